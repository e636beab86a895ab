"""Stage 3 data: preference pairs from a model's own answers to Q1, on the chain's held-out views
(the stage-2 model never trained on them): the truth over the model's wrong answer, and over a
random other category where the model was right, so the pairs keep the data's category balance.

    python -m step3_mpo.make_data --data DATA --predictions PRED --out OUT.jsonl [--checkpoint NAME]
        [--part held-out] [--wrong-answers-only] [--replay] [--reference-clarity]
"""
from __future__ import annotations

import sys

from data_tools import builders
from occmllm.dataset import load_dataset
from occmllm.errors import cli


@cli
def main(argv=None) -> int:
    parser = builders.stage_parser("python -m step3_mpo.make_data", __doc__, part="held-out")
    parser.add_argument("--predictions", required=True, help="the model's answers on this split")
    parser.add_argument("--checkpoint", help="which checkpoint's answers, when the file has several")
    parser.add_argument("--wrong-answers-only", action="store_true",
                        help="category pairs only where the model was wrong (no right-answer pairs)")
    parser.add_argument("--replay", action="store_true",
                        help="also pairs for Q2-Q5 after the earlier questions (the truth over the other answer), "
                             "so training on category pairs does not move the other answers")
    parser.add_argument("--reference-clarity", action="store_true",
                        help="reproduce the reference's pairs (v1/train_Q1_Q6_balanced_dpo): clarity pairs only, "
                             "with its question text 'Is it clear to identify the object in the hand?\\n' and no "
                             "<image> placeholder (training puts the image in front). Chosen/rejected follow the "
                             "reference's rule: No. chosen where the model's Q1 answer was wrong, Yes. where it was "
                             "right. Not the recipe's: its chain asks Q6 after the first answer (occmllm.chain)")
    args = parser.parse_args(argv)
    dataset = load_dataset(args.data)
    recs = builders.stage3_pairs(builders.stage_views(dataset, args), args.predictions, args.checkpoint, args.seed,
                                 reference_clarity=args.reference_clarity, right_pairs=not args.wrong_answers_only,
                                 replay=args.replay)
    out = builders.write_stage(recs, args.out, dataset, f"step3_{args.split}", kind="preference")
    builders.print_summary(out, recs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
