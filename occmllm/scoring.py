"""Scoring answers against a labelled test set: the numbers of report.json (``build_report``).

Shared by ``inference.py`` and any tool that scores answers (e.g. the reference implementation's
``{id: "The object is X."}`` files), so every number in the project is computed one way. The report
files (report.json, report.md, plots) are written by ``occmllm.report``.

Inputs are the test records (conversation records whose ``gpt`` turns are the reference answers
and whose ``meta`` carries ``occlusion`` and ``category``) and, per checkpoint and mode, one
prediction per record: ``{"answers": {key: text}, "final": text}``. ``key`` is the question id
of a human turn (``"Q1"``, ...; a question asked twice in a record gets ``"Q1#2"``; a question
outside the question set is ``"T<turn number>"``), as :func:`turns_of` names them.

``report.json``::

    {"test_file": str, "n": int,                      # records answered
     "labelled": int,                                 # of them, records with at least one reference answer
     "unlabelled": bool,                              # no reference answer at all: answers, no accuracy
     "q1_majority_class": str | null, "q1_majority_rate": float | null, "q1_chance_rate": 1/8,
     "occlusion_bins": [[0.0, 0.2], ..., [0.8, 1.0]],
     "rows": [{"checkpoint": str, "mode": str, "n": int,
               "accuracy": {key: float}, "correct": {key: int}, "answered": {key: int},
               "final_accuracy": float | null, "final_correct": int, "final_scored": int,
               "final_se": float | null,                       # binomial standard error of final_accuracy
               "most_occluded_third": {"n", "correct", "accuracy", "se", "min_occlusion"},
               "by_occlusion": [{"range": [lo, hi] | null, "n": int, "correct": int, "accuracy": float | null}],
               "seconds": float | null, "samples_per_s": float | null,
               "cot": {"no_rate", "calibration", "no_when_wrong", "yes_when_right",      # chain-of-thought rows only
                       "wrong_to_right", "right_to_wrong", "gate",                # the run's gate (None: several)
                       "check_auc",                      # P(No.) of wrong first answers above right ones
                       "gate_choice": occmllm.chain.gate_choice's | absent}}],    # added by inference.py
     "gains": [{"row": [checkpoint, mode], "against": [checkpoint, mode],   # see compared_with
                "final": {"n", "delta", "se", "gained", "lost", "p"},          # paired: see paired_difference
                "most_occluded_third": {"n", "delta", "se", "gained", "lost", "p"}}],
     "confusion": {"checkpoint": str, "mode": str, "truth": [categories], "predicted": [categories + "(none)"],
                   "matrix": [[count]]} | null}

A record whose final question has no reference answer is answered but not scored: the final
accuracy is over the ``final_scored`` records that have one. Bins are [lo, hi) except the last,
[0.8, 1.0]; a scored record without ``meta.occlusion`` falls in a bin with ``range`` null, so the
bins' ``n`` always sum to ``final_scored`` (the row's ``n`` for a labelled file). An empty bin has
accuracy null. For an unlabelled file every accuracy is null and ``confusion`` is null.

``most_occluded_third`` is the final accuracy on the third of the scored records with the highest
occlusion ratio (the same records for every row; ``min_occlusion`` is the lowest ratio among them):
the views the second look is for, in a group large enough to compare, where the top fixed bin may
hold a handful. ``se`` is sqrt(p (1 - p) / n), the spread of one accuracy over test sets of this
size. Whether one row beats another is judged by the paired se in ``gains`` instead: rows that
agree on most records differ far more surely than their two se's suggest.
"""
from __future__ import annotations

import bisect
import math
import os
from collections import Counter
from dataclasses import dataclass

from occmllm import chain
from occmllm.errors import OccError
from occmllm.questions import CATEGORIES, is_correct, parse_category, parse_yes_no, question_id
from occmllm.stats import auc, paired_difference

OCCLUSION_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
NO_CATEGORY = "(none)"


# --- the questions of a record ---------------------------------------------------------------

