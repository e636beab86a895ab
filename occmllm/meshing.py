"""Triangle meshes from signed distance functions (marching cubes on a grid)."""
from __future__ import annotations

import numpy as np
import trimesh
from skimage import measure


def grid_axes(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, int, int]) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """The coordinates along each axis of a grid over the box [lo, hi], and the per-axis spacing."""
    axes = tuple(np.linspace(lo[i], hi[i], shape[i]) for i in range(3))
    spacing = np.array([(hi[i] - lo[i]) / (shape[i] - 1) for i in range(3)])
    return axes, spacing


def grid_points(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Grid vertices over the box [lo, hi] as (N, 3) points (``ij`` order) and the per-axis spacing."""
    axes, spacing = grid_axes(lo, hi, shape)
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3), spacing


def mesh_from_sdf_grid(values: np.ndarray, lo: np.ndarray, spacing: np.ndarray) -> trimesh.Trimesh:
    """Zero level set of SDF samples on a regular grid; an empty mesh if it never crosses zero.

    The grid border is padded with a positive value so the mesh is closed (watertight) even where
    the surface touches the border.
    """
    pad = float(np.abs(values).max()) + 1.0
    padded = np.pad(values, 1, constant_values=pad)
    if padded.min() >= 0.0 or padded.max() <= 0.0:
        return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)
    verts, faces, _, _ = measure.marching_cubes(padded, level=0.0, spacing=tuple(spacing))
    verts = verts - spacing + lo  # undo the one-cell pad
    # skimage orders faces for a positive-outside field with normals pointing to increasing
    # values, i.e. outwards here; flip to trimesh's counter-clockwise-outward convention.
    return trimesh.Trimesh(verts, faces[:, ::-1], process=False)
