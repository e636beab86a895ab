"""How much of the category question the demo's pixels support, by vision backbone: a classifier
on the tiny InternVL's vision tower (same config, fresh weights, its tokens flattened into an MLP
head) against a small CNN, trained from scratch with the same epochs, batch and optimiser on the
stage-1 training records, scored on the validation records.

It answers one question: is stage 1's accuracy limited by the data or by the model? A CNN with a
convolutional prior and a ViT of the tiny model's size differ here by far more than any stage-1
setting does (benchmarks/RESULTS.md). Not part of `make bench`: each model trains for minutes.

    python benchmarks/probe_vision.py [--model outputs/demo/models/tiny] [--epochs 8]
        [--backbones vit cnn] [--augment] [--train-fraction 0.5]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import InternVLVisionConfig, InternVLVisionModel  # noqa: E402

from occmllm.conversation import ConversationEncoder  # noqa: E402
from occmllm.errors import OccError, cli  # noqa: E402
from occmllm.model import ImageOnlyInternVLProcessor, check_checkpoint  # noqa: E402
from occmllm.pretrain import ViTClassifier, accuracy, load_labelled_images, train_classifier  # noqa: E402
from occmllm.questions import CATEGORIES  # noqa: E402
from occmllm.tiny import init_vision_tower  # noqa: E402

DEMO = ROOT / "outputs/demo"


def conv_classifier() -> nn.Module:
    """Four stages of two 3x3 convolutions and a 2x2 max-pool, then global average pooling."""
    def stage(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(stage(3, 32), stage(32, 64), stage(64, 128), stage(128, 128), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(128, len(CATEGORIES)))


def train(model: nn.Module, data, epochs: int, batch: int, lr: float, use_augment: bool, seed: int) -> dict:
    (x, y), (vx, vy) = data
    shift, permute = (4, True) if use_augment else (0, False)
    seconds = train_classifier(model, x, y, epochs, batch, lr, seed, shift=shift, permute_colours=permute)
    return {"train_accuracy": accuracy(model, x, y), "val_accuracy": accuracy(model, vx, vy),
            "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(seconds, 1)}


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEMO / "models/tiny", help="checkpoint whose vision config and "
                   "image processor to use (its weights are not used)")
    p.add_argument("--train", type=Path, default=DEMO / "stages/step1_train.jsonl")
    p.add_argument("--val", type=Path, default=DEMO / "stages/step1_val.jsonl")
    p.add_argument("--backbones", nargs="+", choices=["vit", "cnn"], default=["vit", "cnn"])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--augment", action="store_true", help="flips, shifts and colour-channel permutations "
                   "(default: flips only, as stage 1)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="train on the first fraction of the "
                   "training records (whole scenes: records are in scene order), to see how accuracy grows with data")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch < 1:
        raise OccError(f"--epochs {args.epochs} and --batch {args.batch} must both be at least 1")
    if not 0 < args.train_fraction <= 1:
        raise OccError(f"--train-fraction {args.train_fraction} must be in (0, 1]")
    for path in (args.train, args.val):
        if not path.is_file():
            raise OccError(f"{path}: not found; run `make demo-data` (or pass --train/--val)")
    vision_config = InternVLVisionConfig(**check_checkpoint(args.model)["vision_config"])
    encoder = ConversationEncoder(ImageOnlyInternVLProcessor.from_folder(args.model))
    (x, y, _), (vx, vy, _) = (load_labelled_images(path, encoder) for path in (args.train, args.val))
    val = vx, vy
    keep = max(args.batch, round(len(y) * args.train_fraction))
    data = (x[:keep], y[:keep]), val
    rows = {}
    for name in args.backbones:
        torch.manual_seed(args.seed)
        if name == "vit":
            tower = InternVLVisionModel(vision_config)
            init_vision_tower(tower, args.seed)
            model = ViTClassifier(tower)
        else:
            model = conv_classifier()
        rows[name] = train(model, data, args.epochs, args.batch, args.lr, args.augment, args.seed)
    size = tuple(data[0][0].shape[-2:])
    print(f"{len(data[0][1])} training and {len(data[1][1])} validation images at {size[0]}x{size[1]}; "
          f"{args.epochs} epochs, batch {args.batch}, lr {args.lr}, augment {args.augment}, "
          f"{torch.get_num_threads()} threads; chance {1 / len(CATEGORIES):.3f}")
    print(f"{'backbone':8} {'parameters':>10} {'train acc':>9} {'val acc':>8} {'seconds':>8}")
    for name, r in rows.items():
        print(f"{name:8} {r['parameters']:>10,} {r['train_accuracy']:>9.3f} {r['val_accuracy']:>8.3f} {r['seconds']:>8}")
    print(json.dumps({"epochs": args.epochs, "augment": args.augment, "train_images": len(data[0][1]), **rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
