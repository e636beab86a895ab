"""Small ObMan- and DexYCB-layout roots built offline, geometrically consistent: a posed object
mesh and a hand are ray-cast with the project's renderer, and the renders are encoded as each
dataset encodes its own (the encodings and their sources: ``data_tools.obman``,
``data_tools.dexycb_root``). Each builder returns what it encoded, for independent checks."""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh
import yaml
from PIL import Image

from occmllm.render import Camera, RayCaster, lambert

SHAPENET_TEMPLATE = "/sequoia/data2/dataset/shapenet/ShapeNetCore.v2/{}/{}/models/model_normalized.pkl"
BLENDER_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])  # ObMan's cam_extr, as 4x4
OBMAN_SIZE = 64
DEX_SIZE = (96, 72)  # DexYCB's 640x480, scaled down
DEX_SUBJECT, DEX_SERIALS = "20200709-subject-01", ("836212060125", "839512060362")
DEX_SEQUENCES = ("20200709_141754", "20200709_141841")  # grasps a can (kept); grasps the mug (skipped)
DEX_FRAMES = 3


@dataclass
class Encoded:
    """What a fixture view encodes: masks, camera z (metres, 0: none) and the camera."""
    visible: np.ndarray
    hand: np.ndarray
    amodal: np.ndarray
    depth: np.ndarray
    depth_object: np.ndarray
    intrinsics: np.ndarray
    world_to_cam: np.ndarray
    to_world: np.ndarray       # object model -> world
    quantum: float = 0.0       # the encoding's depth step (m)


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    return trimesh.transformations.rotation_matrix(math.radians(rng.uniform(-max_deg, max_deg)), axis)[:3, :3]


def _shade(hits, colours: list, size: tuple[int, int], background, light) -> np.ndarray:
    """Lambert-shaded colours per mesh over a flat background; ``light`` points to the light (world)."""
    rgb = np.tile(np.asarray(background, dtype=np.float64), (len(hits.label), 1))
    for index, colour in enumerate(colours):
        sel = hits.label == index
        if sel.any():
            rgb[sel] = lambert(np.broadcast_to(np.asarray(colour) / 255, (int(sel.sum()), 3)), hits.normal[sel],
                               np.asarray(light, dtype=np.float64))
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8).reshape(size[1], size[0], 3)


def _hand(centre: np.ndarray, towards_camera: np.ndarray, side: np.ndarray) -> list[trimesh.Trimesh]:
    """A hand (capsule across the object, in front of it) and the start of a forearm."""
    hand = trimesh.creation.capsule(height=0.06, radius=0.02)
    direction = side / np.linalg.norm(side)
    align = trimesh.geometry.align_vectors([0, 0, 1], direction)
    hand.apply_transform(align)
    hand.apply_translation(centre + towards_camera * 0.055)
    arm = trimesh.creation.cylinder(radius=0.024, height=0.12)
    arm.apply_transform(align)
    arm.apply_translation(centre + towards_camera * 0.06 + direction * 0.1)
    return [hand, arm]


def read_png(folder: Path, rel: str) -> np.ndarray:
    return np.asarray(Image.open(folder / rel))


def manifest(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]


# --- ObMan ---------------------------------------------------------------------------------------

OBMAN_MODELS = {  # class_id: (ShapeNet-style normalized model, obj_scale); ShapeNet models are y-up
    "02876657": (lambda: trimesh.creation.cylinder(radius=0.16, height=0.9, sections=32,
                                                   transform=trimesh.transformations.rotation_matrix(
                                                       math.pi / 2, [1, 0, 0])), 0.18),
    "02946921": (lambda: trimesh.creation.cylinder(radius=0.3, height=0.6, sections=32,
                                                   transform=trimesh.transformations.rotation_matrix(
                                                       math.pi / 2, [1, 0, 0])), 0.16),
    "03624134": (lambda: trimesh.creation.box(extents=(0.9, 0.14, 0.04)), 0.22),
}


def obman_depth_code(distance: np.ndarray, hit: np.ndarray) -> tuple[np.ndarray, float, float]:
    """obman_render's ``convert_depth`` and ``cv2.imwrite``: 1..255 between the nearest and farthest
    hit, 0 without one; returns (codes, meta depth_min, meta depth_max), names swapped as stored."""
    near, far = distance[hit].min(), distance[hit].max()
    code = np.where(hit, np.round(254 * (distance - near) / (far - near) + 1), 0).astype(np.uint8)
    return code, float(far), float(near)


