"""Stage JSONL builders on a small SynthOcc set, through their command-line entry points."""
import json
import os
import subprocess
import sys
from pathlib import Path
from collections import Counter

import pytest

from data_tools import builders
from data_tools.dataset import load_dataset
from occmllm import records
from occmllm.errors import OccError
from occmllm.questions import Q0, Q0_PLAN, Q1, Q6, category_answer

ROOT = Path(__file__).resolve().parents[1]


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)


def test_step1(synth, tmp_path):
    out = _run("step1_sft.make_data", "--data", str(synth), "--out", str(tmp_path / "s1.jsonl"))
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "s1.jsonl", root=synth, verify_images=True)
    train = load_dataset(synth).split("train")
    assert [r["id"] for r in recs] == [v["id"] for v in train]
    for r, v in zip(recs, train):
        assert r["conversations"] == [{"from": "human", "value": Q1}, {"from": "gpt", "value": category_answer(v["category"])}]
        assert r["meta"]["occlusion"] == v["occlusion"]
    assert (tmp_path / "s1.meta.json").is_file()


def test_step2_clarity_from_occlusion_and_from_predictions(synth, tmp_path):
    views = load_dataset(synth).split("train")
    recs = builders.step2_records(views, builders.clarity_from_occlusion(views, 0.5))
    for r, v in zip(recs, views):
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * 6
        assert turns[0]["value"] == Q1 and turns[-2]["value"] == Q6  # Q1-Q5 as the test records ask them, Q6 last
        assert turns[-1]["value"] == ("Yes." if v["occlusion"] < 0.5 else "No.")
        assert records.count_placeholders(r) == 1
    # from a model's predictions: wrong -> No.
    preds = {v["id"]: category_answer(v["category"] if k % 3 else "remote" if v["category"] != "remote" else "jar")
             for k, v in enumerate(views)}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    out = _run("step2_multiquery.make_data", "--data", str(synth), "--out", str(tmp_path / "s2.jsonl"),
               "--predictions", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "s2.jsonl")
    assert [r["conversations"][-1]["value"] == "No." for r in recs] == [k % 3 == 0 for k in range(len(views))]


def test_step3_pairs_balanced_and_truthful(synth, tmp_path):
    views = load_dataset(synth).split("train")
    wrong_answer = {v["id"]: "The object is remote." if v["category"] != "remote" else "The object is jar." for v in views}
    preds = {v["id"]: (wrong_answer[v["id"]] if k % 4 == 0 else category_answer(v["category"]))
             for k, v in enumerate(views)}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    out = _run("step3_mpo.make_data", "--data", str(synth), "--out", str(tmp_path / "s3.jsonl"),
               "--predictions", str(tmp_path / "p.json"))
    assert out.returncode == 0, out.stderr
    pairs = records.read_records(tmp_path / "s3.jsonl", kind="preference")
    clarity = [p for p in pairs if p["id"].endswith("#clarity")]
    category = [p for p in pairs if p["id"].endswith("#category")]
    n_wrong = sum(k % 4 == 0 for k in range(len(views)))
    assert Counter(p["chosen"] for p in clarity) == {"Yes.": n_wrong, "No.": n_wrong}
    for p in clarity:  # truthful: No. exactly when the model was wrong
        vid = p["id"].split("#")[0]
        assert (p["chosen"] == "No.") == (preds[vid] != category_answer(p["meta"]["category"]))
    assert len(category) == len(views)  # one per view: the wrong answers, and the right ones over another category
    for p in category:
        vid = p["id"].split("#")[0]
        assert p["chosen"] == category_answer(p["meta"]["category"]) != p["rejected"]
        assert (p["rejected"] == preds[vid]) == (not p["meta"]["correct"])
    assert Counter(p["meta"]["correct"] for p in category) == {False: n_wrong, True: len(views) - n_wrong}
    out = _run("step3_mpo.make_data", "--data", str(synth), "--out", str(tmp_path / "wrong.jsonl"),
               "--predictions", str(tmp_path / "p.json"), "--wrong-answers-only")
    assert out.returncode == 0, out.stderr
    only = [p for p in records.read_records(tmp_path / "wrong.jsonl", kind="preference") if p["id"].endswith("#category")]
    assert len(only) == n_wrong and all(p["rejected"] == preds[p["id"].split("#")[0]] for p in only)


def test_step3_predictions_for_another_dataset(synth, tmp_path, fixtures):
    out = _run("step3_mpo.make_data", "--data", str(synth), "--out", str(tmp_path / "s3.jsonl"),
               "--predictions", str(fixtures / "cot/predictions-sft1.json"))
    assert out.returncode == 2 and "has answers for 0 of the dataset's" in out.stderr
    assert not (tmp_path / "s3.jsonl").exists()


