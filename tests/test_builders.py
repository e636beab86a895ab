"""Stage JSONL builders on a small SynthOcc set, through their command-line entry points."""
import json
import os
import subprocess
import sys
from pathlib import Path
from collections import Counter

import pytest

from data_tools import builders
from occmllm import chain, records
from occmllm.dataset import load_dataset
from occmllm.errors import OccError
from occmllm.questions import CAPTION_PROMPT, Q0, Q0_PLAN, Q1, Q6, category_answer, parse_category

ROOT = Path(__file__).resolve().parents[1]


def _run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)


def test_step1(synth, tmp_path):
    out = _run("step1_sft.make_data", "--data", str(synth), "--out", str(tmp_path / "s1.jsonl"))
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "s1.jsonl", root=synth, verify_images=True)
    fit = builders.select_part(load_dataset(synth).split("train"), "train", "fit")
    assert [r["id"] for r in recs] == [v["id"] for v in fit]
    for r, v in zip(recs, fit):
        assert r["conversations"] == [{"from": "human", "value": Q1}, {"from": "gpt", "value": category_answer(v["category"])}]
        assert r["meta"]["occlusion"] == v["occlusion"]
    assert (tmp_path / "s1.meta.json").is_file()


def test_captions(synth, tmp_path):
    """The base's alignment data: every view of the training split with its object's caption, no
    question of the recipe."""
    out = _run("step1_sft.make_data", "--data", str(synth), "--out", str(tmp_path / "c.jsonl"), "--part", "all",
               "--captions")
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "c.jsonl", root=synth, verify_images=True)
    train = load_dataset(synth).split("train")
    assert [r["id"] for r in recs] == [v["id"] for v in train]
    for r, v in zip(recs, train):
        assert r["conversations"] == [{"from": "human", "value": CAPTION_PROMPT},
                                      {"from": "gpt", "value": f"a photo of a{'n' if v['colour'][0] in 'aeiou' else ''} "
                                                               f"{v['colour']} {v['category']} in a hand"}]


def test_no_hand_reads_each_view_without_the_hand(synth, tmp_path):
    """--no-hand (the base's pretraining data): the same records, each image the view rendered
    without the hand, a caption with no hand in it; views with no such image are refused."""
    out = _run("step1_sft.make_data", "--data", str(synth), "--out", str(tmp_path / "c.jsonl"), "--part", "all",
               "--captions", "--no-hand")
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "c.jsonl", root=synth, verify_images=True)
    train = load_dataset(synth).split("train")
    assert [r["id"] for r in recs] == [v["id"] for v in train]
    for r, v in zip(recs, train):
        assert r["image"] == v["rgb_nohand"] != v["image"]
        assert r["conversations"][1]["value"].endswith(f"{v['colour']} {v['category']}")
    with pytest.raises(OccError, match="no image without the hand"):
        builders.without_hand([{k: x for k, x in v.items() if k != "rgb_nohand"} for v in train])


def test_parts_split_the_training_scenes(synth):
    """fit and held-out partition the training split by whole scenes; other splits stay whole."""
    ds = load_dataset(synth)
    train = ds.split("train")
    fit, held = (builders.select_part(train, "train", part) for part in ("fit", "held-out"))
    assert fit and held and len(fit) + len(held) == len(train)
    assert not {v["scene"] for v in fit} & {v["scene"] for v in held}
    assert builders.select_part(train, "train", "all") == train
    assert builders.select_part(ds.split("test"), "test", "fit") == ds.split("test")
    assert all(chain.is_held_out(v["scene"]) for v in held)


def test_step2_asks_q1_to_q5_in_the_test_order(synth, tmp_path):
    out = _run("step2_multiquery.make_data", "--data", str(synth), "--out", str(tmp_path / "s2.jsonl"))
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "s2.jsonl")
    test = builders.test_records(load_dataset(synth).split("train"))
    by_id = {t["id"]: t for t in test}
    fit = builders.select_part(load_dataset(synth).split("train"), "train", "fit")
    assert [r["id"] for r in recs] == [v["id"] for v in fit]
    for r in recs:  # the test record of the same view is the same conversation: Q1-Q5, no Q6
        assert r["conversations"] == by_id[r["id"]]["conversations"]
        assert records.count_placeholders(r["conversations"]) == 1


