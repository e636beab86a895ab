"""Evaluate a reconstruction model on held-out views against the true object surfaces.

    python -m reconstruction.evaluate --checkpoint CKPT --data DATA [--split test] --out metrics.json
                                      [--sheet sheet.png] [--limit N] [--renders FOLDER] [--batch-size 8]

Protocol: the reconstructed mesh (world frame, metres; the model works in the input camera's
frame with depth, so no alignment is applied) and the true object mesh are each sampled with
10,000 points uniformly on the surface. Chamfer = the mean of the two directed mean
nearest-neighbour distances, in millimetres; F-score at 5 and 10 mm from precision (predicted
points within the threshold of the truth) and recall (true points within it of the prediction);
silhouette IoU = the reconstruction's silhouette in the input view against the object's amodal
mask. An empty reconstruction scores F = 0 and no Chamfer. A metric whose truth a view lacks (a
converted real dataset whose object models are not on this machine, or without amodal masks) is
null for that view, and the command says in one line per cause which metric it could not compute.

Baseline, "visible only": the object pixels the hand does not cover, back-projected with the
depth map, i.e. exactly the visible surface and nothing else (its silhouette is the visible mask).

Beside metrics.json, metrics_by_occlusion.png plots the model's metrics and the baseline's against
occlusion. metrics.json: ``chamfer``, ``fscore_5mm``, ``fscore_10mm``, ``silhouette_iou`` (means), ``n``,
``by_occlusion`` (bins with ``n`` and the same means), ``baseline`` (the same for the
baseline), ``samples`` (per view), ``declined`` (cause -> views), ``protocol``.

Resumable: each batch's scores are appended to ``OUT.partial/`` (e.g. ``metrics.json.partial/``) as
it is scored; started again with the same checkpoint, data, split, limit, resolution and batch
size, a stopped run scores only the batches it had not, and ends with the uninterrupted run's
metrics.json. The folder goes when metrics.json is written.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import trimesh
from PIL import Image, ImageDraw
from pykdtree.kdtree import KDTree
from tqdm import tqdm

from occmllm import fileio, records
from occmllm.dataset import load_dataset, resolve_in_roots
from occmllm.errors import cli, positive_int, refuse_other_settings
from occmllm.questions import OBJECT_COLOURS
from occmllm.render import RayCaster, render_rgb
from reconstruction.metrics import (by_occlusion, mean_metrics, point_tree, sample_surface, silhouette_iou,
                                    surface_metrics)
from reconstruction.reconstruct import Reconstructor, add_common_arguments, depth_scale_of, render, save_render
from reconstruction.truth import true_mesh
from reconstruction.views import backproject, load_view, to_world

SURFACE_SAMPLES = 10_000
PLOT_SUFFIX = "_by_occlusion.png"  # metrics.json -> metrics_by_occlusion.png beside it
KEYS = ("chamfer", "fscore_5mm", "fscore_10mm", "silhouette_iou")
PROTOCOL = ("10k points uniformly on each surface, world frame, metres, no alignment; chamfer = mean of the two "
            "directed mean nearest-neighbour distances in mm; F-score from precision and recall at 5 and 10 mm; "
            "silhouette IoU against the amodal mask in the input view. Baseline: visible object pixels "
            "back-projected with depth.")


def _scores(pred_points: np.ndarray, true_surface: tuple[np.ndarray, KDTree] | None, silhouette: np.ndarray,
            amodal: np.ndarray | None) -> dict:
    """A view's metrics against the true surface (its points and their KD-tree); those whose truth
    is missing (None) are None."""
    m = {}
    if true_surface is not None:
        true_points, true_tree = true_surface
        m = surface_metrics(pred_points, true_points, true_tree=true_tree)
    return {"chamfer": m.get("chamfer_mm"), "fscore_5mm": m.get("fscore_5mm"), "fscore_10mm": m.get("fscore_10mm"),
            "silhouette_iou": silhouette_iou(silhouette, amodal) if amodal is not None else None}


def _summary(rows: list[dict]) -> dict:
    return {"n": len(rows), **mean_metrics(rows, KEYS), "by_occlusion": by_occlusion(rows, keys=KEYS)}


PARTIAL_VIEWS, PARTIAL_SETTINGS = "views.jsonl", "settings.json"  # in OUT.partial/, while a run is unfinished


def scored_views(partial: Path, settings: dict) -> dict[str, dict]:
    """``{id: row}`` of the views an interrupted run scored, from ``partial`` (created, with
    ``settings``, when absent). A run with other settings is refused: its rows would mix two
    evaluations."""
    settings_path = partial / PARTIAL_SETTINGS
    if settings_path.is_file():
        refuse_other_settings(partial, fileio.read_json(settings_path), settings, "evaluation")
    else:
        partial.mkdir(parents=True, exist_ok=True)
        fileio.write_json(settings_path, settings)
    rows = fileio.read_appended(partial / PARTIAL_VIEWS, repair=True, remedy=f"remove {partial} to start afresh")
    return {row["id"]: row for row in rows}


def evaluate(reconstructor: Reconstructor, data: Path, split: str, limit: int | None, batch_size: int = 8,
             progress: bool = True, sheet: Path | None = None, renders: Path | None = None,
             partial: Path | None = None, settings: dict | None = None) -> dict:
    """The metrics of ``reconstructor`` on a split; with ``renders``, each view's render is also
    written there as ``reconstruction.reconstruct`` writes it (``<id>.png``; existing ones are kept),
    so that inference's ``--mode cot`` and ``dual`` find them made. With ``partial``, a folder, each
    batch's rows are appended there as it is scored, and the batches an interrupted run with the same
    ``settings`` scored are not scored again (those with a view on the contact sheet are
    reconstructed again for its pictures); the result is the uninterrupted run's."""
    dataset = load_dataset(data)
    scale = depth_scale_of(data)
    lines = dataset.split(split)
    lines = lines[:limit] if limit else lines
    picks = sheet_picks([line["occlusion"] for line in lines])
    on_sheet = {lines[i]["id"] for row in picks for i in row} if sheet is not None else set()
    done = scored_views(partial, settings or {}) if partial is not None else {}
    if done:
        print(f"resuming: {len(done)} of {len(lines)} views already scored in {partial}", flush=True)
    # whole batches as an uninterrupted run makes them: the model encodes a batch's views together,
    # and another batch would change their meshes in the last bits
    batches = [lines[start: start + batch_size] for start in range(0, len(lines), batch_size)]
    todo = [chunk for chunk in batches if any(line["id"] not in done or line["id"] in on_sheet for line in chunk)]
    rows, sheet_cells = dict(done), {}
    # per mesh: the true mesh, its surface (points, their KD-tree) and why it is missing, shared by the
    # model's and the baseline's scores
    true_cache: dict[str, tuple[trimesh.Trimesh | None, tuple[np.ndarray, KDTree] | None, str | None]] = {}
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(open(partial / PARTIAL_VIEWS, "a", encoding="utf-8")) if partial else None
        for chunk in tqdm(todo, desc="evaluate", unit="batch", disable=not progress):
            views = [load_view(dataset.roots, line, scale) for line in chunk]
            scored = []
            for line, view, rec in zip(chunk, views, reconstructor(views)):
                key = line.get("mesh", line["id"])  # SynthOcc's views of a scene share one mesh
                if key not in true_cache:
                    true_cache.clear()
                    mesh, why = true_mesh(dataset, line)
                    points = sample_surface(mesh, SURFACE_SAMPLES, seed=1) if mesh is not None else None
                    true_cache[key] = (mesh, (points, point_tree(points)) if mesh is not None else None, why)
                truth, true_surface, why = true_cache[key]
                declined = [] if truth is not None else [f"chamfer and F-scores: {why}"]
                amodal = None
                if "mask_amodal" in line:
                    amodal = np.asarray(fileio.read_image(
                        resolve_in_roots(dataset.roots, line["mask_amodal"], line["id"]), None, "L")) > 127
                else:
                    declined.append("silhouette IoU: the manifest has no amodal masks (mask_amodal)")
                caster = RayCaster([rec.mesh])
                hits = caster.render(view.camera)  # one cast for the silhouette, the render and the sheet
                image = None  # the render, made once for the renders folder and the sheet
                if renders is not None and not Path(records.render_path(renders, rec.id)).is_file():
                    image = render(rec, view.camera, caster, hits)
                    save_render(image, renders, rec.id)
                pred_sil = (hits.label >= 0).reshape(view.size)
                pred_points = sample_surface(rec.mesh, SURFACE_SAMPLES, seed=2)
                meta = {"id": line["id"], "category": line["category"], "occlusion": line["occlusion"]}
                visible_points = to_world(backproject(view.visible, view.depth, view.camera.intrinsics), view.camera)
                row = {"id": line["id"], "declined": declined,
                       "ours": {**meta, **_scores(pred_points, true_surface, pred_sil, amodal), "empty": rec.empty,
                                "evaluations": rec.evaluations},
                       "baseline": {**meta, **_scores(visible_points, true_surface, view.visible, amodal)}}
                if line["id"] not in rows:
                    rows[line["id"]] = row
                    scored.append(row)
                if line["id"] in on_sheet and truth is not None:
                    colour = tuple(c / 255 for c in OBJECT_COLOURS.get(line.get("colour"), (200, 200, 200)))
                    truth_image = render_rgb(RayCaster([truth]), view.camera, [colour])
                    sheet_cells[line["id"]] = (row["ours"], row["baseline"], view.rgb, truth_image,
                                               image if image is not None else render(rec, view.camera, caster, hits))
            if log is not None and scored:
                fileio.append_jsonl(log, scored)
    ordered = [rows[line["id"]] for line in lines]
    ours, baseline = [r["ours"] for r in ordered], [r["baseline"] for r in ordered]
    result = {"protocol": PROTOCOL, "checkpoint": None, "data": str(data), "split": split, **_summary(ours),
              "baseline": {"name": "visible only (back-projected visible depth)", **_summary(baseline)},
              "empty_reconstructions": sum(r["empty"] for r in ours), "samples": ours,
              "baseline_samples": baseline, "declined": dict(Counter(why for r in ordered for why in r["declined"]))}
    if sheet is not None and sheet_cells:
        contact_sheet([[sheet_cells[lines[i]["id"]] for i in row if lines[i]["id"] in sheet_cells] for row in picks],
                      sheet)
    return result


