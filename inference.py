"""Checkpoint-by-checkpoint inference on a test set, and its accuracy report.

    python inference.py --checkpoint NAME=PATH [--checkpoint NAME=PATH ...] --data TEST.jsonl --out DIR
                        [--data VAL.jsonl --out DIR2 ...]
                        [--data-root ROOT] [--batch-size 16] [--max-new-tokens 32] [--mode plain|cot|dual]
                        [--recon RECON] [--alpha A] [--tta clip --clip CLIP | --tta second-look --recon RECON]
                        [--limit N] [--device cpu|cuda]
                        [--decoding dynamic|compiled|graphed] [--workers N]
    python inference.py --score-reference PRED.json --data TEST.jsonl --out DIR [--name NAME] [--id-prefix P]

Each record's human turns are asked in order, each with the model's own earlier answers in the
history (the first carries the image placeholder); the reference answers and ``meta`` are read
only for scoring. A test file of questions alone (no answers) is answered and reported as
unlabelled, with no accuracy. Generation is greedy and batched across records, one turn at a time, with left
padding. Checkpoints run in the order given. ``--mode cot`` runs the chain of thought with a
reconstruction render, ``--mode dual`` blends each image's visual tokens with its render's, and
``--tta clip`` adapts each Q1 answer to a CLIP reward (rows ``tta`` and ``best-of-K``), ``--tta
second-look`` to the chain's second look over the image and its render (rows ``tta-second-look`` and
``best-of-K-second-look``). Several
``--data``/``--out`` pairs run in one command, each checkpoint loaded once: the same as a command
per pair, file for file.

Files in DIR:
  predictions.jsonl   one line per checkpoint, mode and record, appended as each batch finishes:
                      {"checkpoint", "mode", "id", "answers": {"Q1": ..., ...}, "final", "question_ids"}.
                      Lines come in a fixed order (checkpoints as given, records in test-file order),
                      so a run that was interrupted and is started again with the same arguments
                      finishes the same file an uninterrupted run writes.
  timing.jsonl        seconds per batch, with any wait for its images (kept out of the predictions so they
                      stay reproducible)
  run.json            the settings the predictions were made with (a resumed run must match them)
  report.json, report.md, accuracy.png, accuracy_vs_occlusion.png, confusion.png, gains.png   (occmllm.report)

``--score-reference`` scores a predictions file in the reference implementation's format
(``{id: "The object is X."}``) against the Q1 answers of the test set and writes the same report.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from occmllm import fileio, records, report
from occmllm.answering import DECODINGS, dataset_root, image_encoder, load_test, sample_of, with_ready_images
from occmllm.errors import OccError, cli
from occmllm.modes import MODE_RUNNERS, TTA_JUDGES, TTA_MODES, Context, tta_mode
from occmllm.predictions import RUN, PredictionLog, answered_alike, check_run_settings
from occmllm.scoring import build_report, turns_of

SEED = 0
PROGRESS_LINES = 10  # a run's progress lines in a log (on a terminal: one per batch)


def parse_checkpoints(specs: list[str]) -> list[tuple[str, Path]]:
    out, names = [], set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise OccError(f"--checkpoint {spec!r}: expected NAME=PATH, e.g. --checkpoint base=models/tiny")
        if name in names:
            raise OccError(f"--checkpoint {spec!r}: the name {name!r} is given twice; each checkpoint needs its own")
        names.add(name)
        out.append((name, Path(path)))
    return out


# --- the two commands -----------------------------------------------------------------------------

@dataclass
class Target:
    """One test file and the run folder its predictions and report go to."""
    data: Path
    out: Path
    test: list[dict]
    samples: list
    context: Context
    log: PredictionLog | None = None  # opened once every test file's inputs have loaded


def run_inference(args) -> list[Path]:
    """Every checkpoint on every (--data, --out) pair, each checkpoint loaded once; the reports' paths."""
    import torch
    from transformers.utils import logging as hf_logging

    from occmllm.answering import Answerer
    from occmllm.model import check_checkpoint, default_device

    checkpoints = parse_checkpoints(args.checkpoint)
    for data in args.data:
        if not data.is_file():
            raise OccError(f"{data}: test file not found")
    answering = {}  # every checkpoint before running any, and before any file is written
    for name, path in checkpoints:
        check_checkpoint(path)
        answering[name] = answer_settings(args, path)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OccError("--device cuda: no CUDA device is available here; use --device cpu")
    clip = load_clip(args)
    targets = []
    for data, out in zip(args.data, args.out):
        root = dataset_root(data, args.data_root)
        test = load_test(data, root, args.limit)
        # the mode's models load (or fail) before anything is written
        targets.append(Target(data, out, test, [sample_of(rec, root) for rec in test],
                              mode_context(args, data, root, out, test, clip)))
    for target in targets:
        target.out.mkdir(parents=True, exist_ok=True)
        target.log = PredictionLog(target.out)
        check_run_settings(target.out, target.data, args.max_new_tokens, checkpoints, resuming=bool(target.log.done),
                           recon=args.recon, clip=args.clip, recon_resolution=args.recon_resolution,
                           mode=args.mode, answering=answering)
    hf_logging.disable_progress_bar()
    runner = MODE_RUNNERS[args.mode]
    device = torch.device(args.device) if args.device else default_device()
    with contextlib.ExitStack() as logs:
        for target in targets:
            logs.enter_context(target.log)
        for name, path in checkpoints:
            todo = [(target, copied_or_todo(target, name, args.mode)) for target in targets]
            for target, samples in todo:
                where = f" on {target.data}" if len(targets) > 1 else ""
                if not samples:
                    print(f"{name} ({args.mode}){where}: all {len(target.samples)} samples already in {target.log.path}")
                else:
                    print(f"{name} ({args.mode}){where}: {len(samples)} of {len(target.samples)} samples to run, "
                          f"batches of {args.batch_size}", flush=True)
            if not any(samples for _, samples in todo):
                continue
            # each batch with its target, how far into that target's samples it reaches, and whether it
            # prints a progress line
            terminal = sys.stdout.isatty()
            batches = []
            for target, samples in todo:
                starts = range(0, len(samples), args.batch_size)
                marks = progress_marks(len(starts), terminal)
                batches += [(target, samples[start: start + args.batch_size],
                             f"{min(start + args.batch_size, len(samples))}/{len(samples)}" if k in marks else None)
                            for k, start in enumerate(starts)]
            with checkpoint_errors(path, name, targets):
                encoder = image_encoder(path)
            # --workers start making the images now, while the model loads
            images = with_ready_images([batch for _, batch, _ in batches], encoder, args.workers,
                                       [target.context.renders.settings if target.context.renders else None
                                        for target, _, _ in batches])
            torch.manual_seed(SEED)
            model, processor = load_checkpoint(path, name, device, targets)
            answerer = Answerer(model, processor, args.max_new_tokens, args.decoding)
            second_look = load_second_look(args, path, name, device, targets)
            if args.decoding == "compiled":
                print(f"{name}: compiling the decoding step (once per model)", flush=True)
            for model_answerer in (answerer, second_look):  # one-time set-up before the first batch
                if model_answerer is not None:
                    model_answerer.warm_up(args.batch_size)
            for target, _ in todo:
                set_checkpoint_context(target.context, answering[name], second_look)
            t0, line_samples, line_seconds = time.perf_counter(), 0, 0.0  # since the last progress line
            for (target, _, progress), (batch, ready) in zip(batches, images):
                answerer.ready = ready
                results = runner(answerer, batch, target.context)
                seconds = time.perf_counter() - t0  # with any wait for the batch's images (--workers)
                target.log.append(name, args.mode, batch, results, seconds)
                line_samples, line_seconds = line_samples + len(batch), line_seconds + seconds
                if progress is not None:
                    print(f"  {name}: {progress} ({line_samples / line_seconds:.2f} samples/s)", flush=True)
                    line_samples, line_seconds = 0, 0.0
                t0 = time.perf_counter()
            del model, processor, answerer, second_look, images
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return [finish(t.out, with_checkpoint_files(build_report(t.data, t.test, t.log.runs([s.id for s in t.samples])), t.out),
                   t.log.path) for t in targets]


