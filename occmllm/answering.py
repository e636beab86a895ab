"""Answering test records: what the model may see of a record, and one checkpoint answering prompts.

A ``Sample`` is a test record stripped to its id, image files and questions: the reference answers
and ``meta`` stay behind, so they cannot reach the model. An ``Answerer`` answers a batch of
``Prompt``s greedily, left padded, stopping at the end of turn; each image goes through the vision
tower once per batch, and every prompt that shows it reuses those features (``mm_encoder_outputs``).

Decoding (``DECODINGS``): ``dynamic`` grows the KV cache token by token and runs every layer's
kernels one by one, each decoding step (a GPU launches hundreds of small kernels per token);
``compiled`` keeps the KV cache in fixed buffers (transformers' ``StaticCache``) and runs each
decoding step as one ``torch.compile`` graph, replayed as a CUDA graph on a GPU (mode
``reduce-overhead``). The graph is compiled once, by ``warm_up``, for any batch size and buffer
length; the buffers of a batch size grow in steps of ``CACHE_STEP`` tokens, only when a prompt
needs it, so few shapes are ever recorded. The answers are the same.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from occmllm import fileio, records
from occmllm.errors import OccError
from occmllm.questions import NO, YES
from occmllm.scoring import turns_of


# --- what the model may see ----------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """A test record stripped to what generation may use: its id, image files and questions."""
    id: str | int
    images: tuple[Path, ...]
    questions: tuple[tuple[str, str, str], ...]  # (key, question id, human turn text) in order, as turns_of

    @property
    def keys(self) -> list[str]:
        return [key for key, _, _ in self.questions]

    @property
    def question_ids(self) -> list[str]:
        return [qid for _, qid, _ in self.questions]


def sample_of(record: dict, root: Path) -> Sample:
    images = tuple(fileio.resolve_in_root(root, rel, f"record {record['id']!r}") for rel in records.images_of(record))
    return Sample(record["id"], images, tuple((t.key, t.qid, t.question) for t in turns_of(record)))


def dataset_root(data: Path, given: Path | None) -> Path:
    """--data-root, else the root named by the InternVL meta JSON beside the test file."""
    if given is not None:
        if not given.is_dir():
            raise OccError(f"--data-root {given}: folder not found")
        return given
    return records.root_from_meta(data, "--data-root")


def load_test(data: Path, root: Path | None, limit: int | None) -> list[dict]:
    """Validated test records (the first ``limit``); with ``root``, every image of them must exist and decode."""
    if not data.is_file():
        raise OccError(f"{data}: test file not found")
    recs = records.read_records(data, "test", root=root)
    recs = recs[:limit] if limit is not None else recs
    if root is not None:
        decoded = set()
        for k, rec in enumerate(recs):
            records.check_images(rec, root, f"{data} record {k + 1} ({rec['id']!r})", decoded)
    return recs


# --- images made ready ahead of the loop ---------------------------------------------------------

def ready_images(encoder, batch: list[Sample], keep_decoded: bool = False) -> dict[Path, tuple]:
    """Every image file of a batch, decoded and tiled once: path -> (pixel tiles, tile count, the
    decoded image where ``keep_decoded``, else None)."""
    return _ready(encoder, list(dict.fromkeys(p for s in batch for p in s.images)), keep_decoded)


def _ready(encoder, paths: list[Path], keep_decoded: bool = False) -> dict[Path, tuple]:
    from occmllm.conversation import load_images
    images = load_images(paths)
    pixels, tiles = encoder.pixel_values(images)
    kept = images if keep_decoded else [None] * len(paths)
    return dict(zip(paths, zip(pixels.split(tiles), tiles, kept)))


class _ReadyBatches:
    """Batch k's ``ready_images`` as item k of a map-style dataset, for a DataLoader's workers; with
    ``renders[k]`` (a ``RenderSettings``), also the batch's reconstruction renders, made in the
    worker (its own reconstruction model on its CPU, once per worker and settings) and tiled."""

    def __init__(self, batches: list[list[Sample]], encoder, renders: list | None = None):
        self.batches, self.encoder = batches, encoder
        self.renders = renders or [None] * len(batches)
        self._caches: dict = {}  # in a worker: settings -> its RenderCache

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[Path, tuple]:
        batch, settings = self.batches[k], self.renders[k]
        ready = ready_images(self.encoder, batch)
        if settings is not None:
            if settings not in self._caches:
                self._caches[settings] = settings.cache(device="cpu")
            ready.update(_ready(self.encoder, self._caches[settings].paths([s.id for s in batch])))
        return ready


def with_ready_images(batches: list[list[Sample]], encoder, workers: int, renders: list | None = None):
    """An iterator of (batch, its images: ``ready_images``), in order, for ``Answerer.ready``.
    With ``workers`` > 0, worker processes make the images of the batches ahead while the main
    process answers, as training's dataloader workers do: the generation loop holds the GIL, so a
    thread could not overlap it (benchmarks/RESULTS.md, "Waiting for data"). They start at once:
    made before the model loads, they fork a small process and have the first batches ready when
    it is loaded. ``renders``, per batch, the ``RenderSettings`` of the modes that blend a
    reconstruction render (or None): the workers also make each of its records' renders, on their
    CPUs, so that the main process finds them made (cot: every record's, also where the gate will
    not look again). With 0 the main process makes each batch's images as the batch is taken, and
    keeps the decoded images for a reader that needs them too (TTA's CLIP judge); renders are made
    where a mode asks for them."""
    if workers == 0:
        return ((batch, ready_images(encoder, batch, keep_decoded=True)) for batch in batches)
    from torch.utils.data import DataLoader
    return zip(batches, iter(DataLoader(_ReadyBatches(batches, encoder, renders), batch_size=None,
                                        num_workers=workers)))


def image_encoder(checkpoint: Path):
    """What ``ready_images`` needs of a checkpoint, without its model: its image processor (and
    tokenizer), as ``occmllm.model.load_model`` loads them."""
    from occmllm.conversation import ConversationEncoder
    from occmllm.model import ImageOnlyInternVLProcessor
    return ConversationEncoder(ImageOnlyInternVLProcessor.from_folder(checkpoint))


# --- batched greedy answers ----------------------------------------------------------------------

@dataclass
class Prompt:
    conversation: list[dict]   # human/gpt turns ending with a human turn
    features: object           # (tiles, image tokens, width): vision features of the images it shows, or None
    tiles: list[int]           # tiles per image


class Dialogue:
    """A batch of conversations asked turn after turn (``occmllm.modes.ask_in_turn``, the chain's
    check after its first answer). A turn's prompt is the last turn's with the model's answer and
    the next question after it, so the ``Answerer`` keeps the keys and values of the last prompt
    and feeds only the new tokens: each turn no longer runs the whole history, image tokens
    included, through the language model again. A turn that does not extend the last one row for
    row (other prompts, a new image, a tokenizer that merges tokens across the turn boundary) is
    prompted whole."""

    def __init__(self):
        self.features: list = []        # the last turn's image features, row by row
        self.ids: list[list[int]] = []  # and its prompts' token ids
        self.input_ids = self.attention_mask = None  # the batch as fed: (rows, width), padding included
        self.cache = None  # its keys and values (and those of the answers generated after it)

    def suffixes(self, prompts: list[Prompt], ids: list[list[int]], image_token: int) -> list[list[int]] | None:
        """Each row's tokens after its last prompt's, or None where a row does not extend its last
        prompt: another conversation, or new image tokens (whose features are not in the cache)."""
        if self.cache is None or len(prompts) != len(self.ids):
            return None
        out = []
        for prompt, features, new, last in zip(prompts, self.features, ids, self.ids):
            if not same_tensor(prompt.features, features) or len(new) <= len(last) or new[: len(last)] != last \
                    or image_token in new[len(last):]:
                return None
            out.append(new[len(last):])
        return out

    def remember(self, prompts: list[Prompt], ids: list[list[int]], input_ids, attention_mask, cache) -> None:
        self.features = [p.features for p in prompts]
        self.ids, self.input_ids, self.attention_mask, self.cache = ids, input_ids, attention_mask, cache


def same_tensor(a, b) -> bool:
    """Whether ``a`` and ``b`` are the same values in the same memory (a row's features sliced anew
    each turn), or both None."""
    if a is None or b is None:
        return a is b
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape


def rewound(cache, length: int):
    """``cache`` cut back to its first ``length`` positions, in place (a static cache keeps its
    buffers, whose later positions are overwritten before anything attends to them)."""
    from transformers import StaticCache
    if isinstance(cache, StaticCache):
        for layer in cache.layers:
            layer.cumulative_length.fill_(length)
    elif cache.get_seq_length() > length:
        cache.crop(length - cache.get_seq_length())
    return cache


def without_cudnn_attention():
    """A context in which scaled-dot-product attention may use any kernel but cuDNN's; outside
    it the process (a training run beside inference) keeps cuDNN's attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([b for b in SDPBackend.__members__.values()
                        if b not in (SDPBackend.CUDNN_ATTENTION, SDPBackend.ERROR)])


