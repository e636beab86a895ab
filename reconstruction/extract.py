"""Meshes from a (learned) signed distance function, evaluated densely or coarse to fine.

A network SDF is costly per point and a 128^3 grid is two million points, yet marching cubes only
needs exact values in the cells the surface passes through; everywhere else the sign is all that
matters. Coarse to fine evaluates a coarse grid, then at each doubling of the resolution evaluates
only the fine points inside coarse cells near the surface and fills the rest by
trilinear interpolation of the coarser level. No maintained library does this octree-style
refinement for an arbitrary point function (scikit-image only meshes a finished grid), so it is
written here; marching cubes itself is ``occmllm.meshing``.

Grid levels. The final grid has exactly ``resolution`` samples per axis, any ``resolution >= 2``.
Coarser levels halve the number of cells, rounding up, ``s -> ceil((s - 1) / 2) + 1`` samples
(129 -> 65 -> 33, 128 -> 65 -> 33), for as long as the halved level keeps at least ``coarse``
samples. When a level has exactly twice the cells of the one below it (sizes ``m * 2^k + 1``,
such as 129) the grids nest and the fine level reuses the values already evaluated at the shared
points; otherwise (such as 128 over 65) the fine level is interpolated from the coarse one at its
own positions and nothing is reused, which costs about 1/8 more evaluations at that level.

Safety margin. A coarse cell is refined when its corner values change sign or the smallest
``|value|`` at its corners is below ``margin_factor`` times the cell diagonal. For an exact
distance function any cell the surface crosses has all its corners within one diagonal of it, so
a factor of 1 is exact, and a factor ``m`` also tolerates a field whose slope reaches ``m`` (one
that overstates distances by up to ``m`` times; one that understates them only refines more than
needed). Outside the refined region the interpolated values keep their sign and stay farther from
zero than the next level's margin, so marching cubes finds no surface there, and inside it every
fine cell has exactly evaluated corners: the mesh is the dense grid's mesh. The margin matters
only for a surface that passes through a coarse cell without changing the sign of any of its
corners; a crossing that does is refined whatever the slope.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import trimesh

from occmllm.meshing import grid_axes, grid_points, mesh_from_sdf_grid

SdfFn = Callable[[np.ndarray], np.ndarray]
MODES = ("dense", "coarse_to_fine")


def extract_mesh(sdf_fn: SdfFn, lo, hi, resolution: int = 128, mode: str = "coarse_to_fine", coarse: int = 32,
                 chunk: int = 65536, margin_factor: float = 1.5) -> tuple[trimesh.Trimesh, int]:
    """Mesh of ``sdf_fn``'s zero level set (negative inside) in the box [lo, hi] on a grid of
    ``resolution`` samples per axis, and the number of points at which ``sdf_fn`` was evaluated.

    ``sdf_fn`` maps (N, 3) float64 points to (N,) values and is called on at most ``chunk`` points
    at a time. ``mode="dense"`` evaluates every grid point (the reference); ``"coarse_to_fine"``
    (see the module docstring) gives the same mesh for far fewer evaluations. A field that never
    crosses zero on the grid (all outside, or all inside) gives an empty mesh.
    """
    lo, hi = np.asarray(lo, dtype=np.float64).reshape(3), np.asarray(hi, dtype=np.float64).reshape(3)
    if mode not in MODES:
        raise ValueError(f"extract_mesh: mode must be one of {MODES}, got {mode!r}")
    if not np.all(hi > lo):
        raise ValueError(f"extract_mesh: the box must have hi > lo on every axis, got lo={lo}, hi={hi}")
    if int(resolution) < 2 or int(coarse) < 2 or int(chunk) < 1:
        raise ValueError(f"extract_mesh: need resolution >= 2, coarse >= 2 and chunk >= 1, got "
                         f"{resolution}, {coarse}, {chunk}")
    evaluator = _ChunkedEvaluator(sdf_fn, int(chunk))
    if mode == "dense":
        values, spacing = _dense_grid(evaluator, lo, hi, int(resolution))
    else:
        values, spacing = _coarse_to_fine_grid(evaluator, lo, hi, int(resolution), int(coarse), margin_factor)
    if values.min() >= 0.0 or values.max() <= 0.0:
        # no zero crossing: mesh_from_sdf_grid would close an all-inside field at the box border
        return _empty_mesh(), evaluator.count
    return mesh_from_sdf_grid(values, lo, spacing), evaluator.count


def level_sizes(resolution: int, coarse: int = 32) -> list[int]:
    """Samples per axis of each level, coarsest first, ending with ``resolution`` itself."""
    sizes = [int(resolution)]
    while True:
        halved = -(-(sizes[-1] - 1) // 2) + 1  # ceil((s - 1) / 2) + 1
        if halved < coarse or halved >= sizes[-1]:
            break
        sizes.append(halved)
    return sizes[::-1]


class _ChunkedEvaluator:
    """Calls the SDF on bounded batches (a network's memory use grows with the batch) and counts points."""

    def __init__(self, sdf_fn: SdfFn, chunk: int):
        self.sdf_fn, self.chunk, self.count = sdf_fn, chunk, 0

    def __call__(self, points: np.ndarray) -> np.ndarray:
        out = np.empty(len(points), dtype=np.float64)
        for start in range(0, len(points), self.chunk):
            batch = points[start:start + self.chunk]
            values = np.asarray(self.sdf_fn(batch), dtype=np.float64).reshape(-1)
            if len(values) != len(batch):
                raise ValueError(f"extract_mesh: sdf_fn returned {len(values)} values for {len(batch)} points")
            out[start:start + len(batch)] = values
        self.count += len(points)
        return out


def _empty_mesh() -> trimesh.Trimesh:
    return trimesh.Trimesh(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), process=False)


