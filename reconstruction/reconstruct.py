"""Reconstruct the held object from single views and render it: the "3D reconstructed image" the
vision-language model reads.

    python -m reconstruction.reconstruct --checkpoint CKPT --data DATA [--split test | --records TEST.jsonl]
                                         [--out renders/recon | --renders DIR] [--resolution 96] [--limit N]

Renders go to ``DATA/<out>/<view id>.png`` (``occmllm.records.render_path``), shaded and
coloured by the model's colour head, seen from the input camera; existing renders are kept, so
an interrupted run resumes. ``--renders DIR`` writes them into any folder instead: a report
folder's ``renders/``, say, where inference's modes that blend a render look first (``RenderCache``).
Made in batches of inference's size, in the test file's order, they are the renders inference
would make itself, byte for byte, so they can be made ahead, beside another job. A view whose
reconstruction is empty (the SDF never crosses zero) is reported and rendered as a blank image;
the batch goes on.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh
from PIL import Image
from tqdm import tqdm

from occmllm import fileio, records
from occmllm.dataset import load_dataset
from occmllm.errors import OccError, cli, positive_int
from occmllm.render import Camera, Hits, RayCaster, render_vertex_colours
from reconstruction.extract import extract_mesh
from reconstruction.model import load_reconstructor, view_batch
from reconstruction.views import CUBE_HALF, ViewInput, load_view, to_world

BACKGROUND = (0.5, 0.5, 0.5)
KEEP_COMPONENT = 0.1  # drop floating pieces smaller than this fraction of the largest piece
# Mesh extraction (reconstruction.extract): the coarsest grid, evaluated densely, has this many
# samples per axis (the demo's 33^3 grid goes 9 -> 17 -> 33), and a coarse cell is refined when the
# surface may pass through it by this margin (in cell diagonals). The learned field's slope exceeds
# 1 in places, so exactness is not guaranteed; measured, these settings render every view of the
# demo's splits as dense extraction does, with a fifth of its SDF evaluations (benchmarks/RESULTS.md,
# "The demo under 20 minutes").
COARSE_SAMPLES = 9
EXTRACTION_MARGIN = 1.0


@dataclass
class Reconstruction:
    id: str
    mesh: trimesh.Trimesh        # world frame, metres; empty when the SDF never crosses zero
    vertex_colours: np.ndarray   # (V, 3) in [0, 1]
    evaluations: int             # SDF evaluations spent on mesh extraction

    @property
    def empty(self) -> bool:
        return len(self.mesh.faces) == 0


def keep_main_pieces(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """The connected pieces with at least ``KEEP_COMPONENT`` of the largest piece's faces."""
    if len(mesh.faces) == 0:
        return mesh
    pieces = mesh.split(only_watertight=False)
    if len(pieces) <= 1:
        return mesh
    biggest = max(len(p.faces) for p in pieces)
    return trimesh.util.concatenate([p for p in pieces if len(p.faces) >= KEEP_COMPONENT * biggest])


class Reconstructor:
    """A trained model and the settings for turning its SDF into meshes."""

    def __init__(self, checkpoint: str | Path, resolution: int = 96, device: str = "cpu", mode: str = "coarse_to_fine"):
        self.model = load_reconstructor(checkpoint, device)
        self.device, self.resolution, self.mode = torch.device(device), resolution, mode

    @torch.inference_mode()
    def __call__(self, views: list[ViewInput]) -> list[Reconstruction]:
        batch = view_batch(views, self.device)
        enc = self.model.encode(batch)
        out = []
        for i, view in enumerate(views):
            centre = batch["centre"][i].cpu().numpy().astype(np.float64)

            def sdf_fn(points: np.ndarray, i=i) -> np.ndarray:
                pts = torch.as_tensor(points, dtype=torch.float32, device=self.device)[None]
                return self.model.sdf(_select(enc, i), pts)[0].cpu().numpy()

            mesh, evaluations = extract_mesh(sdf_fn, centre - CUBE_HALF, centre + CUBE_HALF, self.resolution,
                                             self.mode, coarse=min(COARSE_SAMPLES, self.resolution),
                                             margin_factor=EXTRACTION_MARGIN)
            mesh = keep_main_pieces(mesh)
            colours = np.zeros((len(mesh.vertices), 3))
            if len(mesh.vertices):
                pts = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32, device=self.device)[None]
                colours = self.model.query(_select(enc, i), pts)[1][0].cpu().numpy().astype(np.float64)
                mesh = trimesh.Trimesh(to_world(np.asarray(mesh.vertices), view.camera), mesh.faces, process=False)
            out.append(Reconstruction(view.id, mesh, colours, evaluations))
        return out


