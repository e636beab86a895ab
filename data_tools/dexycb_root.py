"""Convert a DexYCB root, from DexYCB's own files, into the project's dataset: ``manifest.jsonl``,
``dataset.json`` and each view's masks and depth under ``OUT/views/``.

DexYCB layout, as NVlabs/dex-ycb-toolkit reads it (``dex_ycb_toolkit/dex_ycb.py``,
``sequence_loader.py``, ``coco_eval.py``, ``grasp_eval.py``)::

    ROOT/<subject>/<sequence>/meta.yml     serials, num_frames, ycb_ids, ycb_grasp_ind, mano_sides, ...
    ROOT/<subject>/<sequence>/<serial>/color_XXXXXX.jpg
    ROOT/<subject>/<sequence>/<serial>/aligned_depth_to_color_XXXXXX.png   uint16, millimetres
    ROOT/<subject>/<sequence>/<serial>/labels_XXXXXX.npz   seg (H, W) uint8: an object's pixels hold
        its YCB index (1-based, ``ycb_ids``), the hand's 255, background 0; pose_y (objects, 3, 4):
        object-to-camera poses in metres; pose_m, joint_3d, joint_2d: the hand
    ROOT/calibration/intrinsics/<serial>_<W>x<H>.yml   color: {fx, fy, ppx, ppy} (DexYCB: 640x480)
    ROOT/models/<ycb name>/textured_simple.obj          YCB models, metres

Per view: the visible mask is ``seg`` == the grasped object's index (``ycb_ids[ycb_grasp_ind]``),
the hand mask ``seg`` == 255, depth is the aligned depth (millimetres to the project's scale),
``world_to_cam`` the identity (poses are in the camera frame), ``intrinsics`` the colour camera's
with the principal point moved by half a pixel (the toolkit back-projects pixel column x at x,
the project at x + 0.5). DexYCB has no amodal mask: where the grasped object's YCB model is
present, its posed mesh is ray-cast from the camera for ``mask_amodal`` and the occlusion ratio
(visible pixels outside the render are not counted); without the model occlusion is null. Only
sequences whose grasped object has an ObMan category are kept (``dexycb.YCB_CATEGORY``); the
others are counted per object in ``dataset.json["skipped_objects"]``.

Splits follow the toolkit's setups (``--setup``, s0 by default): s0 seen subjects, s1 unseen
subjects, s2 unseen cameras, s3 unseen objects, by subject, camera and sequence position as in
``DexYCBDataset.__init__``.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from data_tools.dexycb import YCB_CATEGORY, YCB_OBJECTS
from data_tools.realviews import ViewWriter, depth_image, finish, load_model, mask_image, model_entry, occlusion_ratio
from occmllm import fileio
from occmllm.dataset import camera_fields
from occmllm.errors import OccError
from occmllm.questions import CATEGORY_ATTRIBUTES
from occmllm.render import Camera, RayCaster

SUBJECTS = ("20200709-subject-01", "20200813-subject-02", "20200820-subject-03", "20200903-subject-04",
            "20200908-subject-05", "20200918-subject-06", "20200928-subject-07", "20201002-subject-08",
            "20201015-subject-09", "20201022-subject-10")
SERIALS = ("836212060125", "839512060362", "840412060917", "841412060263", "932122060857", "932122060861",
           "932122061900", "932122062010")
HAND = 255
MODEL = "{name}/textured_simple.obj"
META_KEYS = ("ycb_ids", "ycb_grasp_ind", "num_frames")


def split_of(setup: str, subject: int, serial: int, sequence: int) -> str:
    """The toolkit's split of a view by subject, camera and sequence position (0-based)."""
    if setup == "s0":
        if sequence % 5 != 4:
            return "train"
        return "val" if subject in (0, 1) else "test"
    if setup == "s1":
        return "val" if subject == 6 else "test" if subject in (7, 8) else "train"
    if setup == "s2":
        return "val" if serial == 6 else "test" if serial == 7 else "train"
    if setup == "s3":
        return "val" if sequence // 5 in (3, 19) else "test" if sequence // 5 in (7, 11, 15) else "train"
    raise OccError(f"--setup {setup!r}: DexYCB's setups are s0, s1, s2, s3")


def read_yaml(path: Path, what: str) -> dict:
    if not path.is_file():
        raise OccError(f"{path}: not found; DexYCB's {what} is needed (extract it from the DexYCB archive)")
    try:
        data = yaml.safe_load(fileio.read_text(path))
    except yaml.YAMLError as exc:
        raise OccError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); re-extract it") from None
    if not isinstance(data, dict):
        raise OccError(f"{path}: expected a YAML mapping ({what})")
    return data


