"""Stage 4 data: chain-of-thought records (occmllm.chain) on the chain's held-out views.

Per view: Q1 with the model's own first answer (PRED, from a model that never trained on these
views; context, not a target), then Q6, answered No. where that answer was wrong; the second
look (Q1 over the image blended with its reconstruction render, ``RENDERS/<view id>.png`` under
the dataset root), repeated ``--second-look-repeats`` times; stage 2's Q1-Q5 record as replay; a
Q0 (3-step plan) record for a fraction of views. Besides, the Q1 record of every view stages 1-2 fit (stage 1's records), so
the plain first look keeps what the earlier stages taught while the blended second look is learnt
(``--no-fit-replay`` leaves them out). Stage 4 trains these with ``dual_alpha`` set (the blend's weight).

    python -m step4_selfconsistency.make_data --data DATA --out OUT.jsonl --predictions PRED --renders renders/recon
"""
from __future__ import annotations

import sys

from data_tools import builders
from occmllm import fileio, records
from occmllm.dataset import load_dataset
from occmllm.errors import OccError, cli


@cli
def main(argv=None) -> int:
    parser = builders.stage_parser("python -m step4_selfconsistency.make_data", __doc__, part="held-out")
    builders.add_predictions_arguments(parser)
    parser.add_argument("--renders", required=True,
                        help="folder of reconstruction renders, relative to the dataset root")
    parser.add_argument("--plan-fraction", type=float, default=0.25, help="share of views with a Q0 record [0.25]")
    parser.add_argument("--no-replay", action="store_true", help="leave out stage 2's Q1-Q5 records")
    parser.add_argument("--no-fit-replay", action="store_true",
                        help="leave out the Q1 records of the training views stages 1-2 fit")
    parser.add_argument("--second-look-repeats", type=int, default=8,
                        help="copies of each view's second-look record (chosen on validation: benchmarks/RESULTS.md, "
                             "\"The blended second look, in the recipe\") [8]")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.data)
    views = builders.stage_views(dataset, args)
    first_right, own_answers = builders.first_answers(views, args.predictions, args.checkpoint)
    recs = builders.stage4_records(views, first_right, args.renders, args.seed, args.plan_fraction,
                                   replay=not args.no_replay, second_look_repeats=args.second_look_repeats,
                                   own_answers=own_answers)
    if not args.no_fit_replay and args.split == "train" and args.part == "held-out":
        recs += builders.stage1_records(builders.select_part(dataset.split(args.split), args.split, "fit"))
    for rec in recs:  # every render a second look names must exist
        if records.render_of(rec):
            path = fileio.resolve_in_root(dataset.root, records.render_of(rec), str(args.out))
            if not path.is_file():
                raise OccError(f"{path}: render missing for {rec['id']}; render the split first "
                               "(python -m data_tools.renders)")
    builders.print_summary(builders.write_stage(recs, args.out, dataset, f"step4_{args.split}"), recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