def _select(enc, i: int):
    """The i-th view of an encoded batch, as a batch of one."""
    from dataclasses import fields, replace
    return replace(enc, **{f.name: getattr(enc, f.name)[i: i + 1] for f in fields(enc)
                           if isinstance(getattr(enc, f.name), torch.Tensor)},
                   feature_maps=[m[i: i + 1] for m in enc.feature_maps])


def render(rec: Reconstruction, camera: Camera, caster: RayCaster | None = None, hits: Hits | None = None) -> np.ndarray:
    """(H, W, 3) uint8 view of the reconstruction; the plain background when it is empty. A caller
    that has already cast the mesh's rays passes its ``RayCaster([rec.mesh])`` and their ``hits``."""
    if rec.empty:
        return np.full((camera.height, camera.width, 3), round(BACKGROUND[0] * 255), dtype=np.uint8)
    return render_vertex_colours(caster or RayCaster([rec.mesh]), camera, rec.vertex_colours, background=BACKGROUND,
                                 hits=hits)


def save_render(image: np.ndarray, folder: Path, view_id: str) -> None:
    """A ``render`` written to ``folder/<view id>.png``, whole or not at all."""
    with fileio.atomic_path(Path(records.render_path(folder, view_id)), suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def depth_scale_of(data: Path) -> float:
    info = fileio.read_json(Path(data) / "dataset.json") if (Path(data) / "dataset.json").is_file() else {}
    if not info.get("depth_scale"):
        raise OccError(f"{data}/dataset.json: no depth_scale; reconstruction needs a dataset with depth maps")
    return float(info["depth_scale"])


def select_views(dataset, split: str | None, records_file: Path | None, limit: int | None) -> list[dict]:
    """Manifest lines to reconstruct: a split's, or those whose ids a records JSONL names."""
    if records_file is not None:
        by_id = dataset.by_id()
        lines = []
        for lineno, rec in fileio.iter_jsonl(records_file):
            if str(rec.get("id")) not in by_id:
                raise OccError(f"{records_file}:{lineno}: id {rec.get('id')!r} is not a view of {dataset.folder}")
            lines.append(by_id[str(rec["id"])])
    else:
        lines = dataset.split(split)
    return lines[:limit] if limit else lines


def reconstruct_views(reconstructor: Reconstructor, root, lines: list[dict], depth_scale: float, folder: Path,
                      batch_size: int = 8, progress: bool = True) -> dict:
    """Render the reconstruction of every view (manifest ``lines``, files under ``root``: a path or
    a dataset's ``roots``) as ``folder/<view id>.png``, keeping renders already there; returns
    counts (rendered, kept, empty)."""
    def target(view_id: str) -> Path:
        return Path(records.render_path(folder, view_id))

    todo = [line for line in lines if not target(line["id"]).is_file()]
    counts = {"rendered": 0, "kept": len(lines) - len(todo), "empty": []}
    bar = tqdm(total=len(todo), desc="reconstruct", unit="view", disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start: start + batch_size]
        views = [load_view(root, line, depth_scale) for line in chunk]
        for view, rec in zip(views, reconstructor(views)):
            if rec.empty:
                counts["empty"].append(rec.id)
                print(f"view {rec.id}: the reconstruction is empty (the SDF never crosses zero); "
                      "rendering a blank image", file=sys.stderr)
            save_render(render(rec, view.camera), folder, rec.id)
            counts["rendered"] += 1
        bar.update(len(chunk))
    bar.close()
    return counts


class RenderCache:
    """Reconstruction renders of test views, made on first use and kept as ``folder/<id>.png``
    (inference's modes that blend a render: cot, dual, TTA's second-look judge).

    The reconstruction model reads the view's image, its visible-object and hand masks and its depth
    (the manifest's inputs for that id in the dataset folder ``data``); nothing about the answer."""

    def __init__(self, checkpoint: Path, data: Path, folder: Path, resolution: int, device: str):
        self.settings = RenderSettings(Path(checkpoint), Path(data), Path(folder), resolution)
        self.reconstructor = Reconstructor(checkpoint, resolution, device)
        self.dataset = load_dataset(data)
        self.lines, self.depth_scale = self.dataset.by_id(), depth_scale_of(data)

    def check(self, ids: list) -> None:
        """A one-line error for an id that is not a view of the dataset (no masks or depth to read)."""
        missing = [i for i in ids if str(i) not in self.lines]
        if missing:
            raise OccError(f"{self.dataset.folder}/manifest.jsonl: no view {missing[0]!r} to reconstruct; a mode that "
                           "blends a render needs the test records' dataset (its masks and depth)")

    def paths(self, ids: list) -> list[Path]:
        self.check(ids)
        reconstruct_views(self.reconstructor, self.dataset.roots, [self.lines[str(i)] for i in ids],
                          self.depth_scale, self.settings.folder, batch_size=max(len(ids), 1), progress=False)
        return [Path(records.render_path(self.settings.folder, i)) for i in ids]


@dataclass(frozen=True)
class RenderSettings:
    """What makes a ``RenderCache``, without its model: small and hashable, for inference's image
    workers, which each make their own on their CPU."""
    checkpoint: Path
    data: Path
    folder: Path
    resolution: int

    def cache(self, device: str) -> RenderCache:
        return RenderCache(self.checkpoint, self.data, self.folder, self.resolution, device)


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every command that runs a reconstruction model shares."""
    p.add_argument("--checkpoint", required=True, type=Path, help="reconstruction model folder")
    p.add_argument("--data", required=True, type=Path, help="dataset folder (manifest.jsonl with masks and depth)")
    p.add_argument("--resolution", type=int, default=96, help="marching-cubes grid per axis [96]")
    p.add_argument("--limit", type=int, help="only the first N views")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reconstruction.reconstruct", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", default="test", help="views of this split [test]")
    which.add_argument("--records", type=Path, help="the views whose ids this JSONL names (e.g. a test file)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", default=records.RECON_RENDERS,
                       help=f"folder under the dataset root [{records.RECON_RENDERS}]")
    where.add_argument("--renders", type=Path, help="any folder instead, e.g. a report folder's renders/, where "
                       "inference's modes that blend a render read them (with inference's --batch-size, the same files)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    args = p.parse_args(argv)
    reconstructor = Reconstructor(args.checkpoint, args.resolution, args.device)
    dataset = load_dataset(args.data)
    lines = select_views(dataset, args.split, args.records, args.limit)
    if args.renders is not None:
        folder = shown = args.renders
    else:
        folder, shown = fileio.resolve_in_root(dataset.root, args.out, "--out"), dataset.root / args.out
    counts = reconstruct_views(reconstructor, dataset.roots, lines, depth_scale_of(dataset.folder), folder,
                               args.batch_size, not args.no_progress)
    print(f"rendered {counts['rendered']} views into {shown} ({counts['kept']} already there, "
          f"{len(counts['empty'])} empty reconstructions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
