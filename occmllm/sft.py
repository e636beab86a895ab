"""Supervised fine-tuning of InternVL on conversation records (stages 1, 2 and 4).

The HF Trainer does the training (single process, torchrun + DeepSpeed ZeRO-1/2/3, checkpoints,
resume); this module supplies the dataset, the collator with InternVL's loss mask, freezing,
optional LoRA on the language model (merged into the saved model), and the stage's YAML config.

    python -m occmllm.sft --config step1_sft/config.yaml [--flag value ...]
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import InternVLForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments

from occmllm import dual, records
from occmllm.augment import flip_draw, hflip
from occmllm.config import parse_config
from occmllm.conversation import IGNORE_INDEX, ConversationEncoder, load_images, pad_batch
from occmllm.errors import OccError, cli
from occmllm.model import (AnswerLogitsOnly, ImageOnlyInternVLProcessor, ResumesInternVL, check_checkpoint,
                           checkpoint_dtype, default_attention)
from occmllm.stages import missing_checkpoint_hint, stage_of

LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="outputs/demo/models/tiny",
                                    metadata={"help": "InternVL checkpoint folder (the previous stage's output)"})
    freeze_vision: bool = field(default=False, metadata={"help": "freeze the vision tower"})
    freeze_projector: bool = field(default=False, metadata={"help": "freeze the vision-language projector"})
    freeze_llm: bool = field(default=False, metadata={"help": "freeze the language model (and its head)"})
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the language model's linear layers"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa | flash_attention_2 | eager"})
    dual_alpha: float | None = field(default=None, metadata={
        "help": "OCC-MLLM-Alpha's dual visual path: the image's visual tokens become alpha * image + (1 - alpha) "
                "* render, the render of the record's 3D reconstruction (see dual_renders); alpha in [0, 1]; "
                "unset: off (the plain model)"})
    dual_learnable: bool = field(default=False, metadata={
        "help": "with dual_alpha: train alpha with the model, starting from dual_alpha"})


@dataclass
class DataArguments:
    train_data: str = field(default="outputs/demo/stages/step1_train.jsonl",
                            metadata={"help": "conversation JSONL or InternVL meta JSON (root, annotation, repeat_time)"})
    data_root: str | None = field(default=None, metadata={
        "help": "image root for a JSONL (default: from the JSONL's .meta.json beside it)"})
    max_length: int = field(default=4096, metadata={"help": "longest conversation in tokens"})
    augment: bool = field(default=False, metadata={"help": "random horizontal flips (for models trained from scratch)"})
    cache_encoded: bool = field(default=False, metadata={
        "help": "keep every encoded sample (tokens, labels, pixels) in memory after its first epoch: "
                "no image decoding or preprocessing after that; for datasets that fit in RAM"})
    resume: bool = field(default=False, metadata={"help": "resume from the last checkpoint in output_dir"})
    dual_renders: str = field(default="renders/oracle", metadata={
        "help": "with dual_alpha: folder under the image root holding <record id>.png, the render of each "
                "record's (single) image (python -m data_tools.renders writes oracle renders there)"})


# --- data ------------------------------------------------------------------------------------

def load_training_records(train_data: str | os.PathLike, data_root: str | None = None, kind: str = "conversation",
                          verify_images: bool = False) -> list[tuple[Path, dict]]:
    """``(image root, record)`` pairs from a JSONL or an InternVL meta JSON, with repeat_time applied
    (a fraction keeps that share of the records, deterministically). ``kind`` and
    ``verify_images`` are ``records.read_records``'s."""
    path = Path(train_data)
    if path.suffix == ".json":
        out = []
        for _name, root, annotation, repeat in records.iter_meta(path):
            recs = records.read_records(annotation, kind, root=root, verify_images=verify_images)
            whole, frac = int(repeat), repeat - int(repeat)
            out += [(root, r) for r in recs] * whole + [(root, r) for r in recs[: int(round(frac * len(recs)))]]
        return out
    if data_root is None:
        meta = path.with_name(path.stem + ".meta.json")
        if not meta.is_file():
            raise OccError(f"{path}: no --data_root given and no {meta.name} beside it to say where images are")
        (_name, root, _annotation, _repeat), *_ = records.iter_meta(meta)
    else:
        root = Path(data_root)
    return [(root, r) for r in records.read_records(path, kind, root=root, verify_images=verify_images)]