def progress_marks(batches: int, terminal: bool) -> set[int]:
    """The batches of a run that print a progress line: every one on a terminal; in a log, about ten
    evenly spaced, the last included (each line gives the rate since the one before)."""
    if terminal or batches <= PROGRESS_LINES:
        return set(range(batches))
    return {round((i + 1) * batches / PROGRESS_LINES) - 1 for i in range(PROGRESS_LINES)}


def copied_or_todo(target: Target, name: str, mode: str) -> list:
    """The samples ``name`` has yet to answer in ``mode``, after copying those that another name for
    the same checkpoint, asked the same way, has answered (the demo's validation chain at the gate
    it chose, 0, is its row looking again everywhere). TTA's runs are always made: they also write
    best-of-K rows."""
    samples = target.log.todo(name, mode, target.samples)
    if not samples or mode in TTA_MODES:
        return samples
    for other in answered_alike(target.out, name, mode):
        if not target.log.todo(other, mode, samples):
            target.log.copy(name, mode, other, samples)
            print(f"{name} ({mode}): {len(samples)} samples answered as {other} ({mode}), the same checkpoint "
                  f"and settings; copied into {target.log.path}")
            return []
    return samples


def with_checkpoint_files(rep: dict, out: Path) -> dict:
    """What the checkpoints' folders add to the report, each checkpoint found by its name in
    run.json: each chain row whose gate is its checkpoint's stored one gets how that gate was chosen
    (``occmllm.chain.gate_choice``), and ``training`` lists each trained checkpoint's log
    (``occmllm.curves.summary``) and its second-look model's, in the order of the rows, each folder
    once."""
    from occmllm import curves
    from occmllm.chain import SECOND_LOOK_DIR, gate_choice
    checkpoints = fileio.read_json(out / RUN).get("checkpoints", {}) if (out / RUN).is_file() else {}
    for row in rep["rows"]:
        if "cot" in row and row["checkpoint"] in checkpoints:
            choice = gate_choice(checkpoints[row["checkpoint"]], row["cot"]["gate"])
            if choice is not None:
                row["cot"]["gate_choice"] = choice
    folders: dict[str, str] = {}  # folder -> the first name it goes by
    for name in dict.fromkeys(row["checkpoint"] for row in rep["rows"]):
        if name in checkpoints:
            folders.setdefault(checkpoints[name], name)
            folders.setdefault(str(Path(checkpoints[name]) / SECOND_LOOK_DIR), f"{name} second look")
    summaries = [(name, curves.summary(folder)) for folder, name in folders.items()]
    rep["training"] = [{"checkpoint": name, **s} for name, s in summaries if s is not None]
    return rep


