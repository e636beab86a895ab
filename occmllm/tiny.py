"""Build a tiny InternVL checkpoint offline: small ViT, small Qwen2 text model, a byte-level BPE
tokenizer trained on the question set, and a chat template with ``{% generation %}`` markers.

The folder is a normal checkpoint (``save_pretrained``, safetensors): every command that takes a
real InternVL "-hf" checkpoint takes it too. Sized so the demo learns SynthOcc on 2 CPU cores.

    python -m occmllm.tiny --out DIR [--image-size 96] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                          InternVLVisionConfig, InternVLVisionModel, PreTrainedTokenizerFast, Qwen2Config)

from occmllm import questions as q
from occmllm.errors import OccError, cli
from occmllm.fileio import atomic_path
from occmllm.model import ImageOnlyInternVLProcessor

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]

# Qwen2 / InternVL 2.5 chat format; the generation markers let tokenizers report which tokens the
# assistant wrote (its answer and the end-of-turn token), which is the training loss mask.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] }}{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    texts = [*q.QUESTIONS.values(), q.Q0_PLAN, q.YES, q.NO, "user\n", "assistant\n", "system\n"]
    texts += [q.category_answer(c) for c in q.CATEGORIES]
    texts += [q.description(c, colour) for c in q.CATEGORIES for colour in q.OBJECT_COLOURS]
    return texts


def byte_level_bpe(texts: list[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``texts`` (any text encodes, byte by byte at worst);
    the special tokens take the first ids, in order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts * 8, trainer)
    return tok


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    tok = byte_level_bpe(_corpus(), vocab_size, SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def init_vision_tower(tower: InternVLVisionModel, seed: int = 0) -> None:
    """Initialise a from-scratch vision tower the way that suits a small ViT on little data.

    - Mimetic attention (Trockman & Kolter, 2023): each head's W_q W_k^T starts near 0.7 Z + 0.7 I
      and W_v W_o near 0.4 Z - 0.4 I (Z random, scale 1/sqrt(d)), the pattern pretrained ViTs show;
      with the position embeddings below, attention starts strongest on a token's own patch and
      falls off with distance on the patch grid.
    - 2-D sin-cos position embeddings (half-amplitude), so neighbouring patches start out similar.
    Both lift stage 1 on the demo data; layer scale stays at 0.1, since 1.0 helps the plain classifier
    but costs stage 1 (benchmarks/RESULTS.md, "What limits stage 1").
    """
    config = tower.config
    d, grid = config.hidden_size, config.image_size[0] // config.patch_size[0]
    if d % 4:
        raise OccError(f"vision hidden size {d} must be a multiple of 4 for 2-D sin-cos position embeddings")
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(d)

    def factors(target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vt = torch.linalg.svd(target)  # target ~ (u sqrt s)(v sqrt s)^T, best rank-`rank` part
        root = s[:rank].sqrt()
        return u[:, :rank] * root, vt[:rank].T * root

    with torch.no_grad():
        for layer in tower.encoder.layer:
            attn = layer.attention
            dh = attn.head_dim
            for h in range(attn.num_heads):
                z = torch.randn(d, d, generator=g) / math.sqrt(d)
                wq, wk = factors(0.7 * z + 0.7 * eye, dh)
                attn.q_proj.weight[h * dh:(h + 1) * dh] = wq.T
                attn.k_proj.weight[h * dh:(h + 1) * dh] = wk.T
            wv, wo = factors(0.4 * torch.randn(d, d, generator=g) / math.sqrt(d) - 0.4 * eye, d)
            attn.v_proj.weight.copy_(wv.T)        # values: x @ wv
            attn.projection_layer.weight.copy_(wo)  # output: values @ wo.T
        quarter = d // 4
        freq = 1.0 / 10000 ** (torch.arange(quarter) / quarter)
        rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        angles = [pos.flatten()[:, None].float() * freq for pos in (rows, cols)]
        table = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1)
        pos = tower.embeddings.position_embeddings
        pos[0, 0] = 0
        pos[0, 1:] = 0.5 * table


def build(out: Path, image_size: int = 96, patch_size: int = 8, vision_hidden: int = 96, vision_layers: int = 4,
          text_hidden: int = 128, text_layers: int = 2, seed: int = 0, merge: int = 2) -> Path:
    if merge < 1:
        raise OccError(f"--merge {merge} must be at least 1 (patches per side in one image token)")
    if image_size % (merge * patch_size):
        raise OccError(f"--image-size {image_size} must be a multiple of --merge x --patch-size ({merge * patch_size}) "
                       f"for InternVL's {merge}x{merge} pixel shuffle")
    for flag, width in (("--vision-hidden", vision_hidden), ("--text-hidden", text_hidden)):
        if width % 4:
            raise OccError(f"{flag} {width} must be a multiple of 4 (the tiny model's 4 attention heads)")
    vision = InternVLVisionConfig(
        hidden_size=vision_hidden, num_hidden_layers=vision_layers, num_attention_heads=4,
        intermediate_size=4 * vision_hidden, image_size=[image_size, image_size], patch_size=[patch_size, patch_size],
        use_absolute_position_embeddings=True, layer_scale_init_value=0.1, norm_type="layer_norm")
    text = Qwen2Config(
        hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    return write_checkpoint(out, vision, text, merge, seed)


def write_checkpoint(out: Path, vision: InternVLVisionConfig, text: Qwen2Config, merge: int = 2, seed: int = 0,
                     init_tower: bool = True, vocab_size: int | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """An InternVL checkpoint with random weights of the given vision and text shapes, the
    project's tokenizer and chat template, and its image-only processor (one tile of the tower's
    image size, ``merge`` x ``merge`` patches an image token). The text model's vocabulary is the
    tokenizer's, or ``vocab_size`` rows when that is larger (a real model's size, for timing: this
    tokenizer never produces the extra ids). ``init_tower``: ``init_vision_tower``'s start for small
    towers."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text.vocab_size = max(vocab_size or 0, len(tokenizer))
    text.bos_token_id, text.eos_token_id, text.pad_token_id = None, tokenizer.eos_token_id, tokenizer.pad_token_id
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=1 / merge,
                            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
                            projector_hidden_act="gelu", vision_feature_layer=-1,
                            vision_feature_select_strategy="default")
    model = InternVLForConditionalGeneration(config)
    if init_tower:
        init_vision_tower(model.model.vision_tower, seed)
    model.to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_size, patch_size = vision.image_size[0], vision.patch_size[0]
    tokens_per_tile = (image_size // patch_size // merge) ** 2
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size},
                                               crop_to_patches=False, max_patches=1)
    processor = ImageOnlyInternVLProcessor(image_processor, tokenizer, image_seq_length=tokens_per_tile,
                                           chat_template=CHAT_TEMPLATE)
    with atomic_path(out) as tmp:
        tmp.unlink()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out


MERGE_HELP = ("patches per side merged into one image token by the pixel shuffle [2, as InternVL does]; the "
              "demo's base merges all 8 x 8 (one token an image), so its two-layer language model reads every "
              "patch in its place, as the pretrained tower learned to be read (benchmarks/RESULTS.md, \"Why the VLM "
              "read less than its tower, and the aligned base\")")


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m occmllm.tiny", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--image-size", type=int, default=96, help="tile size in pixels [96]")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch size [8]")
    p.add_argument("--vision-hidden", type=int, default=96)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--text-hidden", type=int, default=128)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", type=int, default=2, help=MERGE_HELP)
    args = p.parse_args(argv)
    if args.out.exists():
        raise OccError(f"{args.out} already exists; choose another --out or remove it")
    build(args.out, args.image_size, args.patch_size, args.vision_hidden, args.vision_layers, args.text_hidden,
          args.text_layers, args.seed, args.merge)
    n = sum(t.numel() for t in InternVLForConditionalGeneration.from_pretrained(args.out).parameters())
    print(f"wrote tiny InternVL ({n / 1e6:.2f}M parameters) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