class ConversationDataset(Dataset):
    """Encodes one record per item: images loaded (and flipped), template applied, labels masked.

    With ``cache``, the first encoding of each record is kept, and later epochs only flip its
    pixel tensor where augmentation asks for it (a flip commutes with resizing and normalising;
    an image cut into several tiles is encoded again, since its tiles would also change places).
    Without a cache, image decoding and preprocessing took about half of a stage-1 step on the
    demo model.

    With ``renders`` (a folder under the image root: the dual visual path, ``occmllm.dual``) each
    item also has ``render_pixel_values``: ``<renders>/<record id>.png``, resized to its image's
    size and tiled and processed like it, flipped with it, and cached beside it. Each record must
    then have exactly one image and a render; both are checked here, before training."""

    def __init__(self, items: list[tuple[Path, dict]], encoder: ConversationEncoder, augment_images: bool = False,
                 seed: int = 0, cache: bool = False, renders: str | None = None):
        self.items, self.encoder, self.augment, self.seed = items, encoder, augment_images, seed
        self.epoch = 0
        self._cache: dict[int, object] | None = {} if cache else None
        self.renders = renders
        self._render_cache: dict[int, torch.Tensor] | None = {} if cache else None
        if renders is not None:
            for index in range(len(items)):
                self._render_path(index)

    def __len__(self) -> int:
        return len(self.items)

    def _encode(self, index: int, flip: bool):
        root, rec = self.items[index]
        paths = [records.fileio.resolve_in_root(root, p, rec["id"]) for p in records.images_of(rec)]
        images = load_images(paths, f"record {rec['id']}")
        if flip:
            images = [hflip(im) for im in images]
        return self.encoder.encode(images, rec["conversations"])

    def _render_path(self, index: int) -> Path:
        """The record's render file; a one-line error for a record without exactly one image or
        without its render."""
        root, rec = self.items[index]
        images = records.images_of(rec)
        if len(images) != 1:
            raise OccError(f"record {rec['id']}: {len(images)} images; the dual visual path (dual_alpha) blends one "
                           "image with its render")
        relative = f"{self.renders.rstrip('/')}/{rec['id']}.png"
        path = records.fileio.resolve_in_root(root, relative, f"record {rec['id']}")
        if not path.is_file():
            raise OccError(f"record {rec['id']}: no render at {path} (the dual visual path needs one per record: "
                           "python -m data_tools.renders --data ROOT --out DUAL_RENDERS, or set --dual_renders)")
        return path

    def _encode_render(self, index: int, flip: bool) -> torch.Tensor:
        """Tiles of the record's render, at its image's size (so both are cut into the same tiles)."""
        root, rec = self.items[index]
        image = records.fileio.resolve_in_root(root, records.images_of(rec)[0], rec["id"])
        path = self._render_path(index)
        render, = load_images([path], f"record {rec['id']}")
        size = records.fileio.image_size(image)  # header only: _encode decodes the image itself
        if render.size != size:
            render = render.resize(size, Image.BICUBIC)
        if flip:
            render = hflip(render)
        return self.encoder.pixel_values([render])[0]

    def _render_pixels(self, index: int, flip: bool) -> torch.Tensor:
        if self._render_cache is None:
            return self._encode_render(index, flip)
        pixels = self._render_cache.get(index)
        if pixels is None:
            pixels = self._render_cache[index] = self._encode_render(index, False)
        return _flipped(pixels, 1, lambda: self._encode_render(index, True)) if flip else pixels

    def __getitem__(self, index: int) -> dict:
        flip = self.augment and flip_draw(np.random.default_rng([self.seed, self.epoch, index]))
        if self._cache is None:
            enc = self._encode(index, flip)
            pixels = enc.pixel_values
        else:
            enc = self._cache.get(index)
            if enc is None:
                enc = self._cache[index] = self._encode(index, False)
            pixels = enc.pixel_values
            if flip:
                pixels = _flipped(pixels, len(records.images_of(self.items[index][1])),
                                  lambda: self._encode(index, True).pixel_values)
        item = {"input_ids": enc.input_ids, "labels": enc.labels, "pixel_values": pixels}
        if self.renders is not None:
            item["render_pixel_values"] = self._render_pixels(index, flip)
        return item


def _flipped(pixels: torch.Tensor, images: int, encode_flipped) -> torch.Tensor:
    """Cached tiles of ``images`` images, flipped: each tile in place when every image is one tile;
    otherwise ``encode_flipped()`` (a flipped image cut into several tiles has them in other places)."""
    return pixels.flip(-1) if len(pixels) == images else encode_flipped()


