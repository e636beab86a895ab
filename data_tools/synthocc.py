"""SynthOcc: a synthetic counterpart of SOMVideo/ObMan, generated on the CPU.

Each scene is one object of an ObMan category held by a grasping hand, seen by V cameras on a
ring. Per view it writes RGB with and without the hand, the object's amodal and visible masks,
the hand mask, depth with and without the hand, the camera, and the occlusion ratio; per scene
the exact object shape (an SDF spec, see ``data_tools.sdf``) and meshes. Same arguments give
byte-identical files, whatever the number of workers.

    python -m data_tools.synthocc --out DIR --scenes N --views V --seed S
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_tools import shapes
from occmllm import fileio
from occmllm.errors import OccError, cli
from occmllm.questions import CATEGORIES, CATEGORY_ATTRIBUTES, OBJECT_COLOURS
from occmllm.render import Camera, RayCaster, lambert

FORMAT_VERSION = 1
DEPTH_SCALE = 10000.0  # depth PNG value / DEPTH_SCALE = metres (0.1 mm steps, up to 6.5 m)
OBJECT_CELL = 0.0025   # marching-cubes cell for objects (m) at 224 px
HAND_CELL = 0.004


def mesh_cells(size: int) -> tuple[float, float]:
    """Object and hand marching-cubes cells for an image size: smaller images show less detail,
    so meshes coarsen with the pixel footprint (up to 2x; thin parts keep 32 samples across)."""
    factor = min(2.0, max(1.0, 224 / size))
    return OBJECT_CELL * factor, HAND_CELL * factor


SKIN_TONES = [(255, 219, 172), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (90, 56, 37)]
PATTERNS = ("plain", "band", "stripes", "checker")
PATTERN_WEIGHTS = (0.4, 0.2, 0.2, 0.2)
VIEW_FILES = ("rgb", "rgb_nohand", "mask_amodal", "mask_visible", "mask_hand", "depth", "depth_object")


@dataclass(frozen=True)
class Settings:
    scenes: int
    views: int
    seed: int
    size: int = 224
    focal: float = 280.0
    val_frac: float = 0.1
    test_frac: float = 0.1
    # scenes drawn after the first ``scenes``: ``extra_test`` of them for test, then ``extra_val`` for
    # validation. Larger evaluation splits that leave every training scene, and the split of each of
    # the first ``scenes``, as it is
    extra_test: int = 0
    extra_val: int = 0

    @property
    def total_scenes(self) -> int:
        return self.scenes + self.extra_test + self.extra_val

    def as_dict(self) -> dict:
        return dict(self.__dict__, format_version=FORMAT_VERSION)


def scene_id(index: int) -> str:
    return f"s{index:05d}"


def view_id(scene: str, view: int) -> str:
    return f"{scene}_v{view:02d}"


def assign_categories(settings: Settings) -> list[str]:
    """Balanced categories in a seeded order: every category gets N/8 scenes (+-1), and so do the
    extra test scenes and the extra validation scenes, each among themselves."""
    def balanced(n: int, stream: int) -> list[str]:
        rng = np.random.default_rng([settings.seed, stream])
        cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
        return [cats[i] for i in rng.permutation(n)]
    return balanced(settings.scenes, 0xC47) + balanced(settings.extra_test, 0xE7) + balanced(settings.extra_val, 0xE8)


def assign_splits(categories: list[str], settings: Settings) -> dict[str, str]:
    """Scene -> split, whole scenes only (no object is seen in two splits), stratified by
    category: scenes are dealt round-robin over categories, test first, then val, then train, so
    even a 16-scene set has a test and a val scene of several categories. The extra scenes after the
    first ``settings.scenes`` are test (``extra_test``), then val (``extra_val``)."""
    rng = np.random.default_rng([settings.seed, 0x5B17])
    per_cat = []
    for cat in CATEGORIES:
        members = [scene_id(i) for i, c in enumerate(categories[: settings.scenes]) if c == cat]
        per_cat.append([members[i] for i in rng.permutation(len(members))])
    dealt = [m[k] for k in range(max(map(len, per_cat))) for m in per_cat if k < len(m)]
    n = len(dealt)
    n_test = int(round(settings.test_frac * n))
    n_val = int(round(settings.val_frac * n))
    if n >= 3:  # a non-zero fraction always gets at least one scene
        n_test = max(n_test, int(settings.test_frac > 0))
        n_val = max(n_val, int(settings.val_frac > 0))
    splits = {sid: "test" if k < n_test else "val" if k < n_test + n_val else "train" for k, sid in enumerate(dealt)}
    first_val = settings.scenes + settings.extra_test
    return splits | {scene_id(i): "test" if i < first_val else "val" for i in range(settings.scenes, settings.total_scenes)}


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * (k @ k)


def _jitter(rng, rgb, amount=12) -> np.ndarray:
    return np.clip(np.asarray(rgb, dtype=np.float64) + rng.uniform(-amount, amount, 3), 0, 255) / 255.0


def _texture(points_obj: np.ndarray, pattern: dict, base: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Albedo at object-frame points for a category-independent surface pattern."""
    kind = pattern["kind"]
    if kind == "plain":
        sel = np.zeros(len(points_obj), dtype=bool)
    elif kind == "band":
        sel = np.abs(points_obj[:, 2] - pattern["center"]) < pattern["width"]
    elif kind == "stripes":
        sel = np.floor(points_obj[:, 2] / pattern["period"]).astype(np.int64) % 2 == 1
    else:  # checker
        sel = np.floor(points_obj / pattern["period"]).astype(np.int64).sum(axis=1) % 2 == 1
    return np.where(sel[:, None], second, base)


