"""Pretrain the tiny InternVL's vision tower: the demo's stand-in for a pretrained InternViT.

Real runs start from an InternVL checkpoint whose vision tower was pretrained on billions of
images. The tiny model of ``occmllm.tiny`` has no such checkpoint, and its ViT, trained from
scratch inside stage 1 on the demo's 5,120 images, stays far below what the pixels allow
(benchmarks/RESULTS.md, "What limits stage 1"). This command builds a tiny InternVL and trains its
vision tower to name the category and the round/long/thin attributes of every view of a labelled
conversation file (stage 1's format, ``meta.category``), then saves the whole InternVL with the
trained tower. ``--head patches`` (the earlier base's) trains it through a throw-away MLP over its
patch tokens. ``--head projector`` (the shipped base's, ``make base``) trains it through the
model's own projector and a linear map, so the projector trains with the tower and is kept: a
fresh projector reads a tower trained through another head several points worse than that head
does (benchmarks/RESULTS.md, "The tower pretrained through its projector"). The language model
keeps its fresh weights (``make base`` then aligns it and the projector to the tower on captions).

Give it SynthOcc scenes that the demo never uses (another ``--seed``): pretraining on the same
synthetic distribution flatters the demo compared with real data, and must never see the demo's
validation or test scenes.

    python -m occmllm.pretrain --train TRAIN.jsonl [--val VAL.jsonl] --out DIR [--head projector] [--epochs 8]

DIR also gets ``pretrain.json`` (the data, the settings, the time and the final accuracies) and
``train_log.jsonl`` with ``training.png`` (the loss every 50 steps and, with --val, the validation
accuracy after each epoch: ``occmllm.curves``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers import InternVLForConditionalGeneration, InternVLVisionModel

from occmllm import curves, fileio, records
from occmllm.conversation import ConversationEncoder, load_images
from occmllm.errors import OccError, cli, refuse_other_settings
from occmllm.model import ImageOnlyInternVLProcessor, check_checkpoint
from occmllm.questions import CATEGORIES, CATEGORY_ATTRIBUTES
from occmllm.tiny import MERGE_HELP, build

INFO = "pretrain.json"


def load_labelled_images(path: Path, encoder: ConversationEncoder, progress: bool = False):
    """Pixel values (each record's first image as one tile) and labels: category ids (N,) and
    round/long/thin targets (N, 3), from ``meta.category``."""
    items = records.load_training_records(path)
    pixels, labels = [], []
    for root, rec in tqdm(items, desc=f"reading {path.name}", unit="image", disable=not progress):
        category = (rec.get("meta") or {}).get("category")
        if category not in CATEGORIES:
            raise OccError(f"{path}: record {rec['id']!r} has no meta.category naming one of {', '.join(CATEGORIES)}; "
                           "use a stage-1 JSONL (python -m step1_sft.make_data)")
        image = load_images([fileio.resolve_in_root(root, records.images_of(rec)[0], rec["id"])], rec["id"])
        pixels.append(encoder.pixel_values(image)[0][:1])
        labels.append(CATEGORIES.index(category))
    categories = torch.tensor(labels)
    attributes = torch.tensor([[float(CATEGORY_ATTRIBUTES[CATEGORIES[i]][a]) for a in ("round", "long", "thin")]
                               for i in labels])
    return torch.cat(pixels), categories, attributes


class ProjectorClassifier(nn.Module):
    """A model's own image path (vision tower, pixel shuffle, projector: the visual tokens the
    language model reads), its tokens flattened through one linear map to the category logits and,
    with ``attributes``, three attribute logits after them. Trained together, the tower and the
    projector become the reader the VLM keeps (``--head projector``)."""

    def __init__(self, model: InternVLForConditionalGeneration, attributes: int = 0):
        super().__init__()
        self.model = model.model
        config = model.config
        grid = config.vision_config.image_size[0] // config.vision_config.patch_size[0]
        tokens = round(grid * config.downsample_ratio) ** 2
        self.head = nn.Linear(tokens * config.text_config.hidden_size, len(CATEGORIES) + attributes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output.flatten(1))


HEADS = ("patches", "projector")


class ViTClassifier(nn.Module):
    """A vision tower; its patch tokens, flattened (every token in its place, as the projector and
    the language model see them), go through an MLP to the category logits and, with
    ``attributes``, three attribute logits after them."""

    def __init__(self, tower: InternVLVisionModel, attributes: int = 0):
        super().__init__()
        self.tower = tower
        config = tower.config
        grid = config.image_size[0] // config.patch_size[0]
        width = config.hidden_size
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Flatten(), nn.Linear(width * grid * grid, 256), nn.GELU(),
                                  nn.Linear(256, len(CATEGORIES) + attributes))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixel_values=pixels).last_hidden_state[:, 1:])


PARTIAL_STATE = "pretrain_state.pt"  # in OUT.partial/: an interrupted run's state after its last whole epoch
LOG_STEPS = 50  # pretraining's log: the mean loss over this many steps
# random erasing's rectangle: its smallest and (by default) largest share of the image
ERASE_AREA = (0.02, 0.4)


def augment(x: torch.Tensor, rng: torch.Generator, shift: int = 0, permute_colours: bool = False,
            erase: float = 0.0, erase_area: float = ERASE_AREA[1]) -> torch.Tensor:
    """A horizontal flip per image (stage 1's augmentation); with ``shift``, one translation per
    batch of up to that many pixels (edges repeated); with ``permute_colours``, one permutation of
    the colour channels per batch; with ``erase``, that share of the images get one rectangle of
    noise covering ``ERASE_AREA[0]`` to ``erase_area`` of the image (``erase_rectangles``)."""
    flip = torch.rand(len(x), generator=rng) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    if shift:
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=rng).tolist()
        h, w = x.shape[-2:]
        x = F.pad(x, (shift,) * 4, mode="replicate")[..., dy:dy + h, dx:dx + w]
    if erase:
        x = erase_rectangles(x, rng, erase, area=(ERASE_AREA[0], erase_area))
    return x[:, torch.randperm(3, generator=rng)] if permute_colours else x


def erase_rectangles(x: torch.Tensor, rng: torch.Generator, share: float, area: tuple[float, float] = ERASE_AREA,
                     aspect: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020, as DeiT pretrains its ViTs): with probability ``share``
    an image gets one rectangle of ``area`` (a fraction of the image) and ``aspect`` (height / width,
    log-uniform), placed uniformly and filled with standard normal noise (the normalised pixels'
    scale). A tower that has to name objects with part of them missing reads occluded ones better,
    without ever seeing what occludes them."""
    n, _, h, w = x.shape
    hit = torch.rand(n, generator=rng) < share
    s = torch.empty(n).uniform_(*area, generator=rng) * h * w
    r = torch.empty(n).uniform_(math.log(aspect[0]), math.log(aspect[1]), generator=rng).exp()
    rh = (s * r).sqrt().round().clamp(1, h).long()
    rw = (s / r).sqrt().round().clamp(1, w).long()
    top = (torch.rand(n, generator=rng) * (h - rh + 1)).long()
    left = (torch.rand(n, generator=rng) * (w - rw + 1)).long()
    rows, cols = torch.arange(h), torch.arange(w)
    in_rows = (rows >= top[:, None]) & (rows < (top + rh)[:, None])  # (n, h)
    in_cols = (cols >= left[:, None]) & (cols < (left + rw)[:, None])  # (n, w)
    inside = in_rows[:, :, None] & in_cols[:, None, :] & hit[:, None, None]
    noise = torch.randn(x.shape, generator=rng, dtype=x.dtype)
    return torch.where(inside[:, None], noise, x)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Category accuracy (the first 8 logits)."""
    model.eval()
    with torch.no_grad():
        right = sum((model(x[i:i + 256])[:, :len(CATEGORIES)].argmax(1) == y[i:i + 256]).sum().item()
                    for i in range(0, len(x), 256))
    model.train()
    return right / len(x)


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, batch: int, lr: float,
                     seed: int, attributes: torch.Tensor | None = None, shift: int = 0,
                     permute_colours: bool = False, erase: float = 0.0, erase_area: float = ERASE_AREA[1],
                     progress: bool = False, log: list | None = None,
                     val: tuple[torch.Tensor, torch.Tensor] | None = None, partial: Path | None = None,
                     settings: dict | None = None) -> float:
    """AdamW with 100 warm-up steps and cosine decay (stage 1's schedule); cross-entropy on the
    category, plus binary cross-entropy on the attributes when given. Returns the seconds taken.
    ``log`` gets the mean loss and the learning rate every ``LOG_STEPS`` steps and, with ``val``
    (images, categories), the category accuracy on it after each epoch; neither changes the
    training (no random draw). With ``partial``, a folder, the run's state goes there after each
    epoch but the last, and a run that finds one there resumes after its epoch, as if never
    stopped; ``settings`` (what the caller's run depends on) must be the ones it was saved with."""
    steps = epochs * (len(x) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=min(100 / steps, 0.3),
                                                anneal_strategy="cos")
    rng = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    done = step = 0
    seconds = 0.0
    if partial is not None and (partial / PARTIAL_STATE).is_file():
        state = torch.load(partial / PARTIAL_STATE, weights_only=True)  # tensors and plain data only
        refuse_other_settings(partial, state["settings"], settings or {})
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        done, step, losses, seconds = state["epoch"], state["step"], state["losses"], state["seconds"]
        if log is not None:
            log[:] = state["log"]
        print(f"resuming from {partial} after epoch {done} of {epochs}", flush=True)
    start = time.perf_counter() - seconds
    bar = tqdm(total=steps, initial=step, desc="pretraining", unit="step", disable=not progress)
    for epoch in range(done, epochs):
        order = torch.randperm(len(x), generator=rng)
        for i in range(len(x) // batch):
            idx = order[i * batch:(i + 1) * batch]
            logits = model(augment(x[idx], rng, shift, permute_colours, erase, erase_area))
            loss = F.cross_entropy(logits[:, :len(CATEGORIES)], y[idx])
            if attributes is not None:
                loss = loss + F.binary_cross_entropy_with_logits(logits[:, len(CATEGORIES):], attributes[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            losses.append(loss.item())
            if len(losses) == LOG_STEPS:
                if log is not None:
                    log.append({"step": step, "epoch": round(step * batch / len(x), 3),
                                "loss": round(sum(losses) / len(losses), 5), "learning_rate": sched.get_last_lr()[0]})
                losses.clear()
            sched.step()
            bar.update()
        if log is not None and val is not None:
            log.append({"step": step, "epoch": epoch + 1, "val_accuracy": round(accuracy(model, *val), 4)})
        if partial is not None and epoch + 1 < epochs:
            with fileio.replace_folder(partial) as tmp:
                torch.save({"settings": settings, "model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "rng": rng.get_state(), "torch_rng": torch.get_rng_state(),
                            "epoch": epoch + 1, "step": step, "losses": losses, "log": log or [],
                            "seconds": time.perf_counter() - start}, tmp / PARTIAL_STATE)
    bar.close()
    return time.perf_counter() - start


def pretrain(base: Path, train: Path, val: Path | None, out: Path, epochs: int, batch: int, lr: float, seed: int,
             progress: bool = True, head: str = "patches", erase: float = 0.0,
             erase_area: float = ERASE_AREA[1]) -> dict:
    """Train ``base``'s vision tower on ``train`` through ``head`` (``patches``: a throw-away MLP over
    its patch tokens, ``ViTClassifier``; ``projector``: the model's own projector and a linear map,
    ``ProjectorClassifier``, so the projector trains too) and write the whole checkpoint to ``out``
    (atomically), with ``pretrain.json``: the data, the settings, the time and the category accuracy.
    After each epoch the run's state goes to ``out``.partial/; a run stopped there resumes from it
    when started again with the same settings."""
    if head not in HEADS:
        raise OccError(f"head {head!r}: expected one of {', '.join(HEADS)}")
    check_checkpoint(base)
    processor = ImageOnlyInternVLProcessor.from_folder(base)
    encoder = ConversationEncoder(processor)
    model = InternVLForConditionalGeneration.from_pretrained(base, use_safetensors=True, dtype=torch.float32)
    x, y, attrs = load_labelled_images(train, encoder, progress)
    val_images = load_labelled_images(val, encoder, progress)[:2] if val is not None else None
    torch.manual_seed(seed)
    classifier = (ViTClassifier(model.model.vision_tower, attributes=3) if head == "patches"
                  else ProjectorClassifier(model, attributes=3))
    log: list[dict] = []
    partial = out.with_name(out.name + ".partial")
    run = {"head": head, "epochs": epochs, "batch": batch, "learning_rate": lr, "erase": erase, "erase_area": erase_area,
           "seed": seed}  # recorded in pretrain.json, and what a resumed run must share
    settings = {"base": hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest(), "train": str(train.resolve()),
                "train_images": len(y), "val": str(val.resolve()) if val is not None else None, **run}
    seconds = train_classifier(classifier, x, y, epochs, batch, lr, seed, attrs, erase=erase, erase_area=erase_area,
                               progress=progress, log=log, val=val_images, partial=partial, settings=settings)
    info = {"train": str(train), "train_images": len(y), **run, "seconds": round(seconds, 1),
            "train_accuracy": round(accuracy(classifier, x, y), 4)}
    if val_images is not None:
        info.update(val=str(val), val_images=len(val_images[1]), val_accuracy=round(accuracy(classifier, *val_images), 4))
    with fileio.replace_folder(out) as tmp:  # the tower is the model's own module: trained in place
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        fileio.write_json(tmp / INFO, info)
        curves.save_training_log(log, tmp, f"vision tower pretrained through its {head} head")
    shutil.rmtree(partial, ignore_errors=True)
    return info


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m occmllm.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="checkpoint to start from [a fresh tiny InternVL, occmllm.tiny, with "
                                             "--image-size and --merge]")
    p.add_argument("--image-size", type=int, default=64, help="tile size of the fresh tiny model [64]")
    p.add_argument("--merge", type=int, default=2, help="of the fresh tiny model: " + MERGE_HELP)
    p.add_argument("--train", required=True, type=Path, help="stage-1 JSONL of the pretraining scenes")
    p.add_argument("--val", type=Path, help="stage-1 JSONL to report the tower's category accuracy on")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--head", choices=HEADS, default="patches",
                   help="what the tower is trained through: patches, an MLP over its patch tokens, thrown away; "
                        "projector, the model's own projector (kept, trained too) and a linear map [patches]")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--erase", type=float, default=0.0,
                   help="share of the training images that get a random rectangle of noise (random erasing) [0]")
    p.add_argument("--erase-area", type=float, default=ERASE_AREA[1],
                   help=f"with --erase: the largest share of the image a rectangle covers (the smallest is "
                        f"{ERASE_AREA[0]}) [{ERASE_AREA[1]}]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if (args.epochs < 1 or args.batch < 1 or args.lr <= 0 or not 0 <= args.erase <= 1
            or not ERASE_AREA[0] <= args.erase_area <= 1):
        raise OccError("--epochs and --batch must be at least 1, --lr positive, --erase in [0, 1] and --erase-area "
                       f"in [{ERASE_AREA[0]}, 1]")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:  # holds the fresh tiny model when no --base is given
        base = args.base or build(Path(tmp) / "tiny", image_size=args.image_size, seed=args.seed,
                                     merge=args.merge)
        info = pretrain(base, args.train, args.val, args.out, args.epochs, args.batch, args.lr, args.seed,
                        not args.no_progress, args.head, args.erase, args.erase_area)
    print(json.dumps(info))
    print(f"wrote the pretrained tiny InternVL to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
