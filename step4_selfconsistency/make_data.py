"""Stage 4 data: chain-of-thought records.

Q1 then Q6 per view; unclear views continue with the reconstruction render as a second image
and Q1 asked again on it; a Q0 (3-step plan) record for a fraction of views. Clear and unclear
views are balanced by undersampling. Renders are ``RENDERS/<view id>.png`` under the dataset root.

    python -m step4_selfconsistency.make_data --data DATA --out OUT.jsonl --renders renders/oracle
"""
from __future__ import annotations

import sys

from data_tools import builders
from data_tools.dataset import load_dataset
from occmllm import fileio
from occmllm.errors import OccError, cli


@cli
def main(argv=None) -> int:
    parser = builders.stage_parser("python -m step4_selfconsistency.make_data", __doc__)
    builders.add_clarity_arguments(parser)
    parser.add_argument("--renders", required=True,
                        help="folder of reconstruction renders, relative to the dataset root")
    parser.add_argument("--plan-fraction", type=float, default=0.25, help="share of views with a Q0 record [0.25]")
    parser.add_argument("--no-balance", action="store_true", help="keep all views instead of balancing clarity")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.data)
    views = dataset.split(args.split)
    clear = builders.clarity_labels(args, views)
    recs = builders.step4_records(views, clear, args.renders, args.seed, args.plan_fraction,
                                  balance=not args.no_balance)
    for rec in recs:  # every render an unclear record names must exist
        if isinstance(rec["image"], list):
            path = fileio.resolve_in_root(dataset.root, rec["image"][1], str(args.out))
            if not path.is_file():
                raise OccError(f"{path}: render missing for {rec['id']}; render the split first "
                               "(python -m data_tools.renders)")
    builders.report(builders.write_stage(recs, args.out, dataset, f"step4_{args.split}"), recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
