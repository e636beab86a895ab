"""A tiny CLIP reward model for test-time adaptation (RLCF, Zhao et al., ICLR 2024).

RLCF scores a model's answers with CLIP-S = 2.5 * max(cos(image, text), 0). This module builds a
tiny transformers ``CLIPModel`` offline (small ViT, small text transformer, a byte-level BPE
tokenizer trained on the captions and the question set, a PIL image processor), trains it briefly
on SynthOcc image/caption pairs so its scores mean something, and measures it by zero-shot
classification over the eight category captions. The folder is a normal checkpoint
(``CLIPModel.from_pretrained``), and ``load`` takes a real CLIP checkpoint too.

    python -m occmllm.clip build --out DIR [--image-size 64] [--seed 0]
    python -m occmllm.clip train --clip DIR --data D [--split train] [--steps N] [--batch-size B] [--lr LR]
    python -m occmllm.clip zero-shot --clip DIR --data D [--split test] [--limit N]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from tokenizers import processors
from tqdm import tqdm
from transformers import (AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTextConfig,
                          CLIPVisionConfig, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup)

from occmllm import questions as q
from occmllm.conversation import load_images
from occmllm.dataset import load_dataset
from occmllm.errors import OccError, cli, positive_int
from occmllm.fileio import dumps, read_json, replace_folder, resolve_in_root
from occmllm.model import to_model

START, END = "<|startoftext|>", "<|endoftext|>"
CLIP_S_WEIGHT = 2.5  # RLCF's (and CLIPScore's) w in CLIP-S = w * max(cos, 0)
MAX_TEXT_TOKENS = 64

# Defaults sized for the demo data on 2 CPU cores (benchmarks/RESULTS.md, "Figures behind settings in the code").
DEFAULT_STEPS = 600
DEFAULT_BATCH = 32
DEFAULT_LR = 2e-3


# --- building ---------------------------------------------------------------------------------

def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the captions and the question set (so the VLM's answers encode compactly;
    any text encodes, byte by byte at worst). Every text is wrapped as ``<|startoftext|> ...
    <|endoftext|>`` and padded with ``<|endoftext|>``, as OpenAI's CLIP does.

    Not ``occmllm.tiny.build_tokenizer``: its end token ``<|im_end|>`` has id 2, and CLIP's text
    model treats ``eos_token_id == 2`` as a legacy config and pools at the highest token id
    instead of at the end token. Here the end token has id 1, so pooling reads the first
    ``<|endoftext|>``: the real end of the text, whatever padding follows."""
    from occmllm.tiny import _corpus, byte_level_bpe
    tok = byte_level_bpe([q.caption(c) for c in q.CATEGORIES] + _corpus(), vocab_size, [START, END])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{START} $A {END}", special_tokens=[(START, tok.token_to_id(START)), (END, tok.token_to_id(END))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=START, eos_token=END, pad_token=END,
                                   model_max_length=MAX_TEXT_TOKENS)


def build(out: Path, image_size: int = 64, seed: int = 0) -> Path:
    """Write an untrained tiny CLIP (model, tokenizer, image processor) to ``out``; returns ``out``."""
    if image_size < 16 or image_size % 8:
        raise OccError(f"--image-size {image_size} must be a multiple of the patch size 8, at least 16")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TEXT_TOKENS, projection_dim=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=8, projection_dim=64)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=64)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    with replace_folder(out) as tmp:
        _save(tmp, model, tokenizer, image_processor)
    return Path(out)


def _save(folder: Path, model, tokenizer, image_processor) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    image_processor.save_pretrained(folder)


