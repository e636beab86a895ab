"""DexYCB into the project's manifest (``manifest.jsonl`` + ``dataset.json``), in two modes.

From DexYCB's own files (``--root`` alone; ``data_tools.dexycb_root``): every camera's frames of
the sequences under the root, with visible and hand masks, depth, camera, occlusion and the
object's YCB model and pose: what reconstruction, ``inference.py --mode cot`` and ``--mode dual``
read.

From a DexYCB-derived JSONL (``--jsonl``): each line is one JSON object describing one image, with at least:

- the image path, relative to the DexYCB root: ``image`` (or ``color_file`` / ``image_path``);
- the grasped YCB object, one of: ``ycb_name`` or ``object`` (``"006_mustard_bottle"`` or
  ``"mustard_bottle"``); ``ycb_id`` (DexYCB's 1-based object index, 1 = 002_master_chef_can ...
  21 = 061_foam_brick); or ``ycb_ids`` + ``ycb_grasp_ind`` as in DexYCB's ``meta.yml``.

Optional: ``id``, ``split`` (default: the ``--split`` flag), ``mask`` (an image path relative to the
root), ``intrinsics`` (3x3, or DexYCB's ``{"fx", "fy", "ppx", "ppy"}``), ``world_to_cam`` (3x4 or
4x4), ``occlusion`` (a ratio in [0, 1] computed elsewhere). Such lines carry no masks or depth, so
this mode serves the category questions only; occlusion is null unless the line supplies it.

Only objects of ObMan's eight categories are kept (table ``YCB_CATEGORY``); other objects are
skipped and counted, and the counts are printed and stored in ``dataset.json``.

Usage::

    python -m data_tools.dexycb --root DEXYCB_ROOT --out OUT_DIR [--subjects S1,S2] [--setup s0]
                                [--limit N] [--stride K]
    python -m data_tools.dexycb --jsonl FILE --root DEXYCB_ROOT --out OUT_DIR [--split test]
"""
from __future__ import annotations

import argparse
import math
import warnings
from collections import Counter
from pathlib import Path

from occmllm import fileio
from occmllm.dataset import camera_fields, write_dataset
from occmllm.errors import OccError, cli, positive_int, where
from occmllm.questions import CATEGORY_ATTRIBUTES

# DexYCB's 21 YCB objects, indexed as in its annotations (ycb_ids).
YCB_OBJECTS = (
    "002_master_chef_can", "003_cracker_box", "004_sugar_box", "005_tomato_soup_can",
    "006_mustard_bottle", "007_tuna_fish_can", "008_pudding_box", "009_gelatin_box",
    "010_potted_meat_can", "011_banana", "019_pitcher_base", "021_bleach_cleanser", "024_bowl",
    "025_mug", "035_power_drill", "036_wood_block", "037_scissors", "040_large_marker",
    "051_large_clamp", "052_extra_large_clamp", "061_foam_brick",
)

# YCB object -> ObMan category, only where a person would name the object by that category.
# Attributes (round/long/thin) come per category, so they are approximate for some objects: the
# mustard and bleach bottles have oval, not circular, sections and the potted meat can is a
# rounded box, yet "bottle" and "can" are what they are called.
YCB_CATEGORY = {
    "002_master_chef_can": "can",
    "005_tomato_soup_can": "can",
    "007_tuna_fish_can": "can",
    "010_potted_meat_can": "can",
    "006_mustard_bottle": "bottle",
    "021_bleach_cleanser": "bottle",   # a squeeze bottle of cleanser
    "024_bowl": "bowl",
}
# Deliberately unmapped (skipped and counted): the boxes (003, 004, 008, 009, 036, 061) fit no
# category; 025_mug is neither a jar nor a can; 019_pitcher_base is a jug; 037_scissors are not a
# knife; 040_large_marker is not a remote; 011_banana, 035_power_drill and the clamps fit nothing.
# DexYCB has no camera, cellphone, jar, knife or remote.

_BY_SHORT_NAME = {name[4:]: name for name in YCB_OBJECTS}  # "mustard_bottle" -> "006_mustard_bottle"
IMAGE_KEYS = ("image", "color_file", "image_path")


def _ycb_name(rec: dict, ctx: str) -> str:
    """The full YCB name of a line's grasped object."""
    if "ycb_ids" in rec and "ycb_grasp_ind" in rec:
        ids, ind = rec["ycb_ids"], rec["ycb_grasp_ind"]
        if not isinstance(ids, list) or not isinstance(ind, int) or not 0 <= ind < len(ids):
            raise OccError(f"{ctx}: ycb_grasp_ind {ind!r} does not index ycb_ids {ids!r}")
        index = ids[ind]
    elif "ycb_id" in rec:
        index = rec["ycb_id"]
    else:
        name = rec.get("ycb_name", rec.get("object"))
        if name is None:
            raise OccError(f"{ctx}: no object given; add ycb_name, object, ycb_id or ycb_ids + ycb_grasp_ind")
        if isinstance(name, str):
            name = name.strip()
            full = name if name in YCB_OBJECTS else _BY_SHORT_NAME.get(name)
            if full is None:
                raise OccError(f"{ctx}: unknown YCB object {name!r}; DexYCB's objects are {', '.join(YCB_OBJECTS)}")
            return full
        index = name
    if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= len(YCB_OBJECTS):
        raise OccError(f"{ctx}: YCB object id {index!r} is not a DexYCB object index (1-{len(YCB_OBJECTS)})")
    return YCB_OBJECTS[index - 1]