def test_step3_pairs_truthful_and_balanced_over_categories(synth, tmp_path):
    views = load_dataset(synth).split("train")
    wrong_answer = {v["id"]: "The object is remote." if v["category"] != "remote" else "The object is jar." for v in views}
    preds = {v["id"]: (wrong_answer[v["id"]] if k % 4 == 0 else category_answer(v["category"]))
             for k, v in enumerate(views)}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    out = _run("step3_mpo.make_data", "--data", str(synth), "--out", str(tmp_path / "s3.jsonl"),
               "--predictions", str(tmp_path / "p.json"), "--part", "all")
    assert out.returncode == 0, out.stderr
    pairs = records.read_records(tmp_path / "s3.jsonl", kind="preference")
    category = [p for p in pairs if p["id"].endswith("#category")]
    assert len(category) == len(pairs)  # no Q6 pairs: the chain asks Q6 after the first answer, not alone
    n_wrong = sum(k % 4 == 0 for k in range(len(views)))
    assert len(category) == len(views)  # one per view: the wrong answers, and the right ones over another category
    for p in category:
        vid = p["id"].split("#")[0]
        assert p["chosen"] == category_answer(p["meta"]["category"]) != p["rejected"]
        assert (p["rejected"] == preds[vid]) == (not p["meta"]["correct"])
    assert Counter(p["meta"]["correct"] for p in category) == {False: n_wrong, True: len(views) - n_wrong}
    out = _run("step3_mpo.make_data", "--data", str(synth), "--out", str(tmp_path / "wrong.jsonl"),
               "--predictions", str(tmp_path / "p.json"), "--wrong-answers-only", "--part", "all")
    assert out.returncode == 0, out.stderr
    only = [p for p in records.read_records(tmp_path / "wrong.jsonl", kind="preference") if p["id"].endswith("#category")]
    assert len(only) == n_wrong and all(p["rejected"] == preds[p["id"].split("#")[0]] for p in only)


def test_step3_predictions_for_another_dataset(synth, tmp_path, fixtures):
    out = _run("step3_mpo.make_data", "--data", str(synth), "--out", str(tmp_path / "s3.jsonl"),
               "--predictions", str(fixtures / "cot/predictions-sft1.json"))
    assert out.returncode == 2 and "has answers for 0 of the dataset's" in out.stderr
    assert not (tmp_path / "s3.jsonl").exists()


def test_step4_chain_records(synth, tmp_path):
    """Per held-out view: the check (Q1, then Q6 = the model's first answer was right), the second
    look in its own conversation over the image blended with its render (repeated), stage 2's Q1-Q5
    as replay, plans."""
    ds = load_dataset(synth)
    views = builders.select_part(ds.split("train"), "train", "held-out")
    first_right = {v["id"]: k % 3 != 0 for k, v in enumerate(views)}
    own = {v["id"]: category_answer(v["category"] if first_right[v["id"]] else "remote" if v["category"] != "remote"
                                    else "jar") for v in views[1:]}  # the first view's answer unknown
    image_of = {v["id"]: v["image"] for v in views}
    recs = builders.stage4_records(views, first_right, "renders/oracle", plan_fraction=0.5, second_look_repeats=3,
                                   own_answers=own)
    kinds = Counter(r["id"].partition("#")[2].rstrip("0123456789") for r in recs)
    assert kinds[""] == kinds["replay"] == len(views) and kinds["second"] == 3 * len(views)
    assert 0 < kinds["plan"] < len(views) and len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        records.validate_conversation(r, "test")
        vid, _, kind = r["id"].partition("#")
        kind = kind.rstrip("0123456789")
        truth = category_answer(r["meta"]["category"])
        if kind == "":  # the check after the model's own first answer, kept as context (the truth where unknown)
            check = "Yes." if first_right[vid] else "No."
            if vid in own:
                assert r["conversations"] == [{"from": "human", "value": Q1},
                                              {"from": "gpt", "value": own[vid], "train": False},
                                              {"from": "human", "value": Q6}, {"from": "gpt", "value": check}]
                assert (parse_category(own[vid]) == r["meta"]["category"]) == first_right[vid]
            else:
                assert r["conversations"] == chain.check_turns(truth, check)
            assert isinstance(r["image"], str)
        elif kind == "second":
            assert r["render"] == f"renders/oracle/{vid}.png" and r["image"] == image_of[vid]
            assert r["conversations"] == [{"from": "human", "value": chain.SECOND_LOOK}, {"from": "gpt", "value": truth}]
            assert records.count_placeholders(r["conversations"]) == 1
        else:
            assert "render" not in r
        if kind == "replay":
            assert [t["value"] for t in r["conversations"][::2]] == [Q1, *(builders.QUESTIONS[q] for q in
                                                                           ("Q2", "Q3", "Q4", "Q5"))]
        elif kind == "plan":
            assert r["conversations"] == [{"from": "human", "value": Q0}, {"from": "gpt", "value": Q0_PLAN}]
    assert not any(kind == "replay" for kind in (r["id"].partition("#")[2] for r in builders.stage4_records(
        views, first_right, "renders/oracle", replay=False)))


