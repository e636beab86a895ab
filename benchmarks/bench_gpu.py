"""Training and inference speed at InternVL scale: the project's own stage trainers and inference
path on InternVL-shaped checkpoints with random weights, built offline.

Shapes (``--shape``): ``1b`` (default) is InternVL3-1B's (InternViT-300M at 448 px, 1,025 tokens a
tile, 256 image tokens after the 2 x 2 pixel shuffle; a Qwen2-0.5B-shaped language model with a
151,674-row vocabulary), ``8b`` InternVL3-8B's (the same tower; a Qwen2.5-7B-shaped language model),
``tiny`` a few-layer model that runs on CPU in seconds (what ``make test`` runs, so the script
cannot rot). The tokenizer is the project's (``occmllm.tiny``); only timing, not answers, means
anything with random weights.

Runs (``--runs``, comma-separated):
  full     stage 1, every part trained (``freeze_vision false``)
  frozen   stage 1, vision tower frozen (the recipe's setting after pretraining)
  full-compiled, frozen-compiled  the same with ``compile_layers`` (each layer of the tower and the
           language model compiled; ``occmllm.stage.compile_layers``), compiled in the warm-up steps
  lora     stage 1, tower frozen, LoRA on the language model
  frozen-all-logits  the frozen run with the output head at every position, as before
           ``occmllm.model.AnswerLogitsOnly`` (its loss is the same)
  mpo      stage 3 (TRL's DPOTrainer with the MPO losses), tower frozen, with its frozen reference
  plain    ``inference.py``'s plain mode (Q1-Q5 in turn, greedy, batches of ``--batch-size``)
  plain-compiled   the same with ``--decoding compiled`` (static KV buffers, each decoding step one
           compiled graph, a CUDA graph on a GPU), compiled before the first batch as
           ``inference.py`` does (the time is reported)
  plain-graphed    the same with ``--decoding graphed`` (static KV buffers, each pass after the kept
           keys and values one CUDA graph, captured on first use; ``occmllm.decoding``)
  plain-whole      plain with every turn prompted whole, history and image tokens again, as before
           ``occmllm.answering.Dialogue`` kept the last turn's keys and values
  cot      ``--mode cot``, every record looking again (gate 0), each image its own render (the
           reconstruction is ``bench_recon.py``'s to time)
  dual     ``--mode dual`` at alpha 0.5, each image its own render
  tta      ``--tta clip`` (Q1 after 3 SGD steps per record), with an untrained tiny CLIP
  tta-second-look  ``--tta second-look`` as the demo runs it, the model itself the judge
           over its image blended with the image standing in for its render

With ``--packed`` the stage-1 runs train on packed batches (``occmllm.sft.Collator``: one row, no
padding); the FLOP count is the same, since padding is not work. With ``--group-by-length`` they
batch samples of about one length together (``occmllm.model.GroupsByLength``); the stage-1 file
then repeats its views up to 200 batches, so that the sampler sorts groups of 50 batches, as it
does on a dataset of that size or more. Each training row
gives the share of the language model's token slots that were padding.

Each training run takes ``--warmup`` steps, then times ``--steps`` more (the device synchronised at
each step's edges); the rates count the steps alone, and the note adds the waits for each step's
batch between steps (made on the main process unless ``--workers``). With ``--profile`` each
training run then takes one more step under ``torch.profiler``, not timed, and reports where its
time went: the share of each kind of work (``WORK_KINDS``: matrix multiplies and convolutions,
attention, the optimizer, normalisation, compiled layers, other elementwise work, copies and casts,
the rest) and the operations that took most, by device time on a GPU (each kernel) and by CPU time
on a CPU (each operator's own time). Inference times its first
batch (cold: includes any per-shape set-up) and then ``--steps`` warm batches (each of other
records, so of other prompt widths; the slowest against the median shows any per-shape stall), and
the time of loading and tiling one batch's images on the CPU, a part of every batch unless
``--workers`` make them ahead (a batch's time then includes only any wait for them; the first
batch's is also given apart, as the workers may still be starting); on a GPU it
then profiles one more batch and counts the host's kernel and CUDA-graph launches per record.
With ``--profile`` an inference run also profiles one more batch: its kernels by kind as above, and
the Python functions that took most of the host's own time (cProfile); and times one more batch
part by part (``INFERENCE_PHASES``: the tiles' copy to the device, the vision tower, the language
model's eager passes and graph replays, the turns' host work, the rest), the device synchronised
at each part's edges, so that a GPU run shows which part a warm batch's time goes to.

Model FLOPs of a step, counted from the batch itself (tiles, and each sequence's tokens): each part
costs 2 x parameters x tokens forward (the vision tower on 1,025 tokens a tile, the projector on
the image tokens, the language model and its output head on every text token, embeddings not
counted), plus attention 4 x length^2 x width per layer and sequence (per tile for the tower).
A trained part costs 3x its forward (forward and backward), a frozen part that gradients pass
through 2x (the language model under LoRA), a frozen part before everything trained 1x (the
frozen tower). MPO runs the policy (3x) and its reference (1x) on both answers of each pair.
The output head counts at every text token, the work the model defines, so making logits only
where the loss reads them (the stage trainers do) shows as a higher rate.
The share of peak is against a bf16 matrix-multiply rate measured in the same run (fp32 on CPU).

    python benchmarks/bench_gpu.py [--shape 1b|8b|tiny] [--tiles 1|dynamic] [--batch-size 16]
        [--steps 10] [--warmup 3] [--runs full,frozen,lora,mpo,plain,...]
        [--gradient-checkpointing] [--packed] [--group-by-length] [--profile] [--fp32] [--workers N] [--vocab-size N]
        [--device cuda|cpu] [--json OUT]

Prints each row as it is measured (a run cut short still tells what it measured), then the table and
one JSON line ``{"shape", "device", "peak_tflops", "rows": [...]}``.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import InternVLVisionConfig, Qwen2Config, TrainerCallback, TrainingArguments  # noqa: E402

VISION_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   image_size=448, patch_size=14)
SHAPES = {
    "tiny": {"vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            image_size=32, patch_size=8),
             "text": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          intermediate_size=128, tie_word_embeddings=True),
             "vocab_size": None},
    "1b": {"vision": VISION_300M,
           "text": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                        intermediate_size=4864, tie_word_embeddings=True),
           "vocab_size": 151674},
    "8b": {"vision": VISION_300M,
           "text": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        intermediate_size=18944, tie_word_embeddings=False),
           "vocab_size": 151674},
}
TRAIN_RUNS = {"full": ["--freeze_vision", "false"], "frozen": ["--freeze_vision", "true"],
              "frozen-all-logits": ["--freeze_vision", "true"],
              "lora": ["--freeze_vision", "true", "--use_lora", "true"], "mpo": ["--freeze_vision", "true"]}
COMPILED_RUNS = {"full-compiled": "full", "frozen-compiled": "frozen"}  # run -> the run it compiles
TRAIN_RUNS.update({run: [*TRAIN_RUNS[base], "--compile_layers", "true"] for run, base in COMPILED_RUNS.items()})
# tiles for --tiles dynamic: image sizes in tiles (columns x rows); with a thumbnail above one tile
# these make 1, 3, 3, 4, 5 and 7 tiles, InternVL's dynamic tiling of up to 6 tiles
DYNAMIC_GRIDS = [(1, 1), (2, 1), (1, 2), (3, 1), (2, 2), (3, 2)]


def build_checkpoint(shape: str, out: Path, tiles: str, vocab_size: int | None = None) -> Path:
    from occmllm.model import ImageOnlyInternVLProcessor
    from occmllm.tiny import write_checkpoint
    spec = SHAPES[shape]
    v = spec["vision"]
    vision = InternVLVisionConfig(
        **{k: v[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")},
        image_size=[v["image_size"]] * 2, patch_size=[v["patch_size"]] * 2, use_absolute_position_embeddings=True,
        layer_scale_init_value=0.1, norm_type="layer_norm")
    text = Qwen2Config(**spec["text"], max_position_embeddings=32768)
    write_checkpoint(out, vision, text, merge=2, init_tower=False, vocab_size=vocab_size or spec["vocab_size"],
                     dtype=torch.bfloat16 if shape != "tiny" else torch.float32)
    if tiles == "dynamic":  # InternVL's dynamic tiling: up to 6 tiles and a thumbnail
        processor = ImageOnlyInternVLProcessor.from_folder(out)
        processor.image_processor.crop_to_patches, processor.image_processor.max_patches = True, 6
        processor.save_pretrained(out)
    return out


# transformers' LengthGroupedSampler sorts random groups of min(samples // (4 x batch), 50) batches
GROUPED_BATCHES = 4 * 50


def build_data(out: Path, tile: int, tiles: str, samples: int, stage1_samples: int = 0) -> dict[str, Path]:
    """SynthOcc views, resized to whole tiles (varied grids for dynamic tiling), with stage-1,
    stage-3 and test files over them; the stage-1 file repeats its records up to
    ``stage1_samples``."""
    from data_tools import builders
    from data_tools.synthocc import Settings, generate
    from occmllm.dataset import load_dataset
    from occmllm.questions import category_answer
    scenes = max(4, (samples + 1) // 2)
    data = generate(out / "data", Settings(scenes=scenes, views=2, seed=0, size=64), progress=False)
    ds = load_dataset(data)
    views = ds.split(None)[:samples]
    for k, view in enumerate(views):
        cols, rows = DYNAMIC_GRIDS[k % len(DYNAMIC_GRIDS)] if tiles == "dynamic" else (1, 1)
        path = ds.root / view["image"]
        Image.open(path).convert("RGB").resize((cols * tile, rows * tile)).save(path)
    wrong = {v["id"]: category_answer("remote" if v["category"] != "remote" else "jar") for v in views}
    (out / "predictions.json").write_text(json.dumps(wrong))
    stage1 = builders.stage1_records(views)
    copies = -(-stage1_samples // len(stage1)) if stage1_samples > len(stage1) else 1
    stage1 = [{**r, "id": f"{r['id']}_{k}" if k else r["id"]} for k in range(copies) for r in stage1]
    return {"step1": builders.write_stage(stage1, out / "step1.jsonl", ds, "step1"),
            "step3": builders.write_stage(builders.stage3_pairs(views, out / "predictions.json", right_pairs=False),
                                          out / "step3.jsonl", ds, "step3", kind="preference"),
            "test": builders.write_stage(builders.test_records(views), out / "test.jsonl", ds, "test")}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device) -> float:
    """Measured matrix-multiply FLOP/s: bf16 8192^2 on a GPU, fp32 1024^2 on CPU."""
    n, dtype, repeats = (8192, torch.bfloat16, 20) if device.type == "cuda" else (1024, torch.float32, 10)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


class Shape:
    """The parameter counts and widths the FLOP count needs, read from a model."""

    def __init__(self, model):
        inner = model.model if hasattr(model.model, "vision_tower") else model.base_model.model.model
        count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
        config = inner.config
        self.vision, self.text = config.vision_config, config.text_config
        self.vision_params = count(inner.vision_tower)
        self.projector_params = count(inner.multi_modal_projector)
        self.text_params = count(inner.language_model) - inner.language_model.embed_tokens.weight.numel()
        self.head_params = self.text.vocab_size * self.text.hidden_size
        patches = (self.vision.image_size[0] // self.vision.patch_size[0]) ** 2
        self.vit_tokens = patches + 1
        self.image_tokens = int(patches * config.downsample_ratio ** 2)

    def forward_flops(self, tiles: int, lengths: list[int]) -> dict[str, float]:
        v, t = self.vision, self.text
        vision = tiles * (2 * self.vision_params * self.vit_tokens
                          + 4 * v.num_hidden_layers * v.hidden_size * self.vit_tokens ** 2)
        projector = 2 * self.projector_params * tiles * self.image_tokens
        text = sum(2 * (self.text_params + self.head_params) * n + 4 * t.num_hidden_layers * t.hidden_size * n * n
                   for n in lengths)
        return {"vision": vision, "projector": projector, "text": text}


MULTIPLIERS = {"full": {"vision": 3, "projector": 3, "text": 3}, "frozen": {"vision": 1, "projector": 3, "text": 3},
               "frozen-all-logits": {"vision": 1, "projector": 3, "text": 3},
               "lora": {"vision": 1, "projector": 3, "text": 2}, "mpo": {"vision": 1 + 1, "projector": 3 + 1,
                                                                          "text": 3 + 1}}
MULTIPLIERS.update({run: MULTIPLIERS[base] for run, base in COMPILED_RUNS.items()})  # the same work


class StepClock(TrainerCallback):
    """Wall time of each optimizer step, the device synchronised at both edges, and the wait before
    it: the Trainer fetches a step's batch (data loading, on the main process without dataloader
    workers) between the last step's end and this one's beginning."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self.waits = device, [], []
        self.end = None

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.start = time.perf_counter()
        self.waits.append(self.start - self.end if self.end is not None else 0.0)

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.end = time.perf_counter()
        self.seconds.append(self.end - self.start)


