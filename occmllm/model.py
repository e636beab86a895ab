"""Loading InternVL checkpoints (transformers-native "-hf" layout) with an image-only processor.

Works the same for a downloaded InternVL2.5 / InternVL3 / InternVL3.5 "-hf" folder and for the
tiny offline model of ``occmllm.tiny``. No ``trust_remote_code``.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration, InternVLProcessor

from occmllm.conversation import IGNORE_INDEX
from occmllm.errors import OccError
from occmllm.fileio import read_json

CONVERT_HINT = ("convert it with `python -m occmllm.convert --src FOLDER --out NEW_FOLDER`, or download "
                "the '-hf' release (e.g. OpenGVLab/InternVL3-1B-hf)")


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL's processor without the video slot.

    The stock processor builds a video processor, which needs torchvision; this recipe only
    feeds images, and torchvision cannot sit beside CPU torch here. Tiling is
    GotOcr2ImageProcessorPil's (dynamic patches up to ``max_patches`` plus a thumbnail). Saved
    folders name the stock class, so they load with ``AutoProcessor`` where torchvision exists.
    """

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length,
                         chat_template=chat_template, **kwargs)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, image_seq_length: int | None = None) -> "ImageOnlyInternVLProcessor":
        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = GotOcr2ImageProcessorPil.from_pretrained(path)
        if image_seq_length is None:
            cfg = path / "processor_config.json"
            image_seq_length = read_json(cfg).get("image_seq_length", 256) if cfg.is_file() else 256
        return cls(image_processor, tokenizer, image_seq_length=image_seq_length,
                   chat_template=getattr(tokenizer, "chat_template", None))

    def save_pretrained(self, save_directory, **kwargs):
        out = super().save_pretrained(save_directory, **kwargs)
        for name in ("processor_config.json", "tokenizer_config.json"):
            cfg = Path(save_directory) / name
            if cfg.is_file():
                data = json.loads(cfg.read_text())
                if "processor_class" in data:
                    data["processor_class"] = "InternVLProcessor"
                    cfg.write_text(json.dumps(data, indent=2) + "\n")
        return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them: a fast, sentencepiece or BPE tokenizer


def check_checkpoint(path: str | os.PathLike, missing_hint: str | None = None) -> dict:
    """The folder's config if it is a transformers-native InternVL checkpoint; a clear error if not.
    ``missing_hint`` is added to the error for a folder that does not exist (e.g. which stage
    writes it: ``occmllm.stage.missing_checkpoint_hint``)."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise OccError(f"{path}: checkpoint folder not found" + (f"; {missing_hint}" if missing_hint else ""))
    if not config_file.is_file():
        raise OccError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise OccError(f"{config_file}: expected a JSON object (a model config); re-save the checkpoint")
    model_type = config.get("model_type")
    if model_type == "internvl":
        if not any((path / name).is_file() for name in TOKENIZER_FILES):
            raise OccError(f"{path}: no tokenizer files ({' or '.join(TOKENIZER_FILES)}); copy them from the "
                           "checkpoint it was trained from")
        return config
    if model_type == "internvl_chat" or "InternVLChatModel" in json.dumps(config.get("auto_map", {})):
        raise OccError(f"{path}: InternVL checkpoint in the original remote-code layout (InternVLChatModel); "
                       + CONVERT_HINT)
    raise OccError(f"{path}: not an InternVL checkpoint (model_type {model_type!r}); "
                   "expected a transformers InternVLForConditionalGeneration folder")


def checkpoint_dtype(config: dict) -> torch.dtype:
    """The dtype a checkpoint's config says its weights are stored in (``dtype``, or the older
    ``torch_dtype``, at the top or in ``text_config``); fp32 when it says none."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_model(tensor: torch.Tensor, model) -> torch.Tensor:
    """``tensor`` on ``model``'s device in its dtype (``model``: a model, or a tensor to match), cast
    there: ``.to(device, dtype)`` in one call casts on the host before a blocking copy (PyTorch's
    CUDA copy kernel does so to spare device memory), which for a batch of 32 image tiles at 448 px
    is 19 million values cast by the process that feeds the GPU."""
    return tensor.to(model.device).to(model.dtype)


