"""Reconstruction throughput: reconstructions per second (encode + mesh extraction + render).

Runs a trained reconstruction model on a split's views (or those a records file names), one view
at a time as chain-of-thought inference does, and times each part; then the same views with dense
mesh extraction, for the coarse-to-fine saving, counting the views whose renders are not the dense
extraction's to the pixel; then the model's SDF-only path (``sdf``, what extraction calls) against
its full query (SDF and colour) on the same points. Prints a table, then one JSON line with the figures.

    python benchmarks/bench_recon.py [--checkpoint outputs/demo/recon/model] [--data outputs/demo/data]
                                     [--split test | --records FILE.jsonl] [--views 32 (0: all)] [--resolution 96]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from occmllm.dataset import load_dataset  # noqa: E402
from occmllm.errors import OccError  # noqa: E402
from reconstruction.model import view_batch  # noqa: E402
from reconstruction.reconstruct import Reconstructor, depth_scale_of, render, select_views  # noqa: E402
from reconstruction.views import load_view  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(reconstructor: Reconstructor, views, renders: list | None = None) -> dict:
    """Per view: the encoder alone, the whole reconstruction (encoder + mesh extraction + colours),
    and the render (appended to ``renders``); extraction time is the difference of the first two."""
    encode = reconstruct = draw = 0.0
    evaluations = 0
    for view in views:
        with torch.inference_mode():
            _, t = timed(lambda: reconstructor.model.encode(view_batch([view])))
        encode += t
        (rec,), t = timed(lambda: reconstructor([view]))
        reconstruct += t
        evaluations += rec.evaluations
        image, t = timed(lambda: render(rec, view.camera))
        draw += t
        if renders is not None:
            renders.append(image)
    n = len(views)
    return {"views": n, "encode_ms": round(1000 * encode / n, 1),
            "extract_ms": round(1000 * (reconstruct - encode) / n, 1), "render_ms": round(1000 * draw / n, 1),
            "evaluations": evaluations // n, "per_s": round(n / (reconstruct + draw), 2)}


def sdf_paths(reconstructor: Reconstructor, views, points: int = 40_000, repeats: int = 5) -> dict:
    """Milliseconds per call of the model's two ways to the SDF on ``points`` points in a view's
    cube: ``query`` (SDF and colour; the training path) and ``sdf`` (what mesh extraction calls)."""
    model, rows = reconstructor.model, {}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        enc = model.encode(view_batch(views[:1]))
        pts = enc.centre[:, None] + (torch.rand(1, points, 3, generator=generator) - 0.5) * 0.3
        for name, fn in (("query", lambda: model.query(enc, pts)[0]), ("sdf", lambda: model.sdf(enc, pts))):
            fn()
            _, t = timed(lambda: [fn() for _ in range(repeats)])
            rows[name] = round(1000 * t / repeats, 1)
    return {"points": points, **{f"{k}_ms": v for k, v in rows.items()},
            "speedup_sdf_over_query": round(rows["query"] / rows["sdf"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("outputs/demo/recon/model"))
    p.add_argument("--data", type=Path, default=Path("outputs/demo/data"))
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", default="test")
    which.add_argument("--records", type=Path, help="the views a records JSONL names (e.g. a stage's file)")
    p.add_argument("--views", type=int, default=32, help="the first N views; 0: all")
    p.add_argument("--resolution", type=int, default=96)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        dataset = load_dataset(args.data)
        scale = depth_scale_of(args.data)
        lines = select_views(dataset, args.split, args.records, args.views or None)
        views = [load_view(dataset.roots, line, scale) for line in lines]
        rows, renders = {}, {}
        for mode in ("coarse_to_fine", "dense"):
            reconstructor = Reconstructor(args.checkpoint, args.resolution, mode=mode)
            run(reconstructor, views[:2])  # warm-up
            renders[mode] = []
            rows[mode] = run(reconstructor, views, renders[mode])
        paths = sdf_paths(reconstructor, views)
    except OccError as exc:
        sys.exit(f"error: {exc} (train a model first: make demo)")
    print(f"{'extraction':>15} {'views':>6} {'encode ms':>10} {'extract ms':>11} {'render ms':>10} "
          f"{'SDF evals':>10} {'recon/s':>8}")
    for mode, r in rows.items():
        print(f"{mode:>15} {r['views']:>6} {r['encode_ms']:>10} {r['extract_ms']:>11} {r['render_ms']:>10} "
              f"{r['evaluations']:>10} {r['per_s']:>8}")
    print(f"SDF at {paths['points']} points: query (SDF + colour) {paths['query_ms']} ms, sdf {paths['sdf_ms']} ms, "
          f"{paths['speedup_sdf_over_query']}x")
    c2f, dense = rows["coarse_to_fine"], rows["dense"]
    differ = sum(not np.array_equal(a, b) for a, b in zip(renders["coarse_to_fine"], renders["dense"]))
    print(f"coarse-to-fine renders that differ from dense extraction's: {differ} of {len(views)}")
    print(json.dumps({"benchmark": "reconstruction", "cores": os.cpu_count(), "resolution": args.resolution,
                      "views_rendered_unlike_dense": differ,
                      "size": views[0].size[0], "reconstructions_per_s": c2f["per_s"],
                      "evaluation_ratio_dense_over_c2f": round(dense["evaluations"] / max(c2f["evaluations"], 1), 2),
                      "speedup_c2f_over_dense": round(c2f["per_s"] / dense["per_s"], 2), "sdf_paths": paths,
                      "rows": rows}))


if __name__ == "__main__":
    main()