def make_obman_view(root: Path, shapenet: Path, split: str, stem: str, class_id: str, seed: int,
                    rgb_obj: bool = False, protocol: int = 2, size: int = OBMAN_SIZE) -> Encoded:
    rng = np.random.default_rng(seed)
    make, scale = OBMAN_MODELS[class_id]
    sample_id = f"{seed:04x}fixture"
    model = make()
    model_file = shapenet / class_id / sample_id / "models" / "model_normalized.obj"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    model.export(model_file, file_type="obj")
    affine = np.eye(4)  # model -> Blender camera frame (the camera looks down -z)
    affine[:3, :3] = scale * _rotation(rng, 35)
    affine[:3, 3] = [rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02), -rng.uniform(0.42, 0.5)]
    obj = model.copy()
    obj.apply_transform(affine)
    centre = affine[:3, 3]
    person = _hand(centre, np.array([0.0, 0.0, 1.0]), np.array([rng.uniform(0.5, 1), rng.uniform(-0.5, 0.5), 0]))
    k = np.array([[480.0 * size / 256, 0, size / 2], [0, 480.0 * size / 256, size / 2], [0, 0, 1]])
    camera = Camera(k, BLENDER_TO_CV, size, size)
    full, obj_only, person_only = (RayCaster(m).render(camera) for m in ([obj, *person], [obj], person))
    shape = (size, size)

    def index(hits, labels):
        out = np.zeros(len(hits.label), np.uint8)
        for mesh, value in enumerate(labels):
            out[hits.label == mesh] = value
        return out.reshape(shape)
    segm = np.stack([index(obj_only, [100]), index(person_only, [22, 20]), index(full, [100, 22, 20])], axis=2)
    codes, ranges = [], {}
    for key, hits in (("obj_", obj_only), ("hand_", person_only), ("", full)):
        hit = hits.label >= 0
        code, named_min, named_max = obman_depth_code(np.linalg.norm(hits.location, axis=1), hit)
        codes.append(code.reshape(shape))
        ranges[f"{key}depth_min"], ranges[f"{key}depth_max"] = named_min, named_max
    for folder in ("rgb", "segm", "depth", "meta") + (("rgb_obj",) if rgb_obj else ()):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
    colours = [(200, 60, 40), (230, 180, 140), (230, 180, 140)]
    light = (0.3, 0.6, 1.0)  # Blender camera frame: the camera looks down -z
    Image.fromarray(_shade(full, colours, (size, size), (0.4, 0.5, 0.6), light)).save(
        root / split / "rgb" / f"{stem}.jpg", quality=95)
    if rgb_obj:
        Image.fromarray(_shade(obj_only, colours, (size, size), (0.4, 0.5, 0.6), light)).save(
            root / split / "rgb_obj" / f"{stem}.jpg", quality=95)
    Image.fromarray(segm).save(root / split / "segm" / f"{stem}.png")
    Image.fromarray(np.stack(codes, axis=2)).save(root / split / "depth" / f"{stem}.png")
    visible, amodal = segm[..., 2] == 100, segm[..., 0] == 100
    meta = {
        "side": "right", "coords_2d": rng.uniform(0, size, (21, 2)).astype(np.float32),
        "coords_3d": rng.normal(0, 0.05, (21, 3)).astype(np.float32),
        "verts_3d": rng.normal(0, 0.05, (778, 3)).astype(np.float32),
        "affine_transform": affine.astype(np.float32), "obj_path": SHAPENET_TEMPLATE.format(class_id, sample_id),
        "obj_scale": scale, "sample_id": sample_id, "class_id": class_id,
        "pca_pose": np.zeros(30, np.float32), "hand_pose": np.zeros(45, np.float32),
        "hand_trans": np.zeros(3, np.float32), "hand_global_rot": np.zeros(3, np.float32),
        "grasp_quality": 0.5, "grasp_epsilon": 0.1, "grasp_volume": 0.2,
        "z": 0.1, "trans": np.zeros(3, np.float32), "pose": np.zeros(156, np.float32),
        "shape": np.zeros(10, np.float32), "mano_pose": np.zeros(45, np.float32),
        "bg_path": "/lsun/bg.jpg", "sh_coeffs": np.zeros(9, np.float32), "body_tex": "/tex/body.jpg",
        "obj_visibility_ratio": float(visible.sum() / amodal.sum()), **ranges,
    }
    (root / split / "meta" / f"{stem}.pkl").write_bytes(pickle.dumps(meta, protocol=protocol))
    def z(hits):
        return np.where(hits.label >= 0, hits.depth, 0.0).reshape(shape)
    return Encoded(visible, np.isin(segm[..., 2], (20, 22)), amodal, z(full), z(obj_only), k, BLENDER_TO_CV, affine,
                   quantum=(ranges["depth_min"] - ranges["depth_max"]) / 254)


OBMAN_VIEWS = (  # split, stem, class_id, rgb_obj
    ("train", "00000000", "02876657", True), ("train", "00000001", "02946921", False),
    ("train", "00000002", "03624134", False), ("train", "00000003", "02876657", False),
    ("val", "00000000", "02946921", False), ("test", "00000000", "02876657", False),
    ("test", "00000001", "03624134", False),
)


def make_obman_root(base: Path) -> tuple[Path, Path, dict[str, Encoded]]:
    """An ObMan root and a ShapeNetCore.v2-style model folder; truth per manifest id."""
    root, shapenet = base / "obman", base / "ShapeNetCore.v2"
    truth = {}
    for k, (split, stem, class_id, rgb_obj) in enumerate(OBMAN_VIEWS):
        truth[f"obman_{split}_{stem}"] = make_obman_view(root, shapenet, split, stem, class_id, seed=k + 1,
                                                         rgb_obj=rgb_obj, protocol=2 if k % 2 else 5)
    return root, shapenet, truth