def test_step4_cot_records(synth, tmp_path):
    ds = load_dataset(synth)
    views = ds.split("train")
    clear = builders.clarity_from_occlusion(views, 0.5)
    # without renders on disk the generator refuses
    out = _run("step4_selfconsistency.make_data", "--data", str(synth), "--out", str(tmp_path / "s4.jsonl"),
               "--renders", "renders/none")
    assert out.returncode == 2 and "render missing" in out.stderr
    recs = builders.step4_records(views, clear, "renders/oracle", plan_fraction=0.5)
    cot = [r for r in recs if not r["id"].endswith("#plan")]
    plans = [r for r in recs if r["id"].endswith("#plan")]
    assert Counter(r["meta"]["clear"] for r in cot) == {True: sum(not c for c in clear.values()),
                                                        False: sum(not c for c in clear.values())}
    for r in cot:
        records.validate_conversation(r, "test")
        if r["meta"]["clear"]:
            assert r["conversations"][-1]["value"] == "Yes." and isinstance(r["image"], str)
        else:
            assert r["image"][1] == f"renders/oracle/{r['id']}.png"
            assert r["conversations"][3]["value"] == "No." and r["conversations"][4]["value"] == Q1
    assert plans and all(p["conversations"] == [{"from": "human", "value": Q0}, {"from": "gpt", "value": Q0_PLAN}]
                         for p in plans)


def test_oracle_renders_and_step4_cli(synth, tmp_path):
    out = _run("data_tools.renders", "--data", str(synth), "--split", "train", "--no-progress")
    assert out.returncode == 0, out.stderr
    out = _run("step4_selfconsistency.make_data", "--data", str(synth), "--out", str(tmp_path / "s4.jsonl"),
               "--renders", "renders/oracle")
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "s4.jsonl", root=synth, verify_images=True)
    assert any(isinstance(r["image"], list) for r in recs)
    again = _run("data_tools.renders", "--data", str(synth), "--split", "train", "--no-progress")
    assert "rendered 0 new views" in again.stdout  # resumable: nothing redone


def test_interrupted_oracle_renders_resume_to_the_same_files(synth, monkeypatch):
    from data_tools import renders
    assert renders.render_views(synth, "renders/full", "test", progress=False) > 2
    real, calls = renders.render_rgb, []

    def stop_at_the_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(renders, "render_rgb", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        renders.render_views(synth, "renders/resumed", "test", progress=False)
    assert len(list((synth / "renders/resumed").iterdir())) == 2  # two finished files, no partial one
    monkeypatch.undo()
    total = len(list((synth / "renders/full").iterdir()))
    assert renders.render_views(synth, "renders/resumed", "test", progress=False) == total - 2
    for path in (synth / "renders/full").iterdir():
        assert (synth / "renders/resumed" / path.name).read_bytes() == path.read_bytes()


def test_testset(synth, tmp_path):
    out = _run("data_tools.make_testset", "--data", str(synth), "--out", str(tmp_path / "t.jsonl"))
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "t.jsonl", root=synth, verify_images=True)
    assert len(recs) == len(load_dataset(synth).split("test"))
    assert [t["value"] for t in recs[0]["conversations"][::2]][1:] == [
        "Is the object in hand round?", "Is the object in hand long?", "Is the object in hand thin?",
        "Describe the object in the hand."]
    with pytest.raises(OccError, match="Q1-Q5"):
        builders.test_records(load_dataset(synth).split("test"), ("Q6",))


def test_relative_data_path(synth, tmp_path):
    """A dataset given by a relative path (as `make demo` does) resolves its images once."""
    out = subprocess.run([sys.executable, "-m", "data_tools.renders", "--data", synth.name, "--split", "test",
                          "--out", "renders/rel", "--no-progress"], capture_output=True, text=True,
                         cwd=synth.parent, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert len(list((synth / "renders/rel").glob("*.png"))) == len(load_dataset(synth).split("test"))


def test_predictions_from_inference_jsonl(synth, tmp_path):
    """Q6 labels from this project's own predictions.jsonl (one checkpoint chosen of two)."""
    views = load_dataset(synth).split("train")
    lines = []
    for name, wrong_every in (("a", 2), ("b", 3)):
        for k, v in enumerate(views):
            cat = v["category"] if k % wrong_every else ("jar" if v["category"] != "jar" else "can")
            lines.append({"checkpoint": name, "mode": "plain", "id": v["id"],
                          "answers": {"Q1": category_answer(cat)}, "final": category_answer(cat)})
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(OccError, match="several checkpoints"):
        builders.clarity_from_predictions(views, tmp_path / "predictions.jsonl")
    clear = builders.clarity_from_predictions(views, tmp_path / "predictions.jsonl", checkpoint="b")
    assert [clear[v["id"]] for v in views] == [k % 3 != 0 for k in range(len(views))]
