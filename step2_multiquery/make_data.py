"""Stage 2 data: multi-turn records asking Q1-Q5 in the test records' order (of the training split,
the scenes stages 1-2 fit). Q6 belongs to the chain of thought (occmllm.chain, stages 3-4).

    python -m step2_multiquery.make_data --data DATA --out OUT.jsonl [--part fit]
"""
from __future__ import annotations

import sys

from data_tools import builders
from occmllm.dataset import load_dataset
from occmllm.errors import cli


@cli
def main(argv=None) -> int:
    args = builders.stage_parser("python -m step2_multiquery.make_data", __doc__, part="fit").parse_args(argv)
    dataset = load_dataset(args.data)
    recs = builders.stage2_records(builders.stage_views(dataset, args))
    builders.print_summary(builders.write_stage(recs, args.out, dataset, f"step2_{args.split}"), recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
