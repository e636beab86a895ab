"""occmllm.convert: InternVL checkpoints in the original remote-code layout -> transformers' native layout.

Each family's tiny checkpoint is written as InternVL saves one (config.json with ``llm_config`` and
``vision_config`` dicts, safetensors under the original key names, the family's tokenizer files).
The converted folder is loaded with ``occmllm.model.load_model`` and its logits are compared with
a re-implementation of the original model written here from the original tensors; fused tensors
are split in activation space, as the original modelling code does, not as the converter does.
"""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from occmllm import questions as q
from occmllm.conversation import ConversationEncoder
from occmllm.convert import convert, main
from occmllm.errors import OccError
from occmllm.model import check_checkpoint, load_model
from occmllm.tiny import byte_level_bpe

pytestmark = pytest.mark.usefixtures("one_thread")

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
INTERNLM2 = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]  # eos </s>; every encoding starts with <s>
PHI3 = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
IMAGE_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]

# One tiny checkpoint per language-model family, each with grouped-query attention and its own quirks:
# how the tokenizer ships, the ViT's norm, tiling, rope scaling, shards.
FAMILIES = {
    "qwen2": dict(arch="Qwen2ForCausalLM", template="Hermes-2", specials=CHATML, heads=4, kv_heads=2, hidden=32,
                  tokenizer="vocab.json", vit=dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False)),
    "internlm2": dict(arch="InternLM2ForCausalLM", template="internlm2-chat", specials=INTERNLM2, heads=6, kv_heads=2,
                      hidden=48, tokenizer="separate", shards=2, dynamic=True,
                      llm=dict(bias=False, rope_theta=1000000, rope_scaling={"type": "dynamic", "factor": 2.0}),
                      vit=dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False)),
    "phi3": dict(arch="Phi3ForCausalLM", template="phi3-chat", specials=PHI3, heads=4, kv_heads=2, hidden=32,
                 tokenizer="tokenizer.json", spare_rows=16,
                 llm=dict(max_position_embeddings=4096, original_max_position_embeddings=1024, sliding_window=2047,
                          rope_scaling={"type": "su", "short_factor": [1.0, 1.5, 2.0, 3.0],
                                        "long_factor": [2.0, 4.0, 8.0, 16.0]}),
                 vit=dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False)),
    "llama": dict(arch="LlamaForCausalLM", template="internvl2_5", specials=CHATML, heads=4, kv_heads=2, hidden=32,
                  tokenizer="tokenizer.json", force_image_size=48,
                  vit=dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True)),
}
VIT = dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2, image_size=32,
           patch_size=8, layer_norm_eps=1e-6, hidden_act="gelu", use_flash_attn=False, dropout=0.0,
           drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1, num_channels=3)


# --- a checkpoint in the original layout ------------------------------------------------------

def family_tokenizer(specials: list[str], adds_bos: bool = False) -> PreTrainedTokenizerFast:
    texts = [*q.QUESTIONS.values(), q.Q0_PLAN, q.YES, q.NO] + [q.category_answer(c) for c in q.CATEGORIES]
    tok = byte_level_bpe(texts, 320, specials + IMAGE_TOKENS)
    bos = "<s>" if adds_bos else None
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=specials[2], pad_token=specials[0])


