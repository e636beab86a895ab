"""Contact sheet: a PNG grid of SynthOcc views per category with their masks.

Each cell shows, side by side, the RGB view, the same view without the hand, and a mask overlay
(green: visible object, red: object hidden by the hand, blue: hand), captioned with the view id
and occlusion ratio. Rows are categories; views are picked to span the occlusion range.

    python -m data_tools.contact_sheet --data DIR --out sheet.png [--per-category 4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from occmllm import fileio
from occmllm.errors import OccError, cli
from occmllm.questions import CATEGORIES


def _load(root: Path, rel: str, mode: str) -> np.ndarray:
    return np.asarray(fileio.read_image(fileio.resolve_in_root(root, rel, str(root)), None, mode))


def mask_overlay(root: Path, view: dict) -> np.ndarray:
    visible = _load(root, view["mask_visible"], "L") > 0
    amodal = _load(root, view["mask_amodal"], "L") > 0
    hand = _load(root, view["mask_hand"], "L") > 0
    out = np.full(visible.shape + (3,), 30, dtype=np.uint8)
    out[hand] = (60, 90, 230)
    out[amodal & ~visible] = (230, 60, 60)
    out[visible] = (60, 200, 80)
    return out


def pick_views(views: list[dict], k: int) -> list[dict]:
    """``k`` views spread over the occlusion range (quantiles), in increasing occlusion."""
    ordered = sorted(views, key=lambda v: (v["occlusion"], v["id"]))
    if len(ordered) <= k:
        return ordered
    idx = np.round(np.linspace(0, len(ordered) - 1, k)).astype(int)
    return [ordered[i] for i in idx]


def contact_sheet(root: Path, out: Path, per_category: int = 4, split: str | None = None) -> Path:
    root = Path(root)
    views = [rec for _, rec in fileio.iter_jsonl(root / "manifest.jsonl") if split in (None, rec["split"])]
    if not views:
        raise OccError(f"{root / 'manifest.jsonl'}: no views{' in split ' + split if split else ''}")
    size = views[0]["width"]
    cell_w, cell_h, label_h = 3 * size + 8, size + 18, 18
    sheet = Image.new("RGB", (per_category * cell_w + 90, len(CATEGORIES) * cell_h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 2), "each cell: RGB | without hand | masks (green visible, red hidden by hand, blue hand)",
              fill=(0, 0, 0))
    for row, cat in enumerate(CATEGORIES):
        y = label_h + row * cell_h
        draw.text((4, y + size // 2), cat, fill=(0, 0, 0))
        for col, view in enumerate(pick_views([v for v in views if v["category"] == cat], per_category)):
            x = 90 + col * cell_w
            tiles = [_load(root, view["image"], "RGB"), _load(root, view["rgb_nohand"], "RGB"),
                     mask_overlay(root, view)]
            sheet.paste(Image.fromarray(np.concatenate(tiles, axis=1)), (x, y))
            draw.text((x, y + size + 2), f"{view['id']}  occlusion {view['occlusion']:.2f}", fill=(0, 0, 0))
    with fileio.atomic_path(out, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.contact_sheet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="SynthOcc dataset folder")
    p.add_argument("--out", required=True, type=Path, help="PNG to write")
    p.add_argument("--per-category", type=int, default=4, help="views per category [4]")
    p.add_argument("--split", choices=["train", "val", "test"], help="only views of this split")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(contact_sheet(args.data, args.out, args.per_category, args.split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