# --- DexYCB --------------------------------------------------------------------------------------

def _write_yaml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data))


def make_dexycb_root(base: Path) -> tuple[Path, dict[str, Encoded]]:
    """A DexYCB root: one subject, two sequences (a grasped can: ``ycb_ids`` [13 bowl, 1 can] with
    ``ycb_grasp_ind`` 1; a grasped mug), two cameras, a YCB model for the can; truth per id."""
    root = base / "dexycb"
    width, height = DEX_SIZE
    can = trimesh.creation.cylinder(radius=0.034, height=0.1, sections=32)  # YCB models are in metres
    model = root / "models" / "002_master_chef_can" / "textured_simple.obj"
    model.parent.mkdir(parents=True)
    can.export(model, file_type="obj")
    bowl = trimesh.creation.box(extents=(0.08, 0.08, 0.04))
    truth = {}
    for s, serial in enumerate(DEX_SERIALS):
        fx = 110.0 + 5 * s
        ppx, ppy = width / 2 - 0.5 + s, height / 2 - 0.5 - s  # RealSense: pixel centres at integers
        color = {"fx": fx, "fy": fx + 1, "ppx": ppx, "ppy": ppy}
        _write_yaml(root / "calibration" / "intrinsics" / f"{serial}_{width}x{height}.yml",
                    {"serial": serial, "color": color, "depth": color})
    for q, (sequence, ids) in enumerate(zip(DEX_SEQUENCES, ([13, 1], [14, 1]))):
        folder = root / DEX_SUBJECT / sequence
        _write_yaml(folder / "meta.yml", {
            "serials": list(DEX_SERIALS), "num_frames": DEX_FRAMES, "ycb_ids": ids,
            "ycb_grasp_ind": 1 if q == 0 else 0, "mano_sides": ["right"],
            "mano_calib": ["mano_20200709_140042_subject-01_right"], "extrinsics": "20200702_151821"})
        for s, serial in enumerate(DEX_SERIALS):
            intr = yaml.safe_load((root / "calibration" / "intrinsics" / f"{serial}_{width}x{height}.yml").read_text())
            c = intr["color"]
            k = np.array([[c["fx"], 0, c["ppx"] + 0.5], [0, c["fy"], c["ppy"] + 0.5], [0, 0, 1]])
            camera = Camera(k, np.eye(4), width, height)
            (folder / serial).mkdir(parents=True)
            for f in range(DEX_FRAMES):
                rng = np.random.default_rng([q, s, f])
                poses = []
                for offset in ([0.0, 0.0], [-0.09, 0.05]):  # the grasped object, then the other
                    pose = np.eye(4)
                    pose[:3, :3] = _rotation(rng, 40)
                    pose[:3, 3] = [offset[0] + rng.uniform(-0.01, 0.01), offset[1], rng.uniform(0.45, 0.5)]
                    poses.append(pose)
                grasped, other = (can.copy(), bowl.copy())
                grasped.apply_transform(poses[0])
                other.apply_transform(poses[1])
                hand = _hand(poses[0][:3, 3], np.array([0.0, 0.0, -1.0]), np.array([1.0, rng.uniform(-0.5, 0.5), 0]))
                full = RayCaster([grasped, other, *hand]).render(camera)
                alone = RayCaster([grasped]).render(camera)
                ycb_grasped, ycb_other = ids[1], ids[0]  # ycb_ids order: pose_y[i] is ycb_ids[i]'s pose
                seg = np.zeros(len(full.label), np.uint8)
                seg[full.label == 0], seg[full.label == 1], seg[full.label >= 2] = ycb_grasped, ycb_other, 255
                seg = seg.reshape(height, width)
                depth_mm = np.round(full.depth * 1000).astype(np.uint16).reshape(height, width)
                Image.fromarray(_shade(full, [(40, 60, 200), (200, 200, 60), (230, 180, 140), (230, 180, 140)],
                                       DEX_SIZE, (0.5, 0.5, 0.5), (0.3, -0.6, -1.0))).save(folder / serial / f"color_{f:06d}.jpg",
                                                                        quality=95)
                Image.fromarray(depth_mm).save(folder / serial / f"aligned_depth_to_color_{f:06d}.png")
                pose_y = np.stack([poses[1][:3], poses[0][:3]]).astype(np.float32)  # ids order: other, grasped
                np.savez_compressed(folder / serial / f"labels_{f:06d}.npz", seg=seg, pose_y=pose_y,
                                    pose_m=np.zeros((1, 51), np.float32),
                                    joint_3d=np.full((1, 21, 3), -1, np.float32),
                                    joint_2d=np.full((1, 21, 2), -1, np.float32))
                z = full.depth.reshape(height, width)
                truth[f"dexycb_{DEX_SUBJECT}_{sequence}_{serial}_{f:06d}"] = Encoded(
                    seg == ycb_grasped, seg == 255, (alone.label >= 0).reshape(height, width), z,
                    np.zeros_like(z), k, np.eye(4), poses[0], quantum=0.0005)
    return root, truth
