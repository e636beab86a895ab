"""Stage JSONL builders: every stage's training records, the test set and InternVL meta files.

All stages share these functions; each stage folder's ``make_data.py`` only picks which to call.
Records follow ``occmllm.records``; labels the model must not see ride in ``meta``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from data_tools.dataset import Dataset
from data_tools.predictions import read_predictions
from occmllm import fileio, records
from occmllm.errors import OccError
from occmllm.questions import (ATTRIBUTE_QUESTIONS, CATEGORIES, NO, Q0, Q0_PLAN, Q1, Q6, QUESTIONS, YES, answers_for,
                               category_answer, yes_no)

DEFAULT_CLEAR_BELOW = 0.5  # views whose occlusion ratio is under this are labelled clear (Q6 Yes.)


def view_meta(view: dict, **extra) -> dict:
    keys = ("category", "occlusion", "scene", "view", "split", "colour", "source")
    return {**{k: view[k] for k in keys if k in view}, **extra}


def _human(text: str) -> dict:
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def _answers(view: dict) -> dict[str, str]:
    return answers_for(view["category"], view.get("colour"))


# --- clarity labels (Q6) ---------------------------------------------------------------------

def clarity_from_occlusion(views: list[dict], clear_below: float = DEFAULT_CLEAR_BELOW) -> dict[str, bool]:
    missing = [v["id"] for v in views if v.get("occlusion") is None]
    if missing:
        raise OccError(f"view {missing[0]!r} (and {len(missing) - 1} more) has no occlusion ratio; "
                       "label clarity from a model's predictions instead (--predictions)")
    return {v["id"]: v["occlusion"] < clear_below for v in views}


def clarity_from_predictions(views: list[dict], predictions_path, checkpoint: str | None = None) -> dict[str, bool]:
    """Clear = the model named the category correctly (the reference's rule: wrong -> ``No.``)."""
    preds = read_predictions(predictions_path, checkpoint)
    return preds.correctness({v["id"]: v["category"] for v in views})


# --- records ---------------------------------------------------------------------------------

def q1_record(view: dict) -> dict:
    return {"id": view["id"], "image": view["image"],
            "conversations": [_human(Q1), _gpt(category_answer(view["category"]))], "meta": view_meta(view)}


def step1_records(views: list[dict]) -> list[dict]:
    """Stage 1: the category question, one record per view."""
    return [q1_record(v) for v in views]


def step2_records(views: list[dict], clear: dict[str, bool]) -> list[dict]:
    """Stage 2: one multi-turn record per view: Q1, Q2-Q5, then the clarity question Q6. The test
    records ask Q1-Q5 in that order, so every test conversation is a prefix of a training one."""
    out = []
    for v in views:
        ans = _answers(v)
        turns = [_human(Q1), _gpt(ans["Q1"])]
        for qid in (*ATTRIBUTE_QUESTIONS, "Q5"):
            turns += [_human(QUESTIONS[qid]), _gpt(ans[qid])]
        turns += [_human(Q6), _gpt(yes_no(clear[v["id"]]))]
        out.append({"id": v["id"], "image": v["image"], "conversations": turns,
                    "meta": view_meta(v, clear=clear[v["id"]])})
    return out


def _undersample(items: list, key, seed: int) -> list:
    """Keep every item of the minority class and as many, drawn at random, of the majority
    (the reference balances its clarity pairs this way). Order is kept."""
    pos = [i for i, it in enumerate(items) if key(it)]
    neg = [i for i, it in enumerate(items) if not key(it)]
    rng = np.random.default_rng(seed)
    small, big = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
    keep = set(small) | set(rng.choice(big, size=len(small), replace=False).tolist()) if small else set()
    return [it for i, it in enumerate(items) if i in keep]


# The clarity question as the reference's preference file writes it: a trailing newline and no
# <image> placeholder (the image goes in front, InternVL's rule for a question without one).
REFERENCE_CLARITY_QUESTION = Q6 + "\n"


def step3_pairs(views: list[dict], predictions_path, checkpoint: str | None = None, seed: int = 0,
                category_pairs: bool = True, reference_clarity: bool = False, right_pairs: bool = True) -> list[dict]:
    """Stage 3 preference pairs from a model's own Q1 answers.

    Clarity pairs: Q6 with the truthful answer (``No.`` where the model's category was wrong)
    chosen, balanced between ``Yes.`` and ``No.`` by undersampling. Category pairs: for each wrong
    answer, the true answer chosen over the model's answer; with ``right_pairs``, also for each
    right answer, the true answer over another category drawn at random. Pairs from wrong answers
    alone are the views the model finds hard, with the categories it confuses: on the demo they
    shifted its answers and lowered validation Q1 accuracy (0.591 after stage 2; 0.572 after
    MPO on them, 0.586 with the right-answer pairs added).

    ``reference_clarity`` writes the pairs as the reference's ``train_Q1_Q6_balanced_dpo`` file:
    clarity pairs only, its question text (``REFERENCE_CLARITY_QUESTION``). Its labels follow the
    same rule as here (an id in its wrong-answer list has ``No.`` chosen), so they are not changed.
    """
    preds = read_predictions(predictions_path, checkpoint)
    correct = preds.correctness({v["id"]: v["category"] for v in views})
    question = REFERENCE_CLARITY_QUESTION if reference_clarity else Q6 + "\n<image>"
    clarity = []
    for v in views:
        ok = correct[v["id"]]
        clarity.append({"id": f"{v['id']}#clarity", "image": v["image"], "question": question,
                        "chosen": yes_no(ok), "rejected": yes_no(not ok), "meta": view_meta(v, correct=ok)})
    pairs = _undersample(clarity, key=lambda r: r["chosen"] == YES, seed=seed)
    if category_pairs and not reference_clarity:
        rng = np.random.default_rng([seed, 1])
        for v in views:
            answer = preds.answers.get(v["id"])
            truth = category_answer(v["category"])
            if not correct[v["id"]] and answer is not None and answer.strip() != truth:
                pairs.append({"id": f"{v['id']}#category", "image": v["image"], "question": Q1,
                              "chosen": truth, "rejected": answer, "meta": view_meta(v, correct=False)})
            elif correct[v["id"]] and right_pairs:
                other = rng.choice([c for c in CATEGORIES if c != v["category"]])
                pairs.append({"id": f"{v['id']}#category", "image": v["image"], "question": Q1,
                              "chosen": truth, "rejected": category_answer(str(other)),
                              "meta": view_meta(v, correct=True)})
    if not pairs:
        verdict = "right" if all(correct.values()) else "wrong"
        raise OccError(f"{predictions_path}: no preference pairs: the model answered every view {verdict}, "
                       "so clarity pairs cannot be balanced")
    return pairs


def render_path(renders_dir: str, view_id: str) -> str:
    """Where the reconstruction render of a view lives, relative to the dataset root."""
    return f"{renders_dir.rstrip('/')}/{view_id}.png"


def step4_records(views: list[dict], clear: dict[str, bool], renders_dir: str, seed: int = 0,
                  plan_fraction: float = 0.25, balance: bool = True) -> list[dict]:
    """Stage 4 chain-of-thought records.

    Per view: Q1 then Q6; for an unclear view the conversation goes on with the reconstruction
    render as a second image and Q1 asked again on it. Plus a Q0 record (the 3-step plan) for
    ``plan_fraction`` of the views. With ``balance``, clear and unclear views are undersampled to
    equal numbers, as in the reference's stage-4 file.
    """
    chosen = _undersample(views, key=lambda v: clear[v["id"]], seed=seed) if balance else list(views)
    rng = np.random.default_rng([seed, 4])
    out = []
    for v in chosen:
        ans = category_answer(v["category"])
        ok = clear[v["id"]]
        turns = [_human(Q1), _gpt(ans), _human(Q6), _gpt(YES if ok else NO)]
        image: str | list[str] = v["image"]
        if not ok:
            turns += [_human(Q1), _gpt(ans)]
            image = [v["image"], render_path(renders_dir, v["id"])]
        out.append({"id": v["id"], "image": image, "conversations": turns, "meta": view_meta(v, clear=ok)})
        if rng.random() < plan_fraction:
            out.append({"id": f"{v['id']}#plan", "image": v["image"],
                        "conversations": [_human(Q0), _gpt(Q0_PLAN)], "meta": view_meta(v)})
    return out


def test_records(views: list[dict], question_ids: tuple[str, ...] = ("Q1", "Q2", "Q3", "Q4", "Q5")) -> list[dict]:
    """The test set: one multi-turn record per view asking ``question_ids`` in order (the first
    carries the image placeholder)."""
    unknown = [q for q in question_ids if q not in ("Q1", *ATTRIBUTE_QUESTIONS, "Q5")]
    if unknown or not question_ids:
        raise OccError(f"test questions must be among Q1-Q5, got {', '.join(question_ids) or 'none'}")
    out = []
    for v in views:
        ans = _answers(v)
        turns = []
        for k, qid in enumerate(question_ids):
            text = QUESTIONS[qid]
            if k == 0 and "<image>" not in text:
                text = f"{text}\n<image>"
            if k > 0:
                text = text.replace("\n<image>", "")
            turns += [_human(text), _gpt(ans[qid])]
        out.append({"id": v["id"], "image": v["image"], "conversations": turns, "meta": view_meta(v)})
    return out


# --- writing ---------------------------------------------------------------------------------

def write_stage(recs: list[dict], out: str | os.PathLike, dataset: Dataset, name: str, kind: str = "conversation") -> Path:
    """Validate and write a stage file and its InternVL meta JSON (``<out>.meta.json``) atomically."""
    out = Path(out)
    validate = records.validate_conversation if kind == "conversation" else records.validate_preference
    for k, rec in enumerate(recs):
        validate(rec, f"{out} record {k + 1}")
        for rel in records.images_of(rec):
            fileio.resolve_in_root(dataset.root, rel, f"{out} record {k + 1}")
    fileio.write_jsonl(out, recs)
    records.write_meta(out.with_name(out.stem + ".meta.json"), name, dataset.root, out, len(recs))
    return out


def stage_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments every stage generator shares."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--data", required=True, type=Path, help="dataset folder (manifest.jsonl + dataset.json)")
    p.add_argument("--out", required=True, type=Path, help="JSONL to write (its .meta.json is written beside it)")
    p.add_argument("--split", default="train", help="which split's views to use [train]")
    p.add_argument("--seed", type=int, default=0, help="seed for balancing and sampling [0]")
    return p


def add_clarity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", type=Path,
                   help="label Q6 from a model's Q1 answers (wrong -> No.) instead of the occlusion ratio")
    p.add_argument("--checkpoint", help="which checkpoint's answers, when the predictions file has several")
    p.add_argument("--clear-below", type=float, default=DEFAULT_CLEAR_BELOW,
                   help=f"occlusion ratio under which a view is clear (Q6 Yes.) [{DEFAULT_CLEAR_BELOW}]")


def clarity_labels(args, views: list[dict]) -> dict[str, bool]:
    if args.predictions is not None:
        return clarity_from_predictions(views, args.predictions, args.checkpoint)
    return clarity_from_occlusion(views, args.clear_below)


def report(out: Path, recs: list[dict]) -> None:
    print(f"wrote {len(recs)} records to {out} (meta: {out.with_name(out.stem + '.meta.json')})")

