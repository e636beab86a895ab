"""Stage JSONL builders: every stage's training records, the test set and InternVL meta files.

All stages share these functions; each stage folder's ``make_data.py`` only picks which to call.
Records follow ``occmllm.records``; labels the model must not see ride in ``meta``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from occmllm import chain, fileio, records
from occmllm.dataset import Dataset
from occmllm.errors import OccError
from occmllm.predictions import read_predictions
from occmllm.questions import (ATTRIBUTE_QUESTIONS, CAPTION_PROMPT, CATEGORIES, Q0, Q0_PLAN, Q1, Q6, QUESTIONS, YES,
                               answers_for, caption, category_answer, description, parse_category, yes_no)


def view_meta(view: dict, **extra) -> dict:
    keys = ("category", "occlusion", "scene", "view", "split", "colour", "source")
    return {**{k: view[k] for k in keys if k in view}, **extra}


def _human(text: str) -> dict:
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


def _answers(view: dict) -> dict[str, str]:
    return answers_for(view["category"], view.get("colour"))


# --- the chain's check labels (Q6) ------------------------------------------------------------

def first_answers(views: list[dict], predictions_path,
                  checkpoint: str | None = None) -> tuple[dict[str, bool], dict[str, str]]:
    """Whether the model's Q1 answer to each view was right, the label of the chain's check
    (``occmllm.chain``: right -> ``Yes.``, wrong -> ``No.``), and the answers themselves where the
    file holds them (a list of wrong ids holds none). Use answers to views the model never trained
    on (``--part held-out``)."""
    preds = read_predictions(predictions_path, checkpoint)
    return preds.correctness({v["id"]: v["category"] for v in views}), preds.answers


# --- records ---------------------------------------------------------------------------------

def q1_record(view: dict) -> dict:
    return {"id": view["id"], "image": view["image"],
            "conversations": [_human(Q1), _gpt(category_answer(view["category"]))], "meta": view_meta(view)}


def stage1_records(views: list[dict]) -> list[dict]:
    """Stage 1: the category question, one record per view."""
    return [q1_record(v) for v in views]


def caption_records(views: list[dict], in_hand: bool = True) -> list[dict]:
    """The pretrained base's alignment data (make base): each view with its caption
    (``questions.caption``: category and colour, and whether a hand holds it), so the projector and
    the language model learn to read the tower's tokens before any stage asks a question of the recipe."""
    return [{"id": v["id"], "image": v["image"],
             "conversations": [_human(CAPTION_PROMPT), _gpt(caption(v["category"], v.get("colour"), in_hand))],
             "meta": view_meta(v)} for v in views]


def without_hand(views: list[dict]) -> list[dict]:
    """The views with each image replaced by the same view rendered without the hand
    (``rgb_nohand``: the whole object, nothing hidden). The pretrained base learns from these
    (make base), as InternVL's pretraining saw objects, not objects held and hidden by a hand."""
    missing = [v["id"] for v in views if not v.get("rgb_nohand")]
    if missing:
        raise OccError(f"{len(missing)} views have no image without the hand (rgb_nohand), e.g. {missing[0]!r}; "
                       "use a SynthOcc or ObMan dataset, or leave out --no-hand")
    return [{**v, "image": v["rgb_nohand"]} for v in views]


def stage2_records(views: list[dict]) -> list[dict]:
    """Stage 2: one multi-turn record per view asking Q1-Q5 in the test records' order, so every
    test conversation is one of them. Q6 is the chain's question (``occmllm.chain``), asked after the
    first answer in stages 3-4, where the model's own answers give its labels."""
    return [{"id": v["id"], "image": v["image"], "conversations": _asked_in_turn(v), "meta": view_meta(v)}
            for v in views]


IMAGE_FACT_QUESTIONS = ("Q1", *ATTRIBUTE_QUESTIONS, "Q5")


def _asked_in_turn(view: dict, question_ids: tuple[str, ...] = IMAGE_FACT_QUESTIONS) -> list[dict]:
    """The view's reference answers to ``question_ids``, asked in order in one conversation; the
    first question carries the image placeholder, the others none."""
    ans = _answers(view)
    turns = []
    for k, qid in enumerate(question_ids):
        text = QUESTIONS[qid]
        if k == 0 and "<image>" not in text:
            text = f"{text}\n<image>"
        if k > 0:
            text = text.replace("\n<image>", "")
        turns += [_human(text), _gpt(ans[qid])]
    return turns


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


