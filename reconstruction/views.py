"""One view's inputs to the reconstruction model, and the frame the object is reconstructed in.

The model reads an RGB image, the object's visible mask, the hand mask and the scene depth (a
SynthOcc view has all four; a real image needs a hand-object segmentation and a depth map). It
reconstructs in the input camera's frame (OpenCV axes, metres), inside a cube centred just
behind the visible part of the object, so the prediction is metric and needs no alignment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from occmllm import fileio
from occmllm.dataset import resolve_in_roots
from occmllm.errors import OccError
from occmllm.render import Camera

CUBE_HALF = 0.18      # m: half the side of the reconstruction cube (objects are 5-25 cm long)
CENTRE_BEHIND = 0.03  # m: the cube centre sits this far behind the visible surface, along the ray
MIN_PIXELS = 8        # fewer visible-object pixels than this: anchor on the hand instead
HAND_POINTS = 256     # hand surface points kept for the hand features

REQUIRED_FIELDS = ("image", "mask_visible", "mask_hand", "depth", "intrinsics", "world_to_cam")


@dataclass
class ViewInput:
    """What the model may see of one view (no ground truth)."""
    id: str
    rgb: np.ndarray          # (H, W, 3) uint8, with the hand
    visible: np.ndarray      # (H, W) bool: object pixels the hand does not cover
    hand: np.ndarray         # (H, W) bool
    depth: np.ndarray        # (H, W) float32 metres, camera z of the scene; 0 where nothing was hit
    camera: Camera

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[0], self.rgb.shape[1]


def backproject(mask: np.ndarray, depth: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Camera-frame points (N, 3) of the pixels of ``mask`` that have a depth."""
    v, u = np.nonzero(mask & (depth > 0))
    z = depth[v, u].astype(np.float64)
    pix = np.stack([(u + 0.5) * z, (v + 0.5) * z, z], axis=1)
    return pix @ np.linalg.inv(intrinsics).T


def cube_centre(view: ViewInput) -> np.ndarray:
    """Centre of the reconstruction cube in camera coordinates: the median of the visible object
    points (or of the hand points when the hand hides almost all of it), pushed back along the ray."""
    K = view.camera.intrinsics
    points = backproject(view.visible, view.depth, K)
    if len(points) < MIN_PIXELS:
        points = backproject(view.hand, view.depth, K)
    if len(points) == 0:
        raise OccError(f"view {view.id}: neither the object nor the hand has a depth; cannot place the object")
    anchor = np.median(points, axis=0)
    return anchor + CENTRE_BEHIND * anchor / np.linalg.norm(anchor)


def hand_points(view: ViewInput, count: int = HAND_POINTS) -> np.ndarray:
    """Up to ``count`` camera-frame points on the visible hand surface, evenly strided (deterministic)."""
    points = backproject(view.hand, view.depth, view.camera.intrinsics)
    if len(points) > count:
        points = points[np.linspace(0, len(points) - 1, count).round().astype(int)]
    return points


def _image(root, rel: str, mode: str, context: str) -> np.ndarray:
    path = resolve_in_roots(root, rel, context)
    if not path.is_file():
        where = " or ".join(map(str, [root] if isinstance(root, (str, os.PathLike)) else root))
        raise OccError(f"{context}: image {rel!r} not found under {where}")
    return np.asarray(fileio.read_image(path, f"{context}: image {rel!r}", mode if mode != "I" else None))


def load_view(root, line: dict, depth_scale: float, context: str = "") -> ViewInput:
    """A manifest line's view, its files under ``root`` (a path, or a dataset's ``roots``). Masks
    and depth are required: the model places the object and the hand from them."""
    context = context or f"view {line.get('id')!r}"
    missing = [k for k in REQUIRED_FIELDS if k not in line]
    if missing:
        raise OccError(f"{context}: lacks {', '.join(missing)}; the reconstruction model needs the hand mask, "
                       "the object's visible mask and depth (SynthOcc's manifest, or one from data_tools.obman / "
                       "data_tools.dexycb --root)")
    rgb = _image(root, line["image"], "RGB", context)
    visible = _image(root, line["mask_visible"], "L", context) > 127
    hand = _image(root, line["mask_hand"], "L", context) > 127
    depth = _image(root, line["depth"], "I", context).astype(np.float32) / depth_scale
    if not (rgb.shape[:2] == visible.shape == hand.shape == depth.shape):
        raise OccError(f"{context}: image, masks and depth differ in size")
    h, w = rgb.shape[:2]
    camera = Camera.from_lists(line["intrinsics"], line["world_to_cam"], w, h)
    return ViewInput(str(line["id"]), rgb, visible, hand, depth, camera)


def to_world(points_cam: np.ndarray, camera: Camera) -> np.ndarray:
    r, t = camera.world_to_cam[:3, :3], camera.world_to_cam[:3, 3]
    return (points_cam - t) @ r


def to_camera(points_world: np.ndarray, camera: Camera) -> np.ndarray:
    r, t = camera.world_to_cam[:3, :3], camera.world_to_cam[:3, 3]
    return points_world @ r.T + t