# --- loading ----------------------------------------------------------------------------------

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(model, tokenizer, image_processor)`` from a CLIP checkpoint folder, the model in eval
    mode on ``device``; a one-line OccError naming the folder when it is not a usable CLIP."""
    path = Path(path)
    if not path.is_dir():
        raise OccError(f"{path}: CLIP checkpoint folder not found; build one with "
                       f"`python -m occmllm.clip build --out {path}`")
    if not (path / "config.json").is_file():
        raise OccError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    model_type = read_json(path / "config.json").get("model_type")
    if model_type != "clip":
        raise OccError(f"{path}: not a CLIP checkpoint (model_type {model_type!r}); give a CLIPModel folder, "
                       "e.g. one from `python -m occmllm.clip build`")
    try:
        model, info = CLIPModel.from_pretrained(path, output_loading_info=True, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
        image_processor = CLIPImageProcessorPil.from_pretrained(path)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise OccError(f"{path}: CLIP checkpoint does not load ({_first_line(exc)}); rebuild or re-download it") \
            from None
    bad = [k for key in ("missing_keys", "mismatched_keys") for k in info.get(key) or []]
    if bad:
        raise OccError(f"{path}: CLIP weights do not match its config ({len(bad)} missing or mismatched, "
                       f"e.g. {bad[0]!r}); rebuild or re-download it")
    _check_pooling(path, model, tokenizer)
    return model.to(device).eval(), tokenizer, image_processor


def _check_pooling(path: Path, model: CLIPModel, tokenizer) -> None:
    """The text model must pool at the last token the tokenizer writes (its end token), or every
    text embedding reads the wrong position without any error."""
    ids = tokenizer(q.caption(q.CATEGORIES[0])).input_ids
    eos = model.config.text_config.eos_token_id
    # eos_token_id == 2 is transformers' legacy path: pool at the highest token id.
    pooled = max(range(len(ids)), key=ids.__getitem__) if eos == 2 else (ids.index(eos) if eos in ids else None)
    if pooled != len(ids) - 1:
        raise OccError(f"{path}: the text model pools at token id {eos} (config text_config.eos_token_id), but the "
                       "tokenizer does not end texts with it; fix the config or the tokenizer")


# --- scoring ----------------------------------------------------------------------------------

def _text_embeds(model: CLIPModel, tokenizer, texts: list[str]) -> torch.Tensor:
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(model.device)
    out = model.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask).pooler_output
    return F.normalize(out, dim=-1)


def _pixels(image_processor, images: list[Image.Image]) -> torch.Tensor:
    return image_processor(images=images, return_tensors="pt").pixel_values


def _image_embeds(model: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    pixel_values = to_model(pixel_values, model)
    return F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)


@torch.no_grad()
def scores(model: CLIPModel, tokenizer, image_processor, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    """CLIP-S of every (image, text) pair: ``2.5 * max(cos, 0)``, shape ``(len(images), len(texts))``."""
    if not images or not texts:
        return torch.zeros(len(images), len(texts))
    cos = _image_embeds(model, _pixels(image_processor, images)) @ _text_embeds(model, tokenizer, texts).T
    return CLIP_S_WEIGHT * cos.clamp(min=0).float().cpu()


# --- training ---------------------------------------------------------------------------------

def contrastive_loss(logits_per_image: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy where every same-category (image, caption) pair is a positive.

    The batch holds several images of each category and so several copies of each caption; CLIP's
    own loss (``return_loss=True``) would call all but the diagonal copy negatives and push an
    image away from its own category's text. The target of each row is instead spread evenly over
    its category's columns. With distinct categories this is exactly CLIP's loss (a test checks).
    The other way out, one image per category per batch, would cap every batch at eight pairs."""
    same = (labels[:, None] == labels[None, :]).to(logits_per_image.dtype)
    targets = same / same.sum(dim=1, keepdim=True)  # symmetric, so it serves both directions
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.T, targets)) / 2


def _balanced_batches(views: list[dict], batch_size: int, rng: random.Random):
    """Endless batches that take the split's categories in turn (each category's views reshuffled
    whenever they run out), so every batch holds every category about equally often: a fixed
    number of copies of each caption gives every category the same offset in the loss."""
    by_category = defaultdict(list)
    for v in views:
        by_category[v["category"]].append(v)
    queues = {c: [] for c in by_category}
    categories = sorted(by_category)
    while True:
        rng.shuffle(categories)
        batch = []
        for i in range(batch_size):
            c = categories[i % len(categories)]
            if not queues[c]:
                queues[c] = rng.sample(by_category[c], len(by_category[c]))
            batch.append(queues[c].pop())
        yield batch


