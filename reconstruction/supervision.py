"""Training targets for the reconstruction model, from a dataset with the objects' true shapes:
SynthOcc's, or a converted real one whose views name their object model (``reconstruction.truth``).

Per scene (computed once, cached; a real view is a scene of its own unless its line names one):
  - SDF samples: points near the true surface (Gaussian offsets of 4 mm and 15 mm) and uniform in
    a box around it, with the signed distance from the scene's primitive spec (SynthOcc: exact) or
    from the object model's mesh;
  - colour targets: surface points seen (depth test) in some view's hand-free image, with that
    colour, or where a view has none, in its image (the scene depth then hides what the hand covers).
Per training view:
  - occlusion-aware silhouette rays (MOHO's multi-view idea): pixels of another view of the same
    scene, target = that view's visible-object mask, and pixels the hand covers carry no loss,
    since whether the object is behind the hand there is unknown. Only the visible mask and the
    hand mask are used, as they would be on real multi-view data without 3D ground truth.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from data_tools.sdf import scene_sdf
from occmllm import fileio
from occmllm.dataset import resolve_in_roots
from occmllm.errors import OccError
from occmllm.render import Camera
from reconstruction.truth import mesh_sdf, true_mesh
from reconstruction.views import CUBE_HALF, ViewInput, cube_centre, load_view, to_camera

COLOUR_DEPTH_TOLERANCE = 0.004  # m: a surface point is seen in a view if its depth matches within this


@dataclass
class SceneBank:
    points: np.ndarray          # (N, 3) world, float32
    sdf: np.ndarray             # (N,) metres
    surface: np.ndarray         # (M, 3) world points on the surface with a colour target
    colour: np.ndarray          # (M, 3) in [0, 1]


def _read(root, rel: str, mode: str | None = None) -> np.ndarray:
    return np.asarray(fileio.read_image(resolve_in_roots(root, rel, rel), None, mode))


def build_bank(root, views: list[dict], depth_scale: float, rng: np.random.Generator,
               surface_points: int = 4096, mesh: trimesh.Trimesh | None = None) -> SceneBank:
    """SDF samples and colour targets of one scene (``views``: its manifest lines; ``root``: a
    path or the dataset's roots). Without ``mesh``, the scene is SynthOcc's: its mesh and exact
    shape; with it, distances are the mesh's (``truth.mesh_sdf``)."""
    first = views[0]
    if mesh is None:
        scene = fileio.read_json(resolve_in_roots(root, first["scene_file"], first["id"]))
        mesh = trimesh.load(resolve_in_roots(root, first["mesh"], first["id"]), process=False)

        def signed_distance(p):
            return scene_sdf(scene, p)
    else:
        def signed_distance(p):
            return mesh_sdf(mesh, p)
    if len(mesh.faces) == 0:
        raise OccError(f"{first['mesh']}: empty object mesh")
    surface, _ = trimesh.sample.sample_surface(mesh, surface_points, seed=int(rng.integers(2**31)))
    n = surface_points
    near = surface[: n // 2] + rng.normal(0, 0.004, (n // 2, 3))
    mid = surface[n // 2:] + rng.normal(0, 0.015, (n - n // 2, 3))
    lo, hi = mesh.bounds[0] - 0.05, mesh.bounds[1] + 0.05
    uniform = rng.uniform(lo, hi, (n // 2, 3))
    points = np.concatenate([near, mid, uniform])
    sdf = signed_distance(points)

    colour = np.full((len(surface), 3), np.nan)
    for v in views:  # first view in which each surface point is seen
        todo = np.isnan(colour[:, 0])
        if not todo.any():
            break
        cam = Camera.from_lists(v["intrinsics"], v["world_to_cam"], v["width"], v["height"])
        uv, z = cam.project(surface[todo])
        u, w = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
        inside = (u >= 0) & (u < cam.width) & (w >= 0) & (w < cam.height) & (z > 0)
        hand_free = "rgb_nohand" in v and "depth_object" in v
        depth = _read(root, v["depth_object" if hand_free else "depth"]).astype(np.float64) / depth_scale
        rgb = _read(root, v["rgb_nohand" if hand_free else "image"], "RGB")
        idx = np.flatnonzero(todo)[inside]
        seen_depth = depth[w[inside], u[inside]]
        seen = np.abs(seen_depth - z[inside]) < COLOUR_DEPTH_TOLERANCE
        colour[idx[seen]] = rgb[w[inside][seen], u[inside][seen]] / 255.0
    has = ~np.isnan(colour[:, 0])
    return SceneBank(points.astype(np.float32), sdf.astype(np.float32), surface[has].astype(np.float32),
                     colour[has].astype(np.float32))


def ray_box(origin: np.ndarray, direction: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """Entry and exit distances of rays (N, 3) through an axis-aligned box; exit <= entry where they miss."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / direction
        t0, t1 = (lo - origin) * inv, (hi - origin) * inv
    near = np.nanmax(np.minimum(t0, t1), axis=1)
    far = np.nanmin(np.maximum(t0, t1), axis=1)
    return np.maximum(near, 0.0), far


def silhouette_rays(target: ViewInput, other: ViewInput, centre: np.ndarray, rays: int, samples: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points along ``rays`` pixel rays of ``other`` inside ``target``'s cube, in ``target``'s camera
    frame: (rays, samples, 3) points, (rays,) silhouette targets, (rays,) loss weights."""
    h, w = other.size
    region = other.visible | other.hand
    ys, xs = np.nonzero(region)
    half = rays // 2
    if len(ys):  # half the rays near the hand and object, where the silhouette is decided
        y0, y1, x0, x1 = max(ys.min() - 8, 0), min(ys.max() + 8, h - 1), max(xs.min() - 8, 0), min(xs.max() + 8, w - 1)
        py = np.concatenate([rng.integers(y0, y1 + 1, half), rng.integers(0, h, rays - half)])
        px = np.concatenate([rng.integers(x0, x1 + 1, half), rng.integers(0, w, rays - half)])
    else:
        py, px = rng.integers(0, h, rays), rng.integers(0, w, rays)
    silhouette = other.visible[py, px].astype(np.float32)
    weight = (~other.hand[py, px]).astype(np.float32)  # hand-covered pixels: unknown, no loss

    pix = np.stack([px + 0.5, py + 0.5, np.ones(rays)], axis=1)
    dirs_other = pix @ np.linalg.inv(other.camera.intrinsics).T
    # other camera -> world -> target camera
    rot_other = other.camera.world_to_cam[:3, :3]
    dirs_world = dirs_other @ rot_other
    origin = to_camera(other.camera.center[None], target.camera)[0]
    dirs = dirs_world @ target.camera.world_to_cam[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    near, far = ray_box(origin[None], dirs, centre - CUBE_HALF, centre + CUBE_HALF)
    hit = far > near
    weight = weight * hit  # a ray that misses the cube cannot see the object: nothing to learn
    near, far = np.where(hit, near, 0.0), np.where(hit, far, 1e-3)
    t = (np.arange(samples) + rng.uniform(0, 1, (rays, samples))) / samples
    t = near[:, None] + (far - near)[:, None] * t
    points = origin + t[..., None] * dirs[:, None]
    return points.astype(np.float32), silhouette, weight.astype(np.float32)


def scene_of(line: dict) -> str:
    """The scene a view belongs to (its views share one object pose); a real view is its own."""
    return str(line.get("scene", line["id"]))


class TrainingViews:
    """Training items of a dataset split: view inputs plus targets, cached per view and scene."""

    def __init__(self, dataset, split: str, max_scenes: int | None = None):
        self.dataset, self.root = dataset, dataset.root
        info_file = Path(dataset.folder) / "dataset.json"
        self.depth_scale = float(fileio.read_json(info_file).get("depth_scale", 0)) if info_file.is_file() else 0.0
        if not self.depth_scale:
            raise OccError(f"{info_file}: no depth_scale; reconstruction training needs a dataset with depth maps "
                           "(SynthOcc's, or one from data_tools.obman / data_tools.dexycb --root)")
        views = dataset.split(split)
        for v in views[:1]:
            keys = ("scene_file", "mesh", "depth_object", "rgb_nohand") if "object_model" not in v else ()
            for key in keys:
                if key not in v:
                    raise OccError(f"{dataset.folder}: manifest lines lack {key!r}; reconstruction training needs "
                                   "the objects' true shapes: SynthOcc's ground truth, or a converted dataset's "
                                   "object models (object_model)")
        self.scenes: dict[str, list[dict]] = {}
        for v in views:
            self.scenes.setdefault(scene_of(v), []).append(v)
        if max_scenes:
            self.scenes = dict(list(self.scenes.items())[:max_scenes])
        self.views = [v for vs in self.scenes.values() for v in vs]
        self._inputs: dict[str, ViewInput] = {}
        self._banks: dict[str, SceneBank] = {}

    def __len__(self) -> int:
        return len(self.views)

    def view(self, line: dict) -> ViewInput:
        if line["id"] not in self._inputs:
            self._inputs[line["id"]] = load_view(self.dataset.roots, line, self.depth_scale)
        return self._inputs[line["id"]]

    def bank(self, scene: str) -> SceneBank:
        if scene not in self._banks:
            # crc32, not hash(): str hashes change from run to run, and a resumed run must match
            seed = int(scene.lstrip("s")) if scene.lstrip("s").isdigit() else zlib.crc32(scene.encode())
            first = self.scenes[scene][0]
            mesh = None
            if "scene_file" not in first:
                mesh, why = true_mesh(self.dataset, first)
                if mesh is None:
                    raise OccError(f"view {first['id']}: no true object surface to train on: {why}")
            self._banks[scene] = build_bank(self.dataset.roots, self.scenes[scene], self.depth_scale,
                                            np.random.default_rng([seed, 0xB4]), mesh=mesh)
        return self._banks[scene]

    def item(self, index: int, rng: np.random.Generator, sdf_points: int, colour_points: int, rays: int,
             samples: int) -> dict:
        line = self.views[index]
        view = self.view(line)
        bank = self.bank(scene_of(line))
        centre = cube_centre(view)
        pick = rng.integers(0, len(bank.points), sdf_points)
        cpick = rng.integers(0, max(len(bank.surface), 1), colour_points)
        surface = bank.surface[cpick] if len(bank.surface) else np.zeros((colour_points, 3), np.float32)
        colour = bank.colour[cpick] if len(bank.colour) else np.zeros((colour_points, 3), np.float32)
        others = [v for v in self.scenes[scene_of(line)] if v["id"] != line["id"]] or [line]
        other = self.view(others[rng.integers(len(others))])
        ray_points, silhouette, weight = silhouette_rays(view, other, centre, rays, samples, rng)
        return {
            "view": view,
            "sdf_points": to_camera(bank.points[pick], view.camera).astype(np.float32),
            "sdf": bank.sdf[pick],
            "colour_points": to_camera(surface, view.camera).astype(np.float32),
            "colour": colour, "colour_weight": np.float32(len(bank.surface) > 0),
            "ray_points": ray_points, "silhouette": silhouette, "silhouette_weight": weight,
        }
