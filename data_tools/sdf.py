"""Analytic signed distance functions for SynthOcc shapes.

A shape is a JSON-serialisable list of primitives, each ``{"type": ..., "op": ..., params}``,
folded left to right with ``op`` in {"union", "subtract", "intersect"} (the first primitive's op
is ignored). Every primitive's SDF is exact. Unions are exact outside the shape (the case that
matters for surface metrics and sampling near the surface) and bound the depth inside; the sign
is exact everywhere. Units are metres. Points are ``(N, 3)`` float arrays.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

_AXES = {"x": 0, "y": 1, "z": 2}


def _length(v: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("...i,...i->...", v, v))


def sphere(p, center, radius):
    return _length(p - np.asarray(center)) - radius


def round_box(p, center, half, rounding=0.0, rotation=None):
    """Box with half extents ``half`` and rounded edges; ``rotation`` (3x3, box axes as columns)
    orients it, default axis-aligned."""
    d = p - np.asarray(center)
    if rotation is not None:
        d = d @ np.asarray(rotation)
    q = np.abs(d) - (np.asarray(half) - rounding)
    outside = _length(np.maximum(q, 0.0))
    inside = np.minimum(q.max(axis=1), 0.0)
    return outside + inside - rounding


def cylinder(p, center, radius, half_height, axis="z", rounding=0.0):
    """Capped cylinder along ``axis`` with optionally rounded rims."""
    d = p - np.asarray(center)
    a = _AXES[axis]
    radial = np.sqrt(np.sum(np.delete(d, a, axis=1) ** 2, axis=1))
    q = np.stack([radial - (radius - rounding), np.abs(d[:, a]) - (half_height - rounding)], axis=1)
    return _length(np.maximum(q, 0.0)) + np.minimum(q.max(axis=1), 0.0) - rounding


def capsule(p, a, b, radius):
    """Segment ``a``-``b`` swept by a sphere of ``radius`` (fingers, handles)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pa, ba = p - a, b - a
    h = np.clip((pa @ ba) / max(float(ba @ ba), 1e-12), 0.0, 1.0)
    return _length(pa - h[:, None] * ba) - radius


def cone(p, center, radius_bottom, radius_top, half_height, axis="z"):
    """Capped cone (frustum) along ``axis``; exact (Inigo Quilez's capped cone)."""
    d = p - np.asarray(center)
    a = _AXES[axis]
    qx = np.sqrt(np.sum(np.delete(d, a, axis=1) ** 2, axis=1))
    qy = d[:, a]
    r1, r2, h = radius_bottom, radius_top, half_height
    k1 = np.array([r2, h])
    k2 = np.array([r2 - r1, 2.0 * h])
    cax = qx - np.minimum(qx, np.where(qy < 0.0, r1, r2))
    cay = np.abs(qy) - h
    q = np.stack([qx, qy], axis=1)
    t = np.clip(((k1 - q) @ k2) / float(k2 @ k2), 0.0, 1.0)
    cb = q - k1 + t[:, None] * k2
    s = np.where((cb[:, 0] < 0.0) & (cay < 0.0), -1.0, 1.0)
    return s * np.sqrt(np.minimum(cax**2 + cay**2, np.sum(cb**2, axis=1)))


def half_space(p, normal, offset):
    """Points with ``normal . p > offset`` are outside (normal is unit length)."""
    return p @ np.asarray(normal, dtype=float) - offset


PRIMITIVES: dict[str, Callable[..., np.ndarray]] = {
    "sphere": sphere,
    "round_box": round_box,
    "cylinder": cylinder,
    "capsule": capsule,
    "cone": cone,
    "half_space": half_space,
}


def _params(prim: dict) -> dict:
    return {k: v for k, v in prim.items() if k not in ("type", "op")}


