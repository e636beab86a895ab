"""The chain of thought's rules (occmllm.chain): its turns, the held-out share, the reward, the gate."""
import itertools
import json
import math

import numpy as np
import pytest

from occmllm import chain
from occmllm.errors import OccError
from occmllm.questions import IMAGE_TOKEN, NO, Q1, Q6, YES, question_id


def test_turns_follow_one_order():
    first = chain.first_turns("The object is jar.")
    assert first == [{"from": "human", "value": Q1}, {"from": "gpt", "value": "The object is jar."}]
    check = chain.check_turns("The object is jar.", NO)
    assert check[:2] == first and check[2] == {"from": "human", "value": Q6} and check[3]["value"] == NO
    # the second look stands alone: one question over one (blended) image, the first answer nowhere in it
    second = chain.second_look_turns()
    assert len(second) == 1 and second[0]["value"].count(IMAGE_TOKEN) == 1
    assert question_id(second[0]["value"]) == "Q1"
    assert chain.first_turns("<image> jar")[1]["value"] == " jar"  # an answer cannot open an image slot
    assert chain.check_answer(True) == YES and chain.check_answer(False) == NO


def test_held_out_share_is_by_scene_and_stable():
    scenes = [f"s{i:05d}" for i in range(4000)]
    held = [chain.is_held_out(s) for s in scenes]
    assert abs(np.mean(held) - chain.HELD_OUT_SHARE) < 0.03
    assert held == [chain.is_held_out(s) for s in scenes]  # a hash of the id: the same every run
    assert not any(chain.is_held_out(s, share=0.0) for s in scenes)


def test_always_no_earns_no_more_than_answering_right():
    """For every outcome of a chain that says No., the reward is at most that of a right first
    answer followed by Yes.; and No. by itself pays nothing."""
    w = chain.RewardWeights(1.0, 0.5)
    right_and_sure = chain.reward(True, False, True, w)
    for first_right, final_right in itertools.product((True, False), repeat=2):
        assert chain.reward(first_right, True, final_right, w) <= right_and_sure
    # the same outcome with and without a look: No. adds only what telling the truth adds
    assert chain.reward(True, True, True, w) < chain.reward(True, False, True, w)
    assert chain.reward(False, True, False, w) == chain.reward(False, False, False, w) + w.calibration
    assert chain.reward(True, None, True, w) == w.correct  # an unreadable check earns nothing


def test_best_gate_is_the_best_by_brute_force():
    rng = np.random.default_rng(0)
    rows = [(float(rng.random()), bool(rng.random() < 0.7), bool(rng.random() < 0.6)) for _ in range(200)]
    choice = {**chain.best_gate(rows), "first_only_accuracy": chain.choose_gate(rows)["first_only_accuracy"]}

    def accuracy(gate):
        return np.mean([second if p >= gate else first for p, first, second in rows])
    grid = np.linspace(0, 1.01, 2000)
    assert choice["accuracy"] == pytest.approx(max(accuracy(g) for g in grid))
    assert choice["accuracy"] == pytest.approx(accuracy(choice["gate"]))
    assert choice["first_only_accuracy"] == pytest.approx(np.mean([f for _, f, _ in rows]))
    # the gate lies between two views' P(No.), never on one: rounding a view's P(No.) as predictions
    # write it (six digits) does not move it across the gate
    gaps = sorted(abs(p - choice["gate"]) for p, _, _ in rows)
    assert gaps[0] > 1e-6
    assert accuracy(choice["gate"]) == np.mean([second if round(p, 6) >= choice["gate"] else first
                                                for p, first, second in rows])
    # a second look that never helps: the gate looks nowhere, a gain far beyond its noise
    never = chain.choose_gate([(p, True, False) for p, _, _ in rows])
    assert never["looked"] == 0 and never["accuracy"] == 1.0
    with pytest.raises(OccError, match="no labelled views"):
        chain.choose_gate([])
    # views that share a P(No.): every gate of the table scored as by hand
    tied = [(round(p, 1), first, second) for p, first, second in rows]
    for row in chain.gate_table(tied):
        looks = [p >= row["gate"] for p, _, _ in tied]
        assert row["looked"] == pytest.approx(np.mean(looks))
        assert row["accuracy"] == pytest.approx(np.mean([s if look else f for look, (_, f, s) in zip(looks, tied)]))