def intrinsics(root: Path, serial: str, width: int, height: int) -> np.ndarray:
    path = root / "calibration" / "intrinsics" / f"{serial}_{width}x{height}.yml"
    color = read_yaml(path, f"intrinsics of camera {serial}").get("color")
    try:
        fx, fy, ppx, ppy = (float(color[k]) for k in ("fx", "fy", "ppx", "ppy"))
    except (KeyError, TypeError, ValueError):
        raise OccError(f"{path}: needs color: {{fx, fy, ppx, ppy}} as numbers") from None
    return np.array([[fx, 0.0, ppx + 0.5], [0.0, fy, ppy + 0.5], [0.0, 0.0, 1.0]])


def read_labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``seg`` and ``pose_y`` of a labels file (loaded without pickle: plain arrays only)."""
    if not path.is_file():
        raise OccError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as labels:
            return np.asarray(labels["seg"]), np.asarray(labels["pose_y"], dtype=np.float64)
    except KeyError as exc:
        raise OccError(f"{path}: no {exc} array; DexYCB labels hold seg and pose_y") from None
    except (OSError, ValueError) as exc:
        raise OccError(f"{path}: not a readable .npz ({exc}); re-extract it from the DexYCB archive") from None


class Sequence:
    """One DexYCB sequence: its meta.yml, grasped object and cameras."""

    def __init__(self, root: Path, subject: str, name: str):
        self.rel = f"{subject}/{name}"
        meta_file = root / self.rel / "meta.yml"
        meta = read_yaml(meta_file, "sequence meta")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise OccError(f"{meta_file}: lacks {', '.join(missing)}; is this a DexYCB sequence?")
        ids, ind = meta["ycb_ids"], meta["ycb_grasp_ind"]
        if not isinstance(ids, list) or not isinstance(ind, int) or not 0 <= ind < len(ids) \
                or not all(isinstance(i, int) and 1 <= i <= len(YCB_OBJECTS) for i in ids):
            raise OccError(f"{meta_file}: ycb_grasp_ind {ind!r} does not index ycb_ids {ids!r} of DexYCB objects")
        self.grasp_ind, self.grasp_id = ind, ids[ind]
        self.object = YCB_OBJECTS[self.grasp_id - 1]
        self.frames = int(meta["num_frames"])
        serials = meta.get("serials") or sorted(p.name for p in (root / self.rel).iterdir() if p.is_dir())
        self.serials = [str(s) for s in serials]
        for serial in self.serials:
            if not (root / self.rel / serial).is_dir():
                raise OccError(f"{root / self.rel / serial}: camera folder named in {meta_file} not found")


def list_sequences(root: Path, subjects: list[str] | None) -> list[tuple[int, int, Sequence]]:
    """(subject position, sequence position, sequence) for every sequence of the chosen subjects."""
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name in SUBJECTS)
    chosen = subjects or present
    for name in chosen:
        if name not in SUBJECTS or not (root / name).is_dir():
            raise OccError(f"{root / name}: not a DexYCB subject folder here (present: {', '.join(present) or 'none'})")
    out = []
    for name in chosen:
        names = sorted(p.name for p in (root / name).iterdir() if (p / "meta.yml").is_file())
        out += [(SUBJECTS.index(name), k, Sequence(root, name, seq)) for k, seq in enumerate(names)]
    if not out:
        raise OccError(f"{root}: no DexYCB sequences (<subject>/<sequence>/meta.yml) found")
    return out


def amodal_mask(caster: RayCaster, model_vertices: np.ndarray, camera: Camera) -> np.ndarray:
    """Where a model covers the image of ``camera`` (its ``world_to_cam``: the model's pose), casting
    only the rays inside the model's projected box."""
    uv, z = camera.project(model_vertices)
    mask = np.zeros((camera.height, camera.width), dtype=bool)
    uv = uv[z > 0]
    if len(uv):
        u0, v0 = np.clip(np.floor(uv.min(axis=0)).astype(int), 0, [camera.width, camera.height])
        u1, v1 = np.clip(np.ceil(uv.max(axis=0)).astype(int) + 1, 0, [camera.width, camera.height])
        mask[v0:v1, u0:u1] = True
    return (caster.render(camera, pixel_mask=mask).label >= 0).reshape(mask.shape)


class Converter:
    """Converts views one by one, keeping one YCB model's ray caster at a time."""

    def __init__(self, root: Path, writer: ViewWriter):
        self.root, self.writer = root, writer
        self._model: tuple[str, RayCaster | None, np.ndarray | None] = ("", None, None)

    def model(self, name: str) -> tuple[RayCaster | None, np.ndarray | None]:
        if self._model[0] != name:
            path = self.root / "models" / MODEL.format(name=name)
            mesh = load_model(path, str(path)) if path.is_file() else None
            self._model = (name, RayCaster([mesh]) if mesh is not None else None,
                           np.asarray(mesh.vertices) if mesh is not None else None)
        return self._model[1], self._model[2]

    def view(self, seq: Sequence, serial: str, frame: int, k: np.ndarray, split: str) -> dict:
        folder = f"{seq.rel}/{serial}"
        image = f"{folder}/color_{frame:06d}.jpg"
        rgb = np.asarray(fileio.read_image(self.root / image, str(self.root / image)))
        height, width = rgb.shape[:2]
        labels = self.root / folder / f"labels_{frame:06d}.npz"
        seg, poses = read_labels(labels)
        if seg.shape != (height, width) or poses.ndim != 3 or poses.shape[1:] != (3, 4) \
                or len(poses) <= seq.grasp_ind:
            raise OccError(f"{labels}: seg {seg.shape} or pose_y {poses.shape} does not fit the {width}x{height} "
                           f"image and the sequence's objects")
        pose = np.vstack([poses[seq.grasp_ind], [0.0, 0.0, 0.0, 1.0]])
        posed = abs(np.linalg.det(pose[:3, :3]) - 1.0) < 1e-3  # an all-zero pose means none was annotated
        caster, vertices = self.model(seq.object) if posed else (None, None)
        visible = seg == seq.grasp_id
        size = (width, height)

        def out(kind: str) -> str:
            return f"views/{folder}/{kind}_{frame:06d}.png"

        def depth() -> np.ndarray:
            path = self.root / folder / f"aligned_depth_to_color_{frame:06d}.png"
            millimetres = np.asarray(fileio.read_image(path, str(path), None), dtype=np.float64)
            if millimetres.shape != (height, width):
                raise OccError(f"{path}: {millimetres.shape} is not a {width}x{height} single-channel depth map")
            return depth_image(millimetres / 1000.0)

        record = {
            "id": f"dexycb_{folder.replace('/', '_')}_{frame:06d}", "image": image,
            "mask_visible": self.writer.write(out("mask_visible"), size, lambda: mask_image(visible)),
            "mask_hand": self.writer.write(out("mask_hand"), size, lambda: mask_image(seg == HAND)),
            "depth": self.writer.write(out("depth"), size, depth),
        }
        occlusion = None
        if caster is not None:
            amodal = amodal_mask(caster, vertices, Camera(k, pose, width, height))
            record["mask_amodal"] = self.writer.write(out("mask_amodal"), size, lambda: mask_image(amodal))
            occlusion = occlusion_ratio(visible, amodal)
        category = YCB_CATEGORY[seq.object]
        record.update({
            "split": split, "category": category, "attributes": CATEGORY_ATTRIBUTES[category],
            "occlusion": occlusion, "source": "dexycb", "ycb_object": seq.object,
            "width": int(width), "height": int(height),
            **camera_fields(k, np.eye(4), str(labels)),
        })
        if posed:
            record["object_model"] = model_entry("ycb", MODEL.format(name=seq.object), pose, str(labels))
        return record


def convert_root(root: str | Path, out: str | Path, subjects: list[str] | None = None, limit: int | None = None,
                 stride: int = 1, setup: str = "s0", progress: bool = True) -> dict:
    """Convert every camera's frames (the first ``limit`` of each, every ``stride``-th) of the
    chosen subjects' sequences; returns the dataset info."""
    root = Path(root)
    if not root.is_dir():
        raise OccError(f"{root}: DexYCB root not found")
    split_of(setup, 0, 0, 0)  # an unknown setup fails before any work
    sequences = list_sequences(root, subjects)
    skipped: Counter = Counter()
    jobs, cameras = [], {}
    for subject, position, seq in sequences:
        frames = list(range(0, seq.frames, stride))[:limit]
        if seq.object not in YCB_CATEGORY:
            skipped[seq.object] += len(frames) * len(seq.serials)
            continue
        for serial in seq.serials:
            if serial not in cameras:  # every camera's calibration is checked before anything is written
                first = root / seq.rel / serial / f"color_{frames[0]:06d}.jpg"
                if not first.is_file():
                    raise OccError(f"{first}: file not found")
                cameras[serial] = intrinsics(root, serial, *fileio.image_size(first))
            index = SERIALS.index(serial) if serial in SERIALS else -1
            jobs += [(seq, serial, f, split_of(setup, subject, index, position)) for f in frames]
    if not jobs:
        raise OccError(f"{root}: no sequence grasps an object of ObMan's categories (skipped "
                       f"{dict(sorted(skipped.items()))}); nothing to write")
    writer = ViewWriter(Path(out))
    convert = Converter(root, writer)
    records = [convert.view(seq, serial, frame, cameras[serial], split)
               for seq, serial, frame, split in tqdm(jobs, desc="dexycb", unit="view", disable=None if progress else True)]
    return finish(Path(out), records, "DexYCB", root, source="dexycb", setup=setup,
                  model_roots={"ycb": str((root / "models").resolve())}, skipped_objects=dict(sorted(skipped.items())))