def default_attention(device: torch.device) -> str:
    """flash-attention 2 on a GPU where it is installed, PyTorch SDPA otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_model(path: str | os.PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               attention: str | None = None) -> tuple[InternVLForConditionalGeneration, ImageOnlyInternVLProcessor]:
    """Model (eval mode, on ``device``) and processor from a checkpoint folder. Defaults: the GPU
    if there is one, bf16 there and fp32 on CPU."""
    check_checkpoint(path)
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = InternVLForConditionalGeneration.from_pretrained(
        path, use_safetensors=True, dtype=dtype, attn_implementation=attention or default_attention(device))
    model.to(device).eval()
    return model, ImageOnlyInternVLProcessor.from_folder(path)


def load_weights_into(model: InternVLForConditionalGeneration, checkpoint: str | os.PathLike) -> None:
    """Load a checkpoint folder's weights into an existing model, as ``from_pretrained`` reads them.

    transformers writes InternVL's weights under the original hub key names
    (``language_model.model.*``, ``vision_tower.*``) and maps them back only in ``from_pretrained``;
    the HF Trainer's resume loads the raw file with ``load_state_dict(strict=False)``, matches no key
    and leaves every weight at its start while restoring the optimizer and the step."""
    saved = type(model).from_pretrained(checkpoint, dtype=model.dtype, use_safetensors=True)
    model.load_state_dict(saved.state_dict())


class ResumesInternVL:
    """Trainer mixin: resuming from a checkpoint loads an InternVL model's weights by
    ``load_weights_into`` (the Trainer's own loader for everything else: LoRA adapters, DeepSpeed)."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = model if model is not None else self.model
        if isinstance(target, InternVLForConditionalGeneration) and (
                Path(resume_from_checkpoint) / "model.safetensors").is_file():
            return load_weights_into(target, resume_from_checkpoint)
        return super()._load_from_checkpoint(resume_from_checkpoint, model)


class GroupsByLength:
    """Trainer mixin: with ``--train_sampling_strategy group_by_length`` each batch gathers samples of
    about one length (transformers' ``LengthGroupedSampler``: sorted within random groups of 50
    batches), so batches of dynamic tiles carry little padding. The lengths come from the dataset's
    ``lengths()``, which reads no pixels; the Trainer's own fallback would encode every sample,
    images included, before the first step."""

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            from transformers.trainer_pt_utils import LengthGroupedSampler
            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=dataset.lengths())
        return super()._get_train_sampler(train_dataset)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: the positions whose next token is a label, the only logits a causal
    language-model loss reads."""
    return positions_predicting(labels != IGNORE_INDEX)


def positions_predicting(tokens: torch.Tensor) -> torch.Tensor:
    """(batch, length) bool: the positions whose logits predict a token that ``tokens`` (a
    (batch, length) bool mask over the sequence) marks."""
    keep = torch.zeros_like(tokens, dtype=torch.bool)
    keep[:, :-1] = tokens[:, 1:]
    return keep


def answer_token_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``: fp32 cross-entropy, summed over
    ``num_items_in_batch`` when given, else the mean) on logits made at ``answer_positions`` only:
    ``outputs.logits`` is (positions kept, vocabulary), in the mask's row-major order."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    targets = labels[:, 1:][answer_positions(labels)[:, :-1]]
    return ForCausalLMLoss(outputs.logits, None, outputs.logits.shape[-1], num_items_in_batch, shift_labels=targets)


class AnswerLogitsOnly:
    """Trainer mixin: the output head runs only where the loss reads it (``answer_positions``: the
    answers, a few percent of a sequence that holds 256 image tokens a tile), not at every position,
    and the loss is ``answer_token_loss``, the same cross-entropy. With a real vocabulary (151,674
    rows) the full logits are the largest tensor of a step. The Trainer's own handling of
    ``num_items_in_batch`` (gradient accumulation, token averaging across devices) is unchanged: it
    treats ``answer_token_loss`` as its ``compute_loss_func``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("compute_loss_func", answer_token_loss)
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" in inputs and self.compute_loss_func is answer_token_loss:
            inputs = {**inputs, "logits_to_keep": answer_positions(inputs["labels"])}
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
