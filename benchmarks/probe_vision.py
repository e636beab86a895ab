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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import InternVLVisionConfig, InternVLVisionModel  # noqa: E402

from occmllm import records  # noqa: E402
from occmllm.conversation import ConversationEncoder, load_images  # noqa: E402
from occmllm.errors import OccError, cli  # noqa: E402
from occmllm.model import ImageOnlyInternVLProcessor, check_checkpoint  # noqa: E402
from occmllm.questions import CATEGORIES  # noqa: E402
from occmllm.sft import load_training_records  # noqa: E402
from occmllm.tiny import init_vision_tower  # noqa: E402

DEMO = ROOT / "outputs/demo"


def load_split(path: Path, encoder: ConversationEncoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values (each record's first image, tiled by the model's processor: one tile for the
    tiny model) and category ids."""
    items = load_training_records(path)
    pixels, labels = [], []
    for root, rec in items:
        category = rec.get("meta", {}).get("category")
        if category not in CATEGORIES:
            raise OccError(f"{path}: record {rec['id']} has no meta.category; use a stage-1 JSONL")
        images = load_images([records.fileio.resolve_in_root(root, p, rec["id"]) for p in records.images_of(rec)])
        pixels.append(encoder.pixel_values(images[:1])[0][:1])
        labels.append(CATEGORIES.index(category))
    return torch.cat(pixels), torch.tensor(labels)


class ViTClassifier(nn.Module):
    """The tiny InternVL's vision tower, initialised as ``occmllm.tiny`` does; its patch tokens,
    flattened, go through an MLP (what the projector and the language model see: every token in
    its place)."""

    def __init__(self, vision_config, seed: int = 0):
        super().__init__()
        self.tower = InternVLVisionModel(vision_config)
        init_vision_tower(self.tower, seed)
        grid = vision_config.image_size[0] // vision_config.patch_size[0]
        width = vision_config.hidden_size
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Flatten(), nn.Linear(width * grid * grid, 256), nn.GELU(),
                                  nn.Linear(256, len(CATEGORIES)))

    def forward(self, pixels):
        return self.head(self.tower(pixel_values=pixels).last_hidden_state[:, 1:])


def conv_classifier() -> nn.Module:
    """Four stages of two 3x3 convolutions and a 2x2 max-pool, then global average pooling."""
    def stage(cin, cout):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
    return nn.Sequential(stage(3, 32), stage(32, 64), stage(64, 128), stage(128, 128), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(128, len(CATEGORIES)))


def augment(x: torch.Tensor, rng: torch.Generator, shift: int = 0, permute_colours: bool = False) -> torch.Tensor:
    """A horizontal flip per image (stage 1's augmentation); with ``shift``, one translation per
    batch of up to that many pixels (edges repeated); with ``permute_colours``, one permutation of
    the colour channels per batch."""
    flip = torch.rand(len(x), generator=rng) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if shift:
        x = _shifted(x, shift, rng)
    return x[:, torch.randperm(3, generator=rng)] if permute_colours else x


def _shifted(x: torch.Tensor, shift: int, rng: torch.Generator) -> torch.Tensor:
    dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=rng).tolist()
    h, w = x.shape[-2:]
    return F.pad(x, (shift,) * 4, mode="replicate")[..., dy:dy + h, dx:dx + w]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        right = sum((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum().item() for i in range(0, len(x), 256))
    model.train()
    return right / len(x)


def train(model: nn.Module, data, epochs: int, batch: int, lr: float, use_augment: bool, seed: int) -> dict:
    (x, y), (vx, vy) = data
    steps = epochs * (len(x) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # the stage-1 schedule: 100 warmup steps, then cosine
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=min(100 / steps, 0.3),
                                                anneal_strategy="cos")
    rng = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _epoch in range(epochs):
        order = torch.randperm(len(x), generator=rng)
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            xb = augment(x[idx], rng, shift=4 if use_augment else 0, permute_colours=use_augment)
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
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
    (x, y), val = load_split(args.train, encoder), load_split(args.val, encoder)
    keep = max(args.batch, round(len(y) * args.train_fraction))
    data = (x[:keep], y[:keep]), val
    rows = {}
    for name in args.backbones:
        torch.manual_seed(args.seed)
        model = ViTClassifier(vision_config, args.seed) if name == "vit" else conv_classifier()
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
