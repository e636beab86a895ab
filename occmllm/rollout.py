"""Sampled chains of thought for the self-correction RL phase (``occmllm.selfcorrect``): the
training views and the chains a policy samples on them, with the exact token ids it wrote.

The chain is ``occmllm.chain``'s, as ``inference.py --mode cot`` runs it: attempt 1 = Q1 with the
image; the check (Q6 after it); where the sampled check says No, the second look = Q1 in a fresh
conversation over the image blended with its reconstruction render (``occmllm.dual.blend``, at the
checkpoint's alpha). A sampled answer's tokens are kept as the policy sampled them (no decode /
re-encode), so the loss scores exactly those tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from occmllm import chain as chain_rules
from occmllm import fileio, records
from occmllm.conversation import ConversationEncoder, load_images, pad_batch, pad_id
from occmllm.dual import blended_features, mm_outputs, render_at, stack_renders
from occmllm.errors import OccError
from occmllm.model import to_model
from occmllm.questions import CATEGORIES, parse_category, parse_yes_no, question_id


# --- views -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """One training image: what the chain may show the model, and the category it is scored on."""
    id: str
    image: Path
    render: Path      # the reconstruction render; the image itself where the view has none
    category: str


def is_check_record(rec: dict) -> bool:
    """A chain's first-answer-and-check record: Q1 over one image, its answer, then Q6."""
    turns = rec["conversations"]
    return (len(turns) >= 4 and question_id(turns[0]["value"]) == "Q1" and question_id(turns[2]["value"]) == "Q6"
            and len(records.images_of(rec)) == 1)


def load_views(train_data, data_root: str | None = None, renders: str | None = None) -> list[View]:
    """Views from a stage JSONL: each check record (``is_check_record``; the second-look, replay and
    plan records are counted, not used). The category comes from ``meta`` or the record's Q1
    answer; the render is ``renders/<id>.png`` under the data root."""
    views, others, no_render = [], 0, 0
    for root, rec in records.load_training_records(train_data, data_root):
        if not is_check_record(rec):
            others += 1
            continue
        turns = rec["conversations"]
        context = f"{train_data} record {rec['id']!r}"
        category = (rec.get("meta") or {}).get("category") or parse_category(turns[1]["value"])
        if category not in CATEGORIES:
            raise OccError(f"{context}: no category to score against (meta.category, or a Q1 answer naming one "
                           f"of {', '.join(CATEGORIES)})")
        image = fileio.resolve_in_root(root, records.images_of(rec)[0], context)
        render = fileio.resolve_in_root(root, records.render_path(renders, rec["id"]), context) if renders else None
        if render is None or not render.is_file():
            no_render += 1
            render = None
        views.append(View(str(rec["id"]), image, render or image, category))
    if not views:
        raise OccError(f"{train_data}: no chain record (Q1, then Q6); self-correction needs stage-4 records "
                       "(python -m step4_selfconsistency.make_data)")
    note = f"self-correction: {len(views)} views from {train_data}"
    if others:
        note += f"; {others} other records (second looks, replay, plans) not used"
    if no_render:
        note += f"; {no_render} views have no render under {renders} and show their own image again on the second look"
    print(note, flush=True)
    return views


# --- rollouts ----------------------------------------------------------------------------------

@dataclass
class Conversation:
    """One conversation a chain's policy wrote into, as token ids."""
    ids: list[int] = field(default_factory=list)      # the tokens, as the policy saw and wrote them
    sampled: list[int] = field(default_factory=list)  # positions in ids of tokens the policy sampled
    first: int = 0                                     # how many of them are attempt 1's
    pixel_values: torch.Tensor | None = None          # tiles of the image it shows
    render_pixel_values: torch.Tensor | None = None   # the second look: its render's tiles, blended with the image's


@dataclass
class Chain:
    """A sampled chain (``occmllm.chain``): the first answer and the check in one conversation; the
    second look, where the check said No., in a conversation of its own."""
    view: View
    check: Conversation = field(default_factory=Conversation)
    second: Conversation | None = None
    answers: list[str] = field(default_factory=list)  # attempt 1, the check's answer, the second look (when taken)

    @property
    def looks_again(self) -> bool:
        """The check said No.: the second look follows (or followed)."""
        return len(self.answers) >= 2 and parse_yes_no(self.answers[1]) is False


