"""Fingerprints of a demo's outputs, to find where two machines' demos part.

The demo's float work rounds by CPU, and a one-bit difference in a feature grows over training into
a few answers. To tell at which step two runs of the same commit first differ, this prints a short
SHA-256 of each step's output, in the order the demo makes them: the dataset, the reconstruction
renders, each checkpoint's weights, each report's predictions. Compare the lists of two machines;
the first line that differs is the step whose arithmetic differs. The last line is JSON.

    python benchmarks/fingerprint.py --demo outputs/demo
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from occmllm.errors import OccError, cli  # noqa: E402

# (name, path under the demo folder, the files of it that are hashed), in the order the demo makes them
PARTS = (
    ("dataset", "data", ("manifest.jsonl", "scenes/**/*")),
    ("test renders", "report/renders", ("*.png",)),
    ("held-out renders", "data/renders/recon", ("*.png",)),
    *((f"checkpoint {name}", f"checkpoints/{name}", ("*.safetensors", "second_look/*.safetensors", "*.json"))
      for name in ("step1", "step2", "step3", "step4", "step4_dual")),
    *((f"predictions {name}", name, ("predictions.jsonl",)) for name in ("report_val", "report", "report_fresh")),
)
SKIPPED = {"trainer_state.json", "training_args.bin", "run.json"}  # hold times and paths, not results


def digest(folder: Path, patterns: tuple[str, ...]) -> tuple[str, int] | None:
    """SHA-256 (16 hex digits) over the relative paths and contents of the files ``patterns`` match,
    sorted; None where the folder is absent."""
    if not folder.exists():
        return None
    files = sorted({f for pattern in patterns for f in folder.glob(pattern)
                    if f.is_file() and f.name not in SKIPPED})
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(folder)).encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16], len(files)


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", type=Path, default=Path("outputs/demo"), help="the demo's folder [outputs/demo]")
    args = p.parse_args(argv)
    if not args.demo.is_dir():
        raise OccError(f"{args.demo}: no such folder; run make demo first")
    out = {}
    for name, rel, patterns in PARTS:
        found = digest((args.demo / rel).resolve(), patterns)
        out[name] = None if found is None else {"sha256": found[0], "files": found[1]}
        print(f"{name:24s} {'absent' if found is None else f'{found[0]}  ({found[1]} files)'}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