# kinds of work, by the name of a kernel (GPU) or an operator (CPU); the first pattern that matches
WORK_KINDS = (("attention", re.compile(r"attention|flash|fmha|sdpa|sdp_", re.I)),
              ("matmul", re.compile(r"gemm|nvjet|cublas|cutlass|xmma|conv|matmul|aten::(mm|addmm|bmm|baddbmm)$", re.I)),
              ("optimizer", re.compile(r"adam|foreach|multi_tensor|optimizer", re.I)),
              ("norm", re.compile(r"norm", re.I)),
              # compiled layers: their fused kernels on a GPU; on a CPU the compiled graphs' own time
              ("compiled", re.compile(r"^triton_|cpp_fused|CompiledFxGraph|CompiledFunction|Compiled Region|"
                                      r"TorchDynamo", re.I)),
              ("elementwise", re.compile(r"elementwise|vectorized|reduce_kernel|aten::(mul|add|sub|div|sum|mean|silu|"
                                         r"gelu|exp|neg|pow|rsqrt|tanh|sigmoid|where|fill|zero|clamp|_?softmax|"
                                         r"threshold)(_backward)?_?$", re.I)),
              ("copy/cast", re.compile(r"copy|cast|aten::to$|convert|aten::cat$|index", re.I)))
TOP_OPS = 8