def load_checkpoint(path: Path, name: str, device, targets=()):
    """A checkpoint's model and processor, fp32 on CPU and load_model's default (bf16) on a GPU; a
    one-line error for missing or damaged files."""
    import torch

    from occmllm.model import load_model
    with checkpoint_errors(path, name, targets):
        return load_model(path, device=device, dtype=torch.float32 if device.type == "cpu" else None)


@contextlib.contextmanager
def checkpoint_errors(path: Path, name: str, targets=()):
    """Missing or damaged weights or tokenizer files while loading a checkpoint: one line."""
    try:
        yield
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        kept = ", ".join(str(t.log.path) for t in targets)
        raise OccError(f"{path}: cannot load checkpoint {name!r} ({first})"
                       + (f"; the predictions so far are kept in {kept}" if kept else "")) from None


def load_second_look(args, path: Path, name: str, device, targets=()):
    """cot and tta's second-look judge: the checkpoint's own second-look model
    (``occmllm.chain.SECOND_LOOK_DIR``), or None (the checkpoint looks again itself)."""
    from occmllm.answering import Answerer
    from occmllm.chain import second_look_model
    folder = second_look_model(path) if reads_second_look(args) else None
    if folder is None:
        return None
    model, processor = load_checkpoint(folder, f"{name} (second look)", device, targets)
    return Answerer(model, processor, args.max_new_tokens, args.decoding)


def load_clip(args):
    """--tta clip's reward model (tokenizer and processor with it), loaded once for every test file."""
    if args.tta != "clip":
        return None
    from occmllm import clip
    if args.clip is None:
        raise OccError("--tta clip needs --clip PATH: a CLIP model folder (python -m occmllm.clip build, then "
                       "train)")
    return clip.load(args.clip)


