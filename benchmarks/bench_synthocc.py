"""SynthOcc generation throughput: rendered views per second at 224x224.

Generates the same scenes with 1 worker and with N workers (default: all cores) into a
temporary folder and prints a table, then one JSON line with the figures.

    python benchmarks/bench_synthocc.py [--scenes 40] [--views 10]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_tools.synthocc import Settings, generate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=int, default=40)
    p.add_argument("--views", type=int, default=10)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    settings = Settings(scenes=args.scenes, views=args.views, seed=123)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in sorted({1, args.workers}):
            start = time.perf_counter()
            generate(Path(tmp) / f"w{workers}", settings, workers=workers, progress=False)
            seconds = time.perf_counter() - start
            rows.append({"workers": workers, "views": args.scenes * args.views, "seconds": round(seconds, 2),
                         "views_per_s": round(args.scenes * args.views / seconds, 1)})
    print(f"{'workers':>8} {'views':>6} {'seconds':>8} {'views/s':>8}")
    for r in rows:
        print(f"{r['workers']:>8} {r['views']:>6} {r['seconds']:>8} {r['views_per_s']:>8}")
    best = max(rows, key=lambda r: r["views_per_s"])
    print(json.dumps({"benchmark": "synthocc", "size": settings.size, "cores": os.cpu_count(),
                      "views_per_s": best["views_per_s"], "workers": best["workers"], "rows": rows}))


if __name__ == "__main__":
    main()