def _save_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path, compress_level=1)


def generate_scene(index: int, category: str, split: str, settings: Settings, scene_dir: Path) -> list[dict]:
    """Build, render and write one scene; returns its manifest lines. Deterministic in
    (seed, index, category) alone."""
    rng = np.random.default_rng([settings.seed, index])
    sid = scene_id(index)
    object_cell, hand_cell = mesh_cells(settings.size)
    object_shape, object_mesh = shapes.make_object(category, rng, object_cell)
    hand_shape = shapes.make_hand(category, object_mesh.extents / 2, rng)
    hand_mesh = shapes.mesh_shape(hand_shape, hand_cell)

    # Random pose of the object-with-hand: a tilt about a horizontal axis, then a spin about z.
    tilt = math.radians(rng.uniform(0.0, 50.0))
    tilt_axis = np.array([math.cos(rng.uniform(0, 2 * math.pi)), 0.0, 0.0])
    tilt_axis[1] = math.sqrt(1.0 - tilt_axis[0] ** 2)
    rotation = _rotation(np.array([0.0, 0.0, 1.0]), rng.uniform(0, 2 * math.pi)) @ _rotation(tilt_axis, tilt)
    to_world = np.eye(4)
    to_world[:3, :3] = rotation
    object_mesh.apply_transform(to_world)
    hand_mesh.apply_transform(to_world)

    colour = str(rng.choice(list(OBJECT_COLOURS)))
    second = str(rng.choice([c for c in OBJECT_COLOURS if c != colour]))
    base_rgb, second_rgb = _jitter(rng, OBJECT_COLOURS[colour]), _jitter(rng, OBJECT_COLOURS[second])
    skin = _jitter(rng, SKIN_TONES[rng.integers(len(SKIN_TONES))], 8)
    kind = str(rng.choice(PATTERNS, p=PATTERN_WEIGHTS))
    half_z = float(object_mesh.extents.max()) / 2
    pattern = {"kind": kind, "colour": second, "center": float(rng.uniform(-0.3, 0.3) * half_z),
               "width": float(rng.uniform(0.15, 0.3) * half_z), "period": float(rng.uniform(0.012, 0.03))}
    bg_top, bg_bottom = rng.uniform(0.25, 0.9, 3), rng.uniform(0.15, 0.8, 3)

    # Camera ring: fixed elevation, evenly spaced azimuths, distance framing the whole object.
    elevation = math.radians(rng.uniform(5.0, 40.0))
    azimuth0 = rng.uniform(0.0, 2 * math.pi)
    radius = float(np.linalg.norm(object_mesh.vertices, axis=1).max())
    distance = radius / math.tan(math.atan(settings.size / 2 / settings.focal)) * rng.uniform(1.1, 1.35)
    # Small objects would put the camera inside the forearm: keep it clear of the whole hand.
    distance = max(distance, float(np.linalg.norm(hand_mesh.vertices, axis=1).max()) + 0.03)
    light = np.array([rng.uniform(-0.6, 0.6), rng.uniform(-0.9, -0.3), -1.0])  # camera frame

    both = RayCaster([object_mesh, hand_mesh])
    object_only = RayCaster([object_mesh])
    size = settings.size
    ramp = np.linspace(0.0, 1.0, size)[:, None, None]
    background = (bg_top * (1 - ramp) + bg_bottom * ramp) * np.ones((1, size, 1))

    scene_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for v in range(settings.views):
        az = azimuth0 + 2 * math.pi * v / settings.views
        eye = distance * np.array([math.cos(elevation) * math.cos(az), math.cos(elevation) * math.sin(az),
                                   math.sin(elevation)])
        cam = Camera.look_at(eye, [0.0, 0.0, 0.0], settings.focal, size, size)
        hits = both.render(cam)
        hand_px = hits.label == 1
        behind = object_only.render(cam, pixel_mask=hand_px)  # the object behind the hand
        visible = hits.label == 0
        hidden = hand_px & (behind.label == 0)
        amodal = visible | hidden

        light_world = cam.world_to_cam[:3, :3].T @ light  # towards the light, in world
        def shade(h, sel, albedo):
            return lambert(albedo, h.normal[sel], light_world)

        def object_albedo(h, sel):
            return _texture(h.location[sel] @ rotation, pattern, base_rgb, second_rgb)

        rgb = background.reshape(-1, 3).copy()
        rgb[visible] = shade(hits, visible, object_albedo(hits, visible))
        rgb[hand_px] = shade(hits, hand_px, np.broadcast_to(skin, (int(hand_px.sum()), 3)))
        rgb_nohand = background.reshape(-1, 3).copy()
        rgb_nohand[visible] = rgb[visible]
        rgb_nohand[hidden] = shade(behind, hidden, object_albedo(behind, hidden))
        depth_object = np.where(visible, hits.depth, np.where(hidden, behind.depth, 0.0))

        vid = view_id(sid, v)
        files = {k: f"scenes/{sid}/{k}_{v:02d}.png" for k in VIEW_FILES}
        as_rgb = lambda a: np.round(np.clip(a, 0, 1) * 255).astype(np.uint8).reshape(size, size, 3)
        as_mask = lambda m: (m.reshape(size, size).astype(np.uint8) * 255)
        as_depth = lambda d: np.round(d * DEPTH_SCALE).astype(np.uint16).reshape(size, size)
        arrays = {"rgb": as_rgb(rgb), "rgb_nohand": as_rgb(rgb_nohand), "mask_amodal": as_mask(amodal),
                  "mask_visible": as_mask(visible), "mask_hand": as_mask(hand_px),
                  "depth": as_depth(hits.depth), "depth_object": as_depth(depth_object)}
        for kind, array in arrays.items():  # written under the (possibly temporary) scene folder
            _save_png(scene_dir / Path(files[kind]).name, array)
        n_amodal = int(amodal.sum())
        occlusion = 1.0 - int(visible.sum()) / n_amodal if n_amodal else 1.0
        lines.append({
            "id": vid, "scene": sid, "view": v, "split": split, "category": category,
            "attributes": CATEGORY_ATTRIBUTES[category], "colour": colour,
            "occlusion": round(occlusion, 6),
            "image": files["rgb"], **{k: files[k] for k in VIEW_FILES if k != "rgb"},
            "width": size, "height": size,
            "intrinsics": np.round(cam.intrinsics, 6).tolist(),
            "world_to_cam": np.round(cam.world_to_cam, 9).tolist(),
            "scene_file": f"scenes/{sid}/scene.json", "mesh": f"scenes/{sid}/object.ply",
            "hand_mesh": f"scenes/{sid}/hand.ply",
        })

    object_mesh.export(scene_dir / "object.ply")
    hand_mesh.export(scene_dir / "hand.ply")
    scene = {
        "scene": sid, "category": category, "split": split, "colour": colour, "pattern": pattern,
        "units": "metres",
        "object_to_world": np.round(to_world, 12).tolist(),
        "object_shape": object_shape, "hand_shape": hand_shape,
        "views": lines,
    }
    # scene.json is written last: its presence marks the scene complete (see ``resume``).
    fileio.write_json(scene_dir / "scene.json", scene)
    return lines