@dataclass(frozen=True)
class Turn:
    key: str               # unique within the record: "Q1", "Q2", ..., "Q1#2" for a repeat, "T3" off the set
    qid: str               # question id used for scoring ("Q1", ..., or "T3")
    question: str          # the human turn's text
    reference: str | None  # the gpt turn after it (None for a question without its answer)


def turns_of(record: dict) -> list[Turn]:
    """The human turns of a (validated) conversation record, with their reference answers."""
    conv = record["conversations"]
    seen: Counter = Counter()
    out = []
    for k, turn in enumerate(conv):
        if turn["from"] != "human":
            continue
        text = turn["value"]
        qid = question_id(text) or f"T{len(out) + 1}"
        seen[qid] += 1
        key = qid if seen[qid] == 1 else f"{qid}#{seen[qid]}"
        answered = k + 1 < len(conv) and conv[k + 1]["from"] == "gpt"
        out.append(Turn(key, qid, text, conv[k + 1]["value"] if answered else None))
    return out


def final_key(keys: list[str]) -> str:
    """Which answer is the final one: the (first) category question Q1's, else the first turn's."""
    return "Q1" if "Q1" in keys else keys[0]


def truth_category(record: dict) -> str | None:
    """The record's category: its Q1 reference answer parsed, else ``meta.category``."""
    for turn in turns_of(record):
        if turn.qid == "Q1" and turn.reference is not None:
            category = parse_category(turn.reference)
            if category is not None:
                return category
    category = (record.get("meta") or {}).get("category")
    return category if isinstance(category, str) else None


def occlusion_bin(record: dict) -> int | None:
    """Index of the record's occlusion bin, None when it has no occlusion ratio in [0, 1]."""
    x = (record.get("meta") or {}).get("occlusion")
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
        return None
    return min(bisect.bisect_right(OCCLUSION_EDGES, x) - 1, len(OCCLUSION_EDGES) - 2)


# --- scoring -----------------------------------------------------------------------------------

def _rate(correct: int, n: int) -> float | None:
    return correct / n if n else None


def standard_error(correct: int, n: int) -> float | None:
    """Binomial standard error of the accuracy ``correct / n``."""
    if not n:
        return None
    p = correct / n
    return math.sqrt(p * (1 - p) / n)


def most_occluded_third(records: list[dict]) -> list[dict]:
    """The third (rounded up) of the scored records with the highest ``meta.occlusion``; ties are
    broken by id, so every row is scored on the same records."""
    scored = [r for r in records if _final_turn(r).reference is not None and occlusion_bin(r) is not None]
    ranked = sorted(scored, key=lambda r: (-float(r["meta"]["occlusion"]), str(r["id"])))
    return ranked[: math.ceil(len(ranked) / 3)]


def _final_turn(record: dict) -> Turn:
    turns = turns_of(record)
    return next(t for t in turns if t.key == final_key([t.key for t in turns]))


