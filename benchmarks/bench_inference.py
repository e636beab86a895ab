"""Inference throughput: the project's batched inference against a one-sample-at-a-time loop in the
reference implementation's style, on the same checkpoint, test samples and machine, in one run.

The loop does what the reference's evaluation does per test image: load and tile the image, then
for each question build the multi-turn prompt with the earlier answers and call ``generate`` on that
one prompt (no padding). The project's path is ``occmllm.modes.run_plain`` at batch sizes 1, 8 and 32
(left-padded greedy generation). Every batched run must give the loop's answers, word for word.
Then the chain-of-thought mode's cost per sample relative to plain (renders made afresh), and
test-time adaptation (``--tta clip``) one record at a time against a batch of episodes (each record
adapts its own copy of the projector, ``occmllm.tta``), which must give the same answers.

Prints a table, then one JSON line:
``{"speedup": {"1": r1, "8": r8, "32": r32}, "identical": true, "cot_cost": c, ...}``

    python benchmarks/bench_inference.py [--checkpoint outputs/demo/checkpoints/step1]
        [--data outputs/demo/stages/test.jsonl] [--samples 64] [--cot-checkpoint outputs/demo/checkpoints/step4]
        [--recon outputs/demo/recon/model] [--clip outputs/demo/models/clip]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from occmllm import chain  # noqa: E402
from occmllm.answering import Answerer, Sample, dataset_root, load_test, sample_of  # noqa: E402
from occmllm.conversation import ConversationEncoder, load_images  # noqa: E402
from occmllm.dual import resolve_alpha  # noqa: E402
from occmllm.errors import OccError  # noqa: E402
from occmllm.model import load_model  # noqa: E402
from occmllm.modes import Context, run_cot, run_plain, run_tta  # noqa: E402
from reconstruction.reconstruct import RenderCache  # noqa: E402

BATCH_SIZES = (1, 8, 32)


def one_by_one(model, processor, samples: list[Sample], max_new_tokens: int) -> list[dict]:
    """The reference's way: one image, one question, one ``generate`` call at a time (the prompt
    built as the project builds it, so the answers can be compared)."""
    tokenizer = processor.tokenizer
    encoder = ConversationEncoder(processor)
    out = []
    for sample in samples:
        pixels, tiles = encoder.pixel_values(load_images(sample.images))
        pixels = pixels.to(model.dtype)
        history, answers = [], {}
        for key, _, question in sample.questions:
            history.append({"from": "human", "value": question})
            used = sum(t["value"].count("<image>") for t in history if t["from"] == "human")
            ids = torch.tensor([encoder.prompt_ids(tiles[:used], history)])
            kwargs = {"pixel_values": pixels[: sum(tiles[:used])]} if used else {}
            with torch.inference_mode():
                new = model.generate(input_ids=ids, **kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                                     num_beams=1, eos_token_id=tokenizer.eos_token_id,
                                     pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
            answers[key] = tokenizer.decode(new, skip_special_tokens=True).strip()
            history.append({"from": "gpt", "value": answers[key]})
        out.append(answers)
    return out


def batched(answerer: Answerer, samples, batch_size: int, runner=run_plain, context=None):
    out = []
    for start in range(0, len(samples), batch_size):
        out += [r["answers"] for r in runner(answerer, samples[start: start + batch_size], context)]
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=Path("outputs/demo/checkpoints/step1"))
    p.add_argument("--data", type=Path, default=Path("outputs/demo/stages/test.jsonl"))
    p.add_argument("--samples", type=int, default=64, help="test records to answer (each with its questions)")
    p.add_argument("--cot-checkpoint", type=Path, default=Path("outputs/demo/checkpoints/step4"),
                   help="checkpoint for the chain-of-thought cost (skipped if missing)")
    p.add_argument("--recon", type=Path, default=Path("outputs/demo/recon/model"))
    p.add_argument("--clip", type=Path, default=Path("outputs/demo/models/clip"),
                   help="CLIP reward model for the test-time adaptation figure (skipped if missing)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    for path in (args.checkpoint, args.data):
        if not path.exists():
            raise SystemExit(f"{path}: not found; run `make demo` first or pass --checkpoint/--data")
    torch.set_num_threads(args.threads)
    root = dataset_root(args.data, None)
    samples = [sample_of(rec, root) for rec in load_test(args.data, root, args.samples)]
    questions = sum(len(s.questions) for s in samples)
    model, processor = load_model(args.checkpoint, device=torch.device("cpu"), dtype=torch.float32)
    answerer = Answerer(model, processor, args.max_new_tokens)
    batched(answerer, samples[:2], 2)  # warm-up

    reference, loop_s = timed(lambda: one_by_one(model, processor, samples, args.max_new_tokens))
    rows = [("one-by-one loop (reference style)", 1, loop_s, 1.0, True)]
    speedup, identical = {}, True
    for size in BATCH_SIZES:
        answers, seconds = timed(lambda: batched(answerer, samples, size))
        same = answers == reference
        identical &= same
        speedup[str(size)] = round(loop_s / seconds, 2)
        rows.append(("batched (inference.py)", size, seconds, loop_s / seconds, same))

    cot = None
    step4 = None  # the stage-4 checkpoint, for the chain of thought and test-time adaptation
    if args.cot_checkpoint.is_dir():
        step4 = Answerer(*load_model(args.cot_checkpoint, device=torch.device("cpu"), dtype=torch.float32),
                         args.max_new_tokens)
    if step4 and args.recon.is_dir():
        size = BATCH_SIZES[-1]
        _, plain_s = timed(lambda: batched(step4, samples, size))
        second = chain.second_look_model(args.cot_checkpoint)  # the second look's own model, if it has one
        reader = second and Answerer(*load_model(second, device=torch.device("cpu"), dtype=torch.float32),
                                     args.max_new_tokens)
        with tempfile.TemporaryDirectory() as tmp:
            context = Context(renders=RenderCache(args.recon, root, Path(tmp), 64, "cpu"),
                              alpha=resolve_alpha(chain.second_look_source(args.cot_checkpoint), None),
                              gate=chain.read_gate(args.cot_checkpoint), second_look=reader)
            answers, cot_s = timed(lambda: batched(step4, samples, size, run_cot, context))
        unclear = sum(chain.SECOND in a for a in answers)
        cot = {"plain_s": round(plain_s, 2), "cot_s": round(cot_s, 2), "cost": round(cot_s / plain_s, 2),
               "reconstructed": unclear}

    tta_figure = None
    if step4 and args.clip.is_dir():
        from occmllm import clip
        from occmllm.tta import TTASettings
        context = Context(clip=clip.load(args.clip), tta=TTASettings())
        batched(step4, samples[:2], 2, run_tta, context)  # warm-up
        one, one_s = timed(lambda: batched(step4, samples, 1, run_tta, context))
        together, together_s = timed(lambda: batched(step4, samples, BATCH_SIZES[-1], run_tta, context))
        tta_figure = {"one_s": round(one_s, 2), "batched_s": round(together_s, 2),
                      "speedup": round(one_s / together_s, 2), "identical": one == together}
        identical &= one == together

    print(f"{len(samples)} test records, {questions} questions, {args.checkpoint}, {torch.get_num_threads()} threads")
    print(f"{'method':<36} {'batch':>5} {'seconds':>8} {'samples/s':>9} {'speedup':>8} {'same answers':>12}")
    for name, size, seconds, ratio, same in rows:
        print(f"{name:<36} {size:>5} {seconds:>8.2f} {len(samples) / seconds:>9.2f} {ratio:>7.2f}x {str(same):>12}")
    if cot:
        print(f"chain of thought ({args.cot_checkpoint}, batch {BATCH_SIZES[-1]}): {cot['cot_s']:.2f} s against "
              f"{cot['plain_s']:.2f} s plain, {cot['cost']:.2f}x per sample; {cot['reconstructed']} of "
              f"{len(samples)} reconstructed and rendered")
    if tta_figure:
        print(f"test-time adaptation ({args.cot_checkpoint}): one record at a time {tta_figure['one_s']:.2f} s, "
              f"{BATCH_SIZES[-1]} episodes at once {tta_figure['batched_s']:.2f} s ({tta_figure['speedup']:.2f}x); "
              f"same answers: {tta_figure['identical']}")
    print(json.dumps({"speedup": speedup, "identical": identical, "samples": len(samples), "questions": questions,
                      "loop_samples_per_s": round(len(samples) / loop_s, 2), "cot_cost": cot and cot["cost"],
                      "cot": cot, "tta": tta_figure, "threads": torch.get_num_threads()}))
    if not identical:
        raise SystemExit("batched answers differ from one record at a time")


if __name__ == "__main__":
    try:
        main()
    except OccError as exc:
        raise SystemExit(f"error: {exc}")