def _fold(op: str, dist: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The shape so far combined with the next primitive's distances ``d``."""
    if op == "union":
        return np.minimum(dist, d)
    if op == "subtract":
        return np.maximum(dist, -d)
    if op == "intersect":
        return np.maximum(dist, d)
    raise ValueError(f"unknown SDF op {op!r}")


def evaluate(shape: list[dict], points: np.ndarray) -> np.ndarray:
    """Signed distance of ``shape`` at ``points`` (negative inside)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    dist = None
    for prim in shape:
        d = PRIMITIVES[prim["type"]](points, **_params(prim))
        dist = d if dist is None else _fold(prim.get("op", "union"), dist, d)
    if dist is None:
        raise ValueError("empty shape")
    return dist


def evaluate_grid(shape: list[dict], axes: tuple[np.ndarray, np.ndarray, np.ndarray], exact_within: float) -> np.ndarray:
    """Signed distance of ``shape`` on the grid ``axes[0] x axes[1] x axes[2]`` (``ij`` order): the
    values of ``evaluate`` wherever they are under ``exact_within`` in size (bit for bit where NumPy
    rounds a point's products alike in any array, as measured on the demo's scenes); elsewhere of
    the right sign and at least that size.

    A primitive that adds or removes material is evaluated only on the block of the grid within
    ``exact_within`` of its bounding box: farther away its distance is at least that, so it cannot
    be a union's minimum (nor, negated, a subtraction's maximum) where the result is smaller.
    Marching cubes reads values only at the corners of cells the surface crosses, all within a cell
    diagonal of it, so the mesh is the same for a fraction of the work: each of the hand's fifteen
    finger capsules fills a small corner of its grid."""
    if not shape:
        raise ValueError("empty shape")
    dist = np.full(tuple(len(a) for a in axes), np.inf)
    for i, prim in enumerate(shape):
        op = "union" if i == 0 else prim.get("op", "union")
        box = primitive_bounds(prim) if op != "intersect" else None
        block = (slice(None),) * 3 if box is None else tuple(
            slice(int(np.searchsorted(a, lo - exact_within, "left")), int(np.searchsorted(a, hi + exact_within, "right")))
            for a, lo, hi in zip(axes, box[0], box[1]))
        sub = [a[s] for a, s in zip(axes, block)]
        if min(len(a) for a in sub) == 0:
            continue
        points = np.stack(np.meshgrid(*sub, indexing="ij"), -1).reshape(-1, 3)
        d = PRIMITIVES[prim["type"]](points, **_params(prim)).reshape(dist[block].shape)
        dist[block] = _fold(op, dist[block], d)
    dist[np.isinf(dist)] = exact_within  # near no primitive: outside, and at least that far
    return dist


def transform_points(points: np.ndarray, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """World -> local: ``R^T (p - t)`` for a pose that maps local to world as ``R x + t``."""
    return (np.asarray(points) - np.asarray(translation)) @ np.asarray(rotation)


def evaluate_posed(shape: list[dict], rotation, translation, points: np.ndarray) -> np.ndarray:
    """SDF of a rigidly posed shape; rigid motions preserve distances."""
    return evaluate(shape, transform_points(points, np.asarray(rotation), np.asarray(translation)))


def scene_sdf(scene: dict, points: np.ndarray, part: str = "object") -> np.ndarray:
    """Exact signed distance (metres) of a SynthOcc scene's object (or hand) at world points
    (``scene``: its ``scene.json``)."""
    pose = np.asarray(scene["object_to_world"])
    return evaluate_posed(scene[f"{part}_shape"], pose[:3, :3], pose[:3, 3], points)


def primitive_bounds(prim: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """Axis-aligned box containing a primitive, or None when it is unbounded (a half space)."""
    t = prim["type"]
    if t == "sphere":
        c, r = np.asarray(prim["center"], dtype=float), prim["radius"]
        return c - r, c + r
    if t == "round_box":
        c, half = np.asarray(prim["center"], dtype=float), np.asarray(prim["half"], dtype=float)
        if prim.get("rotation") is not None:
            half = np.abs(np.asarray(prim["rotation"])) @ half
        return c - half, c + half
    if t in ("cylinder", "cone"):
        c = np.asarray(prim["center"], dtype=float)
        r = prim["radius"] if t == "cylinder" else max(prim["radius_bottom"], prim["radius_top"])
        half = np.full(3, float(r))
        half[_AXES[prim.get("axis", "z")]] = prim["half_height"]
        return c - half, c + half
    if t == "capsule":
        a, b = np.asarray(prim["a"], dtype=float), np.asarray(prim["b"], dtype=float)
        return np.minimum(a, b) - prim["radius"], np.maximum(a, b) + prim["radius"]
    if t == "half_space":
        return None
    raise ValueError(f"unknown SDF primitive {t!r}")


def conservative_bounds(shape: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """A box containing the shape: the union of the boxes of every primitive that adds material
    (subtracting or intersecting can only shrink the shape)."""
    boxes = [primitive_bounds(p) for i, p in enumerate(shape) if i == 0 or p.get("op", "union") == "union"]
    boxes = [b for b in boxes if b is not None]
    return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)