def write_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerFast, how: str, tokenizer_class: str) -> None:
    """The tokenizer files a release of this family ships: a fast tokenizer.json, Qwen2's vocab.json
    and merges.txt, or InternLM2's sentencepiece model with a remote-code class."""
    config = {"tokenizer_class": tokenizer_class, "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
              "pad_token": tokenizer.pad_token,
              "added_tokens_decoder": {str(tokenizer.convert_tokens_to_ids(t)): {
                  "content": t, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                  "single_word": False} for t in tokenizer.all_special_tokens + IMAGE_TOKENS}}
    if how == "vocab.json":
        tokenizer.backend_tokenizer.model.save(str(folder))
    elif how == "tokenizer.model":
        (folder / "tokenizer.model").write_bytes(b"\x0a\x0bsentencepiece")
    else:
        tokenizer.backend_tokenizer.save(str(folder / "tokenizer.json"))
    if tokenizer_class == "InternLM2Tokenizer":
        config["auto_map"] = {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                                "tokenization_internlm2_fast.InternLM2TokenizerFast"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def original_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the original key names and shapes, for this config."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.2
    gain = lambda n: 1 + torch.randn(n, generator=g) * 0.1
    vit, llm, arch = config["vision_config"], config["llm_config"], config["llm_config"]["architectures"][0]
    d, inner, patch = vit["hidden_size"], vit["intermediate_size"], vit["patch_size"]
    grid = vit["image_size"] // patch
    w = {"vision_model.embeddings.class_embedding": rand(1, 1, d),
         "vision_model.embeddings.patch_embedding.weight": rand(d, 3, patch, patch),
         "vision_model.embeddings.patch_embedding.bias": rand(d),
         "vision_model.embeddings.position_embedding": rand(1, grid * grid + 1, d)}
    for i in range(vit["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        w.update({pre + "attn.qkv.weight": rand(3 * d, d), pre + "attn.proj.weight": rand(d, d),
                  pre + "attn.proj.bias": rand(d), pre + "ls1": rand(d), pre + "ls2": rand(d),
                  pre + "mlp.fc1.weight": rand(inner, d), pre + "mlp.fc1.bias": rand(inner),
                  pre + "mlp.fc2.weight": rand(d, inner), pre + "mlp.fc2.bias": rand(d)})
        w.update({pre + f"{n}.weight": gain(d) for n in ("norm1", "norm2")})
        if vit["norm_type"] == "layer_norm":
            w.update({pre + f"{n}.bias": rand(d) for n in ("norm1", "norm2")})
        if vit["qkv_bias"]:
            w[pre + "attn.qkv.bias"] = rand(3 * d)
        if vit["qk_normalization"]:
            w.update({pre + "attn.q_norm.weight": gain(d), pre + "attn.k_norm.weight": gain(d)})
    merged, h = d * round(1 / config["downsample_ratio"]) ** 2, llm["hidden_size"]
    w.update({"mlp1.0.weight": gain(merged), "mlp1.0.bias": rand(merged), "mlp1.1.weight": rand(h, merged),
              "mlp1.1.bias": rand(h), "mlp1.3.weight": rand(h, h), "mlp1.3.bias": rand(h)})
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    ffn, vocab = llm["intermediate_size"], llm["vocab_size"]
    hd = h // heads
    lm = "language_model.model."
    if arch == "InternLM2ForCausalLM":
        w.update({lm + "tok_embeddings.weight": rand(vocab, h), "language_model.output.weight": rand(vocab, h)})
    else:
        w.update({lm + "embed_tokens.weight": rand(vocab, h), "language_model.lm_head.weight": rand(vocab, h)})
    w[lm + "norm.weight"] = gain(h)
    for i in range(llm["num_hidden_layers"]):
        pre = f"{lm}layers.{i}."
        if arch == "InternLM2ForCausalLM":
            w.update({pre + "attention.wqkv.weight": rand((heads + 2 * kv) * hd, h),
                      pre + "attention.wo.weight": rand(h, h),
                      pre + "feed_forward.w1.weight": rand(ffn, h), pre + "feed_forward.w3.weight": rand(ffn, h),
                      pre + "feed_forward.w2.weight": rand(h, ffn), pre + "attention_norm.weight": gain(h),
                      pre + "ffn_norm.weight": gain(h)})
            continue
        if arch == "Phi3ForCausalLM":
            w.update({pre + "self_attn.qkv_proj.weight": rand((heads + 2 * kv) * hd, h),
                      pre + "mlp.gate_up_proj.weight": rand(2 * ffn, h)})
        else:
            w.update({pre + f"self_attn.{p}_proj.weight": rand(n * hd, h)
                      for p, n in (("q", heads), ("k", kv), ("v", kv))})
            w.update({pre + "mlp.gate_proj.weight": rand(ffn, h), pre + "mlp.up_proj.weight": rand(ffn, h)})
        if arch == "Qwen2ForCausalLM":
            w.update({pre + f"self_attn.{p}_proj.bias": rand(n * hd) for p, n in (("q", heads), ("k", kv), ("v", kv))})
        w.update({pre + "self_attn.o_proj.weight": rand(h, h), pre + "mlp.down_proj.weight": rand(h, ffn),
                  pre + "input_layernorm.weight": gain(h), pre + "post_attention_layernorm.weight": gain(h)})
    return w


def save_weights(folder: Path, weights: dict[str, torch.Tensor], shards: int) -> None:
    if shards == 1:
        return save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    keys, weight_map = list(weights), {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: weights[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in weights.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_original(folder: Path, family: str) -> dict:
    """A tiny InternVL checkpoint of ``family`` in the original layout; returns its config."""
    spec = FAMILIES[family]
    folder.mkdir(parents=True)
    tokenizer = family_tokenizer(spec["specials"], adds_bos=family == "internlm2")
    tokenizer_class = {"qwen2": "Qwen2Tokenizer", "internlm2": "InternLM2Tokenizer"}.get(family, "LlamaTokenizer")
    if spec["tokenizer"] == "separate":  # only tokenizer.model in the checkpoint, a tokenizer.json beside it
        write_tokenizer(folder, tokenizer, "tokenizer.model", tokenizer_class)
        (folder.parent / f"{folder.name}-tokenizer").mkdir()
        write_tokenizer(folder.parent / f"{folder.name}-tokenizer", tokenizer, "tokenizer.json", tokenizer_class)
    else:
        write_tokenizer(folder, tokenizer, spec["tokenizer"], tokenizer_class)
    h = spec["hidden"]
    llm = {"_name_or_path": f"tiny-{family}", "architectures": [spec["arch"]], "model_type": family,
           "vocab_size": len(tokenizer) + spec.get("spare_rows", 0), "hidden_size": h, "intermediate_size": 2 * h,
           "num_hidden_layers": 2, "num_attention_heads": spec["heads"], "num_key_value_heads": spec["kv_heads"],
           "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float32", "use_cache": True,
           "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
           "attn_implementation": "eager", "temperature": 1.0, "top_p": 1.0, **spec.get("llm", {})}
    config = {"_name_or_path": f"tiny-internvl-{family}", "architectures": ["InternVLChatModel"],
              "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                           "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
              "model_type": "internvl_chat", "downsample_ratio": 0.5, "dynamic_image_size": spec.get("dynamic", False),
              "force_image_size": spec.get("force_image_size", 32), "max_dynamic_patch": 4, "min_dynamic_patch": 1,
              "ps_version": "v2", "select_layer": -1, "template": spec["template"], "torch_dtype": "float32",
              "use_backbone_lora": 0, "use_llm_lora": 0, "use_thumbnail": True, "hidden_size": h, "llm_config": llm,
              "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                                **VIT, **spec["vit"]}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_weights(folder, original_weights(config), spec.get("shards", 1))
    return config


# --- the original model, re-implemented from its tensors ----------------------------------------

def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def intern_vit(w: dict, vit: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternViT: patch + class embeddings, position table interpolated to the tile's grid, then
    pre-norm blocks with fused qkv (rows [q; k; v]), optional q/k RMS norm over all heads, layer scale."""
    d, heads = vit["hidden_size"], vit["num_attention_heads"]
    hd, eps = d // heads, vit["layer_norm_eps"]
    x = F.conv2d(pixels, w["vision_model.embeddings.patch_embedding.weight"],
                 w["vision_model.embeddings.patch_embedding.bias"], stride=vit["patch_size"])
    n, _, grid, _ = x.shape
    table = w["vision_model.embeddings.position_embedding"]
    old = math.isqrt(table.shape[1] - 1)
    patches = F.interpolate(table[:, 1:].reshape(1, old, old, d).permute(0, 3, 1, 2), size=(grid, grid),
                            mode="bicubic", align_corners=False).reshape(1, d, -1).permute(0, 2, 1)
    x = torch.cat([w["vision_model.embeddings.class_embedding"].expand(n, 1, d), x.flatten(2).transpose(1, 2)], 1)
    x = x + torch.cat([table[:, :1], patches], 1)
    tokens = x.shape[1]

    def norm(x, name):
        if vit["norm_type"] == "layer_norm":
            return F.layer_norm(x, (d,), w[name + ".weight"], w[name + ".bias"], eps)
        return rms_norm(x, w[name + ".weight"], eps)

    for i in range(vit["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        qkv = F.linear(norm(x, pre + "norm1"), w[pre + "attn.qkv.weight"], w.get(pre + "attn.qkv.bias"))
        qh, kh, vh = qkv.reshape(n, tokens, 3, heads, hd).permute(2, 0, 3, 1, 4)
        if vit["qk_normalization"]:
            qh = rms_norm(qh.transpose(1, 2).flatten(-2), w[pre + "attn.q_norm.weight"], eps)
            kh = rms_norm(kh.transpose(1, 2).flatten(-2), w[pre + "attn.k_norm.weight"], eps)
            qh, kh = (t.view(n, tokens, heads, hd).transpose(1, 2) for t in (qh, kh))
        attn = ((qh * hd ** -0.5) @ kh.transpose(-2, -1)).softmax(-1)
        out = (attn @ vh).transpose(1, 2).reshape(n, tokens, d)
        x = x + F.linear(out, w[pre + "attn.proj.weight"], w[pre + "attn.proj.bias"]) * w[pre + "ls1"]
        hidden = F.gelu(F.linear(norm(x, pre + "norm2"), w[pre + "mlp.fc1.weight"], w[pre + "mlp.fc1.bias"]))
        x = x + F.linear(hidden, w[pre + "mlp.fc2.weight"], w[pre + "mlp.fc2.bias"]) * w[pre + "ls2"]
    return x


def image_embeddings(w: dict, config: dict, pixels: torch.Tensor) -> torch.Tensor:
    """InternVLChatModel.extract_feature: drop the class token, pixel shuffle "v2", then mlp1."""
    r = config["downsample_ratio"]
    x = intern_vit(w, config["vision_config"], pixels)[:, 1:]
    n, side = x.shape[0], math.isqrt(x.shape[1])
    x = x.reshape(n, side, side, -1)
    n, width, height, c = x.shape
    x = x.view(n, width, int(height * r), int(c / r)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(height * r), int(width * r), int(c / r / r)).permute(0, 2, 1, 3)
    x = x.reshape(n, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"])
    return F.linear(F.gelu(F.linear(x, w["mlp1.1.weight"], w["mlp1.1.bias"])), w["mlp1.3.weight"], w["mlp1.3.bias"])


def rotary(llm: dict, arch: str, length: int, head_dim: int):
    inv_freq = 1.0 / llm["rope_theta"] ** (torch.arange(0, head_dim, 2).float() / head_dim)
    scale = 1.0
    if arch == "Phi3ForCausalLM" and llm.get("rope_scaling"):  # "su": short factors below the original length
        inv_freq = inv_freq / torch.tensor(llm["rope_scaling"]["short_factor"])
        original = llm["original_max_position_embeddings"]
        scale = math.sqrt(1 + math.log(llm["max_position_embeddings"] / original) / math.log(original))
    angles = torch.arange(length).float()[:, None] * inv_freq[None]
    angles = torch.cat([angles, angles], -1)
    return angles.cos() * scale, angles.sin() * scale


def rotate(x, cos, sin):  # x: (batch, length, heads, head_dim)
    half = x.shape[-1] // 2
    turned = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[None, :, None] + turned * sin[None, :, None]


def attention_inputs(w, pre, arch, x, heads, kv, hd):
    """q, k, v as (batch, length, heads, head_dim), each family's fused layout read as its own code does."""
    b, t, _ = x.shape
    if arch == "InternLM2ForCausalLM":  # per kv group: its query heads, then key, then value
        qkv = F.linear(x, w[pre + "attention.wqkv.weight"]).view(b, t, kv, heads // kv + 2, hd)
        return qkv[..., :-2, :].reshape(b, t, heads, hd), qkv[..., -2, :], qkv[..., -1, :]
    if arch == "Phi3ForCausalLM":  # [q; k; v]
        qkv = F.linear(x, w[pre + "self_attn.qkv_proj.weight"])
        q_, k_, v_ = qkv.split([heads * hd, kv * hd, kv * hd], -1)
        return q_.view(b, t, heads, hd), k_.view(b, t, kv, hd), v_.view(b, t, kv, hd)
    return tuple(F.linear(x, w[pre + f"self_attn.{p}_proj.weight"], w.get(pre + f"self_attn.{p}_proj.bias"))
                 .view(b, t, n, hd) for p, n in (("q", heads), ("k", kv), ("v", kv)))


def feed_forward(w, pre, arch, x):
    if arch == "InternLM2ForCausalLM":
        gate, up, down = (w[pre + f"feed_forward.{n}.weight"] for n in ("w1", "w3", "w2"))
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    if arch == "Phi3ForCausalLM":
        gate, up = F.linear(x, w[pre + "mlp.gate_up_proj.weight"]).chunk(2, -1)
    else:
        gate, up = F.linear(x, w[pre + "mlp.gate_proj.weight"]), F.linear(x, w[pre + "mlp.up_proj.weight"])
    return F.linear(F.silu(gate) * up, w[pre + "mlp.down_proj.weight"])


def original_logits(w: dict, config: dict, input_ids: torch.Tensor, pixels: torch.Tensor, image_token_id: int):
    """The original model's forward: image features in place of <IMG_CONTEXT>, then a pre-norm decoder
    (RMSNorm, rotary embeddings, causal grouped-query attention, SwiGLU)."""
    llm, arch = config["llm_config"], config["llm_config"]["architectures"][0]
    internlm2 = arch == "InternLM2ForCausalLM"
    heads, kv, eps = llm["num_attention_heads"], llm["num_key_value_heads"], llm["rms_norm_eps"]
    hd = llm["hidden_size"] // heads
    lm = "language_model.model."
    x = w[lm + ("tok_embeddings" if internlm2 else "embed_tokens") + ".weight"][input_ids].clone()
    x[input_ids == image_token_id] = image_embeddings(w, config, pixels).reshape(-1, x.shape[-1])
    length = x.shape[1]
    cos, sin = rotary(llm, arch, length, hd)
    causal = torch.full((length, length), float("-inf")).triu(1)
    for i in range(llm["num_hidden_layers"]):
        pre = f"{lm}layers.{i}."
        h = rms_norm(x, w[pre + ("attention_norm" if internlm2 else "input_layernorm") + ".weight"], eps)
        qh, kh, vh = attention_inputs(w, pre, arch, h, heads, kv, hd)
        qh, kh = rotate(qh, cos, sin), rotate(kh, cos, sin)
        kh, vh = (t.repeat_interleave(heads // kv, dim=2) for t in (kh, vh))  # query head j reads kv head j // group
        scores = qh.transpose(1, 2) @ kh.permute(0, 2, 3, 1) / math.sqrt(hd) + causal
        out = (scores.softmax(-1) @ vh.transpose(1, 2)).transpose(1, 2).reshape(x.shape)
        x = x + F.linear(out, w[pre + ("attention.wo" if internlm2 else "self_attn.o_proj") + ".weight"])
        h = rms_norm(x, w[pre + ("ffn_norm" if internlm2 else "post_attention_layernorm") + ".weight"], eps)
        x = x + feed_forward(w, pre, arch, h)
    x = rms_norm(x, w[lm + "norm.weight"], eps)
    return F.linear(x, w["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"])


def load_original(folder: Path) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


# --- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_convert_matches_original_logits(tmp_path, family):
    spec = FAMILIES[family]
    src, out = tmp_path / "original", tmp_path / "converted"
    config = write_original(src, family)
    tokenizer = tmp_path / "original-tokenizer" if spec["tokenizer"] == "separate" else None
    convert(src, out, tokenizer_folder=tokenizer)

    model, processor = load_model(out, device="cpu", dtype=torch.float32)
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.config.text_config.model_type == {"internlm2": "llama"}.get(family, family)
    image_size = spec.get("force_image_size", 32)
    assert processor.image_seq_length == (image_size // 8) ** 2 // 4
    assert tok.eos_token == ("<|end|>" if family == "phi3" else "<|im_end|>")
    assert processor.video_token == "<video>"
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == sorted(p.name for p in src.glob("*.safetensors"))

    encoder = ConversationEncoder(processor)
    pixels, tiles = encoder.pixel_values([Image.new("RGB", (64, 32), (200, 40, 90))])
    assert tiles == ([3] if spec.get("dynamic") else [1])  # two tiles and a thumbnail when tiling is on
    turn = [{"from": "human", "value": q.QUESTIONS["Q1"]}]
    ids = encoder.prompt_ids(tiles, turn)
    assert ids.count(model.config.image_token_id) == tiles[0] * processor.image_seq_length
    # InternVL's own conversation format: default system turn, no newline after the end of a turn but in 2.5
    if family == "phi3":
        system, user, assistant, end_of_turn = "<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>"
    else:
        system, user, assistant = "<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n"
        end_of_turn = "<|im_end|>\n" if family == "llama" else "<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    bos = "<s>" if family == "internlm2" else ""
    assert (ids[0] == tok.bos_token_id) == (family == "internlm2")
    assert rendered.startswith(bos + system + "你")
    assert rendered.endswith(f"{end_of_turn}{user}hi{end_of_turn}{assistant}")

    answer = "The object is jar."  # the SFT loss mask: the answer and the end-of-turn token, nothing else
    ids_with_answer, labels = encoder.tokens(tiles, turn + [{"from": "gpt", "value": answer}])
    assert tok.decode([t for t in labels if t != -100]) == answer + end_of_turn.strip()

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
        reference = original_logits(load_original(src), config, torch.tensor([ids]), pixels,
                                    model.config.image_token_id)[0]
    assert logits.shape == reference.shape
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def qwen2_original(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("convert") / "original"
    write_original(folder, "qwen2")
    return folder


def copy_of(folder: Path, tmp_path: Path) -> Path:
    import shutil
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def refused(src: Path, match: str, **kwargs) -> None:
    """convert fails with a one-line OccError matching ``match`` and leaves nothing at --out or beside it."""
    out = src.parent / "converted"
    with pytest.raises(OccError, match=match) as error:
        convert(src, out, **kwargs)
    assert "\n" not in str(error.value)
    assert not out.exists() and not list(src.parent.glob(".converted*"))


def edit_weights(folder: Path, edit) -> None:
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_convert_refuses_unknown_key(qwen2_original, tmp_path):
    src = copy_of(qwen2_original, tmp_path)
    edit_weights(src, lambda w: w.update({"vision_model.encoder.layers.0.attn.extra.weight": torch.zeros(2)}))
    refused(src, r"vision_model\.encoder\.layers\.0\.attn\.extra\.weight: unknown weight")


def test_convert_refuses_a_weight_this_config_does_not_have(qwen2_original, tmp_path):
    src = copy_of(qwen2_original, tmp_path)
    edit_weights(src, lambda w: w.update({"language_model.model.layers.2.mlp.up_proj.weight": torch.zeros(64, 32)}))
    refused(src, r"language_model\.model\.layers\.2\.mlp\.up_proj\.weight: no native weight")


@pytest.mark.parametrize("key, shape, expected", [
    ("mlp1.1.weight", (32, 129), r"\(32, 128\)"),
    ("vision_model.encoder.layers.1.attn.qkv.weight", (95, 32), r"\(96, 32\)"),  # fused [q; k; v]
])
def test_convert_refuses_wrong_shape(qwen2_original, tmp_path, key, shape, expected):
    src = copy_of(qwen2_original, tmp_path)
    edit_weights(src, lambda w: w.update({key: torch.zeros(shape)}))
    refused(src, rf"{re.escape(key)}: shape \({shape[0]}, {shape[1]}\), expected {expected}")


def test_convert_refuses_missing_weight(qwen2_original, tmp_path):
    src = copy_of(qwen2_original, tmp_path)
    edit_weights(src, lambda w: w.pop("language_model.lm_head.weight"))
    refused(src, r"weights missing for language_model\.lm_head\.weight")


def test_convert_refuses_missing_tokenizer(qwen2_original, tmp_path):
    src = copy_of(qwen2_original, tmp_path)
    for name in ("vocab.json", "merges.txt"):
        (src / name).unlink()
    refused(src, "no tokenizer")
    (src / "tokenizer.model").write_bytes(b"\x0a")  # InternLM2's sentencepiece model alone
    refused(src, r"only a sentencepiece tokenizer\.model.*tokenizer\.json.*--tokenizer")


@pytest.mark.parametrize("change, match", [
    ({"ps_version": "v1"}, "pixel shuffle v1"),
    ({"use_llm_lora": 16}, "LoRA adapters are not merged"),
    ({"llm_config": {"architectures": ["MistralForCausalLM"]}}, "'MistralForCausalLM' is not supported"),
    ({"model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"]}, "already in .* native"),
])
def test_convert_refuses_config(qwen2_original, tmp_path, change, match):
    src = copy_of(qwen2_original, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    refused(src, match)


def test_convert_command_line(qwen2_original, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert "--src" in usage and "--out" in usage and "keep,bfloat16,float32" in usage and "--tokenizer" in usage

    out = tmp_path / "bf16"
    assert main(["--src", str(qwen2_original), "--out", str(out), "--dtype", "bfloat16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # --out exists: one line, status 2
        main(["--src", str(qwen2_original), "--out", str(out)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {out} already exists; choose another --out or remove it"]


def test_check_checkpoint_on_original_layout_names_convert(qwen2_original):
    with pytest.raises(OccError, match=r"original remote-code layout.*python -m occmllm\.convert --src"):
        check_checkpoint(qwen2_original)