@dataclass
class Collator:
    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict:
        ids, mask = pad_batch([b["input_ids"] for b in batch], self.pad_token_id, "right")
        labels, _ = pad_batch([b["labels"] for b in batch], self.pad_token_id, "right", value_for_labels=IGNORE_INDEX)
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels,
               "pixel_values": torch.cat([b["pixel_values"] for b in batch])}
        if "render_pixel_values" in batch[0]:  # the dual visual path: renders' tiles in the images' order
            out["render_pixel_values"] = torch.cat([b["render_pixel_values"] for b in batch])
        return out


class EpochSetter(TrainerCallback):
    """New augmentation draws every epoch, still deterministic."""

    def __init__(self, dataset: ConversationDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


class SaveProcessor(TrainerCallback):
    """Every checkpoint folder gets the processor, so each loads by path in inference.py."""

    def __init__(self, processor):
        self.processor = processor

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                self.processor.save_pretrained(folder)


# --- model -----------------------------------------------------------------------------------

def freeze(model: InternVLForConditionalGeneration, vision: bool, projector: bool, llm: bool) -> None:
    parts = [(vision, model.model.vision_tower), (projector, model.model.multi_modal_projector),
             (llm, model.model.language_model), (llm, model.lm_head)]
    for frozen, module in parts:
        if frozen:
            module.requires_grad_(False)


def add_lora(model, args: ModelArguments):
    """LoRA adapters on the language model's attention and MLP projections only."""
    from peft import LoraConfig, get_peft_model
    target = r".*language_model.*\.(" + "|".join(LLM_LINEAR) + r")$"
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=target, bias="none")
    return get_peft_model(model, config)


def init_deepspeed_comm(training: TrainingArguments) -> None:
    """ZeRO-3 partitions weights as they load (``deepspeed.zero.Init``), which needs DeepSpeed's
    process group before the model exists; on CPU the Trainer only creates it later, at
    ``deepspeed.initialize``."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    if training.deepspeed and training.world_size > 1 and is_deepspeed_zero3_enabled():
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() and not training.use_cpu
                                   else "gloo")


def check_dual(args: ModelArguments, supported: bool = True) -> bool:
    """Whether the dual visual path is on; a one-line error for settings it cannot train with."""
    if args.dual_alpha is None:
        if args.dual_learnable:
            raise OccError("dual_learnable trains the dual visual path's alpha: set dual_alpha (its starting value)")
        return False
    if not supported:
        raise OccError("dual_alpha: the dual visual path trains in the SFT stages only (stages 1 and 2); "
                       "unset dual_alpha for this stage")
    dual.check_alpha(args.dual_alpha)
    if args.use_lora:
        raise OccError("use_lora with dual_alpha is not supported: train the dual visual path without LoRA")
    return True


def build_model(args: ModelArguments, training: TrainingArguments, dual_supported: bool = False):
    """The model to train. With ``dual_alpha`` (only where the caller passes ``dual_supported``:
    the SFT stages, whose data carry renders) it is wrapped in ``occmllm.dual.DualVisual``."""
    is_dual = check_dual(args, dual_supported)
    config = check_checkpoint(args.model_name_or_path)
    init_deepspeed_comm(training)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # fp32 weights whatever bf16/fp16 say: the Trainer then computes in half precision under
    # autocast and steps fp32 weights (DeepSpeed keeps its own fp32 master copy). Half-precision
    # weights stepped in half precision lose every update under half a bf16 step: at lr 1e-5 most of
    # a layer's weights never move.
    model = InternVLForConditionalGeneration.from_pretrained(
        args.model_name_or_path, use_safetensors=True, dtype=torch.float32,
        attn_implementation=args.attn_implementation or default_attention(device))
    model.saved_dtype = checkpoint_dtype(config)  # save_final stores the stage in the dtype it started from
    freeze(model, args.freeze_vision, args.freeze_projector, args.freeze_llm)
    if args.use_lora:
        if args.freeze_llm:
            raise OccError("use_lora adapts the language model: it cannot also be frozen (freeze_llm)")
        model = add_lora(model, args)
    if is_dual:
        model = dual.DualVisual(model, args.dual_alpha, learnable=args.dual_learnable)
    if not any(p.requires_grad for p in model.parameters()):
        raise OccError("every part of the model is frozen: nothing to train")
    return model


def is_finished(output_dir: str | os.PathLike) -> bool:
    """Whether a stage finished in ``output_dir``: ``save_final`` writes the processor last, after
    the weights, so its files mark a complete stage checkpoint."""
    return (Path(output_dir) / "processor_config.json").is_file() and (Path(output_dir) / "config.json").is_file()


def save_final(trainer: Trainer, processor, output_dir: str) -> None:
    """The stage's checkpoint: a plain InternVL folder (LoRA merged in) with its processor. With
    the dual visual path, ``occmllm.dual.DualTrainer`` saves it by ``dual.save``: the same folder
    plus ``dual_alpha.json``. Trained in fp32, the weights are stored in the dtype of the checkpoint
    the stage started from (a bf16 InternVL stays bf16: half the size); DeepSpeed saves its own."""
    model = trainer.model
    lora = hasattr(model, "merge_and_unload")
    if lora:
        model = model.merge_and_unload()
    internvl = model.model if isinstance(model, dual.DualVisual) else model
    dtype = getattr(internvl, "saved_dtype", torch.float32)
    if dtype != torch.float32 and not trainer.is_deepspeed_enabled:
        model.to(dtype)  # training is over: nothing steps these weights again
    if not lora:
        trainer.save_model(output_dir)
    elif trainer.args.should_save:
        model.save_pretrained(output_dir)
    if trainer.args.should_save:
        processor.save_pretrained(output_dir)


class StageTrainer(AnswerLogitsOnly, ResumesInternVL, Trainer):
    """The HF Trainer, resuming InternVL weights correctly (``occmllm.model.ResumesInternVL``), with
    logits made only where the loss reads them (``occmllm.model.AnswerLogitsOnly``)."""


def build_trainer(model_args: ModelArguments, data_args: DataArguments, training: TrainingArguments):
    """The stage's HF Trainer (model, dataset, collator, callbacks) and the processor it saves."""
    items = load_training_records(data_args.train_data, data_args.data_root)
    processor = ImageOnlyInternVLProcessor.from_folder(model_args.model_name_or_path)
    encoder = ConversationEncoder(processor, max_length=data_args.max_length)
    is_dual = check_dual(model_args)
    dataset = ConversationDataset(items, encoder, data_args.augment, training.seed, data_args.cache_encoded,
                                  renders=data_args.dual_renders if is_dual else None)
    model = build_model(model_args, training, dual_supported=True)
    trainer_class = dual.DualTrainer if is_dual else StageTrainer
    trainer = trainer_class(model=model, args=training, train_dataset=dataset,
                            data_collator=Collator(processor.tokenizer.pad_token_id),
                            callbacks=[EpochSetter(dataset), SaveProcessor(processor)])
    return trainer, processor