def _first_answers(views, tmp_path) -> Path:
    preds = {v["id"]: category_answer(v["category"] if k % 3 else "remote" if v["category"] != "remote" else "jar")
             for k, v in enumerate(views)}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    return tmp_path / "p.json"


def test_oracle_renders_and_step4_cli(synth, tmp_path):
    predictions = _first_answers(load_dataset(synth).split("train"), tmp_path)
    # without renders on disk the generator refuses
    out = _run("step4_selfconsistency.make_data", "--data", str(synth), "--out", str(tmp_path / "s4.jsonl"),
               "--renders", "renders/none", "--predictions", str(predictions))
    assert out.returncode == 2 and "render missing" in out.stderr
    out = _run("data_tools.renders", "--data", str(synth), "--split", "train", "--no-progress")
    assert out.returncode == 0, out.stderr
    out = _run("step4_selfconsistency.make_data", "--data", str(synth), "--out", str(tmp_path / "s4.jsonl"),
               "--renders", "renders/oracle", "--predictions", str(predictions))
    assert out.returncode == 0, out.stderr
    recs = records.read_records(tmp_path / "s4.jsonl", root=synth, verify_images=True)
    train = load_dataset(synth).split("train")
    held = {v["id"] for v in builders.select_part(train, "train", "held-out")}
    chain_records = [r for r in recs if r["id"].partition("#")[0] in held]
    assert {r["id"].partition("#")[0] for r in chain_records} == held
    answers = json.loads(predictions.read_text())
    checks = [r for r in chain_records if "#" not in r["id"]]
    assert checks and all(r["conversations"][1] == {"from": "gpt", "value": answers[r["id"]], "train": False}
                          for r in checks)  # the model's own first answer, context only
    # the fit views: one plain Q1 record each (stage 1's), so the first look keeps what stages 1-3 taught
    fit = [r for r in recs if r["id"] not in held and r["id"].partition("#")[0] not in held]
    assert sorted(r["id"] for r in fit) == sorted(v["id"] for v in train if v["id"] not in held)
    assert all(r["conversations"][0]["value"] == Q1 and len(r["conversations"]) == 2 and "render" not in r
               for r in fit)
    seconds = [r for r in recs if r.get("render")]
    assert len(seconds) == 8 * len(held)  # the default repeats
    assert all((synth / r["render"]).is_file() for r in seconds)
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
    """The check's labels from this project's own predictions.jsonl (one checkpoint chosen of two)."""
    views = load_dataset(synth).split("train")
    lines = []
    for name, wrong_every in (("a", 2), ("b", 3)):
        for k, v in enumerate(views):
            cat = v["category"] if k % wrong_every else ("jar" if v["category"] != "jar" else "can")
            lines.append({"checkpoint": name, "mode": "plain", "id": v["id"],
                          "answers": {"Q1": category_answer(cat)}, "final": category_answer(cat)})
    (tmp_path / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(OccError, match="several checkpoints"):
        builders.first_answers(views, tmp_path / "predictions.jsonl")
    clear, answers = builders.first_answers(views, tmp_path / "predictions.jsonl", checkpoint="b")
    assert [clear[v["id"]] for v in views] == [k % 3 != 0 for k in range(len(views))]
    assert answers == {x["id"]: x["final"] for x in lines if x["checkpoint"] == "b"}