def work_kind(name: str) -> str:
    return next((kind for kind, pattern in WORK_KINDS if pattern.search(name)), "other")


class StepProfiler(TrainerCallback):
    """Profiles training step ``step`` (0-based; the device synchronised at its edges)."""

    def __init__(self, step: int, device: torch.device):
        self.step, self.device, self.profile, self.running = step, device, None, False

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            from torch.profiler import ProfilerActivity, profile
            synchronize(self.device)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profile, self.running = profile(activities=activities), True
            self.profile.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.running:
            synchronize(self.device)
            self.profile.__exit__(None, None, None)
            self.running = False

    def summary(self) -> dict:
        return profile_summary(self.profile, self.device)


def profile_summary(prof, device: torch.device) -> dict:
    """Time by kind of work and the operations that took most, as shares of the total: on a GPU
    each kernel's device time; on a CPU each operator's own CPU time (self times add up without
    counting a nested operator twice)."""
    from torch.autograd import DeviceType
    cuda = device.type == "cuda"
    times: dict[str, float] = {}
    for event in prof.events():
        if cuda and event.device_type != DeviceType.CUDA:
            continue
        t = event.device_time_total if cuda else event.self_cpu_time_total
        if t > 0:
            times[event.name] = times.get(event.name, 0.0) + t
    total = sum(times.values())
    kinds: dict[str, float] = {}
    for name, t in times.items():
        kinds[work_kind(name)] = kinds.get(work_kind(name), 0.0) + t / total
    top = sorted(times.items(), key=lambda item: -item[1])[:TOP_OPS]
    return {"timed_by": "device" if cuda else "cpu", "step_ms": total / 1e3,
            "kinds": dict(sorted(kinds.items(), key=lambda item: -item[1])),
            "top": [[name[:80], t / total] for name, t in top]}