def _intrinsics(value, ctx: str):
    if isinstance(value, dict):  # DexYCB's calibration files give fx, fy, ppx, ppy
        try:
            fx, fy, cx, cy = (float(value[k]) for k in ("fx", "fy", "ppx", "ppy"))
        except (KeyError, TypeError, ValueError):
            raise OccError(f"{ctx}: intrinsics must be a 3x3 list or have numeric fx, fy, ppx, ppy") from None
        return [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]
    return value


def _line_record(rec: dict, root: Path, ctx: str, split: str) -> dict:
    key = next((k for k in IMAGE_KEYS if k in rec), None)
    if key is None:
        raise OccError(f"{ctx}: no image path; give it as one of {', '.join(IMAGE_KEYS)} (relative to the root)")
    image = rec[key]
    if not fileio.resolve_in_root(root, image, ctx).is_file():
        raise OccError(f"{ctx}: image {image!r} not found under {root}")
    out = {
        "id": str(rec.get("id") or "dexycb_" + Path(image).with_suffix("").as_posix().replace("/", "_")),
        "image": image,
    }
    if rec.get("mask") is not None:
        if not fileio.resolve_in_root(root, rec["mask"], ctx).is_file():
            raise OccError(f"{ctx}: mask {rec['mask']!r} not found under {root}")
        out["mask"] = rec["mask"]
    out["split"] = str(rec.get("split") or split)
    return out


def read_dexycb(path: str | Path, root: str | Path, split: str = "test",
                skipped: Counter | None = None) -> list[dict]:
    """Manifest lines for the ObMan-category objects in a DexYCB-derived JSONL file.

    Lines whose object has no ObMan category are skipped and counted per YCB object into
    ``skipped``; without a counter to fill, a warning reports them (never silent). A malformed
    line is an error naming the file and line.
    """
    root = Path(root)
    if not root.is_dir():
        raise OccError(f"{root}: DexYCB root not found")
    counts = Counter() if skipped is None else skipped
    records, seen = [], {}
    for lineno, rec in fileio.iter_jsonl(path):
        ctx = where(path, lineno)
        # Every line is validated, kept or not: a skipped line must still be a well-formed one.
        name = _ycb_name(rec, ctx)
        base = _line_record(rec, root, ctx, split)
        if base["id"] in seen:
            raise OccError(f"{ctx}: duplicate id {base['id']!r} (first on line {seen[base['id']]})")
        seen[base["id"]] = lineno
        category = YCB_CATEGORY.get(name)
        if category is None:
            counts[name] += 1
            continue
        occlusion = rec.get("occlusion")
        if occlusion is not None and (isinstance(occlusion, bool) or not isinstance(occlusion, (int, float))
                                      or not math.isfinite(occlusion) or not 0.0 <= occlusion <= 1.0):
            raise OccError(f"{ctx}: occlusion {occlusion!r} is not a ratio in [0, 1]")
        records.append({
            **base, "category": category, "attributes": CATEGORY_ATTRIBUTES[category],
            "occlusion": None if occlusion is None else float(occlusion),
            "source": "dexycb", "ycb_object": name,
            **camera_fields(_intrinsics(rec.get("intrinsics"), ctx), rec.get("world_to_cam"), ctx),
        })
    if skipped is None and counts:
        warnings.warn(f"{path}: skipped {sum(counts.values())} lines whose object has no ObMan category: "
                      f"{dict(sorted(counts.items()))}", stacklevel=2)
    return records


@cli
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.dexycb", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="DexYCB root (subject folders, calibration/, models/)")
    p.add_argument("--out", required=True, help="folder for manifest.jsonl, dataset.json and the view files")
    p.add_argument("--jsonl", help="read this DexYCB-derived annotation file instead of DexYCB's own files")
    p.add_argument("--split", default="test", help="--jsonl: split for lines that name none [test]")
    p.add_argument("--subjects", help="comma-separated subject folders [all present]")
    p.add_argument("--setup", default="s0", help="the toolkit's split setup: s0, s1, s2 or s3 [s0]")
    p.add_argument("--limit", type=positive_int, help="only the first N frames of each camera of each sequence")
    p.add_argument("--stride", type=positive_int, default=1, help="every K-th frame [1]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.jsonl is None:
        from data_tools.dexycb_root import convert_root
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        info = convert_root(args.root, args.out, subjects, args.limit, args.stride, args.setup,
                            progress=not args.no_progress)
        skipped = Counter(info["skipped_objects"])
        unit = "views"
    else:
        skipped = Counter()
        records = read_dexycb(args.jsonl, args.root, args.split, skipped)
        if not records:
            raise OccError(f"{args.jsonl}: no line holds an object of ObMan's categories "
                           f"(skipped {dict(sorted(skipped.items()))}); nothing to write")
        info = write_dataset(Path(args.out), records, "DexYCB", Path(args.root), source="dexycb",
                             skipped_objects=dict(sorted(skipped.items())))
        unit = "lines"
    print(f"wrote {info['views']} views to {Path(args.out) / 'manifest.jsonl'} "
          f"(splits {info['splits']}, categories {info['categories']})")
    if skipped:
        print(f"skipped {sum(skipped.values())} {unit} whose object has no ObMan category: "
              f"{dict(sorted(skipped.items()))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