def test_the_check_must_earn_its_gate():
    """A check that tells nothing: the best gate gains a few views by fitting them, within chance,
    so the gate ignores the check: the second look everywhere where it is better overall, nowhere
    where the first answers are. A check that does tell keeps its gate."""
    rng = np.random.default_rng(4)
    noise = [(float(rng.random()), bool(rng.random() < 0.75), bool(rng.random() < 0.8)) for _ in range(400)]
    best = chain.best_gate(noise)
    against = chain.paired_gain(noise, best["gate"], 0.0)
    assert 0 < best["looked"] < 1 and against["gained"] > against["lost"] and against["p"] > chain.CHECK_MUST_BEAT_P
    # by hand: the views the best gate skips, first answer against second
    skipped = [int(f) - int(s) for p, f, s in noise if p < best["gate"]]
    assert (against["gained"], against["lost"]) == (skipped.count(1), skipped.count(-1))
    assert against["delta"] == pytest.approx(sum(skipped) / len(noise))
    n = against["gained"] + against["lost"]
    assert against["p"] == pytest.approx(2 * sum(math.comb(n, k) for k in range(against["lost"] + 1)) / 2 ** n)
    choice = chain.choose_gate(noise)
    assert choice["gate"] == 0.0 and choice["looked"] == 1.0 and all(chain.looks_again(p, 0.0) for p, _, _ in noise)
    assert choice["accuracy"] == pytest.approx(np.mean([s for _, _, s in noise]))
    assert choice["best_gate"] == best["gate"] and choice["best_against_plain"] == against
    # the same second looks worse than the first answers: nowhere, though the best gate gains 4 to 0
    swapped = chain.choose_gate([(p, s, f) for p, f, s in noise])
    assert (swapped["best_against_plain"]["gained"], swapped["best_against_plain"]["lost"]) == (4, 0)
    assert swapped["looked"] == 0.0 and swapped["accuracy"] == swapped["first_only_accuracy"]
    # first answers right exactly where P(No.) is low, second looks right where it is high: the
    # check tells, and its gate stays
    telling = [(p, p < 0.5, p >= 0.5 or s) for p, f, s in noise]
    kept = chain.choose_gate(telling)
    assert kept["gate"] == chain.best_gate(telling)["gate"] and 0.3 < kept["looked"] < 0.7
    assert kept["best_against_plain"]["p"] < 1e-6


def test_gate_gain_on_fresh_views_removes_the_choice_s_own_bias():
    """A second look that is a coin of the first's accuracy, whatever P(No.) says: the gate chosen on
    the views gains on them by fitting them, and on views it was not chosen on gains nothing on
    average. A second look right wherever P(No.) is high gains there too."""
    rng = np.random.default_rng(1)
    noise = [(float(rng.random()), bool(rng.random() < 0.8), bool(rng.random() < 0.8)) for _ in range(300)]
    fitted = 100 * (chain.best_gate(noise)["accuracy"] - np.mean([f for _, f, _ in noise]))
    fresh = chain.gate_gain_on_fresh_views(noise, resamples=300)
    assert fitted > 1.0
    assert fresh["mean"] < fitted - 1.0
    assert fresh["p5"] < 0 <= fresh["p95"] and fresh["resamples"] == 300
    helps = [(p, p < 0.7, True) for p, _, _ in noise]  # first answers wrong where P(No.) >= 0.7
    fresh = chain.gate_gain_on_fresh_views(helps, resamples=300)
    assert fresh["share_positive"] == 1.0 and fresh["mean"] == pytest.approx(100 * np.mean([p >= 0.7 for p, _, _ in helps]), abs=3)


def test_gate_rows_need_a_run_that_looked_everywhere(tmp_path):
    preds = [{"id": "a", "answers": {"Q1": "The object is jar.", "Q6": "No.", "Q1#2": "The object is can."},
              "chain": {"p_no": 0.2}},
             {"id": "b", "answers": {"Q1": "The object is jar.", "Q6": "Yes."}, "chain": {"p_no": 0.1}}]
    assert chain.gate_rows(preds[:1], {"a": "can"}) == [(0.2, False, True)]
    with pytest.raises(OccError, match="--gate 0"):
        chain.gate_rows(preds, {"a": "can", "b": "jar"})
    assert chain.read_gate(tmp_path) == chain.DEFAULT_GATE
    (tmp_path / chain.GATE_FILE).write_text(json.dumps({"gate": 0.3}))
    assert chain.read_gate(tmp_path) == 0.3
    (tmp_path / chain.GATE_FILE).write_text(json.dumps({"gate": "high"}))
    with pytest.raises(OccError, match="numeric"):
        chain.read_gate(tmp_path)


def test_mcnemar_p_is_scipy_s_exact_binomial_test():
    from scipy.stats import binomtest

    from occmllm.stats import mcnemar_p
    for gained, lost in [(4, 0), (8, 7), (20, 5), (0, 9), (3, 3), (1, 0), (60, 31)]:
        assert mcnemar_p(gained, lost) == pytest.approx(binomtest(gained, gained + lost, 0.5).pvalue)
    assert mcnemar_p(0, 0) == 1.0


def test_auc_is_scipy_s_mann_whitney_u():
    from scipy.stats import mannwhitneyu

    from occmllm.stats import auc
    rng = np.random.default_rng(3)
    wrong, right = list(rng.random(40).round(2) + 0.1), list(rng.random(70).round(2))
    assert auc(wrong, right) == pytest.approx(mannwhitneyu(wrong, right).statistic / (40 * 70))
    assert auc([0.9], [0.1, 0.2]) == 1.0 and auc([0.1], [0.1]) == 0.5 and auc([], right) is None