def train(model_args: ModelArguments, data_args: DataArguments, training: TrainingArguments) -> Path:
    trainer, processor = build_trainer(model_args, data_args, training)
    return fit(trainer, processor, data_args.resume)


def fit(trainer: Trainer, processor, resume: bool) -> Path:
    """Train (with ``resume``, from the last checkpoint in output_dir if there is one) and save the
    stage checkpoint there."""
    out = trainer.args.output_dir
    resume = resume and any(Path(out).glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    save_final(trainer, processor, out)
    return Path(out)


def run_stage(train_fn, dataclass_types: tuple, argv=None, default_config: Path | None = None) -> Path:
    """A stage's command: its config and flags parsed into ``dataclass_types`` (model arguments
    first, training arguments last), its starting checkpoint checked (a missing one names the stage
    that writes it), then ``train_fn(*arguments)``."""
    model_args, *rest = parse_config(dataclass_types, argv, default_config)
    check_checkpoint(model_args.model_name_or_path, missing_checkpoint_hint(stage_of(default_config)))
    out = train_fn(model_args, *rest)
    if rest[-1].should_save:
        print(f"saved the stage checkpoint to {out}")
    close_process_group()
    return out


def close_process_group() -> None:
    """End the distributed run in order, once every rank has finished (never after an error: a rank
    still waiting in a collective would hang the others here).

    A process that exits with its process group alive leaves gloo's worker threads holding work
    objects whose tensors reference Python objects; the interpreter's teardown then races those
    threads and the rank aborts (``terminate called without an active exception``) after its work
    is written. The DeepSpeed engine and the Trainer are garbage by now; collecting them first lets
    their communication handles go before the group does."""
    import gc

    import torch.distributed as dist
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stage_commands(train_fn, dataclass_types: tuple):
    """A stage's ``run(argv, default_config) -> checkpoint folder`` and its command-line ``main``
    (errors as one line), both by ``run_stage``."""
    def run(argv=None, default_config: Path | None = None) -> Path:
        return run_stage(train_fn, dataclass_types, argv, default_config)

    @cli
    def main(argv=None, default_config: Path | None = None) -> int:
        run(argv, default_config)
        return 0

    return run, main


run, main = stage_commands(train, (ModelArguments, DataArguments, TrainingArguments))


if __name__ == "__main__":
    main()