class ChainSampler:
    """Samples chains with a policy, batched with left padding, keeping the exact token ids."""

    def __init__(self, processor, alpha: float, max_new_tokens: int = 24, temperature: float = 1.0,
                 eos_ids: list[int] | None = None):
        if temperature <= 0:
            raise OccError(f"rl_temperature must be positive (sampling), got {temperature}")
        self.encoder = ConversationEncoder(processor)
        self.tokenizer = processor.tokenizer
        self.eot = self.tokenizer.eos_token_id
        self.eos_ids = list(dict.fromkeys([self.eot, *(eos_ids or [])]))
        self.pad_id = pad_id(self.tokenizer)
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.alpha = alpha  # the second look's blend weight
        # image tokens are never sampled (a stray one would claim image features that do not exist);
        # the loss takes the same renormalised distribution (sampled_log_probs)
        image_tokens = (processor.image_token, processor.start_image_token, processor.end_image_token,
                        getattr(processor, "video_token", None))
        unk = self.tokenizer.unk_token_id
        self.suppressed = sorted({i for i in (self.tokenizer.convert_tokens_to_ids(t) for t in image_tokens if t)
                                  if i is not None and i != unk})

    def pixels(self, views: list[View]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Tiles of the image and of its render, per view."""
        out = {}
        for v in views:
            image, render = load_images([v.image, v.render])
            render = render_at(render, image.size)
            out[v.id] = (self.encoder.pixel_values([image])[0], self.encoder.pixel_values([render])[0])
        return out

    def continued(self, conversation: Conversation, turns: list[dict], tiles: list[int]) -> list[int]:
        """The prompt for the last of ``turns`` (a user turn): the template's ids of ``turns``, or,
        when the conversation already has ids, those ids followed by only the template's tokens after
        the last answer's end-of-turn token, so every token the policy sampled stays as it was."""
        full = self.encoder.prompt_ids(tiles, turns)
        if not conversation.ids:
            return full
        ends = [i for i, t in enumerate(full) if t == self.eot]
        if len(ends) < 2:
            raise OccError("the chat template does not close user and assistant turns with the end-of-turn token "
                           f"{self.tokenizer.eos_token!r}; self-correction cannot continue a sampled chain")
        return conversation.ids + full[ends[-2] + 1:]

    def generate(self, model, prompts: list[list[int]], convs: list[Conversation]) -> list[list[int]]:
        """Sampled answer tokens per prompt, up to and including the end-of-turn token (none when
        the answer ran out of ``max_new_tokens``)."""
        input_ids, attention_mask = pad_batch(prompts, self.pad_id, "left")  # (n, width)
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                                 **visual_inputs(model, *stacked(convs), self.alpha),
                                 do_sample=True, temperature=self.temperature, top_k=0, top_p=1.0,
                                 repetition_penalty=1.0, num_beams=1, max_new_tokens=self.max_new_tokens,
                                 suppress_tokens=self.suppressed, pad_token_id=self.pad_id, eos_token_id=self.eos_ids)
        answers = []
        for row in out[:, input_ids.shape[1]:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), None)
            answers.append(row[:end] if end is not None else row)
        return answers

    def _turn(self, model, items: list[tuple[Chain, Conversation, list[dict]]], pixels: dict, blended: bool) -> None:
        """One sampled answer for each (chain, conversation, turns up to the question); ``blended``:
        the conversation's image is blended with its render (the second look)."""
        if not items:
            return
        prompts = []
        for c, conv, turns in items:
            image, render = pixels[c.view.id]
            prompts.append(self.continued(conv, turns, [len(image)]))
            conv.pixel_values = image
            conv.render_pixel_values = render if blended else None
        for (c, conv, _), prompt, answer in zip(items, prompts, self.generate(model, prompts, [conv for _, conv, _ in items])):
            conv.sampled += range(len(prompt), len(prompt) + len(answer))
            conv.ids = prompt + answer
            if not answer or answer[-1] not in self.eos_ids:  # cut off: close the turn (not sampled, not trained)
                conv.ids.append(self.eot)
            c.answers.append(self.tokenizer.decode(answer, skip_special_tokens=True).strip())

    def sample(self, model, views: list[View], k: int) -> list[Chain]:
        """K chains per view (view-major: chains[i*k:(i+1)*k] are view i's)."""
        was_training = model.training
        model.eval()
        try:
            pixels = self.pixels(views)
            chains = [Chain(v) for v in views for _ in range(k)]
            self._turn(model, [(c, c.check, chain_rules.first_turns()) for c in chains], pixels, blended=False)
            for c in chains:
                c.check.first = len(c.check.sampled)
            self._turn(model, [(c, c.check, chain_rules.check_turns(c.answers[0])) for c in chains], pixels,
                       blended=False)
            again = [c for c in chains if c.looks_again]
            for c in again:
                c.second = Conversation()
            self._turn(model, [(c, c.second, chain_rules.second_look_turns()) for c in again], pixels, blended=True)
        finally:
            model.train(was_training)
        return chains


def stacked(convs: list[Conversation]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The conversations' image tiles in order, the render tiles of those that have one, and which
    image tiles those are (bool per tile)."""
    renders, rendered = stack_renders([c.pixel_values for c in convs], [c.render_pixel_values for c in convs])
    return torch.cat([c.pixel_values for c in convs]), renders, rendered


def visual_inputs(model, pixel_values: torch.Tensor, render_pixel_values: torch.Tensor | None,
                  rendered: torch.Tensor, alpha: float) -> dict:
    """What an InternVL ``model``'s forward or generate takes for the images: their tiles, or,
    where some are blended with renders, the blended visual tokens (``occmllm.dual``)."""
    pixels = to_model(pixel_values, model)
    if render_pixel_values is None:
        return {"pixel_values": pixels}
    return {"mm_encoder_outputs": mm_outputs(blended_features(model, pixels, render_pixel_values, alpha, rendered))}
