"""A dataset on disk: a folder with ``manifest.jsonl`` (one line per view) and ``dataset.json``.

SynthOcc writes both; the ObMan and DexYCB converters write them for real data, with
``dataset.json["root"]`` naming where the images are (paths in the manifest are relative to it).
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from occmllm import fileio
from occmllm.errors import OccError, where
from occmllm.questions import CATEGORIES

REQUIRED = ("id", "image", "category", "split")


@dataclass
class Dataset:
    folder: Path      # where manifest.jsonl lives
    root: Path        # image paths are relative to this
    views: list[dict]

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
    return Dataset(folder, root, views)


# --- writing a converted dataset -------------------------------------------------------------

def _matrix(value, shapes: tuple[tuple[int, int], ...], context: str, key: str) -> np.ndarray:
    m = np.asarray(value, dtype=np.float64)
    if m.shape not in shapes or not np.isfinite(m).all():
        raise OccError(f"{context}: {key} has shape {m.shape}, expected {' or '.join(map(str, shapes))} "
                       "of finite numbers")
    return m


def camera_fields(intrinsics, world_to_cam, context: str) -> dict:
    """Manifest camera fields (3x3 K, 4x4 world->camera) from whatever of them is given."""
    out = {}
    if intrinsics is not None:
        out["intrinsics"] = _matrix(intrinsics, ((3, 3),), context, "intrinsics").tolist()
    if world_to_cam is not None:
        m = _matrix(world_to_cam, ((3, 4), (4, 4)), context, "world_to_cam")
        full = np.eye(4)
        full[: m.shape[0]] = m  # a 3x4 [R|t] gets the homogeneous bottom row
        out["world_to_cam"] = full.tolist()
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