class BatchLog:
    """Wraps a trainer's collator: per batch, the tiles and each sequence's length (for the FLOP
    count). TRL's preference collator already stacks each pair's chosen and rejected sequences
    (and their images). The collator may run in dataloader workers, so each batch carries its
    figures to the main process (``STATS``), where the trainer's batch fetch takes them off."""

    STATS = "bench_batch_stats"

    def __init__(self, trainer):
        self.collate, self.batches = trainer.data_collator, []
        trainer.data_collator = self
        fetch = trainer.get_batch_samples

        def get_batch_samples(*args, **kwargs):
            batches, items = fetch(*args, **kwargs)
            self.batches += [batch.pop(self.STATS) for batch in batches]
            return batches, items

        trainer.get_batch_samples = get_batch_samples

    def __call__(self, batch):
        out = self.collate(batch)
        if "attention_mask" in out:
            lengths = [int(n) for n in out["attention_mask"].sum(dim=1)]
        else:  # a packed row (--packed): each sample's positions count up from 0
            starts = torch.nonzero(out["position_ids"][0] == 0).flatten().tolist() + [out["position_ids"].shape[1]]
            lengths = [b - a for a, b in zip(starts, starts[1:])]
        out[self.STATS] = {"tiles": int(out["pixel_values"].shape[0]), "lengths": lengths, "samples": len(batch),
                           "slots": int(out["input_ids"].numel())}
        return out


def train_row(run: str, checkpoint: Path, files: dict, args, device: torch.device, out: Path) -> dict:
    from occmllm import mpo, sft
    from occmllm.config import parse_config
    from occmllm.stage import DataArguments, ModelArguments
    flags = ["--model_name_or_path", str(checkpoint), "--output_dir", str(out / run), "--save_strategy", "no",
             "--max_steps", str(args.warmup + args.steps + args.profile), "--per_device_train_batch_size",
             str(args.batch_size),
             "--disable_tqdm", "true", "--logging_steps", "1000000", "--report_to", "none",
             "--warmup_steps", "0", "--dataloader_num_workers", str(args.workers), "--activation_checkpointing",
             str(args.gradient_checkpointing).lower(), "--bf16", str(device.type == "cuda").lower(),
             "--use_cpu", str(device.type == "cpu").lower(), "--cache_vision", "false", *TRAIN_RUNS[run]]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if run == "mpo":
        from trl import DPOConfig
        model_args, data_args, config = parse_config(
            (ModelArguments, mpo.PreferenceDataArguments, DPOConfig),
            [*flags, "--train_data", str(files["step3"])], ROOT / "step3_mpo/config.yaml")
        trainer, _ = mpo.build_trainer(model_args, data_args, config)
    else:
        model_args, data_args, training = parse_config(
            (ModelArguments, DataArguments, TrainingArguments),
            [*flags, "--train_data", str(files["step1"]), "--cache_encoded", "false", "--augment", "false",
             "--packed", str(args.packed).lower(),
             "--train_sampling_strategy", "group_by_length" if args.group_by_length else "random"],
            ROOT / "step1_sft/config.yaml")
        trainer, _ = sft.build_trainer(model_args, data_args, training)
        if run == "frozen-all-logits":
            trainer.compute_loss_func = None  # the model's own loss over logits at every position
    log = BatchLog(trainer)
    clock = StepClock(device)
    trainer.add_callback(clock)
    profiler = StepProfiler(args.warmup + args.steps, device) if args.profile else None
    if profiler:
        trainer.add_callback(profiler)
    trainer.train()
    shape = Shape(trainer.model)
    end = args.warmup + args.steps  # a profiled step after these is not timed
    seconds = sum(clock.seconds[args.warmup: end])
    waits = sum(clock.waits[args.warmup: end])
    timed = log.batches[args.warmup: args.warmup + len(clock.seconds[args.warmup: end])]
    flops = sum(MULTIPLIERS[run][part] * f for b in timed
                for part, f in shape.forward_flops(b["tiles"], b["lengths"]).items())
    samples = sum(b["samples"] for b in timed)
    tokens = sum(sum(b["lengths"]) for b in timed)
    return {"run": run, "batch": args.batch_size, "steps": len(timed), "epochs": trainer.state.epoch,
            "seconds": seconds, "samples_per_s": samples / seconds, "tokens_per_s": tokens / seconds,
            "data_wait_s": waits, "samples_per_s_with_waits": samples / (seconds + waits),
            "tiles_per_sample": sum(b["tiles"] for b in timed) / samples,
            "tokens_per_sample": tokens / samples, "flops": flops,
            # the share of the language model's token slots that are padding
            "padding_share": 1 - tokens / sum(b["slots"] for b in timed),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            **({"profile": profiler.summary()} if profiler else {})}


