"""Image augmentation for training small models from scratch (off by default).

A horizontal flip. Random crops and hue rotations were tried on SynthOcc with the tiny model and
only slowed learning (colours are random already and a crop can cut the object).
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image
