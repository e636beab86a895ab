"""Stage 2 data: multi-turn records asking Q1, Q2-Q5, then the clarity question Q6.

Q6 is labelled from the occlusion ratio by default, or from a model's predictions (wrong -> No.).

    python -m step2_multiquery.make_data --data DATA --out OUT.jsonl [--predictions P] [--clear-below 0.5]
"""
from __future__ import annotations

import sys

from data_tools import builders
from data_tools.dataset import load_dataset
from occmllm.errors import cli


@cli
def main(argv=None) -> int:
    parser = builders.stage_parser("python -m step2_multiquery.make_data", __doc__)
    builders.add_clarity_arguments(parser)
    args = parser.parse_args(argv)
    dataset = load_dataset(args.data)
    views = dataset.split(args.split)
    recs = builders.step2_records(views, builders.clarity_labels(args, views))
    builders.report(builders.write_stage(recs, args.out, dataset, f"step2_{args.split}"), recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
