"""From conversation records to model inputs: chat template, image tokens, and the loss mask.

The recipe's records use ``<image>`` placeholders (one image each). Here they become InternVL's
``<img><IMG_CONTEXT>...</img>`` runs, sized by how many tiles the image processor cut the image
into, and the conversation is rendered with the checkpoint's own chat template.

Loss mask (InternVL 2.5's): only assistant turns are supervised, their answer tokens and the
end-of-turn token, never the prompt, the images or the role headers. With ``{% generation %}``
markers in the chat template the tokenizer reports these positions; for a template without them
each assistant turn is found by rendering the prefix with and without that turn.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from occmllm.fileio import read_image
from occmllm.questions import IMAGE_TOKEN, question_id

IGNORE_INDEX = -100


def to_messages(conversations: list[dict]) -> list[dict]:
    """Records' ``{"from": "human"|"gpt", "value"}`` turns as chat-template messages."""
    role = {"human": "user", "gpt": "assistant"}
    return [{"role": role[t["from"]], "content": t["value"]} for t in conversations]


def load_images(paths, context: str | None = None) -> list[Image.Image]:
    """RGB images, decoded by ``fileio.read_image`` (any mode, size-limited, one-line errors that
    start with ``context``, e.g. the record)."""
    return [read_image(p, f"{context}: image {p}" if context else None) for p in paths]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor  # (total tiles, 3, H, W)


PROMPT_CACHE_SIZE = 1 << 16  # prompts remembered before the cache starts again


def conversation_key(images_tiles: list[int], conversations: list[dict]) -> tuple:
    """What a conversation's token ids depend on (its turns and its images' tiles), hashable: the
    key of the caches that encode each conversation once."""
    return tuple(images_tiles), tuple((turn["from"], turn["value"], turn.get("train", True)) for turn in conversations)


