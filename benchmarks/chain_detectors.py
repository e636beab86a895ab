"""What limits the chain of thought: its error detector, or its second look?

Reads a chain run that looked again everywhere (``inference.py --mode cot --gate 0``) on labelled
views, and the first look's own confidence in its category (the softmax over the categories' first
tokens after the category answer's opening words, on the first look's prompt, from the checkpoint
given). For each error detector, the check's P(No.) and one minus that confidence, it prints:

- its AUC for a wrong first answer;
- the gain at the gate fitted to these views, and on views the gate was not chosen on
  (``occmllm.chain.gate_gain_on_fresh_views``);
- the gain a perfect detector would give: the second look's fixes with none of its breaks.

Then the first and second looks' accuracy on the least confident views. The last line is JSON.

    python benchmarks/chain_detectors.py --checkpoint outputs/demo/checkpoints/step4 \\
        --predictions outputs/demo/report_val/predictions.jsonl --run step4-always \\
        --data outputs/demo/stages/val.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from occmllm import chain, fileio  # noqa: E402
from occmllm.answering import dataset_root, load_test, sample_of  # noqa: E402
from occmllm.conversation import ConversationEncoder, load_images, pad_batch, pad_id  # noqa: E402
from occmllm.errors import OccError, cli  # noqa: E402
from occmllm.model import load_model  # noqa: E402
from occmllm.questions import CATEGORIES, Q1, category_answer  # noqa: E402
from occmllm.scoring import truth_category  # noqa: E402
from occmllm.stats import auc  # noqa: E402


def first_look_confidence(checkpoint: Path, recs: list[dict], root: Path, batch_size: int) -> dict[str, float]:
    """Each record's first-look confidence: the largest probability of the categories' first tokens
    after the category answer's opening words (``category_answer``), on the first look's prompt."""
    model, processor = load_model(checkpoint)
    model.eval()
    encoder, tokenizer = ConversationEncoder(processor), processor.tokenizer
    opening = os.path.commonprefix([category_answer(c) for c in CATEGORIES]).rstrip()
    prefix = tokenizer.encode(opening, add_special_tokens=False)
    firsts = [tokenizer.encode(category_answer(c)[len(opening):].rstrip("."), add_special_tokens=False)[0]
              for c in CATEGORIES]
    if len(set(firsts)) != len(firsts):
        raise OccError(f"{checkpoint}: two categories start with the same token; their confidence cannot be read")
    out = {}
    with torch.inference_mode():
        for start in range(0, len(recs), batch_size):
            batch = recs[start:start + batch_size]
            ids, pixels = [], []
            for rec in batch:
                tiles_pixels, tiles = encoder.pixel_values(load_images(sample_of(rec, root).images))
                ids.append(encoder.prompt_ids(tiles, [{"from": "human", "value": Q1}]) + prefix)
                pixels.append(tiles_pixels)
            input_ids, mask = pad_batch(ids, pad_id(tokenizer), "left")
            logits = model(input_ids=input_ids, attention_mask=mask, pixel_values=torch.cat(pixels)).logits[:, -1]
            probs = torch.softmax(logits[:, firsts].float(), dim=-1).max(dim=-1).values
            out.update({str(rec["id"]): float(p) for rec, p in zip(batch, probs)})
    return out


def detector_figures(rows: list[tuple[float, bool, bool]]) -> dict:
    choice = chain.choose_gate(rows)
    return {"auc": auc([p for p, first, _ in rows if not first], [p for p, first, _ in rows if first]),
            "gate": choice["gate"], "looked": choice["looked"],
            "fitted_gain": 100 * (choice["accuracy"] - choice["first_only_accuracy"]),
            "fresh_gain": chain.gate_gain_on_fresh_views(rows),
            "perfect_gain": 100 * float(np.mean([second and not first for _, first, second in rows]))}


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, help="the checkpoint whose first look the run asked")
    p.add_argument("--predictions", required=True, type=Path,
                   help="predictions.jsonl of inference.py --mode cot --gate 0 on --data")
    p.add_argument("--run", help="the run's checkpoint name in the predictions, when they hold several")
    p.add_argument("--data", required=True, type=Path, help="the labelled records the run answered")
    p.add_argument("--data-root", type=Path, help="image root [from the .meta.json beside --data]")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    root = dataset_root(args.data, args.data_root)
    recs = load_test(args.data, root, None)
    truths = {str(r["id"]): truth_category(r) for r in recs}
    preds = [row for _, row in fileio.iter_jsonl(args.predictions)
             if row.get("mode") == "cot" and (args.run is None or row.get("checkpoint") == args.run)
             and truths.get(str(row["id"])) is not None]  # the labelled views, as gate_rows keeps them
    check_rows = chain.gate_rows(preds, truths)  # refuses a run that did not look everywhere
    confidence = first_look_confidence(args.checkpoint, recs, root, args.batch_size)
    confidence_rows = [(1.0 - confidence[str(row["id"])], first, second)
                       for row, (_, first, second) in zip(preds, check_rows)]
    result = {"views": len(preds), "detectors": {"check P(No.)": detector_figures(check_rows),
                                                 "1 - first-look confidence": detector_figures(confidence_rows)}}
    print("| error detector | AUC for a wrong first answer | gain at the fitted gate (looks again on) | "
          "gain on views it was not chosen on: mean (5-95%) | with a perfect detector |")
    print("|---|---|---|---|---|")
    for name, d in result["detectors"].items():
        fresh = d["fresh_gain"]
        print(f"| {name} | {'n/a' if d['auc'] is None else format(d['auc'], '.3f')} | {d['fitted_gain']:+.2f} ({d['looked']:.0%}) | {fresh['mean']:+.2f} "
              f"({fresh['p5']:+.2f} to {fresh['p95']:+.2f}) | {d['perfect_gain']:+.2f} |")
    ordered = sorted(confidence_rows, key=lambda row: -row[0])  # least confident first
    result["least_confident"] = []
    for share in (0.1, 0.2, 1 / 3):
        part = ordered[:max(1, int(len(ordered) * share))]
        looks = {"share": share, "views": len(part), "first": float(np.mean([f for _, f, _ in part])),
                 "second": float(np.mean([s for _, _, s in part]))}
        result["least_confident"].append(looks)
        print(f"least confident {share:.0%} ({len(part)} views): first look right {looks['first']:.3f}, "
              f"second look right {looks['second']:.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
