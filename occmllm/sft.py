"""Supervised fine-tuning of InternVL on conversation records (stages 1, 2 and 4's first phase).

The HF Trainer does the training (single process, torchrun + DeepSpeed ZeRO-1/2/3, checkpoints,
resume); this module supplies the dataset, the collator with InternVL's loss mask and the trainer.
Arguments, freezing, LoRA, saving and the stage command are ``occmllm.stage``'s.

    python -m occmllm.sft --config step1_sft/config.yaml [--flag value ...]
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import InternVLForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

from occmllm import dual, fileio, records
from occmllm.augment import flip_draw, flipped_tiles, hflip
from occmllm.conversation import (IGNORE_INDEX, ConversationEncoder, conversation_key, load_images, pad_batch,
                                  pad_id)
from occmllm.errors import OccError
from occmllm.model import (AnswerLogitsOnly, GroupsByLength, ImageOnlyInternVLProcessor, ResumesInternVL,
                           answer_positions, positions_predicting)
from occmllm.stage import (DataArguments, ModelArguments, SaveProcessor, build_model, check_dual, fit, load_start,
                           stage_commands)

HELD_QUESTIONS = frozenset({"Q1"})  # what keep_first_answer holds: the category, the answer stage 1 teaches


class ConversationDataset(Dataset):
    """Encodes one record per item: images loaded (and flipped), template applied, labels masked.

    With ``cache``, what is encoded is kept by content, so it is made once however many records
    share it and however many epochs read it: an image's tiles by the image file (records that
    show the same view, and copies of a record, decode it once), a conversation's tokens and labels
    by its turns and its images' tiles, a render's tiles by the render file. Later reads only flip
    the tiles where augmentation asks for it (a flip commutes with resizing and normalising; an
    image cut into several tiles is encoded again, since its tiles would also change places).
    Without a cache, image decoding and preprocessing are a large share of a stage-1 step on the
    demo model (benchmarks/RESULTS.md, "2026-11-23, 2-core CPU").

    Renders (the dual visual path, ``occmllm.dual``): a record with a ``render`` (a path under the
    image root, ``records.render_of``) has its image's visual tokens blended with that render's;
    with ``renders`` (a folder under the image root) every record without one has
    ``<renders>/<record id>.png``. Such an item also has ``render_pixel_values``: the render, resized
    to its image's size and tiled and processed like it, flipped with it. A record with a render
    must have exactly one image; both are checked here, before training. Records without a render
    (only where ``renders`` is None) stay plain.

    ``held_questions`` (``keep_first_answer``): each item also has ``held``, True on the tokens of
    the trained answers to those questions (``ConversationEncoder.answers_to``)."""

    def __init__(self, items: list[tuple[Path, dict]], encoder: ConversationEncoder, augment_images: bool = False,
                 seed: int = 0, cache: bool = False, renders: str | None = None,
                 held_questions: frozenset[str] | None = None):
        self.items, self.encoder, self.augment, self.seed = items, encoder, augment_images, seed
        self.epoch = 0
        self.cache = cache
        self._images: dict[tuple, tuple[torch.Tensor, list[int]]] = {}  # image paths -> (pixels, tiles per image)
        self._tokens: dict[tuple, tuple[list[int], list[int]]] = {}     # (tiles, turns) -> (input ids, labels)
        self._renders: dict[Path, torch.Tensor] = {}                     # render file -> its tiles' pixels
        self._held: dict[tuple, list[bool]] = {}                         # (tiles, turns) -> held tokens
        self.held_questions = held_questions
        self.renders = renders
        self._render_paths = [self._find_render(index) for index in range(len(items))]

    @property
    def has_renders(self) -> bool:
        return any(path is not None for path in self._render_paths)

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> list[int]:
        """Each item's token count, image tokens included, from its images' sizes (file headers, no
        pixels decoded) and its conversation: what ``group_by_length`` batches by
        (``occmllm.model.GroupsByLength``)."""
        image_processor = self.encoder.processor.image_processor

        def tiles(path: Path) -> int:
            width, height = fileio.image_size(path)
            return image_processor.get_number_of_image_patches(height, width)
        return [len(self._token_ids(index, [tiles(p) for p in self._image_paths(index)])[0])
                for index in range(len(self))]

    def _image_paths(self, index: int) -> tuple[Path, ...]:
        root, rec = self.items[index]
        return tuple(fileio.resolve_in_root(root, p, rec["id"]) for p in records.images_of(rec))

    def _tiled(self, index: int, flip: bool) -> tuple[torch.Tensor, list[int]]:
        images = load_images(self._image_paths(index), f"record {self.items[index][1]['id']}")
        return self.encoder.pixel_values([hflip(im) for im in images] if flip else images)

    def _find_render(self, index: int) -> Path | None:
        """The record's render file, or None for a plain record; a one-line error for a record with
        a render but not exactly one image, or whose render is missing."""
        root, rec = self.items[index]
        relative = records.render_of(rec)
        if relative is None and self.renders is not None:
            relative = records.render_path(self.renders, rec["id"])
        if relative is None:
            return None
        images = records.images_of(rec)
        if len(images) != 1:
            raise OccError(f"record {rec['id']}: {len(images)} images; the dual visual path blends one image with "
                           "its render")
        path = fileio.resolve_in_root(root, relative, f"record {rec['id']}")
        if not path.is_file():
            raise OccError(f"record {rec['id']}: no render at {path} (make the renders: python -m data_tools.renders "
                           "--data ROOT --out RENDERS, or python -m reconstruction.reconstruct; or set --dual_renders)")
        return path

    def _encode_render(self, index: int, flip: bool) -> torch.Tensor:
        """Tiles of the record's render, at its image's size (so both are cut into the same tiles)."""
        render, = load_images([self._render_paths[index]], f"record {self.items[index][1]['id']}")
        render = dual.render_at(render, fileio.image_size(self._image_paths(index)[0]))  # header only
        if flip:
            render = hflip(render)
        return self.encoder.pixel_values([render])[0]

    def _render_pixels(self, index: int, flip: bool) -> torch.Tensor:
        if not self.cache:
            return self._encode_render(index, flip)
        path = self._render_paths[index]
        if path not in self._renders:
            self._renders[path] = self._encode_render(index, False)
        pixels = self._renders[path]
        return flipped_tiles(pixels, 1, lambda: self._encode_render(index, True)) if flip else pixels

    def _pixels(self, index: int, flip: bool) -> tuple[torch.Tensor, list[int]]:
        if not self.cache:
            return self._tiled(index, flip)
        key = self._image_paths(index)
        if key not in self._images:
            self._images[key] = self._tiled(index, False)
        pixels, tiles = self._images[key]
        return (flipped_tiles(pixels, len(tiles), lambda: self._tiled(index, True)[0]) if flip else pixels), tiles

    def _token_ids(self, index: int, tiles: list[int]) -> tuple[list[int], list[int]]:
        turns = self.items[index][1]["conversations"]
        if not self.cache:
            return self.encoder.tokens(tiles, turns)
        key = conversation_key(tiles, turns)
        if key not in self._tokens:
            self._tokens[key] = self.encoder.tokens(tiles, turns)
        return self._tokens[key]

    def _held_tokens(self, index: int, tiles: list[int]) -> list[bool]:
        turns = self.items[index][1]["conversations"]
        key = conversation_key(tiles, turns)
        if key not in self._held:  # always remembered: a few bytes a conversation
            self._held[key] = self.encoder.answers_to(tiles, turns, self.held_questions)
        return self._held[key]

    def __getitem__(self, index: int) -> dict:
        flip = self.augment and flip_draw(np.random.default_rng([self.seed, self.epoch, index]))
        pixels, tiles = self._pixels(index, flip)
        input_ids, labels = self._token_ids(index, tiles)
        item = {"input_ids": input_ids, "labels": labels, "pixel_values": pixels}
        if self.held_questions is not None:
            item["held"] = self._held_tokens(index, tiles)
        if self._render_paths[index] is not None:
            item["render_pixel_values"] = self._render_pixels(index, flip)
        return item


@dataclass
class Collator:
    """A training batch: rows padded on the right, or with ``packed`` one row holding every sample
    end to end, without padding. A packed row has no attention mask and position ids that restart
    at each sample, from which transformers builds attention that stays inside each sample (its
    packed-sequence masks); the label of each sample's first token is never supervised (a prompt
    token), so no loss term crosses from one sample into the next. ``use_cache`` is off in every
    batch: training reads no keys and values back; with a cache transformers would not look for
    packed sequences, and compiled layers (``compile_layers``) would be compiled again for each
    layer's place in it. Items with ``held`` tokens (``keep_first_answer``) give a ``held`` mask
    laid out like the labels."""
    pad_token_id: int
    packed: bool = False

    def __call__(self, batch: list[dict]) -> dict:
        if self.packed:
            out = {"input_ids": torch.tensor([t for b in batch for t in b["input_ids"]])[None],
                   "labels": torch.tensor([t for b in batch for t in b["labels"]])[None],
                   "position_ids": torch.cat([torch.arange(len(b["input_ids"])) for b in batch])[None]}
            if "held" in batch[0]:
                out["held"] = torch.tensor([t for b in batch for t in b["held"]])[None]
            if any(b["labels"][0] != IGNORE_INDEX for b in batch):
                raise OccError("a training sample's first token has a label: packed behind another sample it "
                               "would be learnt from that sample's end; train without --packed true")
        else:
            ids, mask = pad_batch([b["input_ids"] for b in batch], self.pad_token_id, "right")
            labels, _ = pad_batch([b["labels"] for b in batch], self.pad_token_id, "right",
                                  value_for_labels=IGNORE_INDEX)
            out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
            if "held" in batch[0]:
                out["held"] = pad_batch([b["held"] for b in batch], False, "right")[0].bool()
        out["use_cache"] = False
        out["pixel_values"] = torch.cat([b["pixel_values"] for b in batch])
        if any("render_pixel_values" in b for b in batch):  # the dual visual path: renders' tiles in the images' order
            out["render_pixel_values"], out["rendered"] = dual.stack_renders(
                [b["pixel_values"] for b in batch], [b.get("render_pixel_values") for b in batch])
        return out


class EpochSetter(TrainerCallback):
    """New augmentation draws every epoch, still deterministic."""

    def __init__(self, dataset: ConversationDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


class KeepsFirstAnswer:
    """Trainer mixin (``keep_first_answer``): with a ``start_model`` (a frozen copy of the checkpoint
    the stage began from), the loss adds ``keep_weight`` x KL(start || model), averaged over the
    batch's ``held`` tokens: the trained answers to Q1, the category (``ConversationDataset``'s
    ``held_questions``). That is learning without forgetting held to the one answer stage 1 taught:
    later stages' refits otherwise move it on views near a boundary, and held at every answer the
    term also holds the later answers that name the category, and costs them; held at each record's
    first trained answer it would hold stage 4's check and plan, which must be learnt
    (benchmarks/RESULTS.md, "Stage 2's Q1 cost")."""
    start_model = None
    keep_weight = 0.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        held = inputs.pop("held", None)
        if self.start_model is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        predicting = positions_predicting(held)
        rows = predicting[answer_positions(inputs["labels"])]  # the model's logits are made at the answers only
        if rows.any():
            prefix = held_prefix(inputs, held, self.start_model.config.image_token_id)
            with torch.no_grad():
                start = self.start_model(**prefix, logits_to_keep=predicting[:, :prefix["input_ids"].shape[1]])
            loss = loss + self.keep_weight * torch.nn.functional.kl_div(
                outputs.logits[rows].float().log_softmax(-1), start.logits.float().log_softmax(-1),
                log_target=True, reduction="batchmean")
        return (loss, outputs) if return_outputs else loss


def held_prefix(inputs: dict, held: torch.Tensor, image_token_id: int) -> dict:
    """The start model's inputs for ``KeepsFirstAnswer``, cut after the batch's last held token
    and last image token. A causal model's logits at a position read only the tokens up to it, so
    the held answers' logits are the same, and the start's forward skips what follows Q1's answer
    (in stage 2's records, Q2-Q5 and their answers); every image token stays, so each image's
    features still have their places."""
    ids = inputs["input_ids"]
    end = int((held | (ids == image_token_id)).any(0).nonzero().max()) + 1
    return {k: v[:, :end] if k in ("input_ids", "attention_mask", "position_ids") else v
            for k, v in inputs.items() if k != "labels"}


def frozen_start(model_args: ModelArguments, model, device: torch.device) -> InternVLForConditionalGeneration:
    """The checkpoint the stage starts from, frozen, for ``KeepsFirstAnswer``. With a frozen tower
    it reads the trained model's (the same weights), so remembered tower outputs serve both."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    if is_deepspeed_zero3_enabled():
        raise OccError("keep_first_answer: DeepSpeed ZeRO-3 would partition the start's copy with no engine to gather "
                       "it; use ZeRO-1/2 or unset keep_first_answer")
    start = load_start(model_args, device)
    start.requires_grad_(False).eval()
    if model_args.freeze_vision:
        trained = next(m for m in model.modules() if isinstance(m, InternVLForConditionalGeneration))
        start.model.vision_tower = trained.model.vision_tower
    return start.to(device)


class ConversationTrainer(KeepsFirstAnswer, GroupsByLength, AnswerLogitsOnly, ResumesInternVL, Trainer):
    """The HF Trainer, resuming InternVL weights correctly (``occmllm.model.ResumesInternVL``), with
    logits made only where the loss reads them (``occmllm.model.AnswerLogitsOnly``) and, with
    ``keep_first_answer``, the start's Q1 answers kept (``KeepsFirstAnswer``); batches grouped by length
    on request (``occmllm.model.GroupsByLength``)."""


class ClampAlpha(TrainerCallback):
    """Projects a learnable alpha back into [0, 1] after each optimizer step, so it never sticks
    outside (where the clamped blend passes it no gradient). Without DeepSpeed only: DeepSpeed
    keeps its own master copy of the weights, and there the blend's clamp alone holds alpha in range."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if isinstance(model, dual.DualVisual) and model.learnable:
            with torch.no_grad():
                model.alpha.clamp_(0.0, 1.0)


class DualTrainer(GroupsByLength, AnswerLogitsOnly, ResumesInternVL, Trainer):
    """The HF Trainer for an ``occmllm.dual.DualVisual``: checkpoints are written by ``dual.save``
    (each one a plain InternVL folder plus ``dual_alpha.json``), resumed by ``dual.load_weights``,
    and alpha has no weight decay (it is a mixing weight, not a weight to shrink)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(ClampAlpha)

    def _dual(self, model=None):
        model = self.accelerator.unwrap_model(model if model is not None else self.model, keep_torch_compile=False)
        return model if isinstance(model, dual.DualVisual) else None

    def get_decay_parameter_names(self, model) -> list[str]:
        return [n for n in super().get_decay_parameter_names(model) if n != "alpha"]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        wrapper = self._dual()
        if wrapper is None:
            return super()._save(output_dir, state_dict)
        from transformers.trainer import TRAINING_ARGS_NAME
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save and not getattr(self, "is_distributed_loading_by_transformers", False):
            return
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
        dual.save(wrapper, output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        wrapper = self._dual(model)
        if wrapper is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dual.load_weights(wrapper, resume_from_checkpoint)


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training: TrainingArguments,
                  keep: Callable[[dict], bool] | None = None, part: str = "records"):
    """The stage's HF Trainer (model, dataset, collator, callbacks) and the processor it saves.
    ``keep``: train only the records it accepts (``part`` names them in the error when none is left)."""
    items = records.load_training_records(data_args.train_data, data_args.data_root)
    if keep is not None:
        items = [(root, rec) for root, rec in items if keep(rec)]
        if not items:
            raise OccError(f"{data_args.train_data}: no {part} to train on")
    if data_args.augment and training.dataloader_num_workers > 0 and training.dataloader_persistent_workers:
        raise OccError("augment draws each epoch's flips from the dataset's epoch, and persistent dataloader workers "
                       "keep their first copy of it: set dataloader_persistent_workers false (workers are then "
                       "started afresh each epoch, with the epoch set)")
    processor = ImageOnlyInternVLProcessor.from_folder(model_args.model_name_or_path)
    encoder = ConversationEncoder(processor, max_length=data_args.max_length)
    is_dual = check_dual(model_args)
    if model_args.keep_first_answer < 0:
        raise OccError(f"keep_first_answer must be 0 or more, got {model_args.keep_first_answer}")
    if model_args.keep_first_answer and is_dual:
        raise OccError("keep_first_answer holds the start's answers, which read no render: unset it or dual_alpha")
    dataset = ConversationDataset(items, encoder, data_args.augment, training.seed, data_args.cache_encoded,
                                  renders=data_args.dual_renders if is_dual else None,
                                  held_questions=HELD_QUESTIONS if model_args.keep_first_answer else None)
    if dataset.has_renders != is_dual:
        raise OccError(f"{data_args.train_data}: records carry renders to blend with their images (the dual visual "
                       "path): set dual_alpha" if dataset.has_renders else
                       f"{data_args.train_data}: dual_alpha is set, but no record names a 'render' and no dual_renders "
                       "folder is given: nothing to blend")
    model = build_model(model_args, training, dual_supported=True)
    trainer_class = DualTrainer if is_dual else ConversationTrainer
    trainer = trainer_class(model=model, args=training, train_dataset=dataset,
                            data_collator=Collator(pad_id(processor.tokenizer), data_args.packed),
                            callbacks=[EpochSetter(dataset), SaveProcessor(processor)])
    if model_args.keep_first_answer:
        trainer.start_model = frozen_start(model_args, model, training.device)
        trainer.keep_weight = model_args.keep_first_answer
    return trainer, processor


def train(model_args: ModelArguments, data_args: DataArguments, training: TrainingArguments,
          keep: Callable[[dict], bool] | None = None, part: str = "records") -> Path:
    trainer, processor = build_trainer(model_args, data_args, training, keep, part)
    return fit(trainer, processor, data_args.resume)


run, main = stage_commands(train, (ModelArguments, DataArguments, TrainingArguments))


if __name__ == "__main__":
    main()
