"""OCC-MLLM-Alpha's dual visual path: the image's visual tokens blended with its 3D render's.

    x_v = alpha * x_v1 + (1 - alpha) * x_v2

``x_v1`` are the visual tokens of the RGB image (vision tower, pixel shuffle and projector:
``get_image_features``), ``x_v2`` those of the rendered 3D reconstruction of the same view, made
by the same vision tower, tile by tile (the render is tiled like its image). The blend replaces the
image's tokens before the language model, through ``mm_encoder_outputs``; the text side is
unchanged. alpha = 1 is the plain model exactly, alpha = 0 the plain model shown the render.

A dual checkpoint is a normal InternVL checkpoint folder (loads with ``occmllm.model.load_model``)
plus ``dual_alpha.json``: ``{"alpha": float, "learnable": bool}``.

    dual = DualVisual(model, alpha=0.5, learnable=True)
    out = dual(input_ids, attention_mask, pixel_values=image_tiles, render_pixel_values=render_tiles, labels=...)
    features = dual.features(image_tiles, render_tiles)          # (tiles, image tokens, text hidden)
    save(dual, folder); read_alpha(folder) -> 0.5

Inference (``inference.py --mode dual``, and the chain's second look in ``--mode cot``) blends
with ``blended_features`` on the plain model, as ``DualVisual.features`` does.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import InternVLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from occmllm import fileio
from occmllm.errors import OccError
from occmllm.model import load_weights_into, to_model

ALPHA_FILE = "dual_alpha.json"


def blend(rgb_features: torch.Tensor, render_features: torch.Tensor, alpha) -> torch.Tensor:
    """``alpha * rgb_features + (1 - alpha) * render_features``; ``alpha`` a float or a 0-dim
    tensor. alpha = 1 gives ``rgb_features`` bit for bit (1 * x + 0 * y == x for finite y)."""
    if rgb_features.shape != render_features.shape:
        raise ValueError(f"image features {tuple(rgb_features.shape)} and render features "
                         f"{tuple(render_features.shape)} differ in shape: tile each render like its image")
    return alpha * rgb_features + (1 - alpha) * render_features


def check_alpha(alpha, context: str = "dual_alpha") -> float:
    """``alpha`` as a float in [0, 1], or a one-line OccError."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
            or not 0.0 <= alpha <= 1.0:
        raise OccError(f"{context}: alpha must be a number in [0, 1] (1: the image alone, 0: the render alone), "
                       f"got {alpha!r}")
    return float(alpha)


def blended_features(model, pixel_values: torch.Tensor, render_pixel_values: torch.Tensor, alpha,
                     rendered: torch.Tensor | None = None) -> torch.Tensor:
    """Visual tokens ``(tiles, image tokens, text hidden)`` of an InternVL ``model``, blended with
    the renders' where there are renders: the vision tower runs once over the image tiles and the
    render tiles together. ``rendered`` (bool, one per image tile) marks the tiles that have a
    render, and ``render_pixel_values`` holds those tiles' renders in order (tile ``i`` of a render
    is the render of its image's tile ``i``); the other tiles keep their own tokens. Without
    ``rendered`` every tile has its render."""
    n = pixel_values.shape[0]
    if rendered is None:
        if pixel_values.shape != render_pixel_values.shape:
            raise ValueError(f"pixel_values {tuple(pixel_values.shape)} and render_pixel_values "
                             f"{tuple(render_pixel_values.shape)} differ: each render needs its image's tiles")
    elif rendered.shape != (n,) or int(rendered.sum()) != render_pixel_values.shape[0] \
            or pixel_values.shape[1:] != render_pixel_values.shape[1:]:
        raise ValueError(f"rendered marks {int(rendered.sum())} of {tuple(rendered.shape)} tiles for "
                         f"{tuple(render_pixel_values.shape)} render tiles and {tuple(pixel_values.shape)} image tiles: "
                         "one render tile per marked image tile")
    both = torch.cat([pixel_values, to_model(render_pixel_values, pixel_values)])  # renders may come from the host
    tokens = model.get_image_features(pixel_values=both, return_dict=True).pooler_output
    image, render = tokens[:n], tokens[n:]
    if rendered is None:
        return blend(image, render, alpha)
    index = rendered.to(image.device).nonzero().squeeze(1)
    return image.index_put((index,), blend(image[index], render, alpha))


def render_at(render: Image.Image, size: tuple[int, int]) -> Image.Image:
    """A render at its image's ``size``, so both are cut into the same tiles (the blend is tile by tile)."""
    return render if render.size == size else render.resize(size, Image.BICUBIC)