def score_row(checkpoint: str, mode: str, records: list[dict], predictions: dict, seconds: float | None = None,
              timed: int | None = None) -> dict:
    """One report row. ``predictions`` maps each record id to ``{"answers": {key: text}, "final": text}``;
    every record needs one. ``seconds`` is the generation time of ``timed`` samples (for samples/s)."""
    missing = [r["id"] for r in records if r["id"] not in predictions]
    if missing:
        raise OccError(f"checkpoint {checkpoint!r} ({mode}): no prediction for {len(missing)} of {len(records)} "
                       f"test records (e.g. {missing[0]!r})")
    asked = {key for r in records for key in predictions[r["id"]]["answers"]}
    correct: Counter = Counter()
    scored: Counter = Counter()
    final_right = final_correctness(records, predictions)  # record id -> final answer right, scored records
    final_scored, final_correct = len(final_right), sum(final_right.values())
    nbins = len(OCCLUSION_EDGES) - 1
    bin_n, bin_correct = [0] * (nbins + 1), [0] * (nbins + 1)  # the last slot: no occlusion ratio
    for rec in records:
        pred = predictions[rec["id"]]
        turns = turns_of(rec)
        for turn in turns:
            if turn.key in asked and turn.reference is not None:
                scored[turn.key] += 1
                correct[turn.key] += is_correct(turn.qid, pred["answers"].get(turn.key, ""), turn.reference)
        if rec["id"] not in final_right:  # an unlabelled record: answered, not scored
            continue
        ok = final_right[rec["id"]]
        b = occlusion_bin(rec)
        b = nbins if b is None else b
        bin_n[b] += 1
        bin_correct[b] += ok
    keys = sorted(scored, key=key_order)
    by_occlusion = [{"range": [OCCLUSION_EDGES[i], OCCLUSION_EDGES[i + 1]], "n": bin_n[i], "correct": bin_correct[i],
                     "accuracy": _rate(bin_correct[i], bin_n[i])} for i in range(nbins)]
    if bin_n[nbins]:
        by_occlusion.append({"range": None, "n": bin_n[nbins], "correct": bin_correct[nbins],
                             "accuracy": _rate(bin_correct[nbins], bin_n[nbins])})
    n = len(records)
    third = most_occluded_third(records)
    third_correct = sum(final_right[r["id"]] for r in third)
    extra = {"cot": cot_stats(records, predictions)} if all(chain.CHECK in predictions[r["id"]]["answers"]
                                                            for r in records) else {}
    return {"checkpoint": checkpoint, "mode": mode, "n": n, **extra,
            "accuracy": {k: correct[k] / scored[k] for k in keys},
            "correct": {k: correct[k] for k in keys}, "answered": {k: scored[k] for k in keys},
            "final_accuracy": _rate(final_correct, final_scored), "final_correct": final_correct,
            "final_scored": final_scored, "final_se": standard_error(final_correct, final_scored),
            "most_occluded_third": {"n": len(third), "correct": third_correct,
                                    "accuracy": _rate(third_correct, len(third)),
                                    "se": standard_error(third_correct, len(third)),
                                    "min_occlusion": float(third[-1]["meta"]["occlusion"]) if third else None},
            "by_occlusion": by_occlusion,
            "seconds": round(seconds, 4) if seconds is not None else None,
            "samples_per_s": round(timed / seconds, 4) if seconds and timed else None}


def final_correctness(records: list[dict], predictions: dict) -> dict:
    """Record id -> whether its final answer is right, for the records whose final question has a
    reference answer."""
    out = {}
    for rec in records:
        fin = _final_turn(rec)
        if fin.reference is not None:
            out[rec["id"]] = is_correct(fin.qid, predictions[rec["id"]]["final"], fin.reference)
    return out


def compared_with(rows: list[dict], i: int) -> int | None:
    """The row a row's gain is measured against: the last plain row above it. For a plain row that
    is the stage before it; for another mode, the same model asked plainly."""
    return next((j for j in range(i - 1, -1, -1) if rows[j]["mode"] == "plain"), None)


def gains(records: list[dict], runs: list[dict], rows: list[dict]) -> list[dict]:
    """Each row's paired difference (final accuracy, and on the most-occluded third) against the row
    :func:`compared_with` picks."""
    right = [final_correctness(records, r["predictions"]) for r in runs]
    third = [r["id"] for r in most_occluded_third(records)]
    out = []
    for i in range(len(rows)):
        j = compared_with(rows, i)
        if j is None:
            continue
        # every row scores the same records (those with a reference answer): right[i] and right[j] share keys
        out.append({"row": [rows[i]["checkpoint"], rows[i]["mode"]],
                    "against": [rows[j]["checkpoint"], rows[j]["mode"]],
                    "final": paired_difference(right[i], right[j], list(right[i])),
                    "most_occluded_third": paired_difference(right[i], right[j], third)})
    return out


