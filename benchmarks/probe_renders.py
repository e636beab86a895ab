"""How much of the category a reconstruction render holds beside its image: linear probes on a
checkpoint's visual tokens (vision tower, pixel shuffle and projector, flattened: what the language
model reads), fitted on the chain's held-out training views with their renders and scored on the
validation views with theirs, overall and by occlusion third. Each probe reads the image, the
render, their blend (0.5 x each, the second look's tokens at alpha 0.5) or both side by side.

It answers one question: does the render carry category evidence the image lacks, where the object
is most hidden? (benchmarks/RESULTS.md, "The stages on the projector-pretrained base"). It reads
what `make demo` writes; not part of `make bench`.

    python benchmarks/probe_renders.py [--model occmllm/pretrained/tiny-synthocc]
        [--train outputs/demo/stages/heldout_q1.jsonl --train-renders renders/recon]
        [--val outputs/demo/stages/val.jsonl --val-renders outputs/demo/report_val/renders]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from occmllm import records  # noqa: E402
from occmllm.conversation import ConversationEncoder, load_images  # noqa: E402
from occmllm.errors import OccError, cli  # noqa: E402
from occmllm.fileio import resolve_in_root  # noqa: E402
from occmllm.model import load_model  # noqa: E402
from occmllm.questions import CATEGORIES  # noqa: E402

DEMO = ROOT / "outputs/demo"
READS = {"image": lambda img, ren: img, "render": lambda img, ren: ren,
         "blend": lambda img, ren: 0.5 * (img + ren), "both": lambda img, ren: torch.cat([img, ren], 1)}


def visual_tokens(model, encoder: ConversationEncoder, paths: list[Path], batch: int = 64) -> torch.Tensor:
    """Each image's visual tokens (one tile), flattened: (N, tokens x hidden)."""
    out = []
    for i in range(0, len(paths), batch):
        pixels = torch.cat([encoder.pixel_values(load_images([p], str(p)))[0][:1] for p in paths[i:i + batch]])
        with torch.no_grad():
            out.append(model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output.flatten(1))
    return torch.cat(out)


def split_files(path: Path, renders: Path | None):
    """Image paths, render paths, category ids and occlusion ratios of a stage file's records, each
    checked before any model loads. ``renders``: the folder of ``<id>.png`` (default: renders/recon
    under the file's image root, where `make demo`'s reconstruction step writes them)."""
    images, rendered, labels, occlusion = [], [], [], []
    for root, rec in records.load_training_records(path, kind="test"):
        meta = rec.get("meta") or {}
        if meta.get("category") not in CATEGORIES or "occlusion" not in meta:
            raise OccError(f"{path}: record {rec['id']!r} has no meta.category and meta.occlusion; use a file "
                           "written by the stage builders")
        render = (Path(renders) / f"{rec['id']}.png" if renders
                  else resolve_in_root(root, records.render_path(records.RECON_RENDERS, rec["id"]), rec["id"]))
        if not render.is_file():
            raise OccError(f"{path}: no render {render} for record {rec['id']!r}; run make demo first")
        images.append(resolve_in_root(root, records.images_of(rec)[0], rec["id"]))
        rendered.append(render)
        labels.append(CATEGORIES.index(meta["category"]))
        occlusion.append(float(meta["occlusion"]))
    return images, rendered, torch.tensor(labels), torch.tensor(occlusion)


def fit_probe(x: torch.Tensor, y: torch.Tensor, weight_decay: float, steps: int = 300, seed: int = 0):
    """A linear map on standardised features, full-batch AdamW; returns its predict function."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], len(CATEGORIES))
    opt = torch.optim.AdamW(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    xs = (x - mean) / std
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(linear(xs), y).backward()
        opt.step()
    return lambda z: linear((z - mean) / std).argmax(1)


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ROOT / "occmllm/pretrained/tiny-synthocc",
                   help="checkpoint whose visual tokens the probes read")
    p.add_argument("--train", type=Path, default=DEMO / "stages/heldout_q1.jsonl")
    p.add_argument("--train-renders", type=Path, default=None,
                   help="folder of the training records' renders [renders/recon under their image root]")
    p.add_argument("--val", type=Path, default=DEMO / "stages/val.jsonl")
    p.add_argument("--val-renders", type=Path, default=DEMO / "report_val/renders")
    p.add_argument("--weight-decay", type=float, default=1.0)
    args = p.parse_args(argv)
    files = [split_files(args.train, args.train_renders), split_files(args.val, args.val_renders)]
    model, processor = load_model(args.model)
    model.eval()
    encoder = ConversationEncoder(processor)
    train, val = [(visual_tokens(model, encoder, images), visual_tokens(model, encoder, renders), labels, occlusion)
                  for images, renders, labels, occlusion in files]
    order = val[3].argsort()
    n = len(order)
    thirds = {"least": order[:n // 3], "middle": order[n // 3:2 * n // 3], "most": order[2 * n // 3:]}
    result = {"model": str(args.model), "train": len(train[2]), "val": n}
    for name, read in READS.items():
        right = fit_probe(read(train[0], train[1]), train[2], args.weight_decay)(read(val[0], val[1])) == val[2]
        result[name] = {"all": round(right.float().mean().item(), 3),
                        **{k: round(right[idx].float().mean().item(), 3) for k, idx in thirds.items()}}
        print(f"{name:7s} all {result[name]['all']:.3f}  occlusion thirds (least, middle, most) "
              + " ".join(f"{result[name][k]:.3f}" for k in thirds), flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
