"""Stage 1 data: the category question (Q1), one record per view of a split (of the training
split, the scenes stages 1-2 fit: the chain's held-out share is left for stages 3-4).

    python -m step1_sft.make_data --data DATA --out OUT.jsonl [--split train] [--part fit]
"""
from __future__ import annotations

import sys

from data_tools import builders
from data_tools.dataset import load_dataset
from occmllm.errors import cli


@cli
def main(argv=None) -> int:
    args = builders.stage_parser("python -m step1_sft.make_data", __doc__, part="fit").parse_args(argv)
    dataset = load_dataset(args.data)
    recs = builders.step1_records(builders.stage_views(dataset, args))
    builders.report(builders.write_stage(recs, args.out, dataset, f"step1_{args.split}"), recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
