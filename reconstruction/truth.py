"""The true object surface of a view, where the dataset has it: training targets and metrics.

A SynthOcc view names its world-frame mesh (``mesh``) and exact shape (``scene_file``). A converted
real view names an object model (``object_model``, ``data_tools.realviews``): a model file under
the folder ``dataset.json["model_roots"]`` names for it, and the pose that puts it in the world;
that folder may be missing on this machine, and then the view has no true surface here.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import trimesh
from scipy.spatial import cKDTree

from data_tools.realviews import load_model
from occmllm import fileio
from occmllm.dataset import Dataset, resolve_in_roots

MODELS_KEPT = 8           # model files kept loaded (views of one object often come together)
SDF_SURFACE_SAMPLES = 50_000
SDF_CANDIDATES = 8        # triangles tried per point: those of its nearest surface samples

_models: OrderedDict = OrderedDict()


def _model(path) -> trimesh.Trimesh:
    key = str(path)
    if key not in _models:
        _models[key] = load_model(path, key)
        while len(_models) > MODELS_KEPT:
            _models.popitem(last=False)
    _models.move_to_end(key)
    return _models[key]


def true_mesh(dataset: Dataset, line: dict) -> tuple[trimesh.Trimesh | None, str | None]:
    """The view's object surface in world coordinates (metres), or ``(None, why not)``."""
    if "mesh" in line:
        return trimesh.load(resolve_in_roots(dataset.roots, line["mesh"], line["id"]), process=False), None
    entry = line.get("object_model")
    if entry is None:
        return None, "the manifest names no object model (mesh or object_model)"
    base = (dataset.info.get("model_roots") or {}).get(entry["root"])
    if base is None:
        return None, (f"no folder of {entry['root']} models was given when the dataset was converted "
                      "(ObMan: convert again with --shapenet-root)")
    path = fileio.resolve_in_root(base, entry["path"], f"view {line['id']}")
    if not path.is_file():  # one cause for every view, so that the causes can be counted
        return None, f"{entry['root']} model files are not in {base}"
    mesh = _model(path).copy()
    mesh.apply_transform(np.asarray(entry["to_world"], dtype=np.float64))
    return mesh, None


def mesh_sdf(mesh: trimesh.Trimesh, points: np.ndarray) -> np.ndarray:
    """Signed distance (metres, negative inside) from ``points`` (N, 3) to ``mesh``.

    By hand because trimesh's exact query needs rtree, which the project does not install: the
    distance is the exact point-triangle distance to the nearest of the triangles under the
    point's nearest dense surface samples, and the sign is trimesh's ray-cast inside test (noisy
    where a model is not closed, as some ShapeNet models are not)."""
    points = np.asarray(points, dtype=np.float64)
    surface, faces = trimesh.sample.sample_surface(mesh, SDF_SURFACE_SAMPLES, seed=0)
    k = SDF_CANDIDATES
    _, nearest = cKDTree(surface).query(points, k=k)
    triangles = mesh.triangles[faces[nearest].ravel()]
    repeated = np.repeat(points, k, axis=0)
    closest = trimesh.triangles.closest_point(triangles, repeated)
    distance = np.linalg.norm(closest - repeated, axis=1).reshape(len(points), k).min(axis=1)
    return np.where(mesh.contains(points), -distance, distance)
