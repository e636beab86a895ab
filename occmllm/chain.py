"""The chain of thought: one definition for the data builders, every training stage, inference and
the report.

1. **First answer**: Q1 with the image.
2. **Check**: Q6 ("Is it clear to identify the object in the hand?") asked right after the first
   answer, in the same conversation. ``No.`` means one thing in every stage: *the first answer is
   likely wrong*. Its training labels come from the model's own first answers on views it never
   trained on (the held-out share of the training split, ``is_held_out``), never from occlusion,
   and it is trained after those answers, as inference asks it (``check_training_turns``).
3. **Second look**, where the check says ``No.``: Q1 asked again in a fresh conversation
   (``SECOND_LOOK``) over the image whose visual tokens are blended with its reconstruction render's,
   alpha x image + (1 - alpha) x render (``occmllm.dual.blend``; alpha is the checkpoint's
   ``dual_alpha.json``, learnt in stage 4). The first answer is not in it, so the second look
   cannot copy it. Stage 4 trains the second look as a model of its own (``SECOND_LOOK_DIR``
   inside the stage-4 checkpoint, with its alpha): one model that learnt both looks answered
   worse at first look. Blended, the render speaks through the image's own token positions; shown as a
   second image beside it, the same renders moved the answers less (benchmarks/RESULTS.md, "Where
   the second look's gain comes from"). Its answer is the category whose answer it finds likeliest,
   read twice: as they are and with image and render both flipped left to right, as training's
   flips showed them, the log-likelihoods summed (``occmllm.modes.second_look_log_likelihoods``;
   benchmarks/RESULTS.md, "The chain's check does not earn the views it skips").
4. **Gate**: at inference the second look is taken where P(``No.``) (the model's probability of
   ``No.`` against ``Yes.`` as the check's answer) is at least the gate. The gate is chosen on the
   validation split (``choose_gate``; ``python -m occmllm.chain gate``) and stored with the
   checkpoint (``GATE_FILE``); without one it is 0.5, the model's own verdict. The check must earn
   its place: the best gate is kept only where it beats the second look everywhere or nowhere,
   whichever is better, by more than chance (McNemar's test); else that rule is the gate. Its
   gain on the views it was chosen on is fitted to them; ``gate_gain_on_fresh_views`` estimates the
   gain on views it was not chosen on.
5. **Final answer**: the second look's where it was taken, else the first.

The RL reward (``reward``) pays for a right final answer and for a truthful check (``No.`` exactly
when the first answer is wrong). It pays nothing for ``No.`` by itself, so a policy that always
says ``No.`` earns at most what a policy that answers right and says ``Yes.`` earns.

Answer keys in predictions: ``Q1`` (first answer), ``Q6`` (the check, as decided by the gate),
``Q1#2`` (the second look, where taken); the P(``No.``) of each view is kept beside them.

    python -m occmllm.chain gate --predictions VAL/predictions.jsonl --data VAL.jsonl --checkpoint NAME --save CKPT
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from occmllm import fileio, records
from occmllm.errors import OccError, cli
from occmllm.questions import NO, Q1, Q6, YES, answer_in_history, parse_category
from occmllm.stats import paired_difference

FIRST, CHECK, SECOND = "Q1", "Q6", "Q1#2"
CHECK_QUESTION = Q6
# One placeholder: the image, its visual tokens blended with the render's.
SECOND_LOOK = Q1
GATE_FILE = "chain_gate.json"
# The second look's own model, a dual checkpoint inside the stage-4 checkpoint: learning to read the
# blend moved the first look's answers when one model learnt both (benchmarks/RESULTS.md, "The second
# look gets a model of its own")
SECOND_LOOK_DIR = "second_look"
DEFAULT_GATE = 0.5
CHECK_MUST_BEAT_P = 0.05  # a gate that reads the check must beat ignoring it by more than chance (choose_gate)
HELD_OUT_SHARE = 0.25  # of the training scenes: the chain's views, kept out of stages 1 and 2


# --- data ------------------------------------------------------------------------------------------

def is_held_out(scene: str, share: float = HELD_OUT_SHARE) -> bool:
    """Whether a training scene belongs to the chain's held-out share (decided by a hash of the scene
    id, so a scene's views stay together and the split does not depend on the order of the views)."""
    digest = hashlib.sha256(str(scene).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def check_answer(first_right: bool) -> str:
    """The check's label: ``Yes.`` where the first answer was right, ``No.`` where it was wrong."""
    return YES if first_right else NO


def first_turns(first_answer: str | None = None) -> list[dict]:
    """The first answer's conversation: Q1 (with the image), and the answer when given."""
    turns = [{"from": "human", "value": Q1}]
    if first_answer is not None:
        turns.append({"from": "gpt", "value": answer_in_history(first_answer)})
    return turns


def check_turns(first_answer: str, check: str | None = None) -> list[dict]:
    """The check's conversation: the first answer's, then Q6 (and its answer when given)."""
    turns = first_turns(first_answer) + [{"from": "human", "value": CHECK_QUESTION}]
    if check is not None:
        turns.append({"from": "gpt", "value": check})
    return turns


def check_training_turns(own_first_answer: str, first_right: bool) -> list[dict]:
    """The check as stage 4 trains it: after the model's own first answer, as inference asks it,
    that answer kept as context only (``"train": false``: a wrong one is not taught), then Q6
    labelled by whether it was right."""
    turns = check_turns(own_first_answer, check_answer(first_right))
    turns[1]["train"] = False
    return turns


def second_look_turns(answer: str | None = None) -> list[dict]:
    """The second look's own conversation: Q1 over the blended image, nothing before it."""
    turns = [{"from": "human", "value": SECOND_LOOK}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return turns


# --- decisions ---------------------------------------------------------------------------------------

def looks_again(p_no: float, gate: float) -> bool:
    return p_no >= gate


def final_answer(first: str, second: str | None) -> str:
    return second if second is not None else first


@dataclass(frozen=True)
class RewardWeights:
    correct: float = 1.0
    calibration: float = 0.5


def reward(first_right: bool, said_no: bool | None, final_right: bool,
           weights: RewardWeights = RewardWeights()) -> float:
    """A chain's reward: a right final answer, and a check that tells the truth about the first
    answer (``said_no`` None: the check's answer did not parse, which earns nothing)."""
    truthful = said_no is not None and said_no == (not first_right)
    return weights.correct * final_right + weights.calibration * truthful


# --- the gate ----------------------------------------------------------------------------------------

def gate_table(rows: list[tuple[float, bool, bool]]) -> list[dict]:
    """Final accuracy at every useful gate, for views given as (P(No.), first right, second right):
    the second look taken where P(No.) >= gate. Candidates: halfway below each distinct P(No.) (from
    the one under it, or from 0), and one above all. A gate never equals a view's P(No.): that view
    would look again or not by the last digit of a rounded probability (predictions keep six)."""
    if not rows:
        raise OccError("no labelled views to choose the gate on")
    p, first, second = (np.array(column, dtype=float) for column in zip(*rows))
    ps, index = np.unique(p, return_inverse=True)  # distinct P(No.), ascending
    # gate k sits just under ps[k] (k = len(ps): above all): views with index >= k look again
    first_below = np.concatenate([[0.0], np.cumsum(np.bincount(index, first, len(ps)))])
    second_from = np.concatenate([np.cumsum(np.bincount(index, second, len(ps))[::-1])[::-1], [0.0]])
    looked_from = np.concatenate([np.cumsum(np.bincount(index, None, len(ps))[::-1])[::-1], [0]])
    gates = [(low + q) / 2 for low, q in zip([0.0, *ps[:-1]], ps)] + [1.0 + 1e-9]
    return [{"gate": float(g), "accuracy": float(right) / len(rows), "looked": float(looked) / len(rows)}
            for g, right, looked in zip(gates, first_below + second_from, looked_from)]


def best_gate(rows: list[tuple[float, bool, bool]], table: list[dict] | None = None) -> dict:
    """The gate with the best final accuracy on ``rows`` (``table``: their ``gate_table``, where
    made already); among ties, the one that looks again least (the second look costs a
    reconstruction)."""
    return max(table or gate_table(rows), key=lambda r: (round(r["accuracy"], 12), -r["looked"]))


def paired_gain(rows: list[tuple[float, bool, bool]], gate: float, reference: float) -> dict:
    """Final accuracy at ``gate`` against ``reference`` on the same views (``occmllm.stats``): the
    difference and its se, the views gained and lost, and McNemar's p."""
    def right(g: float) -> dict:
        return {i: second if p >= g else first for i, (p, first, second) in enumerate(rows)}
    return paired_difference(right(gate), right(reference), list(range(len(rows))))


def choose_gate(rows: list[tuple[float, bool, bool]]) -> dict:
    """The gate. The check must earn its place: the best gate (``best_gate``) is kept only where it
    beats the better of the two rules that ignore the check, the second look everywhere (gate 0) and
    nowhere (the first answers; on a tie, as it costs nothing), by more than chance
    (``paired_gain``'s p under ``CHECK_MUST_BEAT_P``). Else that rule is the gate: a gate fitted to a
    few validation views' worth of gain skips views on which fresh samples lose
    (benchmarks/RESULTS.md, "The chain's check does not earn the views it skips")."""
    table = gate_table(rows)
    best, everywhere, nowhere = best_gate(rows, table), {**table[0], "gate": 0.0}, table[-1]
    plain = everywhere if everywhere["accuracy"] > nowhere["accuracy"] else nowhere
    against = paired_gain(rows, best["gate"], plain["gate"])
    chosen = best if against["gained"] > against["lost"] and against["p"] < CHECK_MUST_BEAT_P else plain
    return {**chosen, "first_only_accuracy": nowhere["accuracy"], "n": len(rows),
            "best_gate": best["gate"], "best_against_plain": against}


def gate_gain_on_fresh_views(rows: list[tuple[float, bool, bool]], resamples: int = 1000, seed: int = 0) -> dict:
    """What a gate chosen as ``choose_gate`` chooses it brings to views it was not chosen on, in
    points of final accuracy over the first answers (bootstrap: the gate chosen on a resample of
    the views, scored on the views that resample left out). The gain at the gate chosen on all
    views is biased upwards: the gate is fitted to those very views."""
    rng = np.random.default_rng(seed)
    p, first, second = (np.array(column, dtype=float) for column in zip(*rows))
    gains = []
    for _ in range(resamples):
        drawn = rng.integers(len(rows), size=len(rows))
        left_out = np.setdiff1d(np.arange(len(rows)), drawn)
        if not len(left_out):
            continue
        gate = choose_gate([rows[i] for i in drawn])["gate"]
        looks = p[left_out] >= gate
        gains.append(100 * float(np.mean(np.where(looks, second[left_out], first[left_out]) - first[left_out])))
    low, high = np.percentile(gains, [5, 95])
    return {"mean": float(np.mean(gains)), "p5": float(low), "p95": float(high),
            "share_positive": float(np.mean(np.array(gains) > 0)), "resamples": len(gains)}


def gate_rows(predictions: list[dict], truths: dict[str, str]) -> list[tuple[float, bool, bool]]:
    """(P(No.), first right, second right) of each labelled view of a chain run in which the second
    look was taken everywhere (``--gate 0``)."""
    rows = []
    for p in predictions:
        truth = truths.get(str(p["id"]))
        if truth is None:
            continue
        answers, chain = p["answers"], p.get("chain") or {}
        if SECOND not in answers or "p_no" not in chain:
            raise OccError(f"prediction {p['id']!r}: no second look or P(No.); choose the gate on a chain run "
                           "that looks again everywhere (inference.py --mode cot --gate 0)")
        rows.append((float(chain["p_no"]), parse_category(answers[FIRST]) == truth,
                     parse_category(answers[SECOND]) == truth))
    return rows


def is_second_look(record: dict) -> bool:
    """Whether a training record is a second look: its image is blended with a render."""
    return records.render_of(record) is not None


def second_look_model(checkpoint: str | Path) -> Path | None:
    """The checkpoint's own second-look model (``SECOND_LOOK_DIR``), or None: the checkpoint looks
    again itself."""
    folder = Path(checkpoint) / SECOND_LOOK_DIR
    return folder if folder.is_dir() else None


def second_look_source(checkpoint: str | Path) -> Path:
    """The folder the second look is asked of and whose blend weight it uses: the checkpoint's own
    second-look model, else the checkpoint."""
    return second_look_model(checkpoint) or Path(checkpoint)


def read_gate(checkpoint: str | Path) -> float:
    path = Path(checkpoint) / GATE_FILE
    if not path.is_file():
        return DEFAULT_GATE
    gate = fileio.read_json(path).get("gate")
    if not isinstance(gate, (int, float)):
        raise OccError(f"{path}: no numeric 'gate'; choose it again (python -m occmllm.chain gate)")
    return float(gate)


def gate_choice(checkpoint: str | Path, gate: float | None) -> dict | None:
    """How the checkpoint's stored gate was chosen, where ``gate`` (a run's, as its predictions keep
    it: six digits) is that gate: its gain fitted on the validation views and its gain on views it
    was not chosen on (``gate_gain_on_fresh_views``; absent from gates stored before it). None for
    a gate written by hand, which ``read_gate`` takes but which records no choice."""
    path = Path(checkpoint) / GATE_FILE
    if gate is None or not path.is_file():
        return None
    stored = fileio.read_json(path)
    if not isinstance(stored.get("gate"), (int, float)) or abs(stored["gate"] - gate) > 1e-6:
        return None
    if not all(isinstance(stored.get(k), (int, float)) for k in ("accuracy", "first_only_accuracy")):
        return None
    return {"n": stored.get("n"), "fitted_gain": 100 * (stored["accuracy"] - stored["first_only_accuracy"]),
            "gain_on_fresh_views": stored.get("gain_on_fresh_views")}


@cli
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m occmllm.chain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gate", help="choose the second-look gate on a validation chain run (--gate 0)")
    g.add_argument("--predictions", required=True, type=Path,
                   help="predictions.jsonl of inference.py --mode cot --gate 0")
    g.add_argument("--data", required=True, type=Path, help="the labelled records the run answered")
    g.add_argument("--checkpoint", help="which checkpoint's rows, when the file has several")
    g.add_argument("--save", type=Path, help=f"checkpoint folder to write {GATE_FILE} into")
    args = p.parse_args(argv)
    from occmllm import records
    from occmllm.scoring import truth_category
    truths = {str(r["id"]): truth_category(r) for r in records.read_records(args.data, kind="test")}
    preds = [row for _, row in fileio.iter_jsonl(args.predictions)
             if row.get("mode") == "cot" and (args.checkpoint is None or row.get("checkpoint") == args.checkpoint)]
    names = {row.get("checkpoint") for row in preds}
    if len(names) > 1:
        listed = ", ".join(sorted(map(str, names)))
        raise OccError(f"{args.predictions}: chain rows of {len(names)} checkpoints ({listed}); pick one with --checkpoint")
    rows = gate_rows(preds, {k: v for k, v in truths.items() if v is not None})
    choice = choose_gate(rows)
    against = choice["best_against_plain"]
    print(f"best gate {choice['best_gate']:.4f}: {100 * against['delta']:+.2f} ± {100 * against['se']:.2f} points "
          f"({against['gained']} views gained, {against['lost']} lost, p {against['p']:.3f}) over the better of "
          f"looking again everywhere and nowhere; kept where p < {CHECK_MUST_BEAT_P:g}")
    print(f"gate {choice['gate']:.4f}: final accuracy {choice['accuracy']:.4f} with the second look on "
          f"{choice['looked']:.1%} of {choice['n']} views (first answers alone: {choice['first_only_accuracy']:.4f})")
    fresh = choice["gain_on_fresh_views"] = gate_gain_on_fresh_views(rows)
    print(f"on views it was not chosen on, a gate chosen this way gains {fresh['mean']:+.2f} points over the first "
          f"answers (5-95%: {fresh['p5']:+.2f} to {fresh['p95']:+.2f}; above 0 in {fresh['share_positive']:.0%} of "
          f"{fresh['resamples']} bootstrap resamples)")
    if args.save is not None:
        fileio.write_json(args.save / GATE_FILE, {**choice, "predictions": str(args.predictions)})
        print(f"wrote {args.save / GATE_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
