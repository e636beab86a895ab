"""Convert a real ObMan dataset root into the project's manifest (``manifest.jsonl`` + ``dataset.json``).

ObMan layout (one folder per split)::

    ROOT/{split}/rgb/{id}.jpg    the rendered hand-object image (256x256)
    ROOT/{split}/segm/{id}.png   segmentation, three renders in one file (see ``occlusion_from_segm``)
    ROOT/{split}/meta/{id}.pkl   a pickled dict of numpy arrays and plain values: ``class_id`` (ShapeNet
                                 synset), ``sample_id``, ``side``, ``coords_2d``/``coords_3d`` (hand
                                 joints), ``verts_3d`` (hand vertices), ``affine_transform``, ``obj_path``,
                                 ``obj_visibility_ratio``, depth ranges, ... and, in some versions,
                                 ``cam_intr``/``cam_extr``

Usage::

    python -m data_tools.obman --root OBMAN_ROOT --out OUT_DIR [--splits train,val,test] [--limit N]

Images stay where they are: manifest paths are relative to the ObMan root, which ``dataset.json``
names. Nothing is written unless every sample converts (a bad file is an error naming it).
"""
from __future__ import annotations

import argparse
import builtins
import pickle
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.dataset import camera_fields, write_dataset
from occmllm import fileio
from occmllm.errors import OccError, cli
from occmllm.questions import CATEGORIES, CATEGORY_ATTRIBUTES

# ShapeNet synsets of ObMan's eight object classes.
SYNSETS = {
    "02876657": "bottle", "02880940": "bowl", "02942699": "camera", "02946921": "can",
    "02992529": "cellphone", "03593526": "jar", "03624134": "knife", "04074963": "remote",
}
assert sorted(SYNSETS.values()) == sorted(CATEGORIES)

# Material index the ObMan renderer gives the grasped object in every segmentation render
# (hand parts are 21-24, the rest of the body other small indices, background 0).
OBJECT_INDEX = 100


# --- restricted unpickling ---------------------------------------------------------------------