DECODINGS = ("dynamic", "compiled", "graphed")
CACHE_STEP = 256  # compiled and graphed decoding: KV buffers grow in steps of this many tokens


class Answerer:
    """One checkpoint: greedy answers for a batch of prompts (left padded, stop at end of turn)."""

    def __init__(self, model, processor, max_new_tokens: int, decoding: str = "dynamic"):
        import torch

        from occmllm.conversation import ConversationEncoder, pad_id, stop_ids
        # cuDNN's attention builds a plan for every new shape, and each decoding step is one
        # (benchmarks/RESULTS.md, "Toward GPU speed without a GPU"); PyTorch's other fused
        # attention kernels take any shape at once
        self._attention = without_cudnn_attention if model.device.type == "cuda" else contextlib.nullcontext
        self.model, self.processor = model, processor
        self.encoder = ConversationEncoder(processor)
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self.pad_id = pad_id(self.tokenizer)
        self.eos_ids = stop_ids(self.tokenizer, model.generation_config)
        if decoding not in DECODINGS:
            raise OccError(f"decoding {decoding!r}: expected one of {', '.join(DECODINGS)}")
        self.decoding = decoding
        self._caches: dict[int, object] = {}  # compiled, graphed: batch size -> its StaticCache
        self.ready: dict[Path, tuple] = {}  # this batch's images made beforehand (with_ready_images), by path
        if decoding == "compiled":
            from transformers import CompileConfig
            # one graph for every batch size and buffer length (dynamic shapes), so that ``warm_up``
            # compiles it for all batches; mode reduce-overhead: replayed as CUDA graphs on a GPU
            self._compile_config = CompileConfig(dynamic=True)
            self._compile_config._compile_all_devices = True  # transformers compiles only on accelerators unasked
        if decoding == "graphed":
            from occmllm.decoding import GraphedDecoder
            self._graphed = GraphedDecoder(model, self.pad_id, self.eos_ids, self._attention)

    def warm_up(self, batch_size: int) -> None:
        """Answer a made-up batch first, so that no real batch waits for one-time set-up: compiled
        decoding's compilation (on ``batch_size`` rows, the run's batches; its graph also takes
        other batch sizes and buffer lengths, except a batch size that equals one of the model's
        own sizes, where the compiler may tie the two), and on a GPU each kernel's first load,
        which made the first batch 3.95x a warm one (benchmarks/RESULTS.md, "The first GPU
        measurements"), and graphed decoding's graphs for ``batch_size`` rows (a decoding step, and
        a turn's new tokens at the commonest width). Dynamic and graphed decoding on a CPU: nothing
        to set up."""
        if self.decoding == "compiled" or self.model.device.type == "cuda":
            self._answer_made_up_batch(batch_size)

    def _answer_made_up_batch(self, batch_size: int) -> None:
        """``warm_up``'s batch, what a record's questioning does: ``batch_size`` blank images through
        the vision tower together, as a real batch's are (one blank tile left the tower's first pass
        at a batch's size, its kernels' set-up and its memory, to the first real batch), a question
        over each, then two more turns continuing it: a short one, and the widest a turn can be, an
        answer of ``max_new_tokens`` tokens and the longest question after it (graphed decoding
        records a graph for each width of new tokens it meets, so a real turn meets none new)."""
        from PIL import Image

        from occmllm.questions import IMAGE_TOKEN, Q1, QUESTIONS, answer_in_history
        encoded = self.encode([self.encoder.pixel_values([Image.new("RGB", (64, 64))])] * batch_size)
        dialogue, conversation = Dialogue(), [{"from": "human", "value": Q1}]
        first = self([Prompt(conversation, features, tiles) for features, tiles in encoded], dialogue)[0]
        filler = self.tokenizer.encode(" mug", add_special_tokens=False)[0]
        longest = max((q for q in QUESTIONS.values() if IMAGE_TOKEN not in q),
                      key=lambda q: len(self.tokenizer.encode(q, add_special_tokens=False)))
        for said, question in ((answer_in_history(first), "What colour is it?"),
                               (self.tokenizer.decode([filler] * self.max_new_tokens), longest)):
            conversation = [*conversation, {"from": "gpt", "value": said}, {"from": "human", "value": question}]
            self([Prompt(conversation, features, tiles) for features, tiles in encoded], dialogue)

    def _static_cache(self, batch: int, need: int):
        """compiled, graphed: this batch size's static KV buffers, reset, grown to the next multiple of
        CACHE_STEP when ``need`` tokens do not fit."""
        from transformers import StaticCache
        cache = self._caches.get(batch)
        if cache is None or cache.get_max_length() < need:
            length = -(-need // CACHE_STEP) * CACHE_STEP
            cache = self._caches[batch] = StaticCache(config=self.model.config.get_text_config(decoder=True),
                                                      max_cache_len=length)
        else:
            cache.reset()
        return cache

    def tiled(self, paths: list, mirrored: bool = False) -> tuple[object, list[int]]:
        """The images' tiles, concatenated, and how many tiles each image gave: from ``ready``
        where the batch's images were made beforehand, else decoded and tiled now. ``mirrored``:
        of the images flipped left to right."""
        from occmllm.augment import flipped_tiles, hflip
        from occmllm.conversation import load_images

        def made_now():
            images = load_images(paths)
            return self.encoder.pixel_values([hflip(image) for image in images] if mirrored else images)
        ready = [self.ready.get(p) for p in paths]
        if paths and None not in ready:
            import torch
            pieces, tiles = [pixels for pixels, _, _ in ready], [tiles for _, tiles, _ in ready]
            pixels = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # one image: no copy of its tiles
            return (flipped_tiles(pixels, len(paths), lambda: made_now()[0]) if mirrored else pixels), tiles
        return made_now()

    def decoded(self, paths: list) -> list:
        """The images themselves (PIL): kept in ``ready`` where the main process made them, else
        decoded now."""
        from occmllm.conversation import load_images
        kept = [self.ready[p][2] if p in self.ready else None for p in paths]
        return kept if None not in kept else load_images(paths)

    def images(self, paths_per_sample: list) -> list[tuple[object, list[int]]]:
        """Per sample, its images' vision features (the vision tower and projector, run once in one
        pass over every tile of the batch) and tiles per image. Each question that shows an image
        reuses them: a record's five questions do not encode its image five times."""
        return self.encode([self.tiled(paths) for paths in paths_per_sample])

    def pixels_on_device(self, tiled: list[tuple[object, list[int]]]):
        """The batch's tiles on the model's device, in its dtype (``occmllm.model.to_model``: cast
        there, not on the host). Each sample's tiles go to the device as they are and are joined
        there: joined on the host, the whole batch (77 MB at 32 tiles of 448 px) was copied once
        more by the process that feeds the GPU."""
        import torch

        from occmllm.model import to_model
        return to_model(torch.cat([p.to(self.model.device) for p, _ in tiled]), self.model)

    @staticmethod
    def _per_sample(features, tiled: list[tuple[object, list[int]]]) -> list[tuple[object, list[int]]]:
        return [(f, tiles) for f, (_, tiles) in zip(features.split([len(p) for p, _ in tiled]), tiled)]

    def encode(self, tiled: list[tuple[object, list[int]]]) -> list[tuple[object, list[int]]]:
        """``images`` for samples already tiled: (pixel tiles, tiles per image) each."""
        import torch
        with torch.inference_mode():
            pixels = self.pixels_on_device(tiled)
            features = self.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        return self._per_sample(features, tiled)

    def encode_dual(self, tiled: list[tuple[object, list[int]]], render_tiled: list[tuple[object, list[int]]],
                    alpha: float) -> list[tuple[object, list[int]]]:
        """``encode`` on the dual visual path: each sample's image features blended with its render's
        (``occmllm.dual.blended_features``, one pass over the images' and the renders' tiles)."""
        import torch

        from occmllm.dual import blended_features
        with torch.inference_mode():
            features = blended_features(self.model, self.pixels_on_device(tiled), self.pixels_on_device(render_tiled),
                                        alpha)
        return self._per_sample(features, tiled)

    def __call__(self, prompts: list[Prompt], dialogue: Dialogue | None = None) -> list[str]:
        """Each prompt's answer. With ``dialogue``, the prompts continue its last turn where they can."""
        import torch
        with torch.inference_mode():
            new, _ = self._generate(prompts, dialogue, self.max_new_tokens)
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _generate(self, prompts: list[Prompt], dialogue: Dialogue | None, max_new_tokens: int,
                  first_logits: bool = False):
        """Greedy generation over a left-padded batch: ``(the new tokens, the logits of the first one
        or None)``, the new tokens padded after each row's stop token.

        Where every prompt extends ``dialogue``'s last one (``Dialogue.suffixes``), only the new
        tokens are fed, after the kept keys and values of the last prompt (the answers generated
        after it are dropped: the history holds them as written). Each row's new tokens are left
        padded among themselves (graphed decoding: to a multiple of ``SUFFIX_STEP``), so padding can
        sit mid-row; the attention mask hides it and the positions, counted over the mask, are
        those of the whole prompt."""
        import torch

        from occmllm.conversation import pad_batch
        from occmllm.decoding import SUFFIX_STEP
        from occmllm.dual import mm_outputs
        device = self.model.device
        static = self.decoding in ("compiled", "graphed")
        ids = self.encoder.prompts_ids([(p.tiles, p.conversation) for p in prompts])
        suffixes = dialogue and dialogue.suffixes(prompts, ids, self.model.config.image_token_id)
        if suffixes:
            new_ids, new_mask = pad_batch(suffixes, self.pad_id, "left")
            if self.decoding == "graphed":  # few widths, few graphs
                wider = -new_ids.shape[1] % SUFFIX_STEP
                new_ids = torch.nn.functional.pad(new_ids, (wider, 0), value=self.pad_id)
                new_mask = torch.nn.functional.pad(new_mask, (wider, 0), value=0)
            if static and dialogue.cache.get_max_length() < (
                    dialogue.input_ids.shape[1] + new_ids.shape[1] + max_new_tokens):
                suffixes = None  # the kept buffers cannot take this turn: prompt it whole, in larger ones
        if suffixes:
            kept = dialogue.input_ids.shape[1]
            input_ids = torch.cat([dialogue.input_ids, new_ids], dim=1)
            attention_mask = torch.cat([dialogue.attention_mask, new_mask], dim=1)
            cache = rewound(dialogue.cache, kept)
            features = []  # the images' tokens are in the kept part
        else:
            kept = 0
            input_ids, attention_mask = pad_batch(ids, self.pad_id, "left")  # prompts end at the right
            features = [p.features for p in prompts if p.features is not None and len(p.features)]
            cache = None
            if static:
                cache = self._static_cache(len(ids), input_ids.shape[1] + max_new_tokens)
            elif dialogue is not None:
                from transformers import DynamicCache
                cache = DynamicCache()
        if dialogue is not None:
            dialogue.remember(prompts, ids, input_ids, attention_mask, cache)
        # tiles in prompt order, matching the image-token runs in input_ids
        features = mm_outputs(torch.cat(features)) if features else None
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        if self.decoding == "graphed":
            return self._graphed(input_ids, attention_mask, cache, kept, max_new_tokens, features, first_logits)
        kwargs = {"max_new_tokens": max_new_tokens}
        if features:
            kwargs["mm_encoder_outputs"] = features
        if cache is not None:
            kwargs["past_key_values"] = cache
        if self.decoding == "compiled":
            kwargs["compile_config"] = self._compile_config
        with self._attention():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                      num_beams=1, pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                                      output_logits=first_logits, return_dict_in_generate=True, **kwargs)
        return out.sequences[:, input_ids.shape[1]:], out.logits[0] if first_logits else None

    def p_no(self, prompts: list[Prompt], dialogue: Dialogue | None = None) -> list[float]:
        """P(``No.``) against ``Yes.`` as each prompt's answer: the two answers' first tokens'
        probabilities at the answer's first position, renormalised over the pair (``dialogue``: as
        in ``__call__``)."""
        import torch
        no, yes = (self.tokenizer.encode(t, add_special_tokens=False)[0] for t in (NO, YES))
        if no == yes:
            raise OccError(f"the tokenizer starts {NO!r} and {YES!r} with the same token; the check cannot be read")
        with torch.inference_mode():
            _, logits = self._generate(prompts, dialogue, 1, first_logits=True)
        pair = logits[:, [no, yes]].float()  # (batch, 2): the raw logits of the first answer token
        return torch.softmax(pair, dim=-1)[:, 0].tolist()