def stage3_pairs(views: list[dict], predictions_path, checkpoint: str | None = None, seed: int = 0,
                 reference_clarity: bool = False, right_pairs: bool = True, replay: bool = False) -> list[dict]:
    """Stage 3 preference pairs from a model's own Q1 answers (to views it did not train on).

    Category pairs: for each wrong answer, the true answer chosen over the model's; with
    ``right_pairs``, also for each right answer, the true answer over another category drawn at
    random, so the pairs keep the data's category balance. Pairs from wrong answers alone are the
    views the model finds hard, with the categories it confuses, and shift its answers toward them.

    ``replay`` adds, for each category pair, pairs for Q2-Q5 in the test conversation (the earlier
    questions and their true answers as history): the true answer over the other one (Q2-Q4), and
    the view's description over that of the pair's rejected category (Q5). Category pairs alone
    move the yes/no answers that no pair holds.

    ``reference_clarity`` writes instead the reference's ``train_Q1_Q6_balanced_dpo`` file: Q6 alone
    (``REFERENCE_CLARITY_QUESTION``), ``No.`` chosen where the model's answer was wrong, balanced
    by undersampling. The recipe does not use it: the chain asks Q6 after the first answer
    (``occmllm.chain``), and a single-turn preference pair cannot hold that answer.
    """
    preds = read_predictions(predictions_path, checkpoint)
    correct = preds.correctness({v["id"]: v["category"] for v in views})
    if reference_clarity:
        clarity = [{"id": f"{v['id']}#clarity", "image": v["image"], "question": REFERENCE_CLARITY_QUESTION,
                    "chosen": yes_no(correct[v["id"]]), "rejected": yes_no(not correct[v["id"]]),
                    "meta": view_meta(v, correct=correct[v["id"]])} for v in views]
        pairs = _undersample(clarity, key=lambda r: r["chosen"] == YES, seed=seed)
    else:
        pairs = []
        rng = np.random.default_rng([seed, 1])
        for v in views:
            answer = preds.answers.get(v["id"])
            truth = category_answer(v["category"])
            if not correct[v["id"]] and answer is not None and answer.strip() != truth:
                pair = {"id": f"{v['id']}#category", "image": v["image"], "question": Q1,
                        "chosen": truth, "rejected": answer, "meta": view_meta(v, correct=False)}
            elif correct[v["id"]] and right_pairs:
                other = rng.choice([c for c in CATEGORIES if c != v["category"]])
                pair = {"id": f"{v['id']}#category", "image": v["image"], "question": Q1,
                        "chosen": truth, "rejected": category_answer(str(other)), "meta": view_meta(v, correct=True)}
            else:
                continue
            pairs.append(pair)
            if replay:
                pairs += _replay_pairs(v, parse_category(pair["rejected"]), pair["meta"])
    if not pairs:
        verdict = "right" if all(correct.values()) else "wrong"
        raise OccError(f"{predictions_path}: no preference pairs: the model answered every view {verdict}")
    return pairs


def _replay_pairs(view: dict, rejected_category: str | None, meta: dict) -> list[dict]:
    """Q2-Q5 pairs of one view, each after the earlier questions of the test conversation."""
    turns = _asked_in_turn(view)
    pairs = []
    for k, qid in enumerate(IMAGE_FACT_QUESTIONS[1:], start=1):
        truth = turns[2 * k + 1]["value"]
        if qid == "Q5":
            if rejected_category is None or rejected_category == view["category"]:
                continue  # the wrong answer named no other category: no wrong description to set against
            rejected = description(rejected_category, view.get("colour"))
        else:
            rejected = yes_no(truth != YES)
        pairs.append({"id": f"{view['id']}#{qid}", "image": view["image"], "history": turns[:2 * k],
                      "question": turns[2 * k]["value"], "chosen": truth, "rejected": rejected, "meta": meta})
    return pairs