def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a meta pickle may name: numpy array/scalar/dtype reconstruction and
    side-effect-free builtin data types. A pickle can call any global it names, so an open
    ``pickle.load`` on a downloaded file would run whatever the file says."""
    try:  # numpy >= 2 keeps these in numpy._core; 1.x in numpy.core (pickles name either)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    table: dict[tuple[str, str], object] = {}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 arrays
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    # np.matrix is a plain-data ndarray subclass; older numpy pickles name its defining module.
    table[("numpy", "matrix")] = table[("numpy.matrixlib.defmatrix", "matrix")] = np.matrix
    for name in ("set", "frozenset", "complex", "bytearray", "bytes", "str", "int", "float", "bool",
                 "list", "tuple", "dict"):
        table[("builtins", name)] = getattr(builtins, name)
    return table


_ALLOWED = _allowed_globals()


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Protocol-2 pickles written by Python 3 store bytes as ``_codecs.encode(text, 'latin1')``;
    only that codec is admitted (a codec name is a lookup, so arbitrary ones are refused)."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refuses codec {encoding!r}")
    return text.encode("latin1", errors)


class _MetaUnpickler(pickle.Unpickler):
    def __init__(self, fh, context: str):
        # latin1: Python 2 pickles hold numpy buffers as 8-bit str; latin1 maps them to bytes 1:1.
        super().__init__(fh, encoding="latin1")
        self.context = context

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # Python 2 name
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise OccError(f"{self.context}: refuses to load pickle global {module}.{name}; ObMan meta "
                           "files hold only numpy arrays and builtins (is this file really from ObMan?)") from None


def load_meta(path: str | Path, context: str | None = None) -> dict:
    """Load one ObMan meta pickle, refusing anything but numpy data and builtins."""
    context = context or str(path)
    try:
        with open(path, "rb") as fh:
            meta = _MetaUnpickler(fh, context).load()
    except OccError:
        raise
    except FileNotFoundError:
        raise OccError(f"{context}: file not found") from None
    except Exception as exc:  # a damaged pickle surfaces as many exception types
        raise OccError(f"{context}: not a readable pickle ({type(exc).__name__}: {exc}); "
                       "re-extract this file from the ObMan archive") from None
    if not isinstance(meta, dict):
        raise OccError(f"{context}: expected a pickled dict, got {type(meta).__name__}")
    return meta


# --- images ------------------------------------------------------------------------------------

def read_image(path: Path, context: str) -> np.ndarray:
    """Decode an image fully (so a truncated file is caught here, not in training)."""
    return np.asarray(fileio.read_image(path, context, None))


def occlusion_from_segm(segm: np.ndarray) -> float | None:
    """Fraction of the object's silhouette hidden in the image, from an ObMan segm PNG.

    The renderer draws each frame three times (full scene, hand/body only, object only) and stacks
    the three material-index maps into one PNG, written by OpenCV in BGR order. Read as RGB: red is
    the object-only render, green the hand-only render, blue the full scene. The object-only render
    is the object's full (amodal) silhouette from the same camera, and full-scene pixels equal to
    the object index are the part still visible, so occlusion = 1 - visible / amodal. This is the
    same quantity ObMan's renderer stored as ``obj_visibility_ratio`` (it kept only frames where
    enough of the object was visible). Here the hider is the hand and the arm/body.

    None when the file cannot answer honestly: a single-channel mask (no object-only render) or an
    empty object-only silhouette.
    """
    if segm.ndim != 3 or segm.shape[2] < 3:
        return None
    amodal = segm[..., 0] == OBJECT_INDEX
    n_amodal = int(amodal.sum())
    if n_amodal == 0:
        return None
    visible = int(((segm[..., 2] == OBJECT_INDEX) & amodal).sum())
    return round(1.0 - visible / n_amodal, 6)


# --- conversion --------------------------------------------------------------------------------

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


def convert_sample(root: Path, split: str, stem: str) -> dict:
    """One manifest line for ``ROOT/split/*/stem.*``."""
    image = f"{split}/rgb/{stem}.jpg"
    mask = f"{split}/segm/{stem}.png"
    meta_file = root / split / "meta" / f"{stem}.pkl"
    ctx = str(meta_file)
    meta = load_meta(fileio.resolve_in_root(root, f"{split}/meta/{stem}.pkl", ctx), ctx)
    class_id, category = _category(meta, ctx)
    rgb = read_image(fileio.resolve_in_root(root, image, ctx), f"{root / image} (image of {ctx})")
    segm = read_image(fileio.resolve_in_root(root, mask, ctx), f"{root / mask} (segm of {ctx})")
    if segm.shape[:2] != rgb.shape[:2]:
        raise OccError(f"{root / mask}: size {segm.shape[1]}x{segm.shape[0]} differs from its image "
                       f"{root / image} ({rgb.shape[1]}x{rgb.shape[0]})")
    record = {
        "id": f"obman_{split}_{stem}",  # ObMan numbers restart in every split; ids are file-name safe
        "image": image, "mask": mask, "split": split, "category": category,
        "attributes": CATEGORY_ATTRIBUTES[category],
        "occlusion": occlusion_from_segm(segm),
        "source": "obman",
        "width": int(rgb.shape[1]), "height": int(rgb.shape[0]),
        # which ShapeNet model is held (for reconstruction targets); sample_id names it in its synset
        "shapenet": {"class_id": class_id, "sample_id": None if meta.get("sample_id") is None
                     else str(meta["sample_id"])},
    }
    # ObMan's renderer used one fixed camera and most meta files do not store it; take it only when
    # the file does, rather than asserting a camera the file does not vouch for.
    intrinsics = meta.get("cam_intr", meta.get("cam_calib"))
    record.update(camera_fields(intrinsics, meta.get("cam_extr"), ctx))
    return record


def list_samples(root: Path, splits: list[str], limit: int | None) -> list[tuple[str, str]]:
    """(split, stem) for every meta file, in order; the first ``limit`` of each split."""
    samples = []
    for split in splits:
        meta_dir = root / split / "meta"
        if not meta_dir.is_dir():
            raise OccError(f"{meta_dir}: no such folder; is {root} an ObMan root (with {split}/rgb, "
                           f"{split}/segm, {split}/meta)? Choose the splits present with --splits")
        stems = sorted(p.stem for p in meta_dir.glob("*.pkl"))
        if not stems:
            raise OccError(f"{meta_dir}: no .pkl meta files")
        samples += [(split, s) for s in stems[:limit]]
    return samples


def convert(root: str | Path, out: str | Path, splits=("train", "val", "test"), limit: int | None = None,
            progress: bool = True) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise OccError(f"{root}: ObMan root not found")
    samples = list_samples(root, list(splits), limit)
    records = [convert_sample(root, split, stem)
               for split, stem in tqdm(samples, desc="obman", unit="view", disable=None if progress else True)]
    return write_dataset(Path(out), records, "ObMan", root, source="obman")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.obman", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="ObMan root (holding train/, val/, test/)")
    p.add_argument("--out", required=True, help="folder for manifest.jsonl and dataset.json")
    p.add_argument("--splits", default="train,val,test", help="comma-separated splits [train,val,test]")
    p.add_argument("--limit", type=_positive, default=None, help="convert only the first N samples of each split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise OccError("--splits is empty; name at least one split, e.g. --splits test")
    info = convert(args.root, args.out, splits, args.limit, progress=not args.no_progress)
    print(f"wrote {info['views']} views to {Path(args.out) / 'manifest.jsonl'} "
          f"(splits {info['splits']}, categories {info['categories']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