class ConversationEncoder:
    """Turns (images, conversation turns) into token ids, labels and pixel values for one model."""

    def __init__(self, processor, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        template = self.tokenizer.chat_template or ""
        self.has_generation_markers = "{% generation %}" in template or "{%- generation %}" in template
        self._prompts: dict[tuple, tuple[int, ...]] = {}  # prompt_ids by content

    # -- images -------------------------------------------------------------------------------
    def pixel_values(self, images: list[Image.Image]) -> tuple[torch.Tensor, list[int]]:
        """Tiles of every image, concatenated, and how many tiles each image gave."""
        out = self.processor.image_processor(images=images, return_tensors="pt")
        pixels = out["pixel_values"]
        num_patches = out.get("num_patches")
        if num_patches is None:  # one tile per image when tiling is off
            num_patches = [1] * len(images)
        return pixels, [int(n) for n in num_patches]

    def image_run(self, tiles: int) -> str:
        p = self.processor
        return p.start_image_token + p.image_token * (p.image_seq_length * tiles) + p.end_image_token

    def expand(self, messages: list[dict], tiles: list[int]) -> list[dict]:
        """Replace each ``<image>`` in order by its image-token run."""
        it = iter(tiles)
        out = []
        for m in messages:
            if m["role"] != "user":  # images are only in the user's turns; answers stay as written
                out.append(m)
                continue
            parts = m["content"].split(IMAGE_TOKEN)
            text = parts[0]
            for part in parts[1:]:
                text += self.image_run(next(it)) + part
            out.append({"role": m["role"], "content": text})
        return out

    # -- training -----------------------------------------------------------------------------
    def _assistant_mask(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if self.has_generation_markers:
            enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            return list(enc["input_ids"]), list(enc["assistant_masks"])
        ids = list(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        mask = [0] * len(ids)
        for k, m in enumerate(messages):
            if m["role"] == "assistant":
                start, end = self._answer_span(messages, ids, k)
                mask[start:end] = [1] * (end - start)
        return ids, mask

    def _answer_span(self, messages: list[dict], ids: list[int], k: int) -> tuple[int, int]:
        """Token range of assistant message ``k``'s answer in ``ids``, its end-of-turn token included."""
        tok = self.tokenizer
        start = len(tok.apply_chat_template(messages[:k], tokenize=True, return_dict=True,
                                            add_generation_prompt=True)["input_ids"])
        end = len(tok.apply_chat_template(messages[: k + 1], tokenize=True, return_dict=True)["input_ids"])
        eot = tok.convert_tokens_to_ids("<|im_end|>")
        while end > start and ids[end - 1] != eot:  # drop the newline after the end-of-turn token
            end -= 1
        return start, end

    def encode(self, images: list[Image.Image], conversations: list[dict]) -> Encoded:
        pixels, tiles = self.pixel_values(images)
        return Encoded(*self.tokens(tiles, conversations), pixels)

    def tokens(self, images_tiles: list[int], conversations: list[dict]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a conversation whose images gave ``images_tiles`` tiles each:
        labels are the ids on assistant tokens and IGNORE_INDEX elsewhere."""
        messages = self.expand(to_messages(conversations), images_tiles)
        ids, mask = self._assistant_mask(messages)
        for k, turn in enumerate(conversations):  # answers kept as context only: no loss
            if turn.get("train", True) is False:
                start, end = self._answer_span(messages, ids, k)
                mask[start:end] = [0] * (end - start)
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
        if self.max_length is not None and len(ids) > self.max_length:
            raise ValueError(f"conversation of {len(ids)} tokens exceeds max_length {self.max_length}")
        return ids, labels

    def answers_to(self, images_tiles: list[int], conversations: list[dict], question_ids: frozenset[str]) -> list[bool]:
        """One flag per token of the ids ``tokens`` gives for the same conversation: True on the
        trained answers (end-of-turn token included) to the questions ``question_ids`` names
        (``occmllm.questions``)."""
        messages = self.expand(to_messages(conversations), images_tiles)
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        marked = [False] * len(ids)
        for k in range(1, len(conversations)):
            asked, turn = conversations[k - 1], conversations[k]
            if (turn["from"] == "gpt" and turn.get("train", True) is not False and asked["from"] == "human"
                    and question_id(asked["value"]) in question_ids):
                start, end = self._answer_span(messages, ids, k)
                marked[start:end] = [True] * (end - start)
        return marked

    # -- generation ---------------------------------------------------------------------------
    def prompt_ids(self, images_tiles: list[int], conversations: list[dict]) -> list[int]:
        """Token ids of a conversation ending with a user turn, plus the assistant header."""
        return self.prompts_ids([(images_tiles, conversations)])[0]

    def prompts_ids(self, prompts: list[tuple[list[int], list[dict]]]) -> list[list[int]]:
        """``prompt_ids`` of each ``(images_tiles, conversations)``.

        Remembered by content: inference asks the same questions over and over (every record's
        first prompt is the same), and the chat template costs more than the model's forward pass
        on a small model. The prompts not remembered are tokenised in one call, which the fast
        tokenizer spreads over the CPU's cores (a batch's later turns, whose histories differ).
        ``apply_chat_template`` tokenises its text the same way, without special tokens added."""
        keys = [conversation_key(tiles, conversations) for tiles, conversations in prompts]
        new = {key: prompt for key, prompt in zip(keys, prompts) if key not in self._prompts}
        if new:
            if len(self._prompts) + len(new) > PROMPT_CACHE_SIZE:
                self._prompts.clear()
            texts = [self.tokenizer.apply_chat_template(self.expand(to_messages(conversations), tiles),
                                                        tokenize=False, add_generation_prompt=True)
                     for tiles, conversations in new.values()]
            for key, ids in zip(new, self.tokenizer(texts, add_special_tokens=False)["input_ids"]):
                self._prompts[key] = tuple(ids)
        return [list(self._prompts[key]) for key in keys]


def pad_id(tokenizer) -> int:
    """The id padding is written with: the pad token, else the end-of-turn token (some tokenizers
    define no pad token; padding is masked out, so any id serves)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def stop_ids(tokenizer, generation_config) -> list[int]:
    """The ids that end a generated answer: the tokenizer's end-of-turn token and any end token the
    checkpoint's generation config adds."""
    extra = getattr(generation_config, "eos_token_id", None)
    extra = extra if isinstance(extra, list) else [extra]
    return list(dict.fromkeys(e for e in [tokenizer.eos_token_id, *extra] if e is not None))


def pad_batch(sequences: list[list[int]], pad_id: int, side: str, value_for_labels: int | None = None):
    """Pad to a rectangle; returns (ids, attention_mask) tensors. ``side`` is "left" for
    generation (so every prompt ends at the last column) and "right" for training."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id if value_for_labels is None else value_for_labels,
                     dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if side == "left":
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
    return ids, mask
