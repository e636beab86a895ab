"""Convert an InternVL checkpoint from its original remote-code layout to transformers' native one.

    python -m occmllm.convert --src ORIGINAL_FOLDER --out HF_FOLDER [--dtype keep|bfloat16|float32]

The original layout (``InternVLChatModel``, "internvl_chat", ``trust_remote_code``) has three parts:

- ``vision_model.*``: InternViT. Attention has one fused ``attn.qkv`` whose rows are [q; k; v]
  (each ``hidden`` rows, heads in order), an optional RMS ``q_norm``/``k_norm`` over all heads,
  layer scale ``ls1``/``ls2``, and no final norm. Native: ``vision_tower.*`` with separate
  ``q_proj``/``k_proj``/``v_proj``, ``lambda_1``/``lambda_2``, ``layernorm_before``/``_after``.
- ``mlp1.{0,1,3}``: LayerNorm, Linear, GELU, Linear -> ``multi_modal_projector.{layer_norm,linear_1,linear_2}``.
- ``language_model.*``: the LLM named by ``llm_config.architectures``. Qwen2 and LLaMA keep their
  names. InternLM2 becomes LLaMA: its fused ``attention.wqkv`` is laid out per key-value head as
  [that head's query heads..., key, value] (rows ``(kv_heads, q_per_kv + 2, head_dim)``), its
  ``feed_forward.w1/w3/w2`` are gate/up/down. Phi-3 stays Phi-3 (fused ``qkv_proj`` [q; k; v] and
  ``gate_up_proj`` [gate; up] are read as they are by transformers' ``Phi3Model``).

Pixel shuffle "v2" is transformers' ``pixel_shuffle``, ``select_layer`` is ``vision_feature_layer``,
a tile gives (image_size / patch)^2 * downsample_ratio^2 ``<IMG_CONTEXT>`` tokens, and the chat
template is the checkpoint's InternVL conversation template (``config.template``), as it was trained.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoTokenizer, GenerationConfig, GotOcr2ImageProcessorPil, InternVLConfig,
                          InternVLForConditionalGeneration, InternVLVisionConfig, LlamaConfig, Phi3Config,
                          PreTrainedTokenizerFast, Qwen2Config)

from occmllm.errors import OccError, cli
from occmllm.fileio import read_json, replace_folder, write_json
from occmllm.model import ImageOnlyInternVLProcessor

# Phi-3 stays Phi3Config: LlamaConfig lacks its LongRoPE ("su") scaling and sliding window; fused weights load as stored
TEXT_CONFIGS = {"Qwen2ForCausalLM": Qwen2Config, "LlamaForCausalLM": LlamaConfig,
                "InternLM2ForCausalLM": LlamaConfig, "Phi3ForCausalLM": Phi3Config}

# Defaults of InternVL's own config classes, for keys an older config.json leaves out.
CHAT_DEFAULTS = {"select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v1", "dynamic_image_size": False,
                 "min_dynamic_patch": 1, "max_dynamic_patch": 6, "force_image_size": None, "template": None}
VIT_DEFAULTS = {"patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 3200,
                "num_attention_heads": 25, "intermediate_size": 12800, "qk_normalization": True,
                "num_hidden_layers": 48, "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-6,
                "dropout": 0.0, "attention_dropout": 0.0, "initializer_factor": 0.1}

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>"}
VIDEO_TOKEN = "<video>"  # transformers' InternVLProcessor needs one; added as transformers' own conversion does
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # InternVL's image normalisation

# InternVL's conversation templates (internvl/conversation.py, separator style MPT): system, user and
# assistant headers, the end-of-turn token, what follows it, and the default system message.
SYSTEM_V2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYSTEM_V25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
CHATML = ("<|im_start|>system\n", "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>")
TEMPLATES = {"Hermes-2": (*CHATML, "", SYSTEM_V2), "internlm2-chat": (*CHATML, "", SYSTEM_V2),
             "internvl2_5": (*CHATML, "\n", SYSTEM_V25),
             "phi3-chat": ("<|system|>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>", "", SYSTEM_V2)}

# Weight renames: (original key pattern, native key(s), how to split a fused tensor into them).
_LAYER = r"vision_model\.encoder\.layers\.(\d+)\."
_NATIVE_LAYER = r"vision_tower.encoder.layer.\1."
VISION_RULES = [
    (r"vision_model\.embeddings\.class_embedding", ["vision_tower.embeddings.cls_token"], None),
    (r"vision_model\.embeddings\.position_embedding", ["vision_tower.embeddings.position_embeddings"], "positions"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
     [r"vision_tower.embeddings.patch_embeddings.projection.\1"], None),
    (_LAYER + r"attn\.qkv\.(weight|bias)", [_NATIVE_LAYER + f"attention.{p}_proj.\\2" for p in "qkv"], "thirds"),
    (_LAYER + r"attn\.proj\.(weight|bias)", [_NATIVE_LAYER + r"attention.projection_layer.\2"], None),
    (_LAYER + r"attn\.(q_norm|k_norm)\.weight", [_NATIVE_LAYER + r"attention.\2.weight"], None),
    (_LAYER + r"ls([12])", [_NATIVE_LAYER + r"lambda_\2"], None),
    (_LAYER + r"norm1\.(weight|bias)", [_NATIVE_LAYER + r"layernorm_before.\2"], None),
    (_LAYER + r"norm2\.(weight|bias)", [_NATIVE_LAYER + r"layernorm_after.\2"], None),
    (_LAYER + r"mlp\.(fc[12])\.(weight|bias)", [_NATIVE_LAYER + r"mlp.\2.\3"], None),
    (r"mlp1\.0\.(weight|bias)", [r"multi_modal_projector.layer_norm.\1"], None),
    (r"mlp1\.1\.(weight|bias)", [r"multi_modal_projector.linear_1.\1"], None),
    (r"mlp1\.3\.(weight|bias)", [r"multi_modal_projector.linear_2.\1"], None),
    (r"language_model\..*\.rotary_emb\.inv_freq", [], None),  # a buffer old versions saved; recomputed from the config
]
_TEXT_LAYER = r"language_model\.model\.layers\.(\d+)\."
_NATIVE_TEXT_LAYER = r"language_model.model.layers.\1."
SAME_NAMES = [(r"language_model\.(model\..+|lm_head\.weight)", [r"language_model.\1"], None)]
INTERNLM2_RULES = [
    (r"language_model\.model\.tok_embeddings\.weight", ["language_model.model.embed_tokens.weight"], None),
    (r"language_model\.output\.weight", ["language_model.lm_head.weight"], None),
    (r"language_model\.model\.norm\.weight", ["language_model.model.norm.weight"], None),
    (_TEXT_LAYER + r"attention\.wqkv\.(weight|bias)",
     [_NATIVE_TEXT_LAYER + f"self_attn.{p}_proj.\\2" for p in "qkv"], "grouped_qkv"),
    (_TEXT_LAYER + r"attention\.wo\.(weight|bias)", [_NATIVE_TEXT_LAYER + r"self_attn.o_proj.\2"], None),
    *[(_TEXT_LAYER + old + r"\.weight", [_NATIVE_TEXT_LAYER + new + ".weight"], None) for old, new in (
        (r"feed_forward\.w1", "mlp.gate_proj"), (r"feed_forward\.w3", "mlp.up_proj"),
        (r"feed_forward\.w2", "mlp.down_proj"), ("attention_norm", "input_layernorm"),
        ("ffn_norm", "post_attention_layernorm"))],
]
# What save_pretrained writes for the native model's parameter names (from_pretrained maps them back).
SAVED_PREFIXES = [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                  ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")]


def read_source_config(src: Path) -> dict:
    config = read_json(src / "config.json") if (src / "config.json").is_file() else None
    if not isinstance(config, dict):
        raise OccError(f"{src}: no config.json (a JSON object); --src must be an InternVL checkpoint folder")
    if config.get("model_type") == "internvl":
        raise OccError(f"{src}: already in transformers' native InternVL layout; load it as it is")
    if config.get("model_type") != "internvl_chat" and "InternVLChatModel" not in config.get("architectures", []):
        raise OccError(f"{src}: not an original-layout InternVL checkpoint (model_type {config.get('model_type')!r}, "
                       "expected 'internvl_chat')")
    arch = (config.get("llm_config", {}).get("architectures") or [None])[0]
    if arch not in TEXT_CONFIGS:
        raise OccError(f"{src}/config.json: llm_config.architectures {arch!r} is not supported; "
                       f"expected one of {', '.join(TEXT_CONFIGS)}")
    chat = {**CHAT_DEFAULTS, **config}
    if chat["ps_version"] != "v2":
        raise OccError(f"{src}/config.json: ps_version {chat['ps_version']!r}: pixel shuffle v1 leaves the token grid "
                       "transposed, which transformers' InternVL cannot express; only 'v2' checkpoints convert")
    if chat.get("use_backbone_lora") or chat.get("use_llm_lora"):
        raise OccError(f"{src}/config.json: LoRA adapters are not merged (use_backbone_lora/use_llm_lora); "
                       "merge them into the weights first")
    if not float(1 / chat["downsample_ratio"]).is_integer():
        raise OccError(f"{src}/config.json: downsample_ratio {chat['downsample_ratio']} must be 1/n")
    return chat


def vision_config(chat: dict) -> InternVLVisionConfig:
    vit = {**VIT_DEFAULTS, **chat["vision_config"]}
    if vit["qk_normalization"] and vit["layer_norm_eps"] != 1e-6:
        raise OccError(f"vision_config: layer_norm_eps {vit['layer_norm_eps']} with qk_normalization; transformers' "
                       "InternViT fixes the q/k norm epsilon at 1e-6")
    return InternVLVisionConfig(
        hidden_size=vit["hidden_size"], num_hidden_layers=vit["num_hidden_layers"],
        num_attention_heads=vit["num_attention_heads"], intermediate_size=vit["intermediate_size"],
        hidden_act=vit["hidden_act"], norm_type=vit["norm_type"], layer_norm_eps=vit["layer_norm_eps"],
        image_size=chat["force_image_size"] or vit["image_size"], patch_size=vit["patch_size"],
        attention_bias=vit["qkv_bias"], use_qk_norm=vit["qk_normalization"], attention_dropout=vit["attention_dropout"],
        projection_dropout=vit["dropout"], hidden_dropout_prob=0.0, layer_scale_init_value=vit["initializer_factor"],
        use_absolute_position_embeddings=True, use_mean_pooling=True)  # mean pooling: no final norm, as InternViT


def rope_parameters(llm: dict, arch: str) -> dict:
    theta = float(llm.get("rope_theta", 10000.0))
    scaling = dict(llm.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", None))
    if kind is None:
        return {"rope_type": "default", "rope_theta": theta}
    if arch == "Phi3ForCausalLM" and kind in ("su", "longrope", "yarn"):
        original = llm.get("original_max_position_embeddings", 4096)
        scale = llm.get("max_position_embeddings", 4096) / original
        rope = {"rope_type": "longrope", "rope_theta": theta, "short_factor": scaling["short_factor"],
                "long_factor": scaling["long_factor"], "original_max_position_embeddings": original, "factor": scale}
        if kind == "yarn":  # InternVL's Phi-3 "yarn" is LongRoPE with another attention factor
            rope["attention_factor"] = 0.1 * math.log(scale) + 1.0 if scale > 1 else 1.0
        return rope
    if arch == "InternLM2ForCausalLM" and kind not in ("linear", "dynamic"):
        raise OccError(f"llm_config.rope_scaling type {kind!r}: InternLM2 defines only 'linear' and 'dynamic'")
    if arch == "Phi3ForCausalLM":
        raise OccError(f"llm_config.rope_scaling type {kind!r}: Phi-3 defines only 'su' and 'yarn'")
    return {**scaling, "rope_type": kind, "rope_theta": theta}


def text_config(llm: dict, arch: str):
    cls = TEXT_CONFIGS[arch]
    llm = dict(llm)
    if arch == "InternLM2ForCausalLM":
        llm["attention_bias"] = llm.pop("bias", True)  # InternLM2Config's default; it covers wqkv and wo
    fields = {f.name for f in dataclasses.fields(cls)} - {"architectures", "dtype", "transformers_version",
                                                         "rope_parameters", "tie_word_embeddings"}
    kwargs = {k: v for k, v in llm.items() if k in fields}
    # InternVLChatConfig unties the output layer for every LLM, whatever llm_config says
    return cls(**kwargs, rope_parameters=rope_parameters(llm, arch), tie_word_embeddings=False)


def load_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """The checkpoint's tokenizer, with InternVL's image tokens named as transformers' processor wants."""
    names = {**IMAGE_TOKENS, "video_token": VIDEO_TOKEN}
    try:
        if (folder / "tokenizer.json").is_file():  # whatever class tokenizer_config.json names (often remote code)
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder, extra_special_tokens=names)
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():  # e.g. Qwen2Tokenizer
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, extra_special_tokens=names)
        elif (folder / "tokenizer.model").is_file():
            raise OccError(f"{folder}: only a sentencepiece tokenizer.model; put a fast tokenizer.json there or pass "
                           "--tokenizer FOLDER with one (e.g. where sentencepiece is installed: AutoTokenizer."
                           "from_pretrained(SRC, trust_remote_code=True, use_fast=True).save_pretrained(FOLDER))")
        else:
            raise OccError(f"{folder}: no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                           "pass --tokenizer FOLDER holding the checkpoint's tokenizer")
    except OccError:
        raise
    except Exception as exc:  # a third-party loader's error, reported in one line
        raise OccError(f"{folder}: the tokenizer does not load ({str(exc).strip().splitlines()[0]})") from None
    tokenizer.init_kwargs.pop("auto_map", None)  # saved as transformers' own fast class: no remote code to name
    vocab = tokenizer.get_vocab()
    for token in IMAGE_TOKENS.values():
        if token not in vocab:
            raise OccError(f"{folder}: the tokenizer has no {token} token; it is not an InternVL chat tokenizer")
    return tokenizer


def chat_template(template: str | None, tokenizer, folder: Path) -> str:
    """InternVL's conversation template as Jinja, with ``{% generation %}`` around what the assistant
    writes (its answer and the end-of-turn token); the tokenizer's eos becomes that end-of-turn token."""
    if template not in TEMPLATES:
        if tokenizer.chat_template:
            print(f"note: InternVL template {template!r} is not known here; keeping the tokenizer's chat template")
            return tokenizer.chat_template
        raise OccError(f"config.json: template {template!r} is not one of {', '.join(TEMPLATES)} and the tokenizer "
                       "has no chat template")
    system_header, user_header, assistant_header, end, after_end, system = TEMPLATES[template]
    if end not in tokenizer.get_vocab():
        raise OccError(f"{folder}: the tokenizer has no {end} token, which template {template!r} ends turns with")
    # InternVL tokenizes the whole prompt with the tokenizer's special tokens (a BOS for InternLM2);
    # apply_chat_template adds none, so the template writes it
    bos = "{{ bos_token }}" if tokenizer.bos_token and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id] else ""
    tokenizer.eos_token = end
    s = lambda text: json.dumps(text, ensure_ascii=False)  # a Jinja string literal
    return (bos + "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set turns = messages[1:] %}{% else %}{% set system = " + s(system) + " %}{% set turns = messages %}"
            "{% endif %}{{ " + s(system_header) + " + system + " + s(end + after_end) + " }}"
            "{% for message in turns %}{% if message['role'] == 'assistant' %}{{ " + s(assistant_header) + " }}"
            "{% generation %}{{ message['content'] + " + s(end) + " }}{% endgeneration %}{{ " + s(after_end) + " }}"
            "{% else %}{{ " + s(user_header) + " + message['content'] + " + s(end + after_end) + " }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ " + s(assistant_header) + " }}{% endif %}")