SHEET_ROWS, SHEET_PER_ROW = 5, 4


def sheet_picks(occlusions: list, rows: int = SHEET_ROWS, per_row: int = SHEET_PER_ROW) -> list[list[int]]:
    """The views a contact sheet shows, as indices into ``occlusions``: one row per occlusion bin,
    up to ``per_row`` views spread evenly over the bin's views in order (views without an
    occlusion ratio are left out). Chosen before reconstructing, so that only these views' true
    objects are rendered."""
    edges = np.linspace(0, 1.0001, rows + 1)
    picks = []
    for r in range(rows):
        members = [i for i, o in enumerate(occlusions) if o is not None and edges[r] <= o < edges[r + 1]]
        spread = np.linspace(0, len(members) - 1, min(per_row, len(members))).round().astype(int) if members else []
        picks.append([members[i] for i in spread])
    return picks


def contact_sheet(rows: list[list[tuple]], out: Path) -> Path:
    """Input | true object | reconstruction, one row of cells per occlusion bin (``sheet_picks``)."""
    cells = [cell for row in rows for cell in row]
    size = cells[0][2].shape[0]
    cell_w, cell_h = 3 * size + 6, size + 30
    sheet = Image.new("RGB", (max(SHEET_PER_ROW, *map(len, rows)) * cell_w + 4, len(rows) * cell_h + 20), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), "each cell: input | true object | reconstruction render   (rows: occlusion bins)", fill=(0, 0, 0))
    for r, members in enumerate(rows):
        for k, (ours, base, rgb, truth, recon) in enumerate(members):
            x, y = 2 + k * cell_w, 20 + r * cell_h
            sheet.paste(Image.fromarray(np.concatenate([rgb, truth, recon], axis=1)), (x, y))
            draw.text((x, y + size + 2), f"{ours['id']} {ours['category']} occ {ours['occlusion']:.2f}", fill=(0, 0, 0))
            draw.text((x, y + size + 14), f"F@10 ours {ours['fscore_10mm']:.2f} visible-only {base['fscore_10mm']:.2f}",
                      fill=(0, 0, 0))
    with fileio.atomic_path(out, suffix=".png") as tmp:
        sheet.save(tmp, format="PNG")
    return out


