"""Horizontal flips: training's augmentation (off by default), and the chain's mirrored second look
(``occmllm.modes``) at inference.

Random crops and hue rotations were tried on SynthOcc with the tiny model and only slowed learning
(colours are random already and a crop can cut the object).
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def flip_draw(rng: np.random.Generator) -> bool:
    """Whether to flip: a fair coin."""
    return bool(rng.random() < 0.5)


def hflip(image: Image.Image) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT)


def flipped_tiles(pixels: torch.Tensor, images: int, encode_flipped) -> torch.Tensor:
    """The tiles of ``images`` images, each image flipped: each tile in place when every image is
    one tile; otherwise ``encode_flipped()`` (a flipped image cut into several tiles has them in
    other places)."""
    return pixels.flip(-1) if len(pixels) == images else encode_flipped()
