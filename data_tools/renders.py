"""Oracle renders: the true object mesh seen from each view's camera, without the hand.

They stand in for reconstruction renders (same names, ``<out>/<view id>.png`` under the dataset
root) wherever a reconstruction model is not trained yet, and are the upper bound a perfect
reconstruction would reach. Resumable: existing renders are kept.

    python -m data_tools.renders --data DATA [--split test] [--out renders/oracle]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trimesh
from PIL import Image
from tqdm import tqdm

from occmllm import fileio, records
from occmllm.dataset import load_dataset
from occmllm.errors import OccError, cli
from occmllm.questions import OBJECT_COLOURS
from occmllm.render import Camera, RayCaster, render_rgb


def render_views(data: Path, out: str, split: str | None, progress: bool = True) -> int:
    dataset = load_dataset(data)
    views = dataset.split(split)
    if any("mesh" not in v or "world_to_cam" not in v for v in views):
        raise OccError(f"{data}: oracle renders need SynthOcc views (true meshes and cameras)")
    casters: dict[str, tuple[RayCaster, tuple]] = {}
    done = 0
    for v in tqdm(views, desc="oracle renders", unit="view", disable=not progress):
        target = fileio.resolve_in_root(dataset.root, records.render_path(out, v["id"]), str(data))
        if target.is_file():
            continue
        if v["mesh"] not in casters:
            casters.clear()  # views come scene by scene: keep one scene's mesh
            mesh = trimesh.load(fileio.resolve_in_root(dataset.root, v["mesh"], str(data)), process=False)
            colour = tuple(c / 255 for c in OBJECT_COLOURS.get(v.get("colour"), (200, 200, 200)))
            casters[v["mesh"]] = (RayCaster([mesh]), colour)
        caster, colour = casters[v["mesh"]]
        cam = Camera.from_lists(v["intrinsics"], v["world_to_cam"], v["width"], v["height"])
        image = render_rgb(caster, cam, [colour])
        with fileio.atomic_path(target, suffix=".png") as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
        done += 1
    return done


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.renders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="SynthOcc dataset folder")
    p.add_argument("--split", default=None, help="only this split (default: all views)")
    p.add_argument("--out", default="renders/oracle", help="folder under the dataset root [renders/oracle]")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    n = render_views(args.data, args.out, args.split, progress=not args.no_progress)
    print(f"rendered {n} new views into {args.data / args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