PLOTTED = (("chamfer", "Chamfer (mm), lower is better"), ("fscore_10mm", "F-score at 10 mm"),
           ("silhouette_iou", "silhouette IoU"))


def plot_by_occlusion(result: dict, path: Path) -> Path:
    """The metrics against occlusion, the model's beside the visible-only baseline's: one panel per
    metric, a point per occlusion bin that holds views (its view count on the axis)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12.0, 3.4), dpi=100, layout="constrained")
    fig.suptitle(f"Reconstruction against occlusion: {result['n']} {result['split']} views")
    bins = [(b, bb) for b, bb in zip(result["by_occlusion"], result["baseline"]["by_occlusion"]) if b["n"]]
    centres = [(b["lo"] + min(b["hi"], 1.0)) / 2 for b, _ in bins]
    for k, (key, title) in enumerate(PLOTTED):
        ax = fig.add_subplot(1, len(PLOTTED), k + 1)
        for rows, label, style in ((0, "reconstruction", "-o"), (1, "visible only", "--s")):
            values = [pair[rows][key] for pair in bins]
            ax.plot(centres, [float("nan") if v is None else v for v in values], style, label=label)
        ax.set_xticks(centres, [f"{b['bin']}\n{b['n']} views" for b, _ in bins], fontsize="x-small")
        ax.set_xlabel("occlusion ratio", fontsize="small")
        ax.set_title(title, fontsize="medium")
        if key != "chamfer":
            ax.set_ylim(0, 1)
    fig.axes[0].legend(fontsize="small")
    with fileio.atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def table(result: dict) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.3f}"
    lines = ["| rows | n | chamfer (mm) ours / visible-only | F@5mm ours / visible-only | F@10mm ours / visible-only |",
             "|---|---|---|---|---|"]
    pairs = [("all", result, result["baseline"])] + [
        (b["bin"], b, bb) for b, bb in zip(result["by_occlusion"], result["baseline"]["by_occlusion"])]
    for name, a, b in pairs:
        lines.append(f"| {name} | {a['n']} | {fmt(a['chamfer'])} / {fmt(b['chamfer'])} | "
                     f"{fmt(a['fscore_5mm'])} / {fmt(b['fscore_5mm'])} | {fmt(a['fscore_10mm'])} / {fmt(b['fscore_10mm'])} |")
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reconstruction.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(p)
    p.add_argument("--split", default="test", help="held-out split [test]")
    p.add_argument("--out", required=True, type=Path, help="metrics.json to write")
    p.add_argument("--sheet", type=Path, help="also write a contact sheet PNG here")
    p.add_argument("--renders", type=Path, help="also write each view's render into this folder (<id>.png), "
                   "where inference --mode cot/dual then finds it (its --out/renders)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="views the model encodes together; inference's --batch-size makes the renders inference "
                        "would make itself [8]")
    args = p.parse_args(argv)
    reconstructor = Reconstructor(args.checkpoint, args.resolution, args.device)
    # what a view's scores depend on: a resumed run must share it
    settings = {"checkpoint": hashlib.sha256((args.checkpoint / "model.safetensors").read_bytes()).hexdigest(),
                "data": str(args.data.resolve()), "split": args.split, "limit": args.limit,
                "resolution": args.resolution, "batch_size": args.batch_size, "protocol": PROTOCOL}
    partial = args.out.with_name(args.out.name + ".partial")
    result = evaluate(reconstructor, args.data, args.split, args.limit, args.batch_size, progress=not args.no_progress,
                      sheet=args.sheet, renders=args.renders, partial=partial, settings=settings)
    result["checkpoint"] = str(args.checkpoint)
    fileio.write_json(args.out, result)
    shutil.rmtree(partial)
    plot = plot_by_occlusion(result, args.out.with_name(args.out.stem + PLOT_SUFFIX))
    print(table(result))
    for why, n in result["declined"].items():
        print(f"not computed for {n} of {result['n']} views: {why}")
    print(f"wrote {args.out}, {plot}" + (f" and {args.sheet}" if args.sheet else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