class _Images:
    """Views' preprocessed pixels, computed once each: decoding and resizing cost as much as a
    training step of the tiny model, and the demo's train split fits in memory (about 250 MB)."""

    def __init__(self, dataset, image_processor):
        self.dataset, self.image_processor, self.cache = dataset, image_processor, {}

    def path(self, view: dict) -> Path:
        context = f"{self.dataset.folder / 'manifest.jsonl'} view {view['id']}"
        path = resolve_in_root(self.dataset.root, view["image"], context)
        if not path.is_file():
            raise OccError(f"{context}: image {view['image']!r} not found under {self.dataset.root}")
        return path

    def pixels(self, views: list[dict]) -> torch.Tensor:
        todo = [v for v in views if v["id"] not in self.cache]
        if todo:
            for v, px in zip(todo, _pixels(self.image_processor, load_images([self.path(v) for v in todo]))):
                self.cache[v["id"]] = px
        return torch.stack([self.cache[v["id"]] for v in views])


def train(clip_dir: str | os.PathLike, data_root: str | os.PathLike, split: str | None = "train",
          steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH, lr: float = DEFAULT_LR, seed: int = 0,
          progress: bool = True) -> dict:
    """Contrastive training on the split's (image, ``caption(category)``) pairs; saves back to
    ``clip_dir`` (replaced whole, only when training succeeds). AdamW with warmup and cosine decay.

    Returns ``steps``, ``loss_first`` and ``loss_last`` (the mean loss of the first and last tenth of
    the steps, at least one step each) and ``seconds``."""
    if steps < 1 or batch_size < 2:
        raise OccError(f"--steps must be at least 1 and --batch-size at least 2 (got {steps} and {batch_size})")
    dataset = load_dataset(data_root)  # a bad dataset fails before the model loads
    views = dataset.split(split)
    model, tokenizer, image_processor = load(clip_dir)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    images = _Images(dataset, image_processor)
    text = tokenizer([q.caption(c) for c in q.CATEGORIES], padding=True, return_tensors="pt")
    index = {c: i for i, c in enumerate(q.CATEGORIES)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    model.train()
    losses, start = [], time.perf_counter()
    batches = _balanced_batches(views, batch_size, rng)
    with tqdm(total=steps, desc="CLIP", unit="step", disable=not progress) as bar:
        for _ in range(steps):
            batch = next(batches)
            labels = torch.tensor([index[v["category"]] for v in batch])
            # the eight captions encoded once and their columns repeated per image: the same logits
            # (and gradients) as encoding every image's own caption, for less text-model work
            out = model(input_ids=text.input_ids, attention_mask=text.attention_mask,
                        pixel_values=images.pixels(batch))
            loss = contrastive_loss(out.logits_per_image[:, labels], labels)
            if not torch.isfinite(loss):
                raise OccError(f"CLIP training diverged (loss {loss.item()}); lower --lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    seconds = time.perf_counter() - start
    model.eval()
    with replace_folder(clip_dir) as tmp:
        _save(tmp, model, tokenizer, image_processor)
    tenth = max(1, steps // 10)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "views": len(views),
            "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth,
            "seconds": round(seconds, 1)}


# --- evaluation -------------------------------------------------------------------------------

@torch.no_grad()
def zero_shot(clip_dir: str | os.PathLike, data_root: str | os.PathLike, split: str | None = "test",
              limit: int | None = None, batch_size: int = 128) -> dict:
    """Accuracy of naming each view's category by the caption with the highest cosine (not CLIP-S,
    whose clamp at 0 would tie all-negative rows), overall and by category, on the split's first
    ``limit`` views (all by default)."""
    dataset = load_dataset(data_root)
    views = dataset.split(split)[:limit] if limit is not None else dataset.split(split)
    if not views:
        raise OccError(f"--limit {limit} leaves no views to score")
    model, tokenizer, image_processor = load(clip_dir)
    images = _Images(dataset, image_processor)
    texts = _text_embeds(model, tokenizer, [q.caption(c) for c in q.CATEGORIES])
    right, total = defaultdict(int), defaultdict(int)
    for i in range(0, len(views), batch_size):
        chunk = views[i:i + batch_size]
        # not through images.pixels: each view is seen once here, so caching would only hold memory
        pixels = _pixels(image_processor, load_images([images.path(v) for v in chunk]))
        predicted = (_image_embeds(model, pixels) @ texts.T).argmax(dim=1).tolist()
        for v, p in zip(chunk, predicted):
            total[v["category"]] += 1
            right[v["category"]] += q.CATEGORIES[p] == v["category"]
    by_category = {c: {"n": total[c], "accuracy": right[c] / total[c]} for c in q.CATEGORIES if total[c]}
    return {"split": split, "n": len(views), "accuracy": sum(right.values()) / len(views),
            "chance": 1 / len(q.CATEGORIES), "by_category": by_category}


def format_table(result: dict) -> str:
    """The zero-shot result as a small text table."""
    rows = [f"{'category':<10} {'n':>5} {'accuracy':>9}"]
    rows += [f"{c:<10} {r['n']:>5} {r['accuracy']:>9.3f}" for c, r in result["by_category"].items()]
    rows.append(f"{'all':<10} {result['n']:>5} {result['accuracy']:>9.3f}   (chance {result['chance']:.3f})")
    return "\n".join(rows)


# --- command line -----------------------------------------------------------------------------

@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m occmllm.clip", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write an untrained tiny CLIP checkpoint")
    b.add_argument("--out", required=True, type=Path, help="checkpoint folder to write (must not exist)")
    b.add_argument("--image-size", type=int, default=64, help="input size in pixels, a multiple of 8 [64]")
    b.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("train", help="contrastive training on a dataset's image/caption pairs (saved in place)")
    t.add_argument("--clip", required=True, type=Path, help="CLIP checkpoint folder, updated in place")
    t.add_argument("--data", required=True, type=Path, help="dataset folder (manifest.jsonl)")
    t.add_argument("--split", default="train", help="split to train on [train]")
    t.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help=f"optimizer steps [{DEFAULT_STEPS}]")
    t.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH, help=f"images per step [{DEFAULT_BATCH}]")
    t.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"peak learning rate [{DEFAULT_LR}]")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    z = sub.add_parser("zero-shot", help="accuracy of picking the category caption with the highest score")
    z.add_argument("--clip", required=True, type=Path, help="CLIP checkpoint folder")
    z.add_argument("--data", required=True, type=Path, help="dataset folder (manifest.jsonl)")
    z.add_argument("--split", default="test", help="split to score [test]")
    z.add_argument("--limit", type=positive_int, default=None, help="score only the split's first N views")
    args = p.parse_args(argv)

    if args.command == "build":
        if args.out.exists():
            raise OccError(f"{args.out} already exists; choose another --out or remove it")
        build(args.out, args.image_size, args.seed)
        n = sum(t.numel() for t in CLIPModel.from_pretrained(args.out).parameters())
        print(f"wrote tiny CLIP ({n / 1e6:.2f}M parameters) to {args.out}")
        print(dumps({"out": str(args.out), "parameters": n}))
    elif args.command == "train":
        result = train(args.clip, args.data, args.split, args.steps, args.batch_size, args.lr, args.seed,
                       progress=not args.no_progress)
        print(f"trained {args.clip} for {result['steps']} steps in {result['seconds']} s: "
              f"loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}")
        print(dumps(result))
    else:
        result = zero_shot(args.clip, args.data, args.split, args.limit)
        print(format_table(result))
        print(dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
