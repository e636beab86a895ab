"""Reconstruction metrics: Chamfer distance, F-score, silhouette IoU and their summaries.

Protocol (so figures are comparable between runs and with the MOHO-style literature):

- Both surfaces are sampled uniformly by area (``sample_surface``), the same number of points on
  each; no alignment (ICP, scale or centring) is applied, so the figures include pose errors.
- ``chamfer_mm`` is the symmetric mean of the two directed mean nearest-neighbour distances,
  ``1000 * 0.5 * (mean_p min_t |p - t| + mean_t min_p |t - p|)``, in millimetres (plain distances,
  not squared).
- F-score at a threshold ``tau``: precision is the fraction of predicted points within ``tau`` of
  the true point set, recall the fraction of true points within ``tau`` of the predicted set,
  ``F = 2PR / (P + R)`` (0 when both are 0). Inputs are in metres; keys name ``tau`` in mm.
- An empty prediction has no Chamfer distance (``None``) and scores 0 on every F-score, so a
  failed reconstruction counts against a model instead of disappearing from the averages of F.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import trimesh
from pykdtree.kdtree import KDTree

DEFAULT_THRESHOLDS = (0.005, 0.01)
DEFAULT_KEYS = ("chamfer_mm", "fscore_5mm", "fscore_10mm")
OCCLUSION_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0001)


def sample_surface(mesh: trimesh.Trimesh, n: int, seed: int = 0) -> np.ndarray:
    """``n`` points uniformly (by area) on the mesh surface, (n, 3) float64; (0, 3) if it has no faces.

    Seeded so that metrics of a given mesh are reproducible from run to run.
    """
    if len(mesh.faces) == 0 or n <= 0:
        return np.zeros((0, 3), dtype=np.float64)
    points, _ = trimesh.sample.sample_surface(mesh, int(n), seed=seed)
    return np.asarray(points, dtype=np.float64)


def threshold_label(tau: float) -> str:
    """Threshold in metres -> its key suffix in millimetres (0.005 -> ``"5mm"``, 0.0025 -> ``"2.5mm"``)."""
    return f"{round(float(tau) * 1000.0, 6):g}mm"


def point_tree(points: np.ndarray) -> KDTree:
    """A KD-tree for nearest-neighbour distances to ``points`` (n, 3). pykdtree's: the same distances
    as SciPy's cKDTree in about half the time (benchmarks/RESULTS.md, "The demo's time on a slower
    machine")."""
    return KDTree(np.ascontiguousarray(points, dtype=np.float64))


def surface_metrics(pred: np.ndarray, true: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                    true_tree: KDTree | None = None) -> dict:
    """Chamfer distance (mm) and precision / recall / F-score per threshold of two point sets in metres.
    A caller scoring several predictions against one truth passes ``point_tree(true)`` once as ``true_tree``."""
    pred = np.ascontiguousarray(pred, dtype=np.float64).reshape(-1, 3)
    true = np.ascontiguousarray(true, dtype=np.float64).reshape(-1, 3)
    if len(true) == 0:
        raise ValueError("surface_metrics: the true point set is empty; sample the ground-truth mesh first")
    out: dict = {"chamfer_mm": None}
    if len(pred) == 0:
        for tau in thresholds:
            label = threshold_label(tau)
            out.update({f"fscore_{label}": 0.0, f"precision_{label}": 0.0, f"recall_{label}": 0.0})
        return out
    pred_to_true, _ = (true_tree if true_tree is not None else point_tree(true)).query(pred, k=1)
    true_to_pred, _ = point_tree(pred).query(true, k=1)
    out["chamfer_mm"] = float(1000.0 * 0.5 * (pred_to_true.mean() + true_to_pred.mean()))
    for tau in thresholds:
        label = threshold_label(tau)
        precision = float(np.mean(pred_to_true <= tau))
        recall = float(np.mean(true_to_pred <= tau))
        total = precision + recall
        fscore = 2.0 * precision * recall / total if total > 0 else 0.0
        out.update({f"fscore_{label}": fscore, f"precision_{label}": precision, f"recall_{label}": recall})
    return out


def silhouette_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1.0 when both are empty (they agree perfectly)."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"silhouette_iou: mask shapes differ, {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def mean_metrics(rows: list[dict], keys: Iterable[str] = DEFAULT_KEYS) -> dict:
    """Mean of each key over ``rows``, skipping missing and ``None`` values (``None`` if no row has one)."""
    means: dict = {}
    for key in keys:
        values = [row[key] for row in rows if row.get(key) is not None]
        means[key] = float(np.mean(values)) if values else None
    return means


def by_occlusion(rows: list[dict], bins: Sequence[float] = OCCLUSION_BINS,
                 keys: Iterable[str] = DEFAULT_KEYS) -> list[dict]:
    """Means of ``keys`` per occlusion bin ``[lo, hi)``; every bin is listed, empty ones with n 0.

    The last default edge is 1.0001 so that fully occluded samples (1.0) fall in the last bin.
    Rows without an ``occlusion`` value are left out.
    """
    keys = list(keys)
    summary = []
    for lo, hi in zip(bins[:-1], bins[1:]):
        members = [row for row in rows if row.get("occlusion") is not None and lo <= row["occlusion"] < hi]
        summary.append({"bin": f"{lo:.1f}-{hi:.1f}", "lo": float(lo), "hi": float(hi), "n": len(members),
                        **mean_metrics(members, keys)})
    return summary
