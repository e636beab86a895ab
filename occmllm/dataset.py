"""A dataset on disk: a folder with ``manifest.jsonl`` (one line per view) and ``dataset.json``.

SynthOcc writes both; the ObMan and DexYCB converters write them for real data, with
``dataset.json["root"]`` naming where the images are. A converted dataset has two roots: the
source's own files (images) stay in that root, and the files a converter writes (masks, depth)
live in the dataset folder. A manifest path is taken from the folder when it exists there, else
from the root (``Dataset.roots``, ``resolve_in_roots``); converters write under their own
``views/`` folder, which no source root has, so nothing there shadows a source file. Whichever
root a path is read from, it must stay inside it.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from occmllm import fileio
from occmllm.errors import OccError, where
from occmllm.questions import CATEGORIES

REQUIRED = ("id", "image", "category", "split")


def resolve_in_roots(roots, relative: str, context: str) -> Path:
    """``relative`` under the first of ``roots`` (a path or a sequence of them) where it exists, else
    under the first; refused if it escapes any of them (``fileio.resolve_in_root``)."""
    roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
    paths = [fileio.resolve_in_root(r, relative, context) for r in roots]
    return next((p for p in paths if p.exists()), paths[0])


@dataclass
class Dataset:
    folder: Path      # where manifest.jsonl lives
    root: Path        # image paths are relative to this
    views: list[dict]
    info: dict = field(default_factory=dict)  # dataset.json

    @property
    def roots(self) -> tuple[Path, ...]:
        """Where manifest paths are looked up, in order: the folder, then the image root."""
        folder, root = self.folder.resolve(), self.root.resolve()
        return (folder,) if folder == root else (folder, root)

    def split(self, name: str | None) -> list[dict]:
        """Views of one split (all views for None); an empty split is an error."""
        if name is None:
            return list(self.views)
        views = [v for v in self.views if v["split"] == name]
        if not views:
            raise OccError(f"{self.folder / 'manifest.jsonl'}: no views in split {name!r}")
        return views

    def by_id(self) -> dict[str, dict]:
        return {v["id"]: v for v in self.views}


def load_dataset(folder: str | os.PathLike) -> Dataset:
    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise OccError(f"{folder}: no manifest.jsonl; generate a dataset with `python -m data_tools.synthocc` "
                       "or convert one with data_tools.obman / data_tools.dexycb")
    info = fileio.read_json(folder / "dataset.json") if (folder / "dataset.json").is_file() else {}
    root = folder / info["root"] if "root" in info else folder  # an absolute "root" replaces folder
    views, seen = [], set()
    for lineno, rec in fileio.iter_jsonl(manifest):
        ctx = where(manifest, lineno)
        missing = [k for k in REQUIRED if k not in rec]
        if missing:
            raise OccError(f"{ctx}: manifest line lacks {', '.join(missing)}")
        if rec["category"] not in CATEGORIES:
            raise OccError(f"{ctx}: unknown category {rec['category']!r}; expected one of {', '.join(CATEGORIES)}")
        if rec["id"] in seen:
            raise OccError(f"{ctx}: duplicate view id {rec['id']!r}")
        seen.add(rec["id"])
        fileio.resolve_in_root(root, rec["image"], ctx)
        views.append(rec)
    if not views:
        raise OccError(f"{manifest}: empty manifest")
    return Dataset(folder, root, views, info)


# --- writing a converted dataset -------------------------------------------------------------

def _matrix(value, shapes: tuple[tuple[int, int], ...], context: str, key: str) -> np.ndarray:
    m = np.asarray(value, dtype=np.float64)
    if m.shape not in shapes or not np.isfinite(m).all():
        raise OccError(f"{context}: {key} has shape {m.shape}, expected {' or '.join(map(str, shapes))} "
                       "of finite numbers")
    return m


def homogeneous(value, context: str, key: str) -> list:
    """A 3x4 [R|t] or 4x4 transform as a 4x4 list (the bottom row added)."""
    m = _matrix(value, ((3, 4), (4, 4)), context, key)
    full = np.eye(4)
    full[: m.shape[0]] = m
    return full.tolist()


def camera_fields(intrinsics, world_to_cam, context: str) -> dict:
    """Manifest camera fields (3x3 K, 4x4 world->camera) from whatever of them is given."""
    out = {}
    if intrinsics is not None:
        out["intrinsics"] = _matrix(intrinsics, ((3, 3),), context, "intrinsics").tolist()
    if world_to_cam is not None:
        out["world_to_cam"] = homogeneous(world_to_cam, context, "world_to_cam")
    return out


def write_dataset(out: Path, records: list[dict], name: str, root: Path, **extra) -> dict:
    """Write ``manifest.jsonl`` then ``dataset.json`` (each atomically); returns the dataset info."""
    info = {
        "name": name, "root": str(Path(root).resolve()), "views": len(records),
        "splits": dict(Counter(r["split"] for r in records)),
        "categories": dict(sorted(Counter(r["category"] for r in records).items())),
        **extra,
    }
    fileio.write_jsonl(Path(out) / "manifest.jsonl", records)
    fileio.write_json(Path(out) / "dataset.json", info)
    return info