def mode_context(args, data: Path, root: Path, out: Path, test: list[dict], clip) -> Context:
    """The mode's extra inputs for one test file, checked before any model runs."""
    from occmllm.model import default_device
    context = Context(mirror=not args.no_mirror)
    if renders_needed(args):
        from reconstruction.reconstruct import RenderCache
        context.renders = RenderCache(args.recon, records.dataset_folder(data, root), out / "renders",
                                      args.recon_resolution, args.device or str(default_device()))
        context.renders.check([rec["id"] for rec in test])
    if args.tta is not None:
        context.clip = clip
        context.tta = tta_settings(args)
    return context


def tta_settings(args):
    """--tta's settings, its judge's default learning rate where --tta-lr is not given."""
    from occmllm.tta import LEARNING_RATES, TTASettings
    lr = args.tta_lr if args.tta_lr is not None else LEARNING_RATES[args.tta]
    return TTASettings(k=args.tta_k, steps=args.tta_steps, lr=lr, optimizer=args.tta_optimizer, judge=args.tta)


def answer_settings(args, path: Path) -> dict:
    """What decides a checkpoint's answers in this mode beside its weights, the data and the run's
    settings (run.json): the blend weight, the gate, the mirrored reading, TTA's steps. A resumed run
    must keep them (``occmllm.predictions.check_run_settings``): the gate, say, lives in the
    checkpoint and changes when ``python -m occmllm.chain gate --save`` chooses another. Read once,
    before any model runs, and given to the mode as they are recorded (``set_checkpoint_context``)."""
    from occmllm.chain import read_gate
    settings: dict = {}
    if renders_needed(args):
        settings["alpha"] = blend_weight(args, path)
    if args.mode == "cot":  # --gate, else the checkpoint's own
        settings["gate"] = args.gate if args.gate is not None else read_gate(path)
    if reads_second_look(args):
        settings["mirror"] = not args.no_mirror
    if args.tta is not None:
        settings["tta"] = {k: v for k, v in asdict(tta_settings(args)).items() if k != "judge"}
    return settings


def set_checkpoint_context(context: Context, settings: dict, second_look=None) -> None:
    """What a mode reads from the checkpoint itself: the blend weight and the gate (cot) as
    ``answer_settings`` read them, and the second-look model (cot, tta's second-look judge; else None)."""
    context.alpha = settings.get("alpha")
    if "gate" in settings:
        context.gate = settings["gate"]
    context.second_look = second_look


def blend_weight(args, path: Path) -> float | None:
    """The image's weight in the blend with its render (cot, dual, tta's second-look judge): --alpha,
    else the checkpoint's (its second look's where it reads one); a one-line error where there is none."""
    if not renders_needed(args):
        return None
    from occmllm.chain import second_look_source
    from occmllm.dual import resolve_alpha
    return resolve_alpha(second_look_source(path) if reads_second_look(args) else path, args.alpha)


def renders_needed(args) -> bool:
    """Whether the run blends images with reconstruction renders: cot, dual, tta's second-look judge."""
    return args.mode in ("cot", "dual") or args.tta == "second-look"


def reads_second_look(args) -> bool:
    """Whether the run asks the chain's second look: cot, and TTA judged by it."""
    return args.mode == "cot" or args.tta == "second-look"