def _dense_grid(evaluate: _ChunkedEvaluator, lo: np.ndarray, hi: np.ndarray, size: int):
    points, spacing = grid_points(lo, hi, (size,) * 3)
    return evaluate(points).reshape((size,) * 3), spacing


def _coarse_to_fine_grid(evaluate: _ChunkedEvaluator, lo: np.ndarray, hi: np.ndarray, resolution: int,
                         coarse: int, margin_factor: float):
    sizes = level_sizes(resolution, coarse)
    values, spacing = _dense_grid(evaluate, lo, hi, sizes[0])
    exact = np.ones(values.shape, dtype=bool)  # which values came from sdf_fn rather than interpolation
    for coarse_size, fine_size in zip(sizes[:-1], sizes[1:]):
        refine_cells = _cells_near_surface(values, margin_factor * float(np.linalg.norm(spacing)))
        fine_cells = _fine_cells_inside(refine_cells, coarse_size, fine_size)
        to_evaluate = _cell_corners(fine_cells)
        fine_values = _upsample(values, coarse_size, fine_size)
        fine_exact = np.zeros(fine_values.shape, dtype=bool)
        if fine_size - 1 == 2 * (coarse_size - 1):  # nested grids: every other fine point is a coarse point
            fine_values[::2, ::2, ::2] = values
            fine_exact[::2, ::2, ::2] = exact
        to_evaluate &= ~fine_exact
        index = np.nonzero(to_evaluate)
        if len(index[0]):
            axes = grid_axes(lo, hi, (fine_size,) * 3)[0]
            points = np.stack([axes[i][index[i]] for i in range(3)], axis=1)
            fine_values[index] = evaluate(points)
            fine_exact[index] = True
        values, exact = fine_values, fine_exact
        spacing = (hi - lo) / (fine_size - 1)
    return values, spacing


def _cells_near_surface(values: np.ndarray, margin: float) -> np.ndarray:
    """(s-1)^3 mask of cells whose corners change sign or come within ``margin`` of zero."""
    n = values.shape[0] - 1
    corners = [values[a:a + n, b:b + n, c:c + n] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    cell_min = np.minimum.reduce(corners)
    cell_max = np.maximum.reduce(corners)
    closest = np.minimum.reduce([np.abs(c) for c in corners])
    return ((cell_min <= 0.0) & (cell_max >= 0.0)) | (closest < margin)


def _fine_cells_inside(coarse_cells: np.ndarray, coarse_size: int, fine_size: int) -> np.ndarray:
    """Fine-level cell mask: a fine cell is selected when its centre lies in a selected coarse cell."""
    centres = (np.arange(fine_size - 1) + 0.5) / (fine_size - 1)  # in units of the box side
    owner = np.clip(np.floor(centres * (coarse_size - 1)).astype(np.int64), 0, coarse_size - 2)
    return coarse_cells[np.ix_(owner, owner, owner)]


def _cell_corners(cells: np.ndarray) -> np.ndarray:
    """Point mask of every corner of the selected cells ((n+1)^3 from an n^3 cell mask)."""
    n = cells.shape[0]
    points = np.zeros((n + 1,) * 3, dtype=bool)
    for a in (0, 1):
        for b in (0, 1):
            for c in (0, 1):
                points[a:a + n, b:b + n, c:c + n] |= cells
    return points


def _upsample(values: np.ndarray, coarse_size: int, fine_size: int) -> np.ndarray:
    """Trilinear interpolation of a coarse grid at every fine grid position (same box), one axis at a time.

    Trilinear interpolation on a tensor-product grid is linear interpolation along each axis in turn,
    which keeps memory at a few fine grids instead of eight gathers of N points.
    """
    position = np.arange(fine_size) * ((coarse_size - 1) / (fine_size - 1))  # in coarse cell units
    left = np.clip(np.floor(position).astype(np.int64), 0, coarse_size - 2)
    weight = position - left
    out = values
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = fine_size
        w = weight.reshape(shape)
        out = np.take(out, left, axis=axis) * (1.0 - w) + np.take(out, left + 1, axis=axis) * w
    return out
