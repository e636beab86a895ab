"""The test set: one multi-turn record per view of a split, asking Q1-Q5 (configurable).

    python -m data_tools.make_testset --data DATA --out test.jsonl [--split test] [--questions Q1,Q2] [--part all]
        [--ids LIST [--id-prefix P]]

``--ids`` keeps the views a list names (the first tab-separated field of each line, so the
reference's ``obman_view_test_all.txt`` works as it is), in the dataset's order; every id listed
must be in the split.
"""
from __future__ import annotations

import sys

from data_tools import builders
from occmllm import fileio
from occmllm.dataset import load_dataset
from occmllm.errors import OccError, cli


def keep_listed(views: list[dict], listing, prefix: str) -> list[dict]:
    wanted = {prefix + line.split("\t")[0].strip() for line in fileio.read_text(listing).splitlines() if line.strip()}
    missing = wanted - {v["id"] for v in views}
    if missing:
        raise OccError(f"{listing}: {len(missing)} of its {len(wanted)} ids are not in the split (e.g. "
                       f"{min(missing)!r}, against {views[0]['id']!r}); check --split and --id-prefix")
    return [v for v in views if v["id"] in wanted]


@cli
def main(argv=None) -> int:
    parser = builders.stage_parser("python -m data_tools.make_testset", __doc__)
    parser.set_defaults(split="test")
    parser.add_argument("--questions", default="Q1,Q2,Q3,Q4,Q5", help="question ids in order [Q1,Q2,Q3,Q4,Q5]")
    parser.add_argument("--ids", help="a list of the view ids to keep, one per line (the first tab-separated field)")
    parser.add_argument("--id-prefix", default="", help="put before each listed id, e.g. obman_test_ for the "
                        "reference's ObMan stems [none]")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.data)
    views = builders.stage_views(dataset, args)
    if args.ids:
        views = keep_listed(views, args.ids, args.id_prefix)
    recs = builders.test_records(views, tuple(q.strip() for q in args.questions.split(",")))
    builders.print_summary(builders.write_stage(recs, args.out, dataset, f"test_{args.split}"), recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