def expected_shapes(config: InternVLConfig) -> dict[str, tuple]:
    """Shape of every weight of the native model, under the names save_pretrained writes."""
    with torch.device("meta"):  # shapes only: no memory, whatever the model's size
        model = InternVLForConditionalGeneration(config)
    saved = lambda name: next((to + name[len(of):] for of, to in SAVED_PREFIXES if name.startswith(of)), name)
    return {saved(name): tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def split_grouped_qkv(fused: torch.Tensor, kv_heads: int, head_dim: int) -> list[torch.Tensor]:
    """InternLM2's wqkv rows (kv_heads, q_per_kv + 2, head_dim): each group's queries, then its key and value."""
    rest = fused.shape[1:]
    groups = fused.reshape(kv_heads, -1, head_dim, *rest)
    return [groups[:, :-2].reshape(-1, *rest), groups[:, -2].reshape(-1, *rest), groups[:, -1].reshape(-1, *rest)]


def resize_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Position embeddings for another tile size, interpolated as InternViT does at every forward."""
    old = math.isqrt(table.shape[1] - 1)
    patches = table[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], patches.flatten(2).transpose(1, 2).to(table.dtype)], dim=1)


def convert_tensor(key: str, tensor: torch.Tensor, rules, shapes: dict, text) -> list[tuple[str, torch.Tensor]]:
    """The native (name, tensor) pairs of one original weight; a one-line error for anything unexpected."""
    for pattern, targets, split in rules:
        match = re.fullmatch(pattern, key)
        if match:
            break
    else:
        raise OccError(f"{key}: unknown weight for this InternVL layout (vision_model.*, mlp1.*, language_model.*)")
    names = [match.expand(t) for t in targets]
    for name in names:
        if name not in shapes:
            raise OccError(f"{key}: no native weight {name} in a model of this config.json")
    if split == "positions" and tuple(tensor.shape) != shapes[names[0]] and tensor.ndim == 3 \
            and math.isqrt(tensor.shape[1] - 1) ** 2 == tensor.shape[1] - 1:
        tensor = resize_positions(tensor, math.isqrt(shapes[names[0]][1] - 1))
    if len(names) > 1:
        fused_shape = (sum(shapes[n][0] for n in names), *shapes[names[0]][1:])
        if tuple(tensor.shape) != fused_shape:
            raise OccError(f"{key}: shape {tuple(tensor.shape)}, expected {fused_shape} from config.json")
        if split == "grouped_qkv":
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            pieces = split_grouped_qkv(tensor, text.num_key_value_heads, head_dim)
        else:
            pieces = tensor.chunk(len(names), dim=0)
        return [(n, p.clone()) for n, p in zip(names, pieces)]  # clones: safetensors refuses shared storage
    for name in names:
        if tuple(tensor.shape) != shapes[name]:
            raise OccError(f"{key}: shape {tuple(tensor.shape)}, expected {shapes[name]} ({name}) from config.json")
    return [(name, tensor) for name in names]


def source_shards(src: Path) -> list[str]:
    index = src / "model.safetensors.index.json"
    shards = sorted(set(read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for shard in shards:
        if not (src / shard).is_file():
            raise OccError(f"{src / shard}: weight file not found; the original weights must be safetensors "
                           "(model.safetensors or shards with model.safetensors.index.json)")
    return shards


def convert(src: str | Path, out: str | Path, dtype: str = "keep", tokenizer_folder: str | Path | None = None) -> Path:
    src, out = Path(src), Path(out)
    if out.exists():
        raise OccError(f"{out} already exists; choose another --out or remove it")
    chat = read_source_config(src)
    arch = chat["llm_config"]["architectures"][0]
    tokenizer_folder = Path(tokenizer_folder) if tokenizer_folder else src
    tokenizer = load_tokenizer(tokenizer_folder)
    tokenizer.chat_template = template = chat_template(chat["template"], tokenizer, tokenizer_folder)
    vision, text = vision_config(chat), text_config(chat["llm_config"], arch)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKENS["context_image_token"])
    if image_token_id >= text.vocab_size:
        raise OccError(f"{tokenizer_folder}: <IMG_CONTEXT> is token {image_token_id}, outside the "
                       f"{text.vocab_size}-token vocabulary of llm_config; the tokenizer belongs to another model")
    image_size, patch_size = vision.image_size[0], vision.patch_size[0]
    image_seq_length = round((image_size // patch_size) ** 2 * chat["downsample_ratio"] ** 2)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=chat["downsample_ratio"],
                            image_token_id=image_token_id, image_seq_length=image_seq_length,
                            projector_hidden_act="gelu", vision_feature_layer=chat["select_layer"],
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    config.architectures = ["InternVLForConditionalGeneration"]
    shapes = expected_shapes(config)
    rules = VISION_RULES + (INTERNLM2_RULES if arch == "InternLM2ForCausalLM" else SAME_NAMES)
    target_dtype = None if dtype == "keep" else getattr(torch, dtype)
    shards, weight_map, stored, total = source_shards(src), {}, Counter(), 0
    with replace_folder(out) as tmp:
        for shard in shards:
            converted = {}
            for key, tensor in load_file(src / shard).items():
                for name, value in convert_tensor(key, tensor, rules, shapes, text):
                    if name in weight_map:
                        raise OccError(f"{key}: {name} is written twice (the checkpoint repeats a weight)")
                    if target_dtype is not None and value.is_floating_point():
                        value = value.to(target_dtype)
                    stored[value.dtype] += value.numel()
                    total += value.numel() * value.element_size()
                    converted[name], weight_map[name] = value.contiguous(), shard
            save_file(converted, tmp / shard, metadata={"format": "pt"})
        missing = sorted(shapes.keys() - weight_map.keys())
        if missing:
            raise OccError(f"{src}: weights missing for {missing[0]} (and {len(missing) - 1} more native weights); "
                           "the checkpoint does not hold what its config.json describes")
        if len(shards) > 1:
            write_json(tmp / "model.safetensors.index.json",
                       {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
        config.dtype = stored.most_common(1)[0][0]
        config.save_pretrained(tmp)
        GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id).save_pretrained(tmp)
        tiling = bool(chat["dynamic_image_size"])  # InternVL's dynamic_preprocess: tiles plus a thumbnail
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": image_size, "width": image_size}, crop_to_patches=tiling,
            min_patches=chat["min_dynamic_patch"], max_patches=chat["max_dynamic_patch"] if tiling else 1,
            image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
        ImageOnlyInternVLProcessor(image_processor, tokenizer, image_seq_length=image_seq_length,
                                   chat_template=template).save_pretrained(tmp)
    return out


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m occmllm.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, type=Path, help="original InternVL checkpoint folder (InternVLChatModel)")
    p.add_argument("--out", required=True, type=Path, help="folder to write the native checkpoint to (must not exist)")
    p.add_argument("--dtype", choices=["keep", "bfloat16", "float32"], default="keep",
                   help="weight dtype to store [keep: as in --src]")
    p.add_argument("--tokenizer", type=Path, help="folder with the checkpoint's fast tokenizer (tokenizer.json) "
                                                   "when --src has only a sentencepiece tokenizer.model [--src]")
    args = p.parse_args(argv)
    out = convert(args.src, args.out, args.dtype, args.tokenizer)
    print(f"wrote {out}: load it with occmllm.model.load_model or any --checkpoint flag")
    return 0


if __name__ == "__main__":
    sys.exit(main())
