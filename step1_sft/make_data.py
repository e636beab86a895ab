"""Stage 1 data: the category question (Q1), one record per view of a split (of the training
split, the scenes stages 1-2 fit: the chain's held-out share is left for stages 3-4).

    python -m step1_sft.make_data --data DATA --out OUT.jsonl [--split train] [--part fit]

With ``--captions`` it writes the pretrained base's alignment data instead (make base): each view
with a caption of its object, not a question of the recipe. With ``--no-hand`` each view's image is
the same view rendered without the hand (the base pretrains on these).
"""
from __future__ import annotations

import sys

from data_tools import builders
from occmllm.dataset import load_dataset
from occmllm.errors import cli


@cli
def main(argv=None) -> int:
    p = builders.stage_parser("python -m step1_sft.make_data", __doc__, part="fit")
    p.add_argument("--captions", action="store_true", help="write captions (the base's alignment data) instead of Q1")
    p.add_argument("--no-hand", action="store_true",
                   help="use each view's image without the hand (rgb_nohand), as the pretrained base does")
    args = p.parse_args(argv)
    dataset = load_dataset(args.data)
    views = builders.stage_views(dataset, args)
    if args.no_hand:
        views = builders.without_hand(views)
    if args.captions:
        recs, name = builders.caption_records(views, in_hand=not args.no_hand), "captions"
    else:
        recs, name = builders.stage1_records(views), "step1"
    builders.print_summary(builders.write_stage(recs, args.out, dataset, f"{name}_{args.split}"), recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
