"""The reference implementation's published files read as they are, without loss."""
import json

import pytest

from data_tools import reference
from data_tools.predictions import read_predictions
from occmllm.errors import OccError

COUNTS = {
    "v1/train_Q1_10140.jsonl": ("conversation", 10140),
    "v1/train_Q1_Q6_10140.jsonl": ("conversation", 10140),
    "v1/train_Q1_Q6_balanced_dpo_10140.jsonl": ("preference", 5068),
    "v1/train_Q1_Q6_Q0_4_balanced_10140.jsonl": ("conversation", 5068),
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_v1_files_read_without_loss(fixtures, name):
    kind, recs = reference.read_reference_jsonl(fixtures / name)
    assert (kind, len(recs)) == COUNTS[name]
    with open(fixtures / name, encoding="utf-8") as fh:
        originals = [json.loads(line) for line in fh]
    for original, rec in zip(originals, recs):
        # every original field kept exactly; only an id may be added (from the image name)
        assert {k: rec[k] for k in original} == original
        assert set(rec) - set(original) <= {"id"}
    if kind == "preference":
        assert recs[0]["id"] == "00003303" and recs[0]["question"].endswith("\n")
        assert sum(r["chosen"] == "No." for r in recs) == 2559


def test_q1_category_distribution(fixtures):
    _, recs = reference.read_reference_jsonl(fixtures / "v1/train_Q1_10140.jsonl")
    assert reference.category_counts(recs) == {
        "jar": 2720, "bottle": 2390, "cellphone": 2371, "bowl": 734,
        "knife": 720, "camera": 513, "can": 416, "remote": 276}


def test_cot_files(fixtures):
    tests = reference.read_test_list(fixtures / "cot/obman_view_test_all.txt")
    assert len(tests) == 6227 and tests[0] == {"id": "00000000", "ref_view": 0, "view": 0, "image": "00000000.jpg"}
    preds = read_predictions(fixtures / "cot/predictions-sft1.json")
    assert len(preds.answers) == 6227
    wrong = read_predictions(fixtures / "cot/obman_train_checkpoint-30000_wrong_1_moho.json")
    assert len(wrong.wrong_ids) == 30202
    # the wrong list labels the reference's stage-2 file: an id in it is wrong, others right
    _, q16 = reference.read_reference_jsonl(fixtures / "v1/train_Q1_Q6_10140.jsonl")
    truth = {r["id"]: "x" for r in q16}
    right = wrong.correctness(truth)
    assert sum(not ok for ok in right.values()) == 2938


def test_predictions_for_another_dataset_is_an_error(fixtures):
    preds = read_predictions(fixtures / "cot/predictions-sft1.json")
    with pytest.raises(OccError, match="has answers for 0 of the dataset's 2 ids"):
        preds.correctness({"s00000_v00": "jar", "s00000_v01": "jar"})
    wrong = read_predictions(fixtures / "cot/obman_train_checkpoint-30000_wrong_1_moho.json")
    with pytest.raises(OccError, match="another dataset"):
        wrong.correctness({"s00000_v00": "jar"})
