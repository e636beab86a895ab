"""The reference implementation's published files read as they are, without loss, by the readers the
commands use (stage records, predictions, the ObMan test list)."""
import collections
import json

import pytest

from data_tools.make_testset import keep_listed
from occmllm import records
from occmllm.errors import OccError
from occmllm.predictions import read_predictions
from occmllm.questions import parse_category

COUNTS = {
    "v1/train_Q1_10140.jsonl": ("conversation", 10140),
    "v1/train_Q1_Q6_10140.jsonl": ("conversation", 10140),
    "v1/train_Q1_Q6_balanced_dpo_10140.jsonl": ("preference", 5068),
    "v1/train_Q1_Q6_Q0_4_balanced_10140.jsonl": ("conversation", 5068),
}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_v1_files_read_without_loss(fixtures, name):
    kind, count = COUNTS[name]
    recs = records.read_records(fixtures / name, kind)
    assert len(recs) == count
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
    recs = records.read_records(fixtures / "v1/train_Q1_10140.jsonl")
    counts = collections.Counter(parse_category(r["conversations"][1]["value"]) for r in recs)
    assert dict(counts.most_common()) == {
        "jar": 2720, "bottle": 2390, "cellphone": 2371, "bowl": 734,
        "knife": 720, "camera": 513, "can": 416, "remote": 276}


def test_cot_files(fixtures):
    preds = read_predictions(fixtures / "cot/predictions-sft1.json")
    assert len(preds.answers) == 6227
    # the test list names the views the predictions answer (make_testset --ids keeps them)
    views = [{"id": i} for i in sorted(preds.answers)]
    assert len(keep_listed(views, fixtures / "cot/obman_view_test_all.txt", "")) == 6227
    wrong = read_predictions(fixtures / "cot/obman_train_checkpoint-30000_wrong_1_moho.json")
    assert len(wrong.wrong_ids) == 30202
    # the wrong list labels the reference's stage-2 file: an id in it is wrong, others right
    q16 = records.read_records(fixtures / "v1/train_Q1_Q6_10140.jsonl")
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
