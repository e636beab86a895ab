"""Checkpoint-by-checkpoint inference on a test set, and its accuracy report.

    python inference.py --checkpoint NAME=PATH [--checkpoint NAME=PATH ...] --data TEST.jsonl --out DIR
                        [--data-root ROOT] [--batch-size 16] [--max-new-tokens 32] [--mode plain|cot|dual]
                        [--recon RECON] [--alpha A] [--tta clip --clip CLIP] [--limit N] [--device cpu|cuda]
    python inference.py --score-reference PRED.json --data TEST.jsonl --out DIR [--name NAME] [--id-prefix P]

Each record's human turns are asked in order, each with the model's own earlier answers in the
history (the first carries the image placeholder); the reference answers and ``meta`` are read
only for scoring. A test file of questions alone (no answers) is answered and reported as
unlabelled, with no accuracy. Generation is greedy and batched across records, one turn at a time, with left
padding. Checkpoints run in the order given. ``--mode cot`` runs the chain of thought with a
reconstruction render, ``--mode dual`` blends each image's visual tokens with its render's, and
``--tta clip`` adapts each Q1 answer to a CLIP reward (rows ``tta`` and ``best-of-K``).

Files in DIR:
  predictions.jsonl   one line per checkpoint, mode and record, appended as each batch finishes:
                      {"checkpoint", "mode", "id", "answers": {"Q1": ..., ...}, "final", "question_ids"}.
                      Lines come in a fixed order (checkpoints as given, records in test-file order),
                      so a run that was interrupted and is started again with the same arguments
                      finishes the same file an uninterrupted run writes.
  timing.jsonl        generation seconds per batch (kept out of the predictions so they stay reproducible)
  run.json            the settings the predictions were made with (a resumed run must match them)
  report.json, report.md, accuracy.png, accuracy_vs_occlusion.png, confusion.png   (occmllm.report)

``--score-reference`` scores a predictions file in the reference implementation's format
(``{id: "The object is X."}``) against the Q1 answers of the test set and writes the same report.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from occmllm import fileio, records, report
from occmllm.chain import DEFAULT_GATE
from occmllm.errors import OccError, cli
from occmllm.questions import IMAGE_TOKEN, category_answer

PREDICTIONS, TIMING, RUN = "predictions.jsonl", "timing.jsonl", "run.json"
SEED = 0


# --- what the model may see --------------------------------------------------------------------

@dataclass(frozen=True)
class Sample:
    """A test record stripped to what generation may use: its id, image files and questions.
    Reference answers and ``meta`` are not here, so they cannot reach the model."""
    id: str | int
    images: tuple[Path, ...]
    questions: tuple[tuple[str, str, str], ...]  # (key, question id, human turn text) in order, as report.turns_of

    @property
    def keys(self) -> list[str]:
        return [key for key, _, _ in self.questions]

    @property
    def question_ids(self) -> list[str]:
        return [qid for _, qid, _ in self.questions]


def sample_of(record: dict, root: Path) -> Sample:
    images = tuple(fileio.resolve_in_root(root, rel, f"record {record['id']!r}") for rel in records.images_of(record))
    return Sample(record["id"], images, tuple((t.key, t.qid, t.question) for t in report.turns_of(record)))


# --- batched greedy generation ----------------------------------------------------------------

@dataclass
class Prompt:
    conversation: list[dict]   # human/gpt turns ending with a human turn
    features: object           # (tiles, image tokens, width): vision features of the images it shows, or None
    tiles: list[int]           # tiles per image


class Generator:
    """One checkpoint: greedy answers for a batch of prompts (left padded, stop at end of turn)."""

    def __init__(self, model, processor, max_new_tokens: int):
        from occmllm.conversation import ConversationEncoder
        self.model, self.processor = model, processor
        self.encoder = ConversationEncoder(processor)
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = max_new_tokens
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:  # some tokenizers define no pad token; any id works under the mask
            self.pad_id = self.tokenizer.eos_token_id
        # stop at the tokenizer's end of turn and at any end token the checkpoint's generation config adds
        extra = getattr(model.generation_config, "eos_token_id", None)
        extra = extra if isinstance(extra, list) else [extra]
        self.eos_ids = list(dict.fromkeys(e for e in [self.tokenizer.eos_token_id, *extra] if e is not None))

    def images(self, paths_per_sample: list) -> list[tuple[object, list[int]]]:
        """Per sample, its images' vision features (the vision tower and projector, run once in one
        pass over every tile of the batch) and tiles per image. Each question that shows an image
        reuses them: a record's five questions do not encode its image five times."""
        from occmllm.conversation import load_images
        return self.encode([self.encoder.pixel_values(load_images(paths)) for paths in paths_per_sample])

    def encode(self, tiled: list[tuple[object, list[int]]]) -> list[tuple[object, list[int]]]:
        """``images`` for samples already tiled: (pixel tiles, tiles per image) each."""
        import torch
        pixels = torch.cat([p for p, _ in tiled]).to(device=self.model.device, dtype=self.model.dtype)
        with torch.inference_mode():
            features = self.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        counts = [len(p) for p, _ in tiled]
        return [(f, tiles) for f, (_, tiles) in zip(features.split(counts), tiled)]

    def __call__(self, prompts: list[Prompt]) -> list[str]:
        import torch
        with torch.inference_mode():
            out, width = self._generate(prompts, max_new_tokens=self.max_new_tokens)
        new = out[:, width:]
        return [text.strip() for text in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def _generate(self, prompts: list[Prompt], **kwargs):
        """Greedy generation over a left-padded batch: ``(generate's output, the padded prompt width)``."""
        import torch

        from occmllm.conversation import pad_batch
        device = self.model.device
        ids = [self.encoder.prompt_ids(p.tiles, p.conversation) for p in prompts]
        input_ids, attention_mask = pad_batch(ids, self.pad_id, "left")  # (batch, width); prompts end at the right
        features = [p.features for p in prompts if p.features is not None and len(p.features)]
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if features:  # tiles in prompt order, matching the image-token runs in input_ids
            from occmllm.dual import mm_outputs
            inputs["mm_encoder_outputs"] = mm_outputs(torch.cat(features))
        out = self.model.generate(**inputs, do_sample=False, num_beams=1, pad_token_id=self.pad_id,
                                  eos_token_id=self.eos_ids, **kwargs)
        return out, input_ids.shape[1]

    def p_no(self, prompts: list[Prompt]) -> list[float]:
        """P(``No.``) against ``Yes.`` as each prompt's answer: the two answers' first tokens'
        probabilities at the answer's first position, renormalised over the pair."""
        import torch

        from occmllm.questions import NO, YES
        no, yes = (self.tokenizer.encode(t, add_special_tokens=False)[0] for t in (NO, YES))
        if no == yes:
            raise OccError(f"the tokenizer starts {NO!r} and {YES!r} with the same token; the check cannot be read")
        with torch.inference_mode():
            out, _ = self._generate(prompts, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
        pair = out.logits[0][:, [no, yes]].float()  # (batch, 2): the raw logits of the first answer token
        return torch.softmax(pair, dim=-1)[:, 0].tolist()


# --- modes: each answers a batch of samples -> [{"answers": {key: text}, "final": text}] -----------

@dataclass
class Context:
    """What a mode needs beside the model: renders (cot, dual), the blend weight (dual, per
    checkpoint), the CLIP reward model and settings (tta)."""
    renders: "RenderCache | None" = None
    alpha: float | None = None
    gate: float = DEFAULT_GATE          # cot: the second look where P(No.) >= gate (per checkpoint)
    clip: tuple | None = None           # (model, tokenizer, image processor) from occmllm.clip.load
    tta: object | None = None           # occmllm.tta.TTASettings


def run_plain(generate: Generator, batch: list[Sample], context: Context | None = None) -> list[dict]:
    """Ask every question of each sample in order, multi-turn with the model's own answers; the
    final answer is the category question's."""
    return ask_in_turn(generate, batch, generate.images([s.images for s in batch]))


def ask_in_turn(generate: Generator, batch: list[Sample], encoded: list[tuple]) -> list[dict]:
    """The plain questioning with given image features: ``encoded`` holds (features, tiles) per
    sample, computed once for all of its questions."""
    history: list[list[dict]] = [[] for _ in batch]
    answers: list[dict] = [{} for _ in batch]
    for turn in range(max(len(s.questions) for s in batch)):
        active = [i for i, s in enumerate(batch) if turn < len(s.questions)]
        prompts = []
        for i in active:
            history[i].append({"from": "human", "value": batch[i].questions[turn][2]})
            used = sum(t["value"].count(IMAGE_TOKEN) for t in history[i] if t["from"] == "human")
            features, tiles = encoded[i]
            prompts.append(Prompt(list(history[i]), features[: sum(tiles[:used])] if used else None, tiles[:used]))
        for i, text in zip(active, generate(prompts)):
            answers[i][batch[i].questions[turn][0]] = text
            # the history takes the answer as it is, except a literal "<image>" in it, which the
            # encoder would take for an image placeholder
            history[i].append({"from": "gpt", "value": text.replace(IMAGE_TOKEN, "")})
    return [{"answers": a, "final": a[report.final_key(s.keys)]} for s, a in zip(batch, answers)]


class RenderCache:
    """Reconstruction renders of test views, made on first use and kept as ``DIR/<id>.png``.

    The reconstruction model reads the view's image, its visible-object and hand masks and its
    depth (the manifest's inputs for that id in the dataset folder ``data``); nothing about the answer."""

    def __init__(self, checkpoint: Path, data: Path, folder: Path, resolution: int, device: str):
        from data_tools.dataset import load_dataset
        from reconstruction.reconstruct import Reconstructor, depth_scale_of
        self.reconstructor = Reconstructor(checkpoint, resolution, device)
        self.dataset = load_dataset(data)
        self.lines, self.depth_scale = self.dataset.by_id(), depth_scale_of(data)
        self.folder = folder

    def paths(self, samples: list[Sample]) -> list[Path]:
        from reconstruction.reconstruct import reconstruct_views
        missing = [s.id for s in samples if str(s.id) not in self.lines]
        if missing:
            raise OccError(f"{self.dataset.folder}/manifest.jsonl: no view {missing[0]!r} to reconstruct; CoT mode "
                           "needs the test records' dataset (its masks and depth)")
        reconstruct_views(self.reconstructor, self.dataset.roots, [self.lines[str(s.id)] for s in samples],
                          self.depth_scale, self.folder, batch_size=max(len(samples), 1), progress=False)
        return [self.folder / f"{s.id}.png" for s in samples]


def run_cot(generate: Generator, batch: list[Sample], context: Context) -> list[dict]:
    """The chain of thought of ``occmllm.chain``: the first answer (Q1); the check (Q6 after it),
    read as P(``No.``); where P(``No.``) reaches the gate, the render is made and Q1 is asked again in
    a fresh conversation over the image and the render. Only the model's own answers decide."""
    import torch

    from occmllm import chain
    from occmllm.questions import NO, YES
    encoded = generate.images([s.images[:1] for s in batch])
    first = generate([Prompt(chain.first_turns(), features, tiles) for features, tiles in encoded])
    p_no = generate.p_no([Prompt(chain.check_turns(answer), features, tiles)
                          for answer, (features, tiles) in zip(first, encoded)])
    look = [i for i, p in enumerate(p_no) if chain.looks_again(p, context.gate)]
    second: dict[int, str] = {}
    if look:
        paths = context.renders.paths([batch[i] for i in look])
        prompts = []
        # only the renders are new to the vision tower: the first image's features are already made
        for i, (render_features, render_tiles) in zip(look, generate.images([[path] for path in paths])):
            features, tiles = encoded[i]
            prompts.append(Prompt(chain.second_look_turns(), torch.cat([features, render_features]),
                                  tiles + render_tiles))
        second = dict(zip(look, generate(prompts)))
    out = []
    for i in range(len(batch)):
        answers = {chain.FIRST: first[i], chain.CHECK: NO if i in second else YES}
        if i in second:
            answers[chain.SECOND] = second[i]
        out.append({"answers": answers, "final": chain.final_answer(first[i], second.get(i)),
                    "chain": {"p_no": round(p_no[i], 6), "gate": context.gate}})
    return out


def run_dual(generate: Generator, batch: list[Sample], context: Context) -> list[dict]:
    """The plain questions on the dual visual path (OCC-MLLM-Alpha): the image's visual tokens
    blended with its reconstruction render's, alpha x image + (1 - alpha) x render."""
    from occmllm.dual import blend
    # images and renders through the vision tower in one pass, as DualVisual.features does
    both = generate.images([s.images[:1] for s in batch] + [[p] for p in context.renders.paths(batch)])
    encoded = []
    for s, (image, tiles), (render, render_tiles) in zip(batch, both[:len(batch)], both[len(batch):]):
        if tiles != render_tiles:
            raise OccError(f"record {s.id!r}: its image makes {tiles} tiles and its render {render_tiles}; the dual "
                           "path blends tile by tile, so both need the same size")
        encoded.append((blend(image, render, context.alpha), tiles))
    return ask_in_turn(generate, batch, encoded)


def run_tta(generate: Generator, batch: list[Sample], context: Context) -> list[dict]:
    """Episodic test-time adaptation with the CLIP reward, one record at a time (occmllm.tta):
    Q1 answered by the adapted model. Each result also carries the best-of-K answer (the candidate
    CLIP ranks first, no gradient), written as its own row."""
    from occmllm import clip as clip_module
    from occmllm import tta
    from occmllm.conversation import load_images
    from occmllm.questions import Q1, caption
    model, encoder, settings = generate.model, generate.encoder, context.tta
    clip_model, clip_tokenizer, clip_processor = context.clip
    tta.only_adapted_trainable(model)
    out = []
    for s in batch:
        image = load_images(s.images[:1])
        pixels, tiles = encoder.pixel_values(image)
        cands = tta.candidates(model, encoder, Q1, pixels, tiles, settings.k)
        scores = clip_module.scores(clip_model, clip_tokenizer, clip_processor, image,
                                    [caption(c) for c in cands])[0]
        best = category_answer(cands[int(scores.argmax())])
        answers = tta.answer_batch(encoder, Q1, [category_answer(c) for c in cands], pixels, tiles)
        with tta.Episode(tta.adapted_parameters(model)):
            tta.adapt(model, answers, tta.baseline_rewards(scores), settings.steps, settings.lr, settings.optimizer)
            # the image's features again: the adapted projector reads the same tiles differently
            (answer,) = generate([Prompt([{"from": "human", "value": Q1}], *generate.encode([(pixels, tiles)])[0])])
        out.append({"answers": {"Q1": answer}, "final": answer,
                    "also": {f"best-of-{settings.k}": {"answers": {"Q1": best}, "final": best}}})
    return out


# --mode NAME -> its function(generate, batch, context)
MODE_RUNNERS = {"plain": run_plain, "cot": run_cot, "dual": run_dual, "tta": run_tta}


# --- the predictions file ----------------------------------------------------------------------

def read_lines(path: Path, repair: bool) -> list[dict]:
    """Complete lines of an appended JSONL file. A last line without its newline is what a kill
    mid-write leaves: it is dropped (and, with ``repair``, cut from the file so appending goes on
    from a clean end). A malformed complete line is an error: the file was edited or mixed."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        print(f"{path}: dropping an unfinished last line (interrupted run); it is computed again", file=sys.stderr)
        if repair:
            with open(path, "r+b") as fh:
                fh.truncate(end)
    out = []
    for lineno, line in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            raise OccError(f"{path}:{lineno}: not a JSON object; the file is damaged: remove it (or use another "
                           "--out) to start over")
        out.append(rec)
    return out


def done_predictions(path: Path) -> dict[tuple, dict]:
    """``{(checkpoint, mode, id): line}`` of a predictions file (after dropping an unfinished last line)."""
    done = {}
    for k, rec in enumerate(read_lines(path, repair=True), start=1):
        if not {"checkpoint", "mode", "id", "answers", "final"} <= rec.keys():
            raise OccError(f"{path}:{k}: not a predictions line (needs checkpoint, mode, id, answers, final)")
        key = (rec["checkpoint"], rec["mode"], rec["id"])
        if key in done:
            raise OccError(f"{path}:{k}: duplicate prediction for {key}; the file was edited or mixed from "
                           "several runs: remove it (or use another --out) to start over")
        done[key] = rec
    return done


def check_run_settings(out: Path, data: Path, max_new_tokens: int, checkpoints: list[tuple[str, Path]],
                       resuming: bool, recon: Path | None = None, clip: Path | None = None,
                       recon_resolution: int | None = None) -> None:
    """Record the settings in run.json; a resumed run must use the same ones, or its predictions
    would mix answers made differently (and the cached renders would be another model's)."""
    path = out / RUN
    settings = {"data": str(data.resolve()), "max_new_tokens": max_new_tokens,
                "checkpoints": {name: str(p.resolve()) for name, p in checkpoints},
                "recon": str(recon.resolve()) if recon is not None else None,
                "recon_resolution": recon_resolution if recon is not None else None,
                "clip": str(clip.resolve()) if clip is not None else None}
    old = fileio.read_json(path) if path.is_file() else {}
    problems = []
    if resuming and old:
        problems += [f"--{k.replace('_', '-')} was {old.get(k)!r}, now {settings[k]!r}"
                     for k in ("data", "max_new_tokens") if old.get(k) != settings[k]]
        for name, p in settings["checkpoints"].items():
            if old.get("checkpoints", {}).get(name, p) != p:
                problems.append(f"checkpoint {name!r} was {old['checkpoints'][name]}, now {p}")
        settings["checkpoints"] = {**old.get("checkpoints", {}), **settings["checkpoints"]}
    for model in ("recon", "recon_resolution", "clip"):
        if old.get(model) and settings[model] and old[model] != settings[model]:
            why = f" (its renders are cached in {out})" if model.startswith("recon") else ""
            problems.append(f"--{model.replace('_', '-')} was {old[model]}, now {settings[model]}{why}")
        settings[model] = settings[model] or old.get(model)
    if problems:
        raise OccError(f"{out / PREDICTIONS} holds predictions made with other settings ({'; '.join(problems)}); "
                       "use another --out, or remove the folder to start over")
    fileio.write_json(path, settings)


def timings(path: Path) -> dict[tuple[str, str], tuple[float, int]]:
    """``{(checkpoint, mode): (seconds, samples)}`` summed over the batches of timing.jsonl."""
    out: dict = {}
    for rec in read_lines(path, repair=True):
        key = (rec.get("checkpoint"), rec.get("mode"))
        seconds, n = out.get(key, (0.0, 0))
        out[key] = (seconds + float(rec.get("seconds", 0.0)), n + int(rec.get("n", 0)))
    return out


# --- inputs --------------------------------------------------------------------------------------

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


def dataset_root(data: Path, given: Path | None) -> Path:
    """--data-root, else the root named by the InternVL meta JSON beside the test file."""
    if given is not None:
        if not given.is_dir():
            raise OccError(f"--data-root {given}: folder not found")
        return given
    meta = data.with_name(data.stem + ".meta.json")
    if not meta.is_file():
        raise OccError(f"{data}: no {meta.name} beside it to name the dataset root; pass --data-root")
    entries = list(records.iter_meta(meta))
    roots = [root for _, root, annotation, _ in entries if annotation.resolve() == data.resolve()]
    if not roots and len(entries) == 1:
        roots = [entries[0][1]]
    if len(roots) != 1:
        raise OccError(f"{meta}: does not name {data.name} as its annotation; pass --data-root")
    return roots[0]


def dataset_folder(data: Path, root: Path) -> Path:
    """The dataset folder (manifest, masks, depth) of the test file's views: the ``dataset`` its
    meta JSON names (converted real data, whose images stay in the source root), else the root."""
    meta = data.with_name(data.stem + ".meta.json")
    if meta.is_file():
        entries = [e for e in fileio.read_json(meta).values() if isinstance(e, dict)]
        mine = [e for e in entries if (meta.parent / str(e.get("annotation"))).resolve() == data.resolve()]
        if not mine and len(entries) == 1:  # as in dataset_root: a lone entry is the test file's
            mine = entries
        for entry in mine:
            if entry.get("dataset"):
                return meta.parent / entry["dataset"]
    return root


def load_test(data: Path, root: Path | None, limit: int | None) -> list[dict]:
    """Validated test records (the first ``limit``); with ``root``, every image of them must exist and decode."""
    if not data.is_file():
        raise OccError(f"{data}: test file not found")
    recs = records.read_records(data, "test", root=root)
    recs = recs[:limit] if limit is not None else recs
    if root is not None:
        for k, rec in enumerate(recs):
            records.check_images(rec, root, f"{data} record {k + 1} ({rec['id']!r})")
    return recs


# --- the two commands -----------------------------------------------------------------------------

def run_inference(args) -> Path:
    import torch
    from transformers.utils import logging as hf_logging

    from occmllm.model import check_checkpoint, default_device, load_model

    checkpoints = parse_checkpoints(args.checkpoint)
    if not args.data.is_file():
        raise OccError(f"{args.data}: test file not found")
    for _, path in checkpoints:  # every checkpoint before running any
        check_checkpoint(path)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise OccError("--device cuda: no CUDA device is available here; use --device cpu")
    root = dataset_root(args.data, args.data_root)
    test = load_test(args.data, root, args.limit)
    samples = [sample_of(rec, root) for rec in test]
    context = mode_context(args, root)  # its models load (or fail) before anything is written

    args.out.mkdir(parents=True, exist_ok=True)
    pred_path, timing_path = args.out / PREDICTIONS, args.out / TIMING
    done = done_predictions(pred_path)
    read_lines(timing_path, repair=True)  # cut an unfinished line before appending
    check_run_settings(args.out, args.data, args.max_new_tokens, checkpoints, resuming=bool(done), recon=args.recon,
                       clip=args.clip, recon_resolution=args.recon_resolution)
    hf_logging.disable_progress_bar()
    runner = MODE_RUNNERS[args.mode]
    device = torch.device(args.device) if args.device else default_device()
    with open(pred_path, "a", encoding="utf-8") as pred_fh, open(timing_path, "a", encoding="utf-8") as time_fh:
        for name, path in checkpoints:
            todo = [s for s in samples if (name, args.mode, s.id) not in done]
            if not todo:
                print(f"{name} ({args.mode}): all {len(samples)} samples already in {pred_path}")
                continue
            print(f"{name} ({args.mode}): {len(todo)} of {len(samples)} samples to run, batches of {args.batch_size}",
                  flush=True)
            torch.manual_seed(SEED)
            # fp32 on CPU; on a GPU load_model's default (bf16)
            try:
                model, processor = load_model(path, device=device,
                                              dtype=torch.float32 if device.type == "cpu" else None)
            except (OSError, ValueError) as exc:  # missing or damaged weights / tokenizer files
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise OccError(f"{path}: cannot load checkpoint {name!r} ({first}); the predictions so far are "
                               f"kept in {pred_path}") from None
            generate = Generator(model, processor, args.max_new_tokens)
            if args.mode == "dual":
                from occmllm.dual import resolve_alpha
                context.alpha = resolve_alpha(path, args.alpha)
            if args.mode == "cot":
                from occmllm.chain import read_gate
                context.gate = args.gate if args.gate is not None else read_gate(path)
            for start in range(0, len(todo), args.batch_size):
                batch = todo[start: start + args.batch_size]
                t0 = time.perf_counter()
                results = runner(generate, batch, context)
                seconds = time.perf_counter() - t0
                lines = [{"checkpoint": name, "mode": mode, "id": s.id, "answers": r["answers"],
                          "final": r["final"], "question_ids": s.question_ids,
                          **({"chain": r["chain"]} if "chain" in r else {})}
                         for s, result in zip(batch, results)
                         for mode, r in [(args.mode, result), *result.get("also", {}).items()]]
                # one write per batch, flushed and synced: a kill leaves at most one unfinished line
                pred_fh.write("".join(fileio.dumps(line) + "\n" for line in lines))
                pred_fh.flush()
                os.fsync(pred_fh.fileno())
                for line in lines:
                    done[(name, line["mode"], line["id"])] = line
                time_fh.write(fileio.dumps({"checkpoint": name, "mode": args.mode, "n": len(batch),
                                            "seconds": round(seconds, 4)}) + "\n")
                time_fh.flush()
                print(f"  {name}: {start + len(batch)}/{len(todo)} ({len(batch) / seconds:.2f} samples/s)", flush=True)
            del model, processor, generate
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    # one row per checkpoint and mode in the folder (a later run in another mode adds its rows)
    spent = timings(timing_path)
    ids = [s.id for s in samples]
    pairs = list(dict.fromkeys((c, m) for c, m, _ in done))
    runs = []
    for name, mode in pairs:
        if all((name, mode, i) in done for i in ids):
            seconds, timed = spent.get((name, mode), (None, None))
            runs.append({"checkpoint": name, "mode": mode, "seconds": seconds, "timed": timed,
                         "predictions": {i: done[(name, mode, i)] for i in ids}})
    return finish(args.out, report.build_report(args.data, test, runs), pred_path)


def mode_context(args, root: Path) -> Context:
    """The mode's extra inputs, checked before any model runs."""
    from occmllm.model import default_device
    context = Context()
    if args.mode in ("cot", "dual"):
        if args.recon is None:
            raise OccError(f"--mode {args.mode} needs --recon CKPT: a reconstruction model (python -m "
                           "reconstruction.train)")
        context.renders = RenderCache(args.recon, dataset_folder(args.data, root), args.out / "renders",
                                      args.recon_resolution, args.device or str(default_device()))
    if args.mode == "tta":
        from occmllm import clip
        from occmllm.tta import TTASettings
        if args.clip is None:
            raise OccError("--tta clip needs --clip PATH: a CLIP model folder (python -m occmllm.clip build, then "
                           "train)")
        context.clip = clip.load(args.clip)
        context.tta = TTASettings(k=args.tta_k, steps=args.tta_steps, lr=args.tta_lr, optimizer=args.tta_optimizer)
    return context


def score_reference(args) -> Path:
    from data_tools.predictions import read_predictions
    if args.score_reference.suffix == ".jsonl":
        raise OccError(f"{args.score_reference}: --score-reference takes the reference format {{id: \"The object "
                       "is X.\"}} (a .json file); this project's predictions.jsonl is reported by inference itself")
    preds = read_predictions(args.score_reference)
    answers = {args.id_prefix + i: a for i, a in preds.answers.items()}
    if preds.wrong_ids is not None:
        raise OccError(f"{args.score_reference}: a list of wrongly answered ids has no answers to score; "
                       "give a {id: answer} file")
    test = load_test(args.data, None, args.limit)
    no_q1 = [r["id"] for r in test if "Q1" not in [t.key for t in report.turns_of(r)]]
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
    return finish(args.out, report.build_report(args.data, test, runs))


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
    p.add_argument("--data", required=True, type=Path, help="test JSONL (e.g. from data_tools.make_testset), with "
                                                              "reference answers or questions alone")
    p.add_argument("--out", required=True, type=Path, help="run folder for predictions.jsonl and the report")
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
    p.add_argument("--recon", type=Path, help="--mode cot/dual: reconstruction model folder")
    p.add_argument("--recon-resolution", type=int, default=64,
                   help="--mode cot/dual: marching-cubes grid per axis [64]")
    p.add_argument("--alpha", type=float, help="--mode dual: image weight of the blend, 0-1 [the checkpoint's "
                                               "dual_alpha.json]")
    p.add_argument("--tta", choices=("clip",), help="test-time adaptation of Q1 with a CLIP reward (RLCF), one record "
                                                    "at a time; writes rows tta and best-of-K")
    p.add_argument("--clip", type=Path, help="--tta clip: CLIP model folder (python -m occmllm.clip)")
    p.add_argument("--tta-k", type=int, default=4, help="--tta: candidate answers per record [4]")
    p.add_argument("--tta-steps", type=int, default=3, help="--tta: optimizer steps per record [3]")
    p.add_argument("--tta-lr", type=float, default=1e-3, help="--tta: learning rate of the steps [1e-3]")
    p.add_argument("--tta-optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="--tta: sgd (the update's size follows the reward) or adamw (RLCF's) [sgd]")
    p.add_argument("--limit", type=int, help="only the first N test records")
    p.add_argument("--device", choices=("cpu", "cuda"), help="[cuda when available, else cpu]")
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
    if args.alpha is not None:
        from occmllm.dual import check_alpha
        check_alpha(args.alpha, "--alpha")
    if args.gate is not None and (args.mode != "cot" or not 0 <= args.gate <= 1.0 + 1e-6):
        raise OccError(f"--gate {args.gate}: a threshold on P(No.) in [0, 1] for --mode cot")
    if args.clip is not None and args.tta is None:
        raise OccError("--clip is the reward model of --tta clip; add --tta clip")
    if args.tta is not None:
        if args.mode != "plain":
            raise OccError(f"--tta adapts the plain answer to Q1; it does not combine with --mode {args.mode}")
        args.mode = "tta"
    if args.score_reference is not None:
        score_reference(args)
    else:
        if args.name is not None:
            raise OccError("--name goes with --score-reference; checkpoints are named by --checkpoint NAME=PATH")
        run_inference(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