# run -> (inference.py --mode, --decoding, whether each turn keeps the last one's keys and values)
INFERENCE_RUNS = {"plain": ("plain", "dynamic", True), "plain-compiled": ("plain", "compiled", True),
                  "plain-graphed": ("plain", "graphed", True),
                  "plain-whole": ("plain", "dynamic", False), "cot": ("cot", "dynamic", True),
                  "dual": ("dual", "dynamic", True), "tta": ("tta", "dynamic", True),
                  "tta-second-look": ("tta-second-look", "dynamic", True)}


class ImagesAsRenders:
    """cot and dual without a reconstruction model: each record's image stands in for its render
    (``occmllm.modes.Context.renders``), so the model's part is timed and the reconstruction's,
    which ``benchmarks/bench_recon.py`` times, is left out."""

    def __init__(self, samples):
        self.by_id = {s.id: s.images[0] for s in samples}

    def paths(self, ids):
        return [self.by_id[i] for i in ids]


def mode_context(mode: str, samples, out: Path):
    """The inference mode's runner and context: cot looks again at every record (gate 0), cot and
    dual blend at alpha 0.5, tta adapts with an untrained tiny CLIP and the default settings,
    tta-second-look at its default learning rate with the model judging its own blend."""
    from occmllm.modes import MODE_RUNNERS, Context
    from occmllm.tta import LEARNING_RATES, TTASettings
    if mode == "tta":
        from occmllm import clip
        return MODE_RUNNERS[mode], Context(clip=clip.load(clip.build(out / "clip")), tta=TTASettings())
    context = Context(renders=ImagesAsRenders(samples), alpha=0.5, gate=0.0)
    if mode == "tta-second-look":
        context.tta = TTASettings(lr=LEARNING_RATES["second-look"], judge="second-look")
    return MODE_RUNNERS[mode], context


def timed_waits(items, waits: list):
    """``items`` as they come; for each, (when the wait for it began, how long it took) appended to
    ``waits``."""
    it = iter(items)
    while True:
        start = time.perf_counter()
        item = next(it, None)
        if item is None:
            return
        waits.append((start, time.perf_counter() - start))
        yield item