def score_reference(args) -> Path:
    from occmllm.predictions import read_predictions
    args.data, args.out = args.data[0], args.out[0]
    if args.score_reference.suffix == ".jsonl":
        raise OccError(f"{args.score_reference}: --score-reference takes the reference format {{id: \"The object "
                       "is X.\"}} (a .json file); this project's predictions.jsonl is reported by inference itself")
    preds = read_predictions(args.score_reference)
    answers = {args.id_prefix + i: a for i, a in preds.answers.items()}
    if preds.wrong_ids is not None:
        raise OccError(f"{args.score_reference}: a list of wrongly answered ids has no answers to score; "
                       "give a {id: answer} file")
    test = load_test(args.data, None, args.limit)
    no_q1 = [r["id"] for r in test if "Q1" not in [t.key for t in turns_of(r)]]
    if no_q1:
        raise OccError(f"{args.data}: record {no_q1[0]!r} (and {len(no_q1) - 1} more) asks no category question "
                       "(Q1); reference predictions answer only Q1")
    ids = {str(r["id"]) for r in test}
    matched = ids & answers.keys()
    if not matched:
        example, test_id = next(iter(sorted(answers)), ""), str(test[0]["id"])
        # converted ObMan ids are obman_<split>_<stem>; the reference's are the bare stems
        hint = (f"; pass --id-prefix {test_id[: -len(example)]!r}" if example and test_id.endswith(example[-8:])
                and not args.id_prefix else "; it answers another test set")
        raise OccError(f"{args.score_reference}: none of its {len(answers)} ids are in {args.data} "
                       f"(e.g. {example!r} vs {test_id!r}){hint}")
    if len(matched) < len(ids):
        missing = sorted(ids - matched)
        raise OccError(f"{args.score_reference}: answers only {len(matched)} of the {len(ids)} test records of "
                       f"{args.data} (missing e.g. {missing[0]!r}); score it on the test set it was made for, "
                       "or pass --limit")
    predictions = {r["id"]: {"answers": {"Q1": answers[str(r["id"])]}, "final": answers[str(r["id"])]}
                   for r in test}
    name = args.name or args.score_reference.stem
    runs = [{"checkpoint": name, "mode": "reference", "predictions": predictions}]
    extra = len(answers) - len(matched)
    if extra:
        print(f"{args.score_reference}: {extra} ids are not in the test set and are not scored")
    return finish(args.out, build_report(args.data, test, runs))


