"""How much of a padded batch is padding, with dynamic tiles: random batches against batches grouped
by length (``--train_sampling_strategy group_by_length``, ``occmllm.model.GroupsByLength``).

It builds ``bench_gpu.py``'s InternVL-shaped checkpoint and dynamic-tile data (images resized to
1-6 tile grids; 1, 3, 3, 4, 5 and 7 tiles with the thumbnail), reads each sample's token count as
the stage trainers do (``ConversationDataset.lengths``: file headers and the tokenised
conversation, no pixels), and deals one epoch into batches, ``--draws`` times per sampler. The
share is of the language model's token slots: padding costs the language model (attention and
every layer) but not the vision tower, whose tiles are concatenated without padding. No model
runs, so it needs no GPU.

    python benchmarks/bench_padding.py [--shape 1b|8b|tiny] [--samples 1024] [--batch-sizes 8,16,32]
        [--draws 5]

Prints one line per batch size and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402

import bench_gpu  # noqa: E402


def padding_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    """The share of padded slots when ``order`` is dealt into batches of ``batch_size``."""
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    slots = sum(max(lengths[j] for j in batch) * len(batch) for batch in batches)
    return 1 - sum(lengths) / slots


def sample_lengths(shape: str, samples: int, out: Path) -> list[int]:
    from occmllm.conversation import ConversationEncoder
    from occmllm.model import ImageOnlyInternVLProcessor
    from occmllm.records import load_training_records
    from occmllm.sft import ConversationDataset
    checkpoint = bench_gpu.build_checkpoint(shape, out / "model", "dynamic")
    files = bench_gpu.build_data(out, bench_gpu.SHAPES[shape]["vision"]["image_size"], "dynamic", samples)
    dataset = ConversationDataset(load_training_records(files["step1"]),
                                  ConversationEncoder(ImageOnlyInternVLProcessor.from_folder(checkpoint)))
    return dataset.lengths()


def positive_ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="benchmarks/bench_padding.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=tuple(bench_gpu.SHAPES), default="1b", help="model shape [1b]")
    p.add_argument("--samples", type=int, default=1024, help="samples in the epoch [1024]")
    p.add_argument("--batch-sizes", type=positive_ints, default=[8, 16, 32], help="comma-separated [8,16,32]")
    p.add_argument("--draws", type=int, default=5, help="epochs dealt per sampler, each with its own seed [5]")
    args = p.parse_args(argv)
    if args.samples < max(args.batch_sizes) or args.draws < 1:
        p.error("--samples must be at least the largest batch size, --draws at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        lengths = sample_lengths(args.shape, args.samples, Path(tmp))
    rows = []
    for batch_size in args.batch_sizes:
        random = [padding_share(lengths, torch.randperm(len(lengths), generator=torch.Generator().manual_seed(s))
                                .tolist(), batch_size) for s in range(args.draws)]
        grouped = [padding_share(lengths, list(LengthGroupedSampler(
            batch_size, lengths=lengths, generator=torch.Generator().manual_seed(s))), batch_size)
            for s in range(args.draws)]
        rows.append({"batch": batch_size, "random": random, "grouped": grouped})
        print(f"batch {batch_size:>3}: padding {100 * min(random):.1f}-{100 * max(random):.1f}% of token slots in "
              f"random batches, {100 * min(grouped):.1f}-{100 * max(grouped):.1f}% grouped by length")
    result = {"shape": args.shape, "samples": len(lengths), "mean_tokens": sum(lengths) / len(lengths),
              "max_tokens": max(lengths), "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
