"""Convert a real ObMan dataset root into the project's dataset: ``manifest.jsonl``,
``dataset.json`` and each view's masks and depth under ``OUT/views/``.

ObMan layout (one folder per split)::

    ROOT/{split}/rgb/{id}.jpg      the rendered hand-object image (256x256)
    ROOT/{split}/segm/{id}.png     material indices of three renders of the frame in one file
    ROOT/{split}/depth/{id}.png    depth of the same three renders, 8 bits each
    ROOT/{split}/meta/{id}.pkl     a pickled dict of numpy arrays and plain values: ``class_id``
                                   (ShapeNet synset), ``sample_id``, ``affine_transform``,
                                   ``obj_path``, ``obj_scale``, ``obj_visibility_ratio``,
                                   ``depth_min``/``depth_max`` (and ``hand_``/``obj_`` ones), hand
                                   joints (``coords_2d``/``coords_3d``) and vertices (``verts_3d``), ...
    ROOT/{split}/rgb_obj/{id}.jpg  optional: the frame rendered without the person

Per view, under ``OUT/views/{split}/``: ``mask_visible``, ``mask_hand``, ``mask_amodal``, ``depth``
(and ``depth_object`` where ``rgb_obj`` exists) ``/{id}.png``, in ``data_tools.realviews``'s formats:
the visible mask is the full scene's object pixels, the hand mask its forearm and hand parts, the
amodal mask the object-only render's object pixels, the depth the full scene's. Manifest lines give those paths relative to OUT and the image's relative to ROOT (which
``dataset.json`` names; ``occmllm.dataset`` reads each from where it is), with the category,
attributes, occlusion ratio, camera and object model.

Where each encoding comes from (hassony2/obman ``obman/obman.py``; hassony2/obman_render
``blender_grasps.py``, ``obman_render/depthutils.py``, ``camutils.py``, ``texturing.py``, README):

- segm and depth hold three renders (full scene, person only, object only) written by OpenCV as
  BGR, so read as RGB: red = object only, green = person only, blue = full scene. segm values are
  Blender material pass indices: the object 100, body parts 1-24 (19-24: forearms and hands),
  background 0.
- depth: ``convert_depth`` maps a render's Cycles Z pass linearly to 1..255 between its nearest and
  farthest hit (0: no hit) and returns ``(image, max, min)``, which ``blender_grasps.py`` stores as
  ``depth_min, depth_max``: the names are swapped, and ``obman.py``'s ``get_depth`` inverts it as
  ``(v - 1) / 254 * (depth_min - depth_max) + depth_max`` metres, used here as is. The renders
  were made with Blender 2.78c, whose Cycles Z pass is the distance from the camera centre (its
  kernel's ``camera_distance``; planar z came in 2.8x), so it is divided by each pixel's ray
  length to give the camera z the project stores. A 16-bit PNG is read by its high byte, as
  ``cv2.imread(path, 1)`` in ``get_depth`` does.
- camera: fixed, a 60 mm lens on a 32 mm sensor at 256x256 (``camutils.set_camera``), i.e.
  ``obman.py``'s ``cam_intr`` [[480, 0, 128], [0, 480, 128], [0, 0, 1]]. The world is Blender's
  camera frame (the camera is fixed at its origin, ``camutils.check_camera``) and ``obman.py``'s
  ``cam_extr`` = diag(1, -1, -1) (``camutils.get_extrinsic``) turns it into OpenCV axes: that is
  ``world_to_cam``. ``blender_grasps.py`` stores neither in the meta files (it only projects the
  joints with them), so these are used, K scaled for images of another size, unless a meta file
  has ``cam_intr`` / ``cam_extr``.
- object: ``affine_transform`` maps the vertices of ShapeNetCore.v2's
  ``{class_id}/{sample_id}/models/model_normalized.obj`` into that world, as ``obman.py``'s
  ``get_obj_verts_faces`` applies it. With ``--shapenet-root`` reconstruction finds the models.

Usage::

    python -m data_tools.obman --root OBMAN_ROOT --out OUT_DIR [--splits train,val,test] [--limit N]
                               [--shapenet-root SHAPENET_CORE_V2]

Resumable: view files already complete in OUT are kept. ``manifest.jsonl`` and ``dataset.json``
are written (atomically) only when every view has converted; a bad file is an error naming it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.plainpickle import load_plain
from data_tools.realviews import ViewWriter, depth_image, finish, mask_image, model_entry, occlusion_ratio
from occmllm import fileio
from occmllm.dataset import camera_fields
from occmllm.errors import OccError, cli, positive_int
from occmllm.questions import CATEGORIES, CATEGORY_ATTRIBUTES

# ShapeNet synsets of ObMan's eight object classes.
SYNSETS = {
    "02876657": "bottle", "02880940": "bowl", "02942699": "camera", "02946921": "can",
    "02992529": "cellphone", "03593526": "jar", "03624134": "knife", "04074963": "remote",
}
assert sorted(SYNSETS.values()) == sorted(CATEGORIES)

OBJECT_INDEX = 100                    # the grasped object's material index in every render
HAND_PARTS = (19, 20, 21, 22, 23, 24)  # forearms and hands: SynthOcc's hand also starts the forearm
OBJECT_ONLY, PERSON_ONLY, FULL_SCENE = 0, 1, 2  # channels of segm and depth, read as RGB
DEPTH_RANGE = {FULL_SCENE: ("depth_min", "depth_max"), OBJECT_ONLY: ("obj_depth_min", "obj_depth_max")}
RENDER_SIZE = 256
INTRINSICS = ((480.0, 0.0, 128.0), (0.0, 480.0, 128.0), (0.0, 0.0, 1.0))
CAM_EXTR = ((1.0, 0.0, 0.0, 0.0), (0.0, -1.0, 0.0, 0.0), (0.0, 0.0, -1.0, 0.0))
SHAPENET_MODEL = "{class_id}/{sample_id}/models/model_normalized.obj"
NEEDED = (("segm", "segmentation"), ("depth", "depth maps"))


def load_meta(path: str | Path, context: str | None = None) -> dict:
    """Load one ObMan meta pickle, refusing anything but numpy data and builtins."""
    context = context or str(path)
    meta = load_plain(path, context, "ObMan meta files hold only numpy arrays and builtins (is this file really "
                      "from ObMan?)", "re-extract this file from the ObMan archive")
    if not isinstance(meta, dict):
        raise OccError(f"{context}: expected a pickled dict, got {type(meta).__name__}")
    return meta


def read_image(path: Path, context: str) -> np.ndarray:
    """Decode an image fully (so a truncated file is caught here, not in training)."""
    return np.asarray(fileio.read_image(path, context, None))


def occlusion_from_segm(segm: np.ndarray) -> float | None:
    """Fraction of the object's silhouette hidden in the image, from an ObMan segm PNG.

    The object-only render is the object's full (amodal) silhouette from the same camera and
    full-scene pixels of the object index are the part still visible, so occlusion = 1 -
    visible / amodal: the quantity ObMan's renderer stored as ``obj_visibility_ratio``, with the
    hand and arm as the hiders. None when the file cannot answer: a single-channel mask (no
    object-only render) or an empty object-only silhouette.
    """
    if segm.ndim != 3 or segm.shape[2] < 3:
        return None
    return occlusion_ratio(segm[..., FULL_SCENE] == OBJECT_INDEX, segm[..., OBJECT_ONLY] == OBJECT_INDEX)


def intrinsics(meta: dict, width: int, height: int) -> np.ndarray:
    """The meta's ``cam_intr`` if it has one, else ObMan's fixed camera scaled to the image size."""
    given = meta.get("cam_intr", meta.get("cam_calib"))
    if given is not None:
        return np.asarray(given, dtype=np.float64)
    k = np.array(INTRINSICS)
    k[0] *= width / RENDER_SIZE
    k[1] *= height / RENDER_SIZE
    return k


def ray_lengths(k: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W) length of each pixel centre's ray scaled to camera z = 1: distance / z."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays = np.stack([u, v, np.ones_like(u)], axis=-1) @ np.linalg.inv(k).T
    return np.linalg.norm(rays, axis=-1)


def depth_metres(png: np.ndarray, meta: dict, channel: int, k: np.ndarray, context: str) -> np.ndarray:
    """Camera z in metres (0: nothing rendered) of one render of an ObMan depth PNG."""
    if png.ndim != 3 or png.shape[2] < 3:
        raise OccError(f"{context}: one channel; ObMan depth PNGs hold three renders in their colour channels "
                       "(re-extract the file from the ObMan archive)")
    near_key, far_key = DEPTH_RANGE[channel]
    try:
        named_min, named_max = float(meta[near_key]), float(meta[far_key])
    except (KeyError, TypeError, ValueError):
        raise OccError(f"{context}: its meta file lacks numeric {near_key} and {far_key}, which map the depth PNG to "
                       "metres; re-extract the meta file from the ObMan archive") from None
    code = png[..., channel].astype(np.float64)
    distance = (code - 1.0) / 254.0 * (named_min - named_max) + named_max
    return np.where(code > 0, distance / ray_lengths(k, png.shape[1], png.shape[0]), 0.0)


def _category(meta: dict, context: str) -> tuple[str, str]:
    class_id = meta.get("class_id")
    if class_id is None:
        raise OccError(f"{context}: meta has no class_id; is this an ObMan meta file?")
    if isinstance(class_id, (bytes, bytearray)):
        class_id = class_id.decode("latin1")
    class_id = f"{int(class_id):08d}" if isinstance(class_id, (int, np.integer)) else str(class_id).strip()
    if class_id not in SYNSETS:
        known = ", ".join(f"{k} ({v})" for k, v in SYNSETS.items())
        raise OccError(f"{context}: unknown class_id {class_id!r}; ObMan's classes are {known}")
    return class_id, SYNSETS[class_id]


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode("latin1") if isinstance(value, (bytes, bytearray)) else str(value)


def convert_sample(root: Path, split: str, stem: str, writer: ViewWriter) -> dict:
    """One manifest line for ``ROOT/split/*/stem.*``, writing the view's files with ``writer``."""
    image, segm_rel, depth_rel = f"{split}/rgb/{stem}.jpg", f"{split}/segm/{stem}.png", f"{split}/depth/{stem}.png"
    ctx = str(root / split / "meta" / f"{stem}.pkl")
    meta = load_meta(fileio.resolve_in_root(root, f"{split}/meta/{stem}.pkl", ctx), ctx)
    class_id, category = _category(meta, ctx)
    rgb = read_image(fileio.resolve_in_root(root, image, ctx), f"{root / image} (image of {ctx})")
    segm = read_image(fileio.resolve_in_root(root, segm_rel, ctx), f"{root / segm_rel} (segm of {ctx})")
    height, width = rgb.shape[:2]
    if segm.shape[:2] != rgb.shape[:2]:
        raise OccError(f"{root / segm_rel}: size {segm.shape[1]}x{segm.shape[0]} differs from its image "
                       f"{root / image} ({width}x{height})")
    if segm.ndim != 3 or segm.shape[2] < 3:
        raise OccError(f"{root / segm_rel}: one channel; ObMan segm PNGs hold three renders in their colour "
                       "channels (re-extract the file from the ObMan archive)")
    k = intrinsics(meta, width, height)
    decoded: list[np.ndarray] = []

    def depth(channel: int):
        def make() -> np.ndarray:
            label = f"{root / depth_rel} (depth of {ctx})"
            if not decoded:  # both depth files come from one PNG: decode it once
                decoded.append(read_image(fileio.resolve_in_root(root, depth_rel, ctx), label))
            if decoded[0].shape[:2] != rgb.shape[:2]:
                raise OccError(f"{label}: size differs from its image {root / image} ({width}x{height})")
            return depth_image(depth_metres(decoded[0], meta, channel, k, label))
        return make

    def out(kind: str) -> str:
        return f"views/{split}/{kind}/{stem}.png"

    full, object_only, size = segm[..., FULL_SCENE], segm[..., OBJECT_ONLY], (width, height)
    record = {
        "id": f"obman_{split}_{stem}",  # ObMan numbers restart in every split; ids are file-name safe
        "image": image, "mask": segm_rel,
        "mask_visible": writer.write(out("mask_visible"), size, lambda: mask_image(full == OBJECT_INDEX)),
        "mask_hand": writer.write(out("mask_hand"), size, lambda: mask_image(np.isin(full, HAND_PARTS))),
        "mask_amodal": writer.write(out("mask_amodal"), size, lambda: mask_image(object_only == OBJECT_INDEX)),
        "depth": writer.write(out("depth"), size, depth(FULL_SCENE)),
    }
    rgb_obj = f"{split}/rgb_obj/{stem}.jpg"
    if fileio.resolve_in_root(root, rgb_obj, ctx).is_file():  # the object without the person
        record["rgb_nohand"] = rgb_obj
        record["depth_object"] = writer.write(out("depth_object"), size, depth(OBJECT_ONLY))
    sample_id = _text(meta.get("sample_id"))
    record.update({
        "split": split, "category": category, "attributes": CATEGORY_ATTRIBUTES[category],
        "occlusion": occlusion_from_segm(segm), "source": "obman", "width": int(width), "height": int(height),
        # which ShapeNet model is held; sample_id names it in its synset
        "shapenet": {"class_id": class_id, "sample_id": sample_id},
        **camera_fields(k, meta.get("cam_extr", CAM_EXTR), ctx),
    })
    if sample_id is not None and meta.get("affine_transform") is not None:
        record["object_model"] = model_entry("shapenet", SHAPENET_MODEL.format(class_id=class_id, sample_id=sample_id),
                                             meta["affine_transform"], ctx)
    return record


def list_samples(root: Path, splits: list[str], limit: int | None) -> list[tuple[str, str]]:
    """(split, stem) for every meta file, in order; the first ``limit`` of each split. Every split
    must have its segmentation and depth folders (checked before anything is written)."""
    samples = []
    for split in splits:
        meta_dir = root / split / "meta"
        if not meta_dir.is_dir():
            raise OccError(f"{meta_dir}: no such folder; is {root} an ObMan root (with {split}/rgb, "
                           f"{split}/segm, {split}/depth, {split}/meta)? Choose the splits present with --splits")
        for folder, what in NEEDED:
            if not (root / split / folder).is_dir():
                raise OccError(f"{root / split / folder}: no such folder; this ObMan copy has no {what}, which the "
                               f"view masks and depth are made from: extract {split}/{folder} from the ObMan archive")
        stems = sorted(p.stem for p in meta_dir.glob("*.pkl"))
        if not stems:
            raise OccError(f"{meta_dir}: no .pkl meta files")
        samples += [(split, s) for s in stems[:limit]]
    return samples


def convert(root: str | Path, out: str | Path, splits=("train", "val", "test"), limit: int | None = None,
            shapenet_root: str | Path | None = None, progress: bool = True) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise OccError(f"{root}: ObMan root not found")
    if shapenet_root is not None and not Path(shapenet_root).is_dir():
        raise OccError(f"--shapenet-root {shapenet_root}: folder not found; give ShapeNetCore.v2's folder "
                       "(holding the synset folders) or leave it out")
    samples = list_samples(root, list(splits), limit)
    writer = ViewWriter(Path(out))
    records = [convert_sample(root, split, stem, writer)
               for split, stem in tqdm(samples, desc="obman", unit="view", disable=None if progress else True)]
    models = str(Path(shapenet_root).resolve()) if shapenet_root is not None else None
    return finish(Path(out), records, "ObMan", root, source="obman", model_roots={"shapenet": models})


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.obman", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="ObMan root (holding train/, val/, test/)")
    p.add_argument("--out", required=True, help="folder for manifest.jsonl, dataset.json and the view files")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits [train,val,test]")
    p.add_argument("--limit", type=positive_int, default=None, help="convert only the first N samples of each split")
    p.add_argument("--shapenet-root", help="ShapeNetCore.v2 folder: the object models, for reconstruction targets "
                                           "and metrics [none: evaluation then skips the surface metrics]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise OccError("--splits is empty; name at least one split, e.g. --splits test")
    info = convert(args.root, args.out, splits, args.limit, args.shapenet_root, progress=not args.no_progress)
    print(f"wrote {info['views']} views to {Path(args.out) / 'manifest.jsonl'} "
          f"(splits {info['splits']}, categories {info['categories']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