def cot_stats(records: list[dict], predictions: dict) -> dict:
    """Chain-of-thought figures (``occmllm.chain``): how often the check said ``No.`` (the second look
    taken), how well that matched the first answer being wrong, and what the second look changed."""
    said_no = labelled = wrong = no_when_wrong = yes_when_right = wrong_to_right = right_to_wrong = 0
    p_no = {True: [], False: []}  # the check's P(No.) by whether the first answer was right
    for rec in records:
        answers = predictions[rec["id"]]["answers"]
        no = parse_yes_no(answers[chain.CHECK]) is False
        said_no += no
        truth = truth_category(rec)
        if truth is None:  # unlabelled: counts for how often the model said No., nothing else
            continue
        labelled += 1
        first_right = parse_category(answers.get(chain.FIRST, "")) == truth
        wrong += not first_right
        no_when_wrong += no and not first_right
        yes_when_right += (not no) and first_right
        p = (predictions[rec["id"]].get("chain") or {}).get("p_no")
        if p is not None:
            p_no[first_right].append(float(p))
        if chain.SECOND in answers:
            second_right = parse_category(answers[chain.SECOND]) == truth
            wrong_to_right += second_right and not first_right
            right_to_wrong += first_right and not second_right
    n = len(records)
    gates = {(predictions[rec["id"]].get("chain") or {}).get("gate") for rec in records}
    return {"gate": gates.pop() if len(gates) == 1 else None,
            "no_rate": _rate(said_no, n), "calibration": _rate(no_when_wrong + yes_when_right, labelled),
            "no_when_wrong": _rate(no_when_wrong, wrong), "yes_when_right": _rate(yes_when_right, labelled - wrong),
            "wrong_to_right": wrong_to_right, "right_to_wrong": right_to_wrong,
            "check_auc": auc(p_no[False], p_no[True]) if len(p_no[False]) + len(p_no[True]) == labelled else None}


def key_order(key: str):
    qid, _, repeat = key.partition("#")
    return (qid[0], int(qid[1:]) if qid[1:].isdigit() else 0, int(repeat or 1))


def confusion(row_name: tuple[str, str], records: list[dict], predictions: dict) -> dict:
    """Category confusion matrix of the final answers: rows the true category, columns the named one."""
    truths = [truth_category(r) for r in records]
    extra = sorted({t for t in truths if t is not None} - set(CATEGORIES))
    truth_labels = [*CATEGORIES, *extra]
    predicted_labels = [*truth_labels, NO_CATEGORY]
    matrix = [[0] * len(predicted_labels) for _ in truth_labels]
    for rec, truth in zip(records, truths):
        if truth is None:
            continue
        guess = parse_category(predictions[rec["id"]]["final"])
        col = predicted_labels.index(guess) if guess in predicted_labels else len(predicted_labels) - 1
        matrix[truth_labels.index(truth)][col] += 1
    return {"checkpoint": row_name[0], "mode": row_name[1], "truth": truth_labels, "predicted": predicted_labels,
            "matrix": matrix}


def build_report(test_file: str | os.PathLike, records: list[dict], runs: list[dict]) -> dict:
    """The whole report. ``runs``: in row order, dicts with ``checkpoint``, ``mode``, ``predictions``
    and optionally ``seconds`` and ``timed`` (see :func:`score_row`). The confusion matrix is the
    last plain-mode run's (the last run's when none is plain)."""
    if not records:
        raise OccError(f"{test_file}: no test records to score")
    rows = [score_row(r["checkpoint"], r["mode"], records, r["predictions"], r.get("seconds"), r.get("timed"))
            for r in runs]
    truths = Counter(t for t in map(truth_category, records) if t is not None)
    majority = truths.most_common(1)[0] if truths else None
    labelled = sum(any(t.reference is not None for t in turns_of(r)) for r in records)
    conf = None
    if runs and truths:
        last = next((r for r in reversed(runs) if r["mode"] == "plain"), runs[-1])
        conf = confusion((last["checkpoint"], last["mode"]), records, last["predictions"])
    return {"test_file": str(test_file), "n": len(records), "labelled": labelled, "unlabelled": labelled == 0,
            "q1_majority_class": majority[0] if majority else None,
            "q1_majority_rate": majority[1] / sum(truths.values()) if majority else None,
            "q1_chance_rate": 1 / len(CATEGORIES),
            "occlusion_bins": [[OCCLUSION_EDGES[i], OCCLUSION_EDGES[i + 1]] for i in range(len(OCCLUSION_EDGES) - 1)],
            "rows": rows, "gains": gains(records, runs, rows) if labelled else [], "confusion": conf}
