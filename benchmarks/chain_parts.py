"""What the chain's gain is made of: the render, the mirrored reading, scored answers, its own model.

The chain's second look differs from the plain first look in four ways at once: it is asked of the
checkpoint's second-look model (``second_look/``), it reads the reconstruction render blended with
the image, it reads twice (as is and flipped left to right), and it scores the categories' answers
instead of generating one. This asks the stage-4 checkpoint on labelled views six ways, each an
``inference.py`` run into its own folder under ``--out`` (renders made once, shared):

- plain: ``--mode plain``;
- first look, scored: ``--mode cot --gate 0 --alpha 1 --no-mirror``, asked of the checkpoint
  without its second-look model, so the stage-4 model scores the answers over the image alone;
- first look, scored, mirrored: the same, reading the flipped image too;
- second look, image only, mirrored: ``--mode cot --gate 0 --alpha 1``;
- second look with the render, once: ``--mode cot --gate 0 --no-mirror``;
- the chain (gate 0): ``--mode cot --gate 0``.

It prints each row's final accuracy (most-occluded third) and its paired gain against plain and
against the first look read mirrored (the like-for-like baseline of the chain). The last line is JSON.

    python benchmarks/chain_parts.py --checkpoint outputs/demo/checkpoints/step4 \\
        --recon outputs/demo/recon/model --recon-resolution 33 \\
        --data outputs/demo/stages/val.jsonl --out outputs/chain_parts/val
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import inference  # noqa: E402
from occmllm import chain, fileio  # noqa: E402
from occmllm.errors import OccError, cli  # noqa: E402
from occmllm.scoring import final_correctness, most_occluded_third  # noqa: E402
from occmllm.stats import paired_difference  # noqa: E402

PLAIN = "plain"
LIKE_FOR_LIKE = "first look, scored, mirrored"
# (row, folder, asks the checkpoint without its second-look model, inference.py options)
READINGS = (
    (PLAIN, "plain", False, ["--mode", "plain"]),
    ("first look, scored", "first_scored", True, ["--mode", "cot", "--gate", "0", "--alpha", "1", "--no-mirror"]),
    (LIKE_FOR_LIKE, "first_scored_mirrored", True, ["--mode", "cot", "--gate", "0", "--alpha", "1"]),
    ("second look, image only, mirrored", "second_image_only", False, ["--mode", "cot", "--gate", "0", "--alpha", "1"]),
    ("second look with the render, once", "second_once", False, ["--mode", "cot", "--gate", "0", "--no-mirror"]),
    ("the chain (gate 0)", "chain", False, ["--mode", "cot", "--gate", "0"]),
)


def without_second_look(checkpoint: Path, folder: Path) -> Path:
    """``folder``: the checkpoint's files, linked, less its second-look model, so that the chain's
    second look is asked of the checkpoint itself."""
    folder.mkdir(parents=True, exist_ok=True)
    for entry in checkpoint.iterdir():
        link = folder / entry.name
        if entry.name != chain.SECOND_LOOK_DIR and not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=entry.is_dir())
    return folder


def correctness(out: Path, records: list[dict]) -> dict:
    """Record id -> final answer right, from the run's predictions (one checkpoint, one mode each)."""
    answers = {}
    for _, rec in fileio.iter_jsonl(out / "predictions.jsonl"):
        answers[rec["id"]] = rec
    return final_correctness(records, answers)


def parts(right: dict[str, dict], third: list) -> list[dict]:
    """Each reading's accuracy (all records and the most-occluded third) and its paired gain against
    plain and against the first look read mirrored."""
    rows = []
    for name, r in right.items():
        ids = list(r)
        row = {"reading": name, "n": len(ids), "accuracy": sum(r.values()) / len(ids),
               "third_accuracy": sum(r[i] for i in third) / len(third) if third else None}
        for label, base in (("against_plain", PLAIN), ("against_first_mirrored", LIKE_FOR_LIKE)):
            row[label] = {"final": paired_difference(r, right[base], ids),
                          "most_occluded_third": paired_difference(r, right[base], third)}
        rows.append(row)
    return rows


def _gain(d: dict) -> str:
    return f"{100 * d['delta']:+.1f} ± {100 * d['se']:.1f} ({d['gained']} / {d['lost']})"


def table(rows: list[dict]) -> str:
    lines = ["| reading | final (third) | against plain | third | against the first look mirrored | third |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        third = f"{r['third_accuracy']:.3f}" if r["third_accuracy"] is not None else "-"
        lines.append(f"| {r['reading']} | {r['accuracy']:.3f} ({third}) | {_gain(r['against_plain']['final'])} | "
                     f"{_gain(r['against_plain']['most_occluded_third'])} | "
                     f"{_gain(r['against_first_mirrored']['final'])} | "
                     f"{_gain(r['against_first_mirrored']['most_occluded_third'])} |")
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="the stage-4 checkpoint (with its second look)")
    p.add_argument("--recon", required=True, type=Path, help="reconstruction model folder")
    p.add_argument("--recon-resolution", type=int, default=64, help="its marching-cubes grid [64]")
    p.add_argument("--data", required=True, type=Path, help="labelled test records")
    p.add_argument("--out", required=True, type=Path, help="folder for the runs (resumed where they exist)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--limit", type=int, help="only the first N records")
    args = p.parse_args(argv)
    if not (args.checkpoint / "config.json").is_file():
        raise OccError(f"{args.checkpoint}: not a checkpoint (no config.json)")
    first_look = without_second_look(args.checkpoint, args.out / "first_look_checkpoint")
    shared = args.out / "renders"
    shared.mkdir(parents=True, exist_ok=True)
    common = ["--data", str(args.data), "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens)]
    renders = ["--recon", str(args.recon), "--recon-resolution", str(args.recon_resolution)]
    if args.limit:
        common += ["--limit", str(args.limit)]
    for _, folder, first, options in READINGS:
        out = args.out / folder
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "renders").exists():
            (out / "renders").symlink_to(shared.resolve(), target_is_directory=True)
        inference.main(["--checkpoint", f"step4={first_look if first else args.checkpoint}", "--out", str(out),
                        *options, *common, *(renders if "cot" in options else [])])
    records = [rec for _, rec in fileio.iter_jsonl(args.data)][: args.limit]
    right = {name: correctness(args.out / folder, records) for name, folder, _, _ in READINGS}
    third = [r["id"] for r in most_occluded_third(records)]
    rows = parts(right, third)
    print(f"{args.data}: {len(records)} records, most-occluded third {len(third)}")
    print(table(rows))
    print(json.dumps({"data": str(args.data), "checkpoint": str(args.checkpoint), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
