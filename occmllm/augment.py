"""Image augmentation for training small models from scratch (off by default).

A random crop (75-100% of the side), a horizontal flip, and a hue rotation: the category must
come from the shape, and hue changes keep the model from leaning on colour.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    scale = rng.uniform(0.75, 1.0)
    cw, ch = int(w * scale), int(h * scale)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    hsv = np.asarray(image.convert("HSV")).copy()
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + int(rng.integers(0, 256))) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")