def stage4_records(views: list[dict], first_right: dict[str, bool], renders_dir: str, seed: int = 0,
                   plan_fraction: float = 0.25, replay: bool = True, second_look_repeats: int = 1,
                   own_answers: dict[str, str] | None = None) -> list[dict]:
    """Stage 4 chain-of-thought records (``occmllm.chain``), per view:

    - the check: Q1 with the model's own first answer to this (held-out) view (``own_answers``,
      context only, ``chain.check_training_turns``; the true answer where it is not known), then Q6
      answered ``Yes.``/``No.`` as that answer was right or wrong (``first_right``);
    - the second look: Q1 in a conversation of its own over the image, blended with its
      reconstruction render (the record's ``render``), ``second_look_repeats`` times;
    - with ``replay``, stage 2's Q1-Q5 record, so the attributes and the description are kept;
    - for ``plan_fraction`` of the views, a Q0 record (the 3-step plan).
    """
    if second_look_repeats < 1:
        raise OccError(f"second-look repeats must be at least 1, got {second_look_repeats}")
    rng = np.random.default_rng([seed, 4])
    out = []
    for v in views:
        truth = category_answer(v["category"])
        right = first_right[v["id"]]
        own = (own_answers or {}).get(v["id"])
        out.append({"id": v["id"], "image": v["image"],
                    "conversations": (chain.check_training_turns(own, right) if own is not None
                                      else chain.check_turns(truth, chain.check_answer(right))),
                    "meta": view_meta(v, first_right=right)})
        render = records.render_path(renders_dir, v["id"])
        for k in range(second_look_repeats):
            out.append({"id": f"{v['id']}#second" + (str(k + 1) if k else ""), "image": v["image"], "render": render,
                        "conversations": chain.second_look_turns(truth), "meta": view_meta(v)})
        if replay:
            out.append({"id": f"{v['id']}#replay", "image": v["image"], "conversations": _asked_in_turn(v),
                        "meta": view_meta(v)})
        if rng.random() < plan_fraction:
            out.append({"id": f"{v['id']}#plan", "image": v["image"],
                        "conversations": [_human(Q0), _gpt(Q0_PLAN)], "meta": view_meta(v)})
    return out


def test_records(views: list[dict], question_ids: tuple[str, ...] = IMAGE_FACT_QUESTIONS) -> list[dict]:
    """The test set: one multi-turn record per view asking ``question_ids`` in order (the first
    carries the image placeholder)."""
    unknown = [q for q in question_ids if q not in IMAGE_FACT_QUESTIONS]
    if unknown or not question_ids:
        raise OccError(f"test questions must be among Q1-Q5, got {', '.join(question_ids) or 'none'}")
    return [{"id": v["id"], "image": v["image"], "conversations": _asked_in_turn(v, question_ids),
             "meta": view_meta(v)} for v in views]


# --- writing ---------------------------------------------------------------------------------

def write_stage(recs: list[dict], out: str | os.PathLike, dataset: Dataset, name: str, kind: str = "conversation") -> Path:
    """Validate and write a stage file and its InternVL meta JSON (``<out>.meta.json``) atomically."""
    out = Path(out)
    validate = records.validate_conversation if kind == "conversation" else records.validate_preference
    for k, rec in enumerate(recs):
        validate(rec, f"{out} record {k + 1}")
        for rel in records.files_of(rec):
            fileio.resolve_in_root(dataset.root, rel, f"{out} record {k + 1}")
    fileio.write_jsonl(out, recs)
    records.write_meta(records.meta_path(out), name, dataset.root, out, len(recs),
                       dataset=dataset.folder)
    return out


PARTS = ("all", "fit", "held-out")


def stage_parser(prog: str, description: str, part: str = "all") -> argparse.ArgumentParser:
    """The arguments every stage generator shares; ``part`` is the stage's default share of the
    training split (``select_part``)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--data", required=True, type=Path, help="dataset folder (manifest.jsonl + dataset.json)")
    p.add_argument("--out", required=True, type=Path, help="JSONL to write (its .meta.json is written beside it)")
    p.add_argument("--split", default="train", help="which split's views to use [train]")
    p.add_argument("--part", default=part, choices=PARTS,
                   help="which scenes of the training split: fit (stages 1-2), held-out (the chain's views, "
                        f"occmllm.chain, for stages 3-4) or all; other splits are always whole [{part}]")
    p.add_argument("--seed", type=int, default=0, help="seed for balancing and sampling [0]")
    return p


def select_part(views: list[dict], split: str | None, part: str) -> list[dict]:
    """The views of a split that a stage uses: of the training split, the scenes that stages 1-2
    fit (``fit``), the chain's held-out scenes (``held-out``) or all; any other split whole."""
    if part == "all" or split != "train":
        return views
    held_out = part == "held-out"
    chosen = [v for v in views if chain.is_held_out(v.get("scene", v["id"])) == held_out]
    if not chosen:
        raise OccError(f"the {part} part of the training split has no views ({len(views)} in the split); "
                       "use --part all")
    return chosen


def stage_views(dataset: Dataset, args) -> list[dict]:
    return select_part(dataset.split(args.split), args.split, args.part)


def add_predictions_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", required=True, type=Path,
                   help="the model's Q1 answers to these views (inference.py's predictions.jsonl)")
    p.add_argument("--checkpoint", help="which checkpoint's answers, when the predictions file has several")


def print_summary(out: Path, recs: list[dict]) -> None:
    print(f"wrote {len(recs)} records to {out} (meta: {records.meta_path(out)})")

