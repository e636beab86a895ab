"""The test set: one multi-turn record per view of a split, asking Q1-Q5 (configurable).

    python -m data_tools.make_testset --data DATA --out test.jsonl [--split test] [--questions Q1,Q2] [--part all]
"""
from __future__ import annotations

import sys

from data_tools import builders
from data_tools.dataset import load_dataset
from occmllm.errors import cli


@cli
def main(argv=None) -> int:
    parser = builders.stage_parser("python -m data_tools.make_testset", __doc__)
    parser.set_defaults(split="test")
    parser.add_argument("--questions", default="Q1,Q2,Q3,Q4,Q5", help="question ids in order [Q1,Q2,Q3,Q4,Q5]")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.data)
    recs = builders.test_records(builders.stage_views(dataset, args), tuple(q.strip() for q in args.questions.split(",")))
    builders.report(builders.write_stage(recs, args.out, dataset, f"test_{args.split}"), recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