def finish(out: Path, rep: dict, predictions: Path | None = None) -> Path:
    """Write the report, then print its table and where every file is."""
    paths = report.write_report(out, rep)
    if predictions is not None:
        paths["predictions"] = predictions
    print()
    print(report.markdown_table(rep))
    print()
    for kind, path in paths.items():
        print(f"{kind + ':':16s}{path}")
    return paths["json"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python inference.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", action="append", metavar="NAME=PATH",
                      help="a checkpoint folder to run, under a name for the report; repeat for several (run in order)")
    what.add_argument("--score-reference", type=Path, metavar="PRED.json",
                      help="score a reference-format predictions file {id: \"The object is X.\"} instead")
    p.add_argument("--data", required=True, type=Path, action="append",
                   help="test JSONL (e.g. from data_tools.make_testset), with reference answers or questions alone; "
                        "repeat with --out for several test files (e.g. validation and test), each checkpoint "
                        "loaded once for all")
    p.add_argument("--out", required=True, type=Path, action="append",
                   help="run folder for predictions.jsonl and the report; one per --data, in the same order")
    p.add_argument("--data-root", type=Path,
                   help="dataset root the image paths are relative to [the root in <data stem>.meta.json]")
    p.add_argument("--batch-size", type=int, default=16, help="records per generation batch [16]")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens [32]")
    p.add_argument("--mode", choices=("plain", "cot", "dual"), default="plain",
                   help="plain: the test questions in order; cot: the chain of thought of occmllm.chain (Q1; Q6; "
                        "where P(No.) reaches the gate, Q1 again over the image and a 3D reconstruction render); "
                        "dual: the test questions with the image's visual tokens blended with its render's "
                        "(OCC-MLLM-Alpha) [plain]")
    p.add_argument("--gate", type=float, help="--mode cot: take the second look where P(No.) >= GATE; 0 looks "
                                              "everywhere (to choose the gate on validation: python -m occmllm.chain "
                                              "gate) [the checkpoint's chain_gate.json, else 0.5]")
    p.add_argument("--no-mirror", action="store_true",
                   help="--mode cot, --tta second-look: the second look reads the image and render only as they "
                        "are [also both flipped left to right, the category scored over both readings]")
    p.add_argument("--recon", type=Path, help="--mode cot/dual, --tta second-look: reconstruction model folder")
    p.add_argument("--recon-resolution", type=int, default=64,
                   help="--mode cot/dual, --tta second-look: marching-cubes grid per axis [64]")
    p.add_argument("--alpha", type=float, help="--mode cot/dual, --tta second-look: image weight of the blend (cot, "
                                               "tta: of the second look), 0-1 [the checkpoint's dual_alpha.json]")
    p.add_argument("--tta", choices=tuple(TTA_JUDGES),
                   help="test-time adaptation of Q1 (RLCF), each record in an episode of its own, rewarded by a "
                        "judge: clip (RLCF's; --clip), writing rows tta and best-of-K; or second-look (the "
                        "chain's second look over the image and its render; --recon), writing rows "
                        "tta-second-look and best-of-K-second-look")
    p.add_argument("--clip", type=Path, help="--tta clip: CLIP model folder (python -m occmllm.clip)")
    p.add_argument("--tta-k", type=int, default=4, help="--tta: candidate answers per record [4]")
    p.add_argument("--tta-steps", type=int, default=3, help="--tta: optimizer steps per record [3]")
    p.add_argument("--tta-lr", type=float, help="--tta: learning rate of the steps [clip: 1e-3, second-look: 0.3]")
    p.add_argument("--tta-optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="--tta: sgd (the update's size follows the reward) or adamw (RLCF's) [sgd]")
    p.add_argument("--limit", type=int, help="only the first N test records")
    p.add_argument("--device", choices=("cpu", "cuda"), help="[cuda when available, else cpu]")
    p.add_argument("--decoding", choices=DECODINGS, default="dynamic",
                   help="dynamic: a growing KV cache, each step's kernels one by one; compiled: fixed KV "
                        "buffers and each decoding step one compiled graph (a CUDA graph on a GPU), compiled once "
                        "per model before the first batch; graphed: fixed KV buffers and each pass after the kept "
                        "ones replayed as a CUDA graph, captured in moments, no compiler (the fast choice on a GPU; "
                        "eager on a CPU). The same answers [dynamic]")
    p.add_argument("--workers", type=int, default=0,
                   help="worker processes that decode and tile the next batches' images while the model answers "
                        "(on a GPU, where the main process would leave it waiting: e.g. 4-8), and in the modes that "
                        "blend a render make every record's reconstruction render, each on its own CPU; the same "
                        "answers [0: each batch's images on the main process, renders where a mode asks]")
    p.add_argument("--name", help="--score-reference: the row's name in the report [the file's stem]")
    p.add_argument("--id-prefix", default="", help="--score-reference: put before each of the file's ids, e.g. "
                   "obman_test_ (the reference names ObMan views by file stem; data_tools.obman by obman_<split>_<stem>)")
    return p


@cli
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("batch_size", "max_new_tokens", "limit", "tta_k", "tta_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise OccError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    if args.workers < 0:
        raise OccError(f"--workers must be at least 0, got {args.workers}")
    if args.alpha is not None:
        from occmllm.dual import check_alpha
        check_alpha(args.alpha, "--alpha")
    if args.gate is not None and (args.mode != "cot" or not 0 <= args.gate <= 1.0 + 1e-6):
        raise OccError(f"--gate {args.gate}: a threshold on P(No.) in [0, 1] for --mode cot")
    if args.clip is not None and args.tta != "clip":
        raise OccError("--clip is the reward model of --tta clip; add --tta clip")
    if args.tta is not None:
        if args.mode != "plain":
            raise OccError(f"--tta adapts the plain answer to Q1; it does not combine with --mode {args.mode}")
        args.mode = tta_mode(args.tta)
    if renders_needed(args) and args.recon is None and args.score_reference is None:
        needs = f"--mode {args.mode}" if args.tta is None else f"--tta {args.tta}"
        raise OccError(f"{needs} needs --recon CKPT: a reconstruction model (python -m reconstruction.train)")
    if len(args.data) != len(args.out):
        raise OccError(f"{len(args.data)} --data and {len(args.out)} --out: give one run folder per test file, "
                       "in the same order")
    if len(set(map(str, args.out))) != len(args.out):
        raise OccError("--out: each test file needs a run folder of its own")
    if args.score_reference is not None:
        if len(args.data) != 1:
            raise OccError("--score-reference scores one test file: give one --data and one --out")
        score_reference(args)
    else:
        if args.name is not None:
            raise OccError("--name goes with --score-reference; checkpoints are named by --checkpoint NAME=PATH")
        run_inference(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
