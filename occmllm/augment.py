"""Image augmentation for training small models from scratch (off by default).

A horizontal flip. Random crops and hue rotations were tried on SynthOcc with the tiny model and
only slowed learning (colours are random already and a crop can cut the object).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def flip_draw(rng: np.random.Generator) -> bool:
    """Whether to flip: a fair coin."""
    return bool(rng.random() < 0.5)


def hflip(image: Image.Image) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT)