def _generate_one(job):
    index, category, split, settings, root = job
    sid = scene_id(index)
    final = Path(root) / "scenes" / sid
    if (final / "scene.json").is_file():  # finished by an interrupted earlier run
        return fileio.read_json(final / "scene.json")["views"]
    tmp = Path(root) / "scenes" / f".{sid}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # Render into a hidden folder named as the scene (paths inside are final), then rename.
    lines = generate_scene(index, category, split, settings, tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return lines


def generate(out: Path, settings: Settings, workers: int = 1, overwrite: bool = False, progress: bool = True) -> Path:
    """Generate the dataset at ``out``. Work goes to ``out.partial`` (resumed if a run with the
    same settings was interrupted) and is renamed to ``out`` when complete."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OccError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    staging = out.with_name(out.name + ".partial")
    args_file = staging / "settings.json"
    if staging.exists():
        if not args_file.is_file() or fileio.read_json(args_file) != settings.as_dict():
            raise OccError(f"{staging} holds an interrupted run with other settings; delete it or rerun "
                           "with the same --scenes/--views/--seed/--size")
    else:
        (staging / "scenes").mkdir(parents=True)
        fileio.write_json(args_file, settings.as_dict())

    categories = assign_categories(settings)
    splits = assign_splits(categories, settings)
    jobs = [(i, categories[i], splits[scene_id(i)], settings, str(staging)) for i in range(settings.total_scenes)]
    bar = tqdm(total=settings.total_scenes * settings.views, unit="view", desc="SynthOcc", disable=not progress)
    manifest = []
    if workers <= 1:
        results = map(_generate_one, jobs)
        pool = None
    else:
        # workers from a fork server, not forked from this process: a caller that has run torch or a
        # tokenizer's threads can leave locks held that a forked child would wait on forever
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver"))
        results = pool.map(_generate_one, jobs, chunksize=1)
    try:
        for lines in results:
            manifest.extend(lines)
            bar.update(len(lines))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    fileio.write_jsonl(staging / "manifest.jsonl", manifest)
    split_lists = {name: sorted(s for s, sp in splits.items() if sp == name) for name in ("train", "val", "test")}
    fileio.write_json(staging / "splits.json", split_lists)
    occ = np.array([m["occlusion"] for m in manifest]) if manifest else np.zeros(1)
    fileio.write_json(staging / "dataset.json", {
        "name": "SynthOcc", "settings": settings.as_dict(), "views": len(manifest),
        "depth_scale": DEPTH_SCALE, "files_per_view": list(VIEW_FILES),
        "scenes_per_split": {k: len(v) for k, v in split_lists.items()},
        "occlusion": {"min": float(occ.min()), "max": float(occ.max()), "mean": round(float(occ.mean()), 6)},
    })
    args_file.unlink()
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.synthocc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output dataset folder (must not exist)")
    p.add_argument("--scenes", type=int, default=200, help="number of scenes (objects) [200]")
    p.add_argument("--views", type=int, default=10, help="camera views per scene, on a ring [10]")
    p.add_argument("--seed", type=int, default=0, help="random seed [0]")
    p.add_argument("--size", type=int, default=224, help="image width and height in pixels [224]")
    p.add_argument("--val-frac", type=float, default=0.1, help="fraction of scenes per category for val [0.1]")
    p.add_argument("--test-frac", type=float, default=0.1, help="fraction of scenes per category for test [0.1]")
    p.add_argument("--extra-test-scenes", type=int, default=0,
                   help="further scenes drawn after the --scenes ones, all of them test: a larger test split "
                        "that leaves every train and val scene as it is [0]")
    p.add_argument("--extra-val-scenes", type=int, default=0,
                   help="further scenes drawn after those, all of them validation [0]")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="parallel processes; output does not depend on it [min(2, cores)]")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scenes < 1 or args.views < 1 or args.size < 16 or min(args.extra_test_scenes, args.extra_val_scenes) < 0:
        raise OccError("--scenes and --views must be at least 1, --size at least 16, and the extra scenes at "
                       "least 0")
    if not (0 <= args.val_frac < 1 and 0 <= args.test_frac < 1 and args.val_frac + args.test_frac < 1):
        raise OccError("--val-frac and --test-frac must be in [0, 1) and sum to less than 1")
    settings = Settings(args.scenes, args.views, args.seed, args.size,
                        focal=280.0 * args.size / 224, val_frac=args.val_frac, test_frac=args.test_frac,
                        extra_test=args.extra_test_scenes, extra_val=args.extra_val_scenes)
    out = generate(args.out, settings, workers=args.workers, overwrite=args.overwrite,
                   progress=not args.no_progress)
    info = fileio.read_json(out / "dataset.json")
    print(f"wrote {info['views']} views of {settings.total_scenes} scenes to {out} "
          f"(splits {info['scenes_per_split']}, occlusion {info['occlusion']['min']:.2f}-{info['occlusion']['max']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