def stack_renders(pixel_values: list[torch.Tensor], render_pixel_values: list[torch.Tensor | None]
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """For a batch of images (tiles each) of which some have a render: the renders' tiles in order
    (None when none has one), and which image tiles they go with (``rendered``, bool per tile)."""
    renders = [r for r in render_pixel_values if r is not None]
    rendered = torch.cat([torch.full((len(p),), r is not None) for p, r in zip(pixel_values, render_pixel_values)])
    return (torch.cat(renders) if renders else None), rendered


def mm_outputs(features: torch.Tensor) -> dict:
    """Visual tokens in the form ``forward`` and ``generate`` take as ``mm_encoder_outputs``."""
    return {"image": BaseModelOutputWithPooling(pooler_output=features)}


class DualVisual(nn.Module):
    """A native ``InternVLForConditionalGeneration`` (``self.model``) whose image tokens are the
    blend of the image's and its render's. ``alpha`` is an ``nn.Parameter`` when learnable
    (trained with the model; the blend reads it clamped to [0, 1], and ``occmllm.sft.ClampAlpha``
    projects it back after each optimizer step) and a buffer when fixed (not a parameter)."""

    _keys_to_ignore_on_save = None  # read by the HF Trainer after loading a state dict

    def __init__(self, model: InternVLForConditionalGeneration, alpha: float, learnable: bool = False):
        super().__init__()
        self.model = model
        self.learnable = bool(learnable)
        # shape (1,), not 0-dim: DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as
        value = torch.tensor([check_alpha(alpha)], dtype=torch.float32, device=model.device)
        if self.learnable:
            self.alpha = nn.Parameter(value)
        else:
            self.register_buffer("alpha", value)
        # the Trainer passes num_items_in_batch to a model whose forward takes **kwargs; the inner
        # model's forward does, so the loss is normalised as it is without the dual path
        self.accepts_loss_kwargs = getattr(model, "accepts_loss_kwargs", True)

    # -- what the HF Trainer and generation read of a model --------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        return self.model.num_parameters(exclude_embeddings=exclude_embeddings) + self.alpha.numel() * self.learnable

    def activation_checkpointing_enable(self, **kwargs):  # the Trainer's --activation_checkpointing
        return self.model.activation_checkpointing_enable(**kwargs)

    # -- the blend ------------------------------------------------------------------------------
    def effective_alpha(self) -> torch.Tensor:
        """The blend weight as a 0-dim tensor (a learnable one clamped to [0, 1])."""
        alpha = self.alpha.reshape(())
        return alpha.clamp(0.0, 1.0) if self.learnable else alpha

    def alpha_value(self) -> float:
        return float(self.effective_alpha().detach().float().cpu())

    def features(self, pixel_values: torch.Tensor, render_pixel_values: torch.Tensor,
                 rendered: torch.Tensor | None = None) -> torch.Tensor:
        """Blended visual tokens ``(tiles, image tokens, text hidden)`` (``blended_features``)."""
        return blended_features(self.model, pixel_values, render_pixel_values, self.effective_alpha(), rendered)

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, render_pixel_values=None, labels=None,
                rendered=None, **kwargs):
        if render_pixel_values is None:  # no render: the plain model
            return self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                              labels=labels, **kwargs)
        if pixel_values is None:
            raise ValueError("render_pixel_values without pixel_values: the render is blended into its image's tokens")
        features = self.features(pixel_values, render_pixel_values, rendered)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          mm_encoder_outputs=mm_outputs(features), **kwargs)


# --- checkpoints: a normal InternVL folder plus its alpha --------------------------------------

def save(dual: DualVisual, out: str | os.PathLike, state_dict: dict | None = None,
         is_main_process: bool = True) -> Path:
    """Write the inner model with ``save_pretrained(out)`` and ``out/dual_alpha.json``.
    ``state_dict`` (the Trainer's, e.g. gathered by DeepSpeed) holds the wrapper's keys:
    ``model.*`` and ``alpha``."""
    out = Path(out)
    inner, alpha = None, dual.alpha_value()
    if state_dict is not None:
        inner = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        value = state_dict.get("alpha")
        if value is not None and value.numel() == 1:
            alpha = float(value.detach().float().clamp(0.0, 1.0).cpu())
    dual.model.save_pretrained(out, state_dict=inner, is_main_process=is_main_process)
    if is_main_process:
        fileio.write_json(out / ALPHA_FILE, {"alpha": alpha, "learnable": dual.learnable})
    return out


def read_dual(checkpoint: str | os.PathLike) -> dict | None:
    """``{"alpha": float, "learnable": bool}`` from ``checkpoint/dual_alpha.json``; None when the
    folder has no such file (a plain checkpoint)."""
    path = Path(checkpoint) / ALPHA_FILE
    if not path.is_file():
        return None
    expected = 'expected {"alpha": a number in [0, 1], "learnable": true|false}'
    data = fileio.read_json(path)
    if not isinstance(data, dict) or "alpha" not in data:
        raise OccError(f"{path}: malformed dual-path alpha file (no \"alpha\" key); {expected}")
    learnable = data.get("learnable", False)
    if not isinstance(learnable, bool):
        raise OccError(f"{path}: malformed dual-path alpha file (learnable is {learnable!r}); {expected}")
    return {"alpha": check_alpha(data["alpha"], str(path)), "learnable": learnable}


def read_alpha(checkpoint: str | os.PathLike) -> float | None:
    """The checkpoint's blend weight, or None for a plain checkpoint (no ``dual_alpha.json``)."""
    dual = read_dual(checkpoint)
    return None if dual is None else dual["alpha"]


def resolve_alpha(checkpoint: str | os.PathLike, given: float | None = None) -> float:
    """The blend weight to run ``checkpoint`` with: ``given`` when set, else its ``dual_alpha.json``;
    a one-line error for a plain checkpoint without a given alpha."""
    if given is not None:
        return given
    saved = read_alpha(checkpoint)
    if saved is None:
        raise OccError(f"{checkpoint}: no {ALPHA_FILE}, not a dual-path checkpoint (it was not trained on the dual "
                       "path); give an alpha (inference.py --alpha A) to blend with a fixed weight")
    return saved


def load_weights(dual: DualVisual, checkpoint: str | os.PathLike) -> None:
    """Load a dual checkpoint folder (inner weights and alpha) into an existing ``DualVisual``
    (the Trainer's resume)."""
    alpha = read_alpha(checkpoint)
    if alpha is None:
        raise OccError(f"{checkpoint}: no {ALPHA_FILE}; cannot resume the dual visual path from this checkpoint")
    load_weights_into(dual.model, checkpoint)
    with torch.no_grad():
        dual.alpha.fill_(alpha)
