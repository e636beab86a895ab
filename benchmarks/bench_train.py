"""Stage-1 training throughput: samples/s, tokens/s, the share of step time spent loading and
preprocessing data, and model FLOPs against the machine's matmul rate measured in the same run.

Builds the stage's own Trainer (``occmllm.sft.build_trainer``, the stage-1 config plus any flags)
on the first ``--samples`` training records and trains ``--epochs`` epochs. The dataset and the
collator are timed where the Trainer calls them (in the training process: the demo config has no
loader workers). With ``cache_encoded`` the first epoch decodes and tiles every image and later
epochs read the cache, so the table has one row per epoch.

FLOPs per step are counted as ``bench_gpu.py`` counts them (its docstring): 2 x parameters x tokens
forward for each part plus attention, 3x that for a trained part, 1x for a frozen tower. So that
the frozen tower does run every step, the stage config's ``cache_vision`` is turned off here; pass
``-- --cache_vision true`` to time the demo's setting (whose FLOPs this count then overstates).

    python benchmarks/bench_train.py [--samples 1024] [--epochs 2] [-- --flag value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_gpu import Shape  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

from occmllm import sft  # noqa: E402
from occmllm.config import parse_config  # noqa: E402
from occmllm.stage import DataArguments, ModelArguments  # noqa: E402

CONFIG = ROOT / "step1_sft/config.yaml"


class Timed:
    """Adds the seconds spent in ``fn`` to ``self.seconds``."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            self.seconds += time.perf_counter() - start


class TimedDataset(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset, self.get = dataset, Timed(dataset.__getitem__)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.get(i)


class EpochClock(TrainerCallback):
    """Per epoch: wall seconds, data seconds (dataset + collator), steps, samples and tokens."""

    def __init__(self, dataset: TimedDataset, collate: Timed):
        self.dataset, self.collate, self.epochs = dataset, collate, []

    def data_seconds(self) -> float:
        return self.dataset.get.seconds + self.collate.seconds

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.start, self.data_start, self.step_start = time.perf_counter(), self.data_seconds(), state.global_step

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epochs.append({"seconds": time.perf_counter() - self.start,
                            "data_seconds": self.data_seconds() - self.data_start,
                            "steps": state.global_step - self.step_start})


class Collate(Timed):
    """The collator, timed, counting the tokens it hands to the model."""

    def __init__(self, fn):
        super().__init__(fn)
        self.tokens = 0

    def __call__(self, batch):
        out = super().__call__(batch)
        self.tokens += int(out["attention_mask"].sum())
        return out


def matmul_rate(threads: int, n: int = 1024, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s on this machine with ``threads`` threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def flops_per_sample(model, text_tokens: float, vision_trained: bool) -> float:
    """Training FLOPs of one one-tile sample of ``text_tokens`` tokens: ``bench_gpu.Shape``'s count,
    3x the forward for each trained part and 1x for a frozen tower (nothing flows back into it)."""
    parts = Shape(model).forward_flops(1, [text_tokens])
    return parts["vision"] * (3 if vision_trained else 1) + 3 * (parts["projector"] + parts["text"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1024, help="training records to use")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("flags", nargs="*", help="stage-1 flags after --, e.g. -- --cache_encoded false")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_args, data_args, training = parse_config(
            (ModelArguments, DataArguments, TrainingArguments),
            ["--output_dir", tmp, "--num_train_epochs", str(args.epochs), "--save_strategy", "no",
             "--disable_tqdm", "true", "--logging_steps", "1000000", "--cache_vision", "false", *args.flags], CONFIG)
        for path in (model_args.model_name_or_path, data_args.train_data):
            if not Path(path).exists():
                raise SystemExit(f"{path}: not found; run `make demo` first or pass the paths as flags")
        trainer, _ = sft.build_trainer(model_args, data_args, training)
        full = trainer.train_dataset
        full.items = full.items[: args.samples]
        dataset, collate = TimedDataset(full), Collate(trainer.data_collator)
        trainer.train_dataset, trainer.data_collator = dataset, collate
        clock = EpochClock(dataset, collate)
        trainer.add_callback(clock)
        trainer.train()

    model = trainer.model
    samples = len(full)
    tokens_per_sample = collate.tokens / (samples * args.epochs)
    step_flops = flops_per_sample(model, tokens_per_sample, not model_args.freeze_vision) \
        * training.per_device_train_batch_size
    rate = matmul_rate(args.threads)
    print(f"stage 1, {samples} samples x {args.epochs} epochs, batch {training.per_device_train_batch_size}, "
          f"cache_encoded={data_args.cache_encoded}, {args.threads} threads, "
          f"{tokens_per_sample:.0f} tokens per sample; matmul rate {rate / 1e9:.1f} GFLOP/s (fp32, 1024^2)")
    print(f"{'epoch':>5} {'seconds':>8} {'samples/s':>9} {'tokens/s':>9} {'data share':>10} {'ms/step':>8} "
          f"{'GFLOP/s':>8} {'of matmul':>9}")
    rows = []
    for k, e in enumerate(clock.epochs, 1):
        per_step = e["seconds"] / e["steps"]
        achieved = step_flops / per_step
        row = {"epoch": k, "seconds": round(e["seconds"], 2), "samples_per_s": round(samples / e["seconds"], 1),
               "tokens_per_s": round(samples * tokens_per_sample / e["seconds"]),
               "data_share": round(e["data_seconds"] / e["seconds"], 4), "ms_per_step": round(1000 * per_step, 1),
               "gflops": round(achieved / 1e9, 2), "matmul_fraction": round(achieved / rate, 4)}
        rows.append(row)
        print(f"{k:>5} {row['seconds']:>8.2f} {row['samples_per_s']:>9.1f} {row['tokens_per_s']:>9} "
              f"{100 * row['data_share']:>9.1f}% {row['ms_per_step']:>8.1f} {row['gflops']:>8.2f} "
              f"{100 * row['matmul_fraction']:>8.1f}%")
    print(json.dumps({"epochs": rows, "data_share": rows[-1]["data_share"], "samples": samples,
                      "tokens_per_sample": round(tokens_per_sample, 1), "flops_per_step": step_flops,
                      "matmul_gflops": round(rate / 1e9, 1), "cache_encoded": data_args.cache_encoded,
                      "threads": args.threads}))


if __name__ == "__main__":
    main()