def launches(device: torch.device, work) -> int | None:
    """Kernel and CUDA-graph launches the host makes while ``work()`` runs (None off a GPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if "LaunchKernel" in e.name or "GraphLaunch" in e.name)


# the parts of an inference batch that ``phase_times`` times: (name, where it is, its attribute);
# where is "model" for the model itself, else a class of the inference path
INFERENCE_PHASES = (("tiles to the device", "Answerer", "pixels_on_device"),
                    ("vision tower and projector", "Answerer", "encode"),
                    ("dual blend of image and render", "Answerer", "encode_dual"),
                    ("language model, eager passes", "model", "forward"),
                    ("language model, graph replays", "GraphedDecoder", "_replay"),
                    ("turns' own host work", "Answerer", "_generate"))
OUTSIDE_PHASES = "the rest, on the host"


def phase_times(device: torch.device, model, work) -> dict:
    """``work()`` once more with each part of ``INFERENCE_PHASES`` timed, the device synchronised at
    its edges, as its own time in ms (a part's nested parts are counted apart: the eager passes
    inside a turn are not the turn's own work), and the rest of the batch's wall time as
    ``OUTSIDE_PHASES``; also that wall time, ``serialised_ms``. Synchronising removes the overlap of
    host and device, so on a GPU the batch takes longer than a timed one: the excess is about how
    much of the device's work the host hides today. Inside a CUDA-graph capture a
    part runs untimed (a capture cannot synchronise)."""
    import functools

    from occmllm.answering import Answerer
    from occmllm.decoding import GraphedDecoder
    owners = {"Answerer": Answerer, "GraphedDecoder": GraphedDecoder, "model": model}
    spent = {name: 0.0 for name, _, _ in INFERENCE_PHASES}
    nested: list[float] = []  # per open part, the time of the parts inside it

    def timed(name: str, fn):
        @functools.wraps(fn)
        def part(*args, **kwargs):
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return fn(*args, **kwargs)
            synchronize(device)
            start = time.perf_counter()
            nested.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                synchronize(device)
                took = time.perf_counter() - start
                spent[name] += took - nested.pop()
                if nested:
                    nested[-1] += took
        return part

    patched = []
    for name, where, attr in INFERENCE_PHASES:
        owner = owners[where]
        patched.append((owner, attr, owner.__dict__.get(attr)))  # the model's forward: None, its class's
        setattr(owner, attr, timed(name, getattr(owner, attr)))
    try:
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        wall = time.perf_counter() - start
    finally:
        for owner, attr, original in patched:
            if original is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
    parts = {name: 1e3 * seconds for name, seconds in spent.items() if seconds > 0}
    return {"serialised_ms": 1e3 * wall, "parts_ms": {**parts, OUTSIDE_PHASES: 1e3 * wall - sum(parts.values())}}


def batch_profile(device: torch.device, work, model=None) -> dict:
    """Where one more batch's time goes (``--profile``): its wall time; ``profile_summary`` of its
    kernels (on a CPU, its operators); the host's Python functions that took most of their own
    time (cProfile), which show what a GPU waits for when the kernels fill little of the wall; and
    with ``model`` (inference), one more batch timed part by part (``phase_times``)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        work()
        synchronize(device)
        wall = time.perf_counter() - start
    host = cProfile.Profile()
    synchronize(device)
    host.enable()
    start = time.perf_counter()
    work()
    synchronize(device)
    host_wall = time.perf_counter() - start
    host.disable()
    stats = pstats.Stats(host).stats  # (file, line, function) -> (calls, primitive calls, own time, ...)
    top = sorted(stats.items(), key=lambda item: -item[1][2])[:TOP_OPS]
    return {**profile_summary(prof, device), "wall_ms": wall * 1e3,
            "host_top": [[f"{Path(f).name}:{line}({name})", own / host_wall] for (f, line, name), (_, _, own, *_)
                         in top], **(phase_times(device, model, work) if model is not None else {})}


def inference_row(run: str, checkpoint: Path, files: dict, args, device: torch.device, out: Path) -> dict:
    from occmllm.answering import (Answerer, dataset_root, image_encoder, load_test, ready_images, sample_of,
                                   with_ready_images)
    from occmllm.model import load_model
    from occmllm.modes import ask_in_turn
    root = dataset_root(files["test"], None)
    samples = [sample_of(r, root) for r in load_test(files["test"], root, None)]
    batches = [samples[(k * args.batch_size) % len(samples):][: args.batch_size] for k in range(args.steps + 1)]
    # as inference.py does: --workers start making the images before the model loads
    images = with_ready_images(batches, image_encoder(checkpoint), args.workers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, processor = load_model(checkpoint, device=device, dtype=torch.float32 if args.fp32 else None)
    mode, decoding, reuse = INFERENCE_RUNS[run]
    answerer = Answerer(model, processor, args.max_new_tokens, decoding)
    runner, context = mode_context(mode, samples, out)
    if not reuse:  # occmllm.modes.run_plain with every turn prompted whole
        def runner(answerer, batch, context):
            return ask_in_turn(answerer, batch, answerer.images([s.images for s in batch]), reuse=False)

    def run_batch(batch):
        return [r["answers"] for r in runner(answerer, batch, context)]

    warm_up = time.perf_counter()
    answerer.warm_up(args.batch_size)  # as inference.py does once per model (Answerer.warm_up)
    synchronize(device)
    warm_up = time.perf_counter() - warm_up
    times, waits, answers = [], [], []
    synchronize(device)
    # as inference.py times it: a batch's time includes any wait for its images (--workers); the
    # wait is also kept apart, since the first batch's can be the workers' start, not the model's
    for batch, ready in timed_waits(images, waits):
        answerer.ready = ready
        answers += run_batch(batch)
        synchronize(device)
        times.append(time.perf_counter() - waits[-1][0])
    answerer.ready = {}
    waits = [seconds for _, seconds in waits]
    warm = times[1:]
    warm_work = [t - w for t, w in zip(times[1:], waits[1:])]
    records = sum(len(b) for b in batches[1:])
    launched = launches(device, lambda: run_batch(batches[-1]))
    profiled = batch_profile(device, lambda: run_batch(batches[-1]), model) if args.profile else None
    # the CPU's share of a batch: loading and tiling its images, which the timed batches include
    # unless --workers make them
    prep = time.perf_counter()
    ready_images(answerer.encoder, batches[-1], keep_decoded=True)
    prep = time.perf_counter() - prep
    return {"run": run, "batch": args.batch_size, "steps": len(warm), "seconds": sum(warm),
            "image_prep_s": prep, "image_prep_share": prep / statistics.median(warm), "warm_up_s": warm_up,
            "samples_per_s": records / sum(warm), "first_batch_s": times[0],
            "first_over_warm": times[0] / (sum(warm) / len(warm)), "first_image_wait_s": waits[0],
            # the same without the waits for images: what the model's own set-up costs
            "first_work_over_warm": (times[0] - waits[0]) / (sum(warm_work) / len(warm_work)), "flops": None,
            "launches_per_record": launched and launched / len(batches[-1]),
            # a warm batch whose prompt widths are new to the process stalls if anything builds per shape
            "slowest_over_median": max(warm) / statistics.median(warm),
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
            "answers": answers, **({"profile": profiled} if profiled else {})}


def compare_answers(rows: list[dict]) -> None:
    """Each other plain row gets the share of its records answered exactly as the plain row answered
    them (the same batches); the answers themselves leave every row."""
    plain = next((r["answers"] for r in rows if r["run"] == "plain"), None)
    for r in rows:
        answers = r.pop("answers", None)
        if r["run"].startswith("plain-") and answers is not None and plain is not None:
            r["same_answers_as_plain"] = sum(a == b for a, b in zip(answers, plain)) / len(plain)


def table(rows: list[dict], peak: float) -> str:
    def cell(value, fmt: str, width: int) -> str:
        return f"{'-' if value is None else format(value, fmt):>{width}}"
    lines = [f"{'run':<17} {'batch':>5} {'tiles/sample':>12} {'tokens/sample':>13} {'samples/s':>9} {'tokens/s':>9} "
             f"{'TFLOP/s':>8} {'of peak':>7} {'memory GiB':>10}  note"]
    for r in rows:
        tflops = r["flops"] / r["seconds"] / 1e12 if r["flops"] else None
        note = (f"first batch {r['first_over_warm']:.2f}x a warm one ({r['first_work_over_warm']:.2f}x without its "
                f"{r['first_image_wait_s']:.2f} s wait for images), slowest warm {r['slowest_over_median']:.2f}x "
                "the median" if "first_over_warm" in r else "")
        if r.get("warm_up_s", 0) > 0.01:
            note += f", warmed up in {r['warm_up_s']:.1f} s before the first batch"
        if "image_prep_s" in r:
            note += f", images loaded and tiled in {100 * r['image_prep_share']:.0f}% of a batch's time"
        if r.get("launches_per_record"):
            note += f", {r['launches_per_record']:.0f} launches a record"
        if "same_answers_as_plain" in r:
            note += f", {100 * r['same_answers_as_plain']:.0f}% of answers as plain's"
        if "data_wait_s" in r:
            note = (f"{r['samples_per_s_with_waits']:.2f} samples/s counting the waits for data "
                    f"({100 * r['data_wait_s'] / (r['data_wait_s'] + r['seconds']):.0f}% of the time), "
                    f"{100 * r['padding_share']:.0f}% of token slots padding")
        lines.append(f"{r['run']:<17} {r['batch']:>5} {cell(r.get('tiles_per_sample'), '.2f', 12)} "
                     f"{cell(r.get('tokens_per_sample'), '.1f', 13)} {cell(r['samples_per_s'], '.2f', 9)} "
                     f"{cell(r.get('tokens_per_s'), '.0f', 9)} {cell(tflops, '.3f', 8)} "
                     f"{cell(tflops and 100 * tflops * 1e12 / peak, '.1f', 6)}% "
                     f"{cell(r['peak_memory_gib'], '.1f', 10)}  {note}")
    for r in rows:
        if "profile" in r:
            p = r["profile"]
            what = (f"one batch of {p['wall_ms']:.1f} ms wall, {p['step_ms']:.1f} ms of {p['timed_by']} time"
                    if "wall_ms" in p else f"one step, {p['step_ms']:.1f} ms of {p['timed_by']} time")
            lines.append(f"{r['run']}: {what}: " + ", ".join(
                f"{kind} {100 * share:.0f}%" for kind, share in p["kinds"].items()))
            lines += [f"    {100 * share:5.1f}%  {name}" for name, share in p["top"]]
            if "host_top" in p:
                lines.append("  the host's own time by Python function, as shares of the batch's wall time:")
                lines += [f"    {100 * share:5.1f}%  {name}" for name, share in p["host_top"]]
            if "parts_ms" in p:
                lines.append(f"  one more batch, each part timed with the device synchronised at its edges "
                             f"({p['serialised_ms']:.1f} ms so, against {1e3 * r['seconds'] / r['steps']:.1f} for "
                             "a warm batch unsynchronised):")
                lines += [f"    {ms:7.1f} ms  {name}" for name, ms in p["parts_ms"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/bench_gpu.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=tuple(SHAPES), default="1b", help="model shape [1b]")
    p.add_argument("--tiles", choices=("1", "dynamic"), default="1", help="tiles per image: 1, or dynamic 1-6 [1]")
    p.add_argument("--batch-size", type=int, default=16, help="samples (records for plain) per step [16]")
    p.add_argument("--steps", type=int, default=10, help="timed steps (batches for plain) [10]")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first [3]")
    p.add_argument("--runs",
                   default="full,full-compiled,frozen,lora,mpo,plain,plain-compiled,plain-graphed,plain-whole,cot,dual,"
                           "tta,tta-second-look",
                   help="comma-separated runs (above) [all but frozen-compiled and frozen-all-logits]")
    p.add_argument("--vocab-size", type=int, help="the language model's vocabulary rows [the shape's]: e.g. a real "
                                                  "151,674 on the tiny shape, to see the output head's share on CPU")
    p.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing in training")
    p.add_argument("--profile", action="store_true", help="training runs profile one more step, inference runs one "
                   "more batch (not timed): time by kind of work and the operations that took most; for inference "
                   "also the host's Python functions that took most")
    p.add_argument("--fp32", action="store_true", help="inference runs load the model in float32, not the GPU's "
                   "bf16: answers that differ between decodings then show a fault, not bf16's rounding")
    p.add_argument("--packed", action="store_true", help="stage-1 runs train on packed batches (one row, no "
                   "padding; occmllm.sft.Collator); mpo pads as TRL does")
    p.add_argument("--group-by-length", action="store_true", help="stage-1 runs batch samples of about one length "
                   "together (--train_sampling_strategy group_by_length; occmllm.model.GroupsByLength)")
    p.add_argument("--workers", type=int, default=0, help="dataloader worker processes: training runs' (0: each "
                   "batch is made on the main process between steps, the stage configs' setting), and inference "
                   "runs' image decoding and tiling ahead of the loop (inference.py --workers) [0]")
    p.add_argument("--max-new-tokens", type=int, default=8, help="plain: new tokens per answer at most [8]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="also write the JSON line here")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """The options and the runs they ask for; argparse's error (exit 2) for bad ones."""
    p = build_parser()
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in (*TRAIN_RUNS, *INFERENCE_RUNS)]
    if unknown or not runs:
        p.error(f"--runs: unknown run {unknown[0] if unknown else '(none)'}; choose from "
                f"{', '.join((*TRAIN_RUNS, *INFERENCE_RUNS))}")
    if min(args.batch_size, args.steps) < 1 or args.warmup < 0:
        p.error("--batch-size and --steps must be at least 1, --warmup at least 0")
    return args, runs


def main(argv=None) -> dict:
    args, runs = parse_args(argv)
    device = torch.device(args.device)
    peak = matmul_peak(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = build_checkpoint(args.shape, tmp / "model", args.tiles, args.vocab_size)
        tile = SHAPES[args.shape]["vision"]["image_size"]
        # one epoch holds every step: at an epoch's end the dataloader's worker processes start anew,
        # a wait a real run pays once an epoch, not every few steps
        # grouping by length draws each batch from a sorted group of up to 50 batches: the stage-1
        # file holds as many samples as a real dataset would give it (its views repeated)
        files = build_data(tmp, tile, args.tiles, max(args.batch_size * (args.warmup + args.steps + args.profile), 8),
                           GROUPED_BATCHES * args.batch_size if args.group_by_length else 0)
        for run in runs:
            rows.append(inference_row(run, checkpoint, files, args, device, tmp) if run in INFERENCE_RUNS
                        else train_row(run, checkpoint, files, args, device, tmp))
            # each row as it is measured, so a run cut short still tells what it measured
            print(table(rows[-1:], peak).splitlines()[1], flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    compare_answers(rows)
    result = {"shape": args.shape, "tiles": args.tiles, "device": torch.cuda.get_device_name(device)
              if device.type == "cuda" else "cpu", "gradient_checkpointing": args.gradient_checkpointing,
              "packed": args.packed, "group_by_length": args.group_by_length, "peak_tflops": peak / 1e12, "rows": rows}
    print(f"{args.shape}-shaped InternVL, random weights, tiles {args.tiles}{', packed' if args.packed else ''}, "
          f"on {result['device']}; matmul peak measured {peak / 1e12:.3f} TFLOP/s")
    print(table(rows, peak))
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
