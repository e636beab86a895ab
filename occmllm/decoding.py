"""Greedy decoding over fixed KV buffers, each pass over kept keys and values replayed as one CUDA
graph on a GPU (``inference.py --decoding graphed``).

Decoding on a GPU is bound by kernel launches: a step of the 1B shape launches about 1,350 small
kernels (benchmarks/RESULTS.md, "The first GPU measurements"). Here each pass that feeds token ids
after the kept keys and values (every decoding step, and a dialogue turn's new tokens, padded to a
multiple of ``SUFFIX_STEP``) is captured once per batch size, width and buffer length, and then
replayed as one launch. A prompt's first pass, which places the image features, runs eagerly. No
compiler is involved, so a capture takes about as long as one eager pass. On a CPU every pass runs
eagerly; the answers are ``generate``'s either way (a test).

The token choice is ``generate``'s greedy one: the argmax, the pad token once a row has ended, and a
row ends at its first stop token. The passes write into buffers that outlive them (the next token,
its position, the rows still going, the first pass's logits), so a replay needs nothing from the
host but the launch.
"""
from __future__ import annotations

import contextlib

import torch

# a kept dialogue's new tokens are left padded to a multiple of this (a turn's answer and the next
# question, about 26 tokens, fit one), so that few widths need a graph
SUFFIX_STEP = 32


class _Batch:
    """One batch size's KV buffers, the buffers the passes read and write, and its graphs by width."""

    def __init__(self, cache, rows: int, vocab: int, device: torch.device):
        self.cache = cache
        length = cache.get_max_length()
        self.mask = torch.ones(rows, length, dtype=torch.long, device=device)  # the prompt's, then ones
        self.token = torch.zeros(rows, 1, dtype=torch.long, device=device)     # the token just chosen
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=device)  # and where it goes
        self.going = torch.ones(rows, dtype=torch.bool, device=device)         # rows not yet ended
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=device)  # a prompt pass's last
        self.graphs: dict[tuple, tuple] = {}  # (width, prompt?) -> (its replay, its input ids, its positions)

    def written(self) -> list[torch.Tensor]:
        """What a pass changes besides the keys and values: each layer's kept length and the
        buffers it writes."""
        return [*(layer.cumulative_length for layer in self.cache.layers), self.token, self.position, self.going,
                self.logits]


class GraphedDecoder:
    """Greedy decoding for one model: ``__call__`` answers a left-padded batch from a static cache."""

    def __init__(self, model, pad_id: int, eos_ids: list[int], attention=contextlib.nullcontext):
        self.model, self.attention = model, attention
        self.device = model.device
        self.graphs_on = self.device.type == "cuda"
        self.pad = torch.tensor(pad_id, device=self.device)
        self.eos = torch.tensor(eos_ids, device=self.device)
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self._batches: dict[int, _Batch] = {}  # rows -> the buffers of that batch size
        self._pool = torch.cuda.graph_pool_handle() if self.graphs_on else None

    def _batch(self, cache, rows: int) -> _Batch:
        """The buffers of a batch of ``rows`` over ``cache`` (a batch size's new, longer cache
        replaces its old buffers and graphs)."""
        batch = self._batches.get(rows)
        if batch is None or batch.cache is not cache:
            batch = self._batches[rows] = _Batch(cache, rows, self.vocab, self.device)
        return batch

    def _pass(self, batch: _Batch, ids: torch.Tensor, positions: torch.Tensor, keep_logits: bool, **extra) -> None:
        """One forward pass over ``ids`` after the kept keys and values, and its greedy choice, all
        written into ``batch``'s buffers (the same ops whether run eagerly or captured)."""
        logits = self.model(input_ids=ids, attention_mask=batch.mask, position_ids=positions,
                            past_key_values=batch.cache, use_cache=True, logits_to_keep=1, **extra).logits[:, -1]
        if keep_logits:
            batch.logits.copy_(logits)
        token = torch.where(batch.going, logits.argmax(-1), self.pad)
        batch.going &= ~torch.isin(token, self.eos)
        batch.token.copy_(token[:, None])
        batch.position.copy_(positions[:, -1:] + 1)

    def _replay(self, batch: _Batch, ids: torch.Tensor, positions: torch.Tensor, prompt: bool) -> None:
        """``_pass`` over ``ids`` (no image features; ``prompt``: a prompt's tokens, whose logits are
        kept, else a decoding step) as a CUDA graph, captured on its shape's first use; eagerly off
        a GPU."""
        if not self.graphs_on:
            return self._pass(batch, ids, positions, keep_logits=prompt)
        key = (ids.shape[1], prompt)
        if key not in batch.graphs:
            self._capture(batch, *key)
        replay, graph_ids, graph_positions = batch.graphs[key]
        if graph_ids is not ids:
            graph_ids.copy_(ids)
            graph_positions.copy_(positions)
        replay()

    def _capture(self, batch: _Batch, width: int, prompt: bool) -> None:
        """Record ``_pass`` at ``width`` as a graph. The warm-up before the capture runs a real pass,
        so what it changes is put back (``_Batch.written``); the keys and values it wrote lie past
        the kept length and are overwritten before anything attends to them."""
        if not prompt:  # a decoding step reads the token and position the last pass wrote
            ids, positions = batch.token, batch.position
        else:
            ids = torch.full((batch.token.shape[0], width), int(self.pad), dtype=torch.long, device=self.device)
            positions = torch.zeros_like(ids)
        kept = [t.clone() for t in batch.written()]
        replay = self._record(lambda: self._pass(batch, ids, positions, keep_logits=prompt))
        for t, saved in zip(batch.written(), kept):
            t.copy_(saved)
        batch.graphs[width, prompt] = (replay, ids, positions)

    def _record(self, work):
        """``work`` warmed up and captured as a CUDA graph: its replay."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # PyTorch's rule: warm up on a side stream before capturing
            work()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            work()
        return graph.replay

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, kept: int,
                 max_new_tokens: int, features: dict | None = None,
                 first_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new tokens of greedy decoding ``(rows, up to max_new_tokens)``, padded after each row's
        stop token, and with ``first_logits`` the logits of the first one ``(rows, vocabulary)``,
        else None.

        ``input_ids`` and ``attention_mask`` are the whole left-padded prompts; ``cache`` holds the
        keys and values of their first ``kept`` columns (0: none, and ``features`` places the image
        tokens). The cache must hold the prompts and ``max_new_tokens`` more."""
        rows, width = input_ids.shape
        if cache.get_max_length() < width + max_new_tokens:
            raise ValueError(f"the cache holds {cache.get_max_length()} tokens; "
                             f"this batch needs {width + max_new_tokens}")
        batch = self._batch(cache, rows)
        with self.attention():
            batch.mask[:, :width].copy_(attention_mask)
            batch.mask[:, width:].fill_(1)  # later keys: masked by causality until written
            positions = attention_mask.cumsum(-1) - 1  # generate's: counted over the mask
            positions = positions.masked_fill(attention_mask == 0, 1)[:, kept:]
            batch.going.fill_(True)
            if kept == 0:
                self._pass(batch, input_ids, positions, keep_logits=True,
                           **({"mm_encoder_outputs": features} if features else {}))
            else:
                self._replay(batch, input_ids[:, kept:], positions, prompt=True)
            tokens = [batch.token.clone()]
            for _ in range(max_new_tokens - 1):
                if not batch.going.any():
                    break
                self._replay(batch, batch.token, batch.position, prompt=False)
                tokens.append(batch.token.clone())
        return torch.cat(tokens, dim=1), batch.logits.clone() if first_logits else None
