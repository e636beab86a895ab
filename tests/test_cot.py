"""Chain-of-thought inference (occmllm.chain): Q1, the check (Q6) read as P(No.), and where it
reaches the gate, the second look over the image blended with a reconstruction render; no ground truth may
steer it; the gate chosen on one run predicts the next run's accuracy."""
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import inference
from conftest import stop_inference_in_second_batch
from occmllm import chain
from occmllm.questions import category_answer, parse_category
from occmllm.scoring import truth_category

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def cot_setup(tiny_model, synth, tmp_path_factory):
    """A tiny InternVL taught for a few steps the chain's records: the check (``No.`` for views more
    than 30% occluded, so both branches run) and the second look over the image blended with its
    oracle render (alpha learnt, saved with the checkpoint); and a test file over ``synth``'s test views."""
    from data_tools import builders
    from data_tools.renders import render_views
    from occmllm.dataset import load_dataset
    from occmllm.sft import run
    work = tmp_path_factory.mktemp("cot")
    ds = load_dataset(synth)
    views = ds.split(None)
    render_views(synth, "renders/cot_oracle", None, progress=False)
    recs = []
    for v in views:
        truth = category_answer(v["category"])
        recs.append({"id": v["id"], "image": v["image"],
                     "conversations": chain.check_turns(truth, "No." if v["occlusion"] > 0.3 else "Yes.")})
        recs.append({"id": f"{v['id']}#second", "image": v["image"], "render": f"renders/cot_oracle/{v['id']}.png",
                     "conversations": chain.second_look_turns(truth)})
    builders.write_stage(recs, work / "train.jsonl", ds, "cot_train")
    builders.write_stage(builders.test_records(ds.split("test")), work / "test.jsonl", ds, "test")
    model = run(["--model_name_or_path", str(tiny_model), "--train_data", str(work / "train.jsonl"),
                 "--output_dir", str(work / "ckpt"), "--num_train_epochs", "6", "--per_device_train_batch_size", "8",
                 "--learning_rate", "0.003", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
                 "--disable_tqdm", "true", "--logging_steps", "50", "--dual_alpha", "0.5", "--dual_learnable", "true"],
                None)
    return work, model


def _run(argv):
    torch.manual_seed(0)
    assert inference.main(argv) == 0


def _predictions(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]


def test_cot_takes_no_ground_truth_and_reports_its_figures(cot_setup, recon_model, tmp_path):
    work, model = cot_setup
    # the same test file with every answer and label removed
    stripped = work / "stripped.jsonl"
    lines = []
    for line in (work / "test.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("meta", None)
        rec["conversations"] = [t for t in rec["conversations"] if t["from"] == "human"]  # questions alone
        lines.append(json.dumps(rec))
    stripped.write_text("\n".join(lines) + "\n")
    stripped.with_name("stripped.meta.json").write_text(
        (work / "test.meta.json").read_text().replace("test.jsonl", "stripped.jsonl"))

    common = ["--checkpoint", f"m={model}", "--mode", "cot", "--recon", str(recon_model), "--recon-resolution", "24",
              "--batch-size", "4"]
    # a gate between two of the views' P(No.), so both branches run
    _run([*common, "--data", str(work / "test.jsonl"), "--out", str(tmp_path / "probe"), "--gate", "0"])
    p_no = sorted({p["chain"]["p_no"] for p in _predictions(tmp_path / "probe")})
    assert len(p_no) > 1
    gate = (p_no[len(p_no) // 2 - 1] + p_no[len(p_no) // 2]) / 2
    common += ["--gate", str(gate)]
    _run([*common, "--data", str(work / "test.jsonl"), "--out", str(tmp_path / "full")])
    _run([*common, "--data", str(stripped), "--out", str(tmp_path / "stripped")])
    full, bare = _predictions(tmp_path / "full"), _predictions(tmp_path / "stripped")
    assert full == bare
    # graphed decoding (occmllm.decoding) takes the same branches and gives the same answers
    _run([*common, "--data", str(work / "test.jsonl"), "--out", str(tmp_path / "graphed"), "--decoding", "graphed"])
    graphed = _predictions(tmp_path / "graphed")
    assert [p["answers"] for p in graphed] == [p["answers"] for p in full]
    assert [p["chain"]["p_no"] for p in graphed] == pytest.approx([p["chain"]["p_no"] for p in full], abs=1e-5)
    bare_report = json.loads((tmp_path / "stripped/report.json").read_text())
    assert bare_report["unlabelled"] and bare_report["rows"][0]["final_accuracy"] is None
    assert bare_report["rows"][0]["cot"]["calibration"] is None  # nothing to calibrate against

    unclear = [p for p in full if p["answers"]["Q6"] == "No."]
    assert unclear and len(unclear) < len(full), "both branches must run"
    for p in full:  # the second look is taken exactly where P(No.) reaches the gate, and its answer is final
        assert p["chain"]["gate"] == gate
        assert ("Q1#2" in p["answers"]) == (p["answers"]["Q6"] == "No.") == (p["chain"]["p_no"] >= gate)
        assert p["final"] == p["answers"].get("Q1#2", p["answers"]["Q1"])
    renders = sorted(x.stem for x in (tmp_path / "full/renders").glob("*.png"))
    assert renders == sorted(p["id"] for p in unclear)

    row = json.loads((tmp_path / "full/report.json").read_text())["rows"][0]
    assert row["mode"] == "cot"
    assert row["cot"]["no_rate"] == pytest.approx(len(unclear) / len(full))
    # the check's AUC, from the predictions and the records' truths
    truths = {r["id"]: truth_category(r) for r in map(json.loads, (work / "test.jsonl").read_text().splitlines())}
    p_no = {right: [p["chain"]["p_no"] for p in full if (parse_category(p["answers"]["Q1"]) == truths[p["id"]]) == right]
            for right in (True, False)}
    pairs = [(w > r) + 0.5 * (w == r) for w in p_no[False] for r in p_no[True]]
    assert row["cot"]["check_auc"] == (pytest.approx(sum(pairs) / len(pairs)) if pairs else None)
    assert "Chain of thought" in (tmp_path / "full/report.md").read_text()


def test_the_gate_decides_the_second_look(tiny_model, cot_setup, recon_model, tmp_path, capsys):
    """Gate 0 looks again everywhere; a gate above every P(No.) nowhere (and makes no render)."""
    work, _ = cot_setup
    common = ["--checkpoint", f"base={tiny_model}", "--data", str(work / "test.jsonl"), "--mode", "cot", "--recon",
              str(recon_model), "--recon-resolution", "24", "--alpha", "0.5"]
    _run([*common, "--gate", "0", "--out", str(tmp_path / "all")])
    everywhere = _predictions(tmp_path / "all")
    assert everywhere and all("Q1#2" in p["answers"] for p in everywhere)
    top = max(p["chain"]["p_no"] for p in everywhere)
    assert top < 1
    _run([*common, "--gate", str(min(1.0, top + 1e-4)), "--out", str(tmp_path / "none"), "--no-mirror"])
    nowhere = _predictions(tmp_path / "none")
    assert all(p["chain"]["mirror"] for p in everywhere) and not any(p["chain"]["mirror"] for p in nowhere)
    assert all("Q1#2" not in p["answers"] and p["final"] == p["answers"]["Q1"] for p in nowhere)
    assert [p["answers"]["Q1"] for p in nowhere] == [p["answers"]["Q1"] for p in everywhere]
    assert not list((tmp_path / "none/renders").glob("*.png"))
    # benchmarks/chain_detectors.py reads that run: both detectors scored, on every view
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from chain_detectors import main as detectors
    assert detectors(["--checkpoint", str(tiny_model), "--predictions", str(tmp_path / "all/predictions.jsonl"),
                      "--data", str(work / "test.jsonl")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["views"] == len(everywhere)
    for figures in result["detectors"].values():
        assert figures["auc"] is None or 0 <= figures["auc"] <= 1
        assert figures["perfect_gain"] >= max(0.0, figures["fitted_gain"])
    assert [part["views"] for part in result["least_confident"]] == [max(1, int(len(everywhere) * s))
                                                                     for s in (0.1, 0.2, 1 / 3)]
    with pytest.raises(SystemExit) as refused:  # a run that did not look everywhere: a one-line error
        detectors(["--checkpoint", str(tiny_model), "--predictions", str(tmp_path / "none/predictions.jsonl"),
                   "--data", str(work / "test.jsonl")])
    assert refused.value.code == 2 and "--gate 0" in capsys.readouterr().err


def test_a_second_look_model_answers_the_second_look(tiny_model, cot_setup, recon_model, tmp_path):
    """A checkpoint with its own second-look model (``second_look/``, as stage 4 saves it): the
    first answer and the check are the checkpoint's, the second look is that model's, blended at
    that model's alpha, as each answers alone."""
    import shutil
    work, model = cot_setup
    ckpt = shutil.copytree(tiny_model, tmp_path / "ckpt")  # a first look that never learnt the blend
    shutil.copytree(model, ckpt / chain.SECOND_LOOK_DIR)
    assert chain.second_look_model(ckpt) == ckpt / chain.SECOND_LOOK_DIR
    common = ["--data", str(work / "test.jsonl"), "--mode", "cot", "--recon", str(recon_model),
              "--recon-resolution", "24", "--gate", "0"]
    _run(["--checkpoint", f"both={ckpt}", *common, "--out", str(tmp_path / "both")])
    _run(["--checkpoint", f"first={tiny_model}", *common, "--alpha", "0.5", "--out", str(tmp_path / "first")])
    _run(["--checkpoint", f"second={model}", *common, "--out", str(tmp_path / "second")])
    both, first, second = (_predictions(tmp_path / name) for name in ("both", "first", "second"))
    assert [p["answers"]["Q1"] for p in both] == [p["answers"]["Q1"] for p in first]
    assert [p["chain"]["p_no"] for p in both] == [p["chain"]["p_no"] for p in first]
    assert [p["answers"]["Q1#2"] for p in both] == [p["answers"]["Q1#2"] for p in second]
    assert [p["answers"]["Q1#2"] for p in both] != [p["answers"]["Q1#2"] for p in first]


def test_chain_parts_benchmark_asks_each_reading_as_inference_does(tiny_model, cot_setup, recon_model, tmp_path,
                                                                  capsys):
    """benchmarks/chain_parts.py on a checkpoint with its own second-look model: six readings, each
    an inference.py run whose report gives the accuracy the script prints; its chain row is the
    chain itself, and its first-look rows ask the checkpoint without its second-look model."""
    import shutil
    work, model = cot_setup
    ckpt = shutil.copytree(tiny_model, tmp_path / "ckpt")
    shutil.copytree(model, ckpt / chain.SECOND_LOOK_DIR)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import chain_parts
    out = tmp_path / "parts"
    assert chain_parts.main(["--checkpoint", str(ckpt), "--recon", str(recon_model), "--recon-resolution", "24",
                             "--data", str(work / "test.jsonl"), "--out", str(out), "--limit", "6"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [r["reading"] for r in rows] == [name for name, *_ in chain_parts.READINGS]
    for row, (_, folder, _, _) in zip(rows, chain_parts.READINGS):
        report = json.loads((out / folder / "report.json").read_text())["rows"][0]
        assert row["n"] == 6 and row["accuracy"] == pytest.approx(report["final_accuracy"])
    assert rows[0]["against_plain"]["final"]["delta"] == 0
    assert not (out / "first_look_checkpoint" / chain.SECOND_LOOK_DIR).exists()
    assert len(list((out / "renders").glob("*.png"))) == 6  # made once, read by every chain run
    _run(["--checkpoint", f"step4={ckpt}", "--data", str(work / "test.jsonl"), "--mode", "cot", "--gate", "0",
          "--recon", str(recon_model), "--recon-resolution", "24", "--limit", "6", "--batch-size", "32",
          "--max-new-tokens", "16", "--out", str(tmp_path / "chain")])
    assert _predictions(out / "chain") == _predictions(tmp_path / "chain")
    first = [p["answers"]["Q1"] for p in _predictions(out / "first_scored")]
    assert first == [p["answers"]["Q1"] for p in _predictions(tmp_path / "chain")]  # the checkpoint's first look


def test_gate_chosen_on_one_run_predicts_the_next(cot_setup, recon_model, tmp_path):
    """``python -m occmllm.chain gate`` on a run that looked everywhere writes the checkpoint's gate;
    a run with it (read from the checkpoint) scores the accuracy the choice predicted."""
    import shutil
    work, model = cot_setup
    ckpt = shutil.copytree(model, tmp_path / "ckpt")
    common = ["--checkpoint", f"m={ckpt}", "--data", str(work / "test.jsonl"), "--mode", "cot", "--recon",
              str(recon_model), "--recon-resolution", "24"]
    _run([*common, "--gate", "0", "--out", str(tmp_path / "sweep")])
    assert chain.main(["gate", "--predictions", str(tmp_path / "sweep/predictions.jsonl"), "--data",
                       str(work / "test.jsonl"), "--save", str(ckpt)]) == 0
    choice = json.loads((ckpt / chain.GATE_FILE).read_text())
    assert chain.read_gate(ckpt) == choice["gate"]
    _run([*common, "--out", str(tmp_path / "gated")])
    gated = _predictions(tmp_path / "gated")
    assert {p["chain"]["gate"] for p in gated} == {choice["gate"]}
    row = json.loads((tmp_path / "gated/report.json").read_text())["rows"][0]
    assert row["final_accuracy"] == pytest.approx(choice["accuracy"])
    assert row["final_accuracy"] >= choice["first_only_accuracy"]


def test_plain_and_cot_rows_share_one_report(cot_setup, recon_model, tmp_path, capsys):
    work, model = cot_setup
    out = tmp_path / "both"
    _run(["--checkpoint", f"m={model}", "--data", str(work / "test.jsonl"), "--out", str(out), "--limit", "6"])
    _run(["--checkpoint", f"m={model}", "--data", str(work / "test.jsonl"), "--out", str(out), "--limit", "6",
          "--mode", "cot", "--recon", str(recon_model), "--recon-resolution", "24"])
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [(r["checkpoint"], r["mode"]) for r in rows] == [("m", "plain"), ("m", "cot")]
    # the cached renders were made on a 24^3 grid: another grid in the same folder is refused
    with pytest.raises(SystemExit) as exc:
        inference.main(["--checkpoint", f"m={model}", "--data", str(work / "test.jsonl"), "--out", str(out),
                        "--limit", "6", "--mode", "dual", "--alpha", "1", "--recon", str(recon_model),
                        "--recon-resolution", "32"])
    assert exc.value.code == 2
    assert "--recon-resolution was 24, now 32" in capsys.readouterr().err


def test_cot_needs_a_reconstruction_model(cot_setup, tmp_path, capsys):
    work, model = cot_setup
    with pytest.raises(SystemExit) as exc:
        inference.main(["--checkpoint", f"m={model}", "--data", str(work / "test.jsonl"), "--out", str(tmp_path),
                        "--mode", "cot"])
    assert exc.value.code == 2 and "--recon" in capsys.readouterr().err


# --- the dual visual path in inference (OCC-MLLM-Alpha) ----------------------------------------------

def test_dual_mode_at_alpha_one_answers_as_plain(tiny_model, cot_setup, recon_model, tmp_path, capsys):
    """alpha = 1 keeps only the image's visual tokens: every answer is the plain mode's; the
    renders are made and cached all the same."""
    work, model = cot_setup
    common = ["--checkpoint", f"m={model}", "--data", str(work / "test.jsonl"), "--batch-size", "4"]
    _run([*common, "--out", str(tmp_path / "plain")])
    dual = ["--mode", "dual", "--recon", str(recon_model), "--recon-resolution", "24"]
    _run([*common, *dual, "--alpha", "1", "--out", str(tmp_path / "dual1")])
    plain, one = _predictions(tmp_path / "plain"), _predictions(tmp_path / "dual1")
    assert [(p["id"], p["answers"]) for p in plain] == [(p["id"], p["answers"]) for p in one]
    assert {p["mode"] for p in one} == {"dual"}
    assert len(list((tmp_path / "dual1/renders").glob("*.png"))) == len(plain)
    # the chain's second look at alpha = 1 is its first look: the same question, over the image alone
    _run([*common, *dual, "--mode", "cot", "--gate", "0", "--alpha", "1", "--out", str(tmp_path / "cot1")])
    looks = _predictions(tmp_path / "cot1")
    assert looks and all(p["answers"]["Q1#2"] == p["answers"]["Q1"] for p in looks)
    _run([*common, *dual, "--alpha", "0", "--out", str(tmp_path / "dual0")])
    assert len(_predictions(tmp_path / "dual0")) == len(plain)  # the blend itself is tested in test_dual.py
    rows = json.loads((tmp_path / "dual0/report.json").read_text())["rows"]
    assert [(r["checkpoint"], r["mode"]) for r in rows] == [("m", "dual")]
    # no alpha: the checkpoint was not trained on the dual path and none is given, in either mode that blends
    capsys.readouterr()
    for mode in ("dual", "cot"):
        with pytest.raises(SystemExit) as exc:
            inference.main(["--checkpoint", f"base={tiny_model}", *common[2:], *dual, "--mode", mode,
                            "--out", str(tmp_path / "none")])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "\n" not in err and "dual_alpha.json" in err and "--alpha" in err
    # an alpha outside [0, 1] is refused before anything runs or is written
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit) as exc:
            inference.main([*common, *dual, "--alpha", bad, "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "\n" not in err and "--alpha" in err and "[0, 1]" in err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("mode", ["cot", "dual"])
def test_workers_make_the_renders(cot_setup, recon_model, tmp_path, monkeypatch, mode):
    """--workers 2 in a mode that blends a render: the workers reconstruct every record (the main
    process none, cot's records the gate passes by too) and the predictions and renders are byte
    for byte those made without workers."""
    import os

    from reconstruction.reconstruct import Reconstructor
    work, model = cot_setup
    argv = ["--checkpoint", f"m={model}", "--data", str(work / "test.jsonl"), "--mode", mode, "--recon",
            str(recon_model), "--recon-resolution", "24", "--batch-size", "4", "--alpha", "0.5"]
    _run([*argv, "--out", str(tmp_path / "main")])
    main, reconstruct = os.getpid(), Reconstructor.__call__

    def off_main(self, views):
        assert os.getpid() != main, "reconstructed on the main process"
        return reconstruct(self, views)

    monkeypatch.setattr(Reconstructor, "__call__", off_main)
    _run([*argv, "--out", str(tmp_path / "workers"), "--workers", "2"])
    assert (tmp_path / "workers/predictions.jsonl").read_bytes() == (tmp_path / "main/predictions.jsonl").read_bytes()
    made = {p.name: p.read_bytes() for p in (tmp_path / "workers/renders").glob("*.png")}
    assert len(made) == len(_predictions(tmp_path / "main"))
    in_place = {p.name: p.read_bytes() for p in (tmp_path / "main/renders").glob("*.png")}
    assert all(made[name] == data for name, data in in_place.items())
    assert len(in_place) == (len(made) if mode == "dual" else 0)  # this cot model's gate never looks again


def test_a_record_without_its_view_is_refused_before_anything_runs(cot_setup, recon_model, tmp_path, capsys):
    """A mode that blends a render needs every record's view in the dataset (its masks and depth):
    a record that names none is a one-line error before any file is written."""
    work, model = cot_setup
    recs = [json.loads(x) for x in (work / "test.jsonl").read_text().splitlines()]
    recs[-1]["id"] = "not-a-view"
    bad = work / "no_view.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    (work / "no_view.meta.json").write_text((work / "test.meta.json").read_text().replace("test.jsonl", "no_view.jsonl"))
    with pytest.raises(SystemExit) as exc:
        inference.main(["--checkpoint", f"m={model}", "--data", str(bad), "--mode", "dual", "--recon",
                        str(recon_model), "--recon-resolution", "24", "--alpha", "0.5", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "\n" not in err and "'not-a-view'" in err and "manifest.jsonl" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["cot", "dual"])
def test_interrupted_cot_and_dual_runs_resume_to_the_same_file(cot_setup, recon_model, tmp_path, monkeypatch, mode):
    """Stopped in its second batch (first batch's predictions and renders on disk), started again:
    the same predictions.jsonl, byte for byte, as a run never stopped."""
    work, model = cot_setup
    argv = ["--checkpoint", f"m={model}", "--data", str(work / "test.jsonl"), "--mode", mode, "--recon",
            str(recon_model), "--recon-resolution", "24", "--batch-size", "3"]
    if mode == "dual":
        argv += ["--alpha", "0.5"]
    _run([*argv, "--out", str(tmp_path / "full")])
    stop_inference_in_second_batch(monkeypatch, mode)
    with pytest.raises(SystemExit) as exc:
        _run([*argv, "--out", str(tmp_path / "resumed")])
    assert exc.value.code == 130
    assert len(_predictions(tmp_path / "resumed")) == 3 and not (tmp_path / "resumed/report.json").exists()
    monkeypatch.undo()
    _run([*argv, "--out", str(tmp_path / "resumed")])
    full = (tmp_path / "full/predictions.jsonl").read_bytes()
    assert (tmp_path / "resumed/predictions.jsonl").read_bytes() == full and len(full.splitlines()) > 3

    def scores(name):  # the report's figures, less the timings
        rows = json.loads((tmp_path / f"{name}/report.json").read_text())["rows"]
        return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")} for row in rows]
    assert scores("resumed") == scores("full")


def test_a_run_resumed_with_another_gate_or_reading_is_refused(cot_setup, recon_model, tmp_path, capsys):
    """The gate lives in the checkpoint and changes when one is chosen (``occmllm.chain gate --save``):
    asked again into the same folder, the chain must not keep the answers of the old gate beside
    those of the new one. A changed gate, or the mirrored reading turned off, is a one-line error
    that leaves the predictions as they were; the same settings resume with nothing to redo."""
    import shutil
    work, model = cot_setup
    ckpt = shutil.copytree(model, tmp_path / "ckpt")
    (ckpt / chain.GATE_FILE).write_text(json.dumps({"gate": 0.0}))
    out = tmp_path / "out"
    argv = ["--checkpoint", f"m={ckpt}", "--data", str(work / "test.jsonl"), "--mode", "cot", "--recon",
            str(recon_model), "--recon-resolution", "24", "--limit", "2", "--out", str(out)]
    _run(argv)
    before = (out / "predictions.jsonl").read_bytes()
    assert json.loads((out / "run.json").read_text())["answering"]["m (cot)"]["gate"] == 0.0
    (ckpt / chain.GATE_FILE).write_text(json.dumps({"gate": 0.9}))
    for changed, said in ((argv, "gate 0.9"), ([*argv, "--gate", "0", "--no-mirror"], "mirror False")):
        with pytest.raises(SystemExit) as exc:
            inference.main(changed)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "\n" not in err and "m (cot)" in err and said in err, err
        assert (out / "predictions.jsonl").read_bytes() == before
    _run([*argv, "--gate", "0"])  # the settings it answered with: all done, nothing added
    assert (out / "predictions.jsonl").read_bytes() == before


def test_a_checkpoint_asked_again_alike_under_another_name_is_copied(cot_setup, recon_model, tmp_path, capsys):
    """The demo asks stage 4's chain on validation at gate 0 (row step4-always), then at the gate
    chosen on it (row step4). Where that gate is 0 the second row is the first: it is copied, with no
    timing since nothing ran, and reported alike. A name asked with another gate is answered afresh."""
    import shutil
    work, model = cot_setup
    ckpt = shutil.copytree(model, tmp_path / "ckpt")
    (ckpt / chain.GATE_FILE).write_text(json.dumps({"gate": 0.0}))
    out = tmp_path / "out"
    common = ["--data", str(work / "test.jsonl"), "--mode", "cot", "--recon", str(recon_model),
              "--recon-resolution", "24", "--limit", "3", "--out", str(out)]
    _run(["--checkpoint", f"always={ckpt}", "--gate", "0", *common])
    capsys.readouterr()
    _run(["--checkpoint", f"chosen={ckpt}", *common])  # the checkpoint's own gate, 0
    assert "3 samples answered as always (cot)" in capsys.readouterr().out
    rows = _predictions(out)
    always, chosen = ([r for r in rows if r["checkpoint"] == name] for name in ("always", "chosen"))
    assert len(always) == 3 and [dict(r, checkpoint="always") for r in chosen] == always
    assert {json.loads(t)["checkpoint"] for t in (out / "timing.jsonl").read_text().splitlines()} == {"always"}
    scored = {r["checkpoint"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert scored["chosen"]["final_accuracy"] == scored["always"]["final_accuracy"]
    assert scored["chosen"]["samples_per_s"] is None
    _run(["--checkpoint", f"gated={ckpt}", "--gate", "0.9", *common])
    assert "answered as" not in capsys.readouterr().out
    assert sum(r["checkpoint"] == "gated" for r in _predictions(out)) == 3


def test_inference_benchmark_runs_every_mode_on_tiny_models(cot_setup, recon_model, tmp_path):
    """benchmarks/bench_inference.py (make bench) on the tiny models, so it cannot rot: the batched
    answers, each turn fed after the last one's kept keys and values, are word for word those of
    its one-record-at-a-time loop that prompts each turn whole; the chain and test-time adaptation
    figures are made (the latter one record at a time and batched, alike)."""
    import os
    import shutil
    import subprocess
    import sys

    from occmllm import clip
    work, model = cot_setup
    tiny_clip = clip.build(tmp_path / "clip", image_size=32)
    always = shutil.copytree(model, tmp_path / "always")  # a gate of 0: every record takes the second look
    (always / chain.GATE_FILE).write_text(json.dumps({"gate": 0.0}))
    out = subprocess.run([sys.executable, "benchmarks/bench_inference.py", "--checkpoint", str(model), "--data",
                          str(work / "test.jsonl"), "--samples", "8", "--cot-checkpoint", str(always), "--recon",
                          str(recon_model), "--clip", str(tiny_clip), "--threads", "1"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["identical"] and result["samples"] == 8 and result["questions"] == 40
    assert set(result["speedup"]) == {"1", "8", "32"}
    assert result["cot"]["cot_s"] > 0 and result["cot"]["reconstructed"] == 8
    assert result["tta"]["identical"]


def test_tta_judged_by_the_second_look(tiny_model, synth, cot_setup, recon_model, tmp_path):
    """``--tta second-look``: the reward is the second-look model's probability of each candidate
    (among the first look's K likeliest) over the image blended with its render, renormalised over
    the candidates. The judge's scores match an independent reading of that blend
    (``occmllm.dual.blended_features``, the training path), they change when the render does, and the
    command's best-of-K row is, record by record, the candidate they rank first."""
    import shutil

    from occmllm import modes, tta
    from occmllm.answering import Answerer, sample_of
    from occmllm.conversation import load_images
    from occmllm.dual import blended_features, resolve_alpha
    from occmllm.model import load_model
    from occmllm.questions import Q1
    from occmllm.records import render_path
    work, model = cot_setup
    ckpt = shutil.copytree(tiny_model, tmp_path / "ckpt")
    shutil.copytree(model, ckpt / chain.SECOND_LOOK_DIR)
    command = ["--checkpoint", f"m={ckpt}", "--data", str(work / "test.jsonl"), "--tta", "second-look", "--recon",
               str(recon_model), "--recon-resolution", "24", "--tta-k", "3", "--tta-steps", "2", "--limit", "8"]
    _run([*command, "--out", str(tmp_path / "run")])
    _run([*command, "--out", str(tmp_path / "workers"), "--workers", "1", "--batch-size", "4"])
    # images made by a worker, in two batches: the same file
    assert (tmp_path / "workers/predictions.jsonl").read_bytes() == (tmp_path / "run/predictions.jsonl").read_bytes()
    lines = _predictions(tmp_path / "run")
    assert [p["mode"] for p in lines] == ["tta-second-look", "best-of-3-second-look"] * 8
    rows = json.loads((tmp_path / "run/report.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["tta-second-look", "best-of-3-second-look"]

    records = [json.loads(x) for x in (work / "test.jsonl").read_text().splitlines()[:8]]
    batch = [sample_of(rec, synth) for rec in records]
    first, second = (Answerer(*load_model(path), max_new_tokens=8) for path in (ckpt, model))
    encoder = first.encoder
    alpha = resolve_alpha(model)
    tiled = [first.tiled(s.images[:1]) for s in batch]
    plain = [f for f, _ in first.encode(tiled)]
    cands = tta.candidates(first.model, encoder, Q1, plain, [t for _, t in tiled], 3)

    class Renders:  # the render of each record, as RenderCache.paths gives them
        def __init__(self, path_of):
            self.path_of = path_of

        def paths(self, ids):
            return [self.path_of(i) for i in ids]

    def judged(path_of, mirror=True) -> list[torch.Tensor]:
        context = modes.Context(renders=Renders(path_of), alpha=alpha, second_look=second, mirror=mirror)
        return modes.second_look_scores(first, batch, tiled, cands, context)

    def independent(path_of, mirror=True) -> list[torch.Tensor]:
        """Each record's image and render decoded here, flipped by PIL for the mirrored reading."""
        out = []
        for rec, (_, tiles), cs in zip(records, tiled, cands):
            ll = 0
            for flip in (False, True) if mirror else (False,):
                image, render = load_images([synth / rec["image"], path_of(rec["id"])])
                if flip:
                    image, render = (x.transpose(Image.FLIP_LEFT_RIGHT) for x in (image, render))
                (pixels, _), (render_pixels, _) = encoder.pixel_values([image]), encoder.pixel_values([render])
                with torch.no_grad():
                    blended = blended_features(second.model, pixels, render_pixels, alpha)
                    ll = ll + tta.answer_log_likelihoods(second.model, tta.answer_batch(
                        encoder, chain.SECOND_LOOK, [[category_answer(c) for c in cs]], [tiles]), [blended])
            out.append(ll.softmax(0))
        return out

    def renders(i):
        return render_path(tmp_path / "run/renders", i)

    def images(i):
        return synth / next(rec["image"] for rec in records if rec["id"] == i)

    scores = judged(renders)
    for got, want in zip(scores, independent(renders)):
        assert torch.allclose(got, want, rtol=0, atol=1e-6) and abs(got.sum().item() - 1) < 1e-5
    as_they_are = judged(renders, mirror=False)
    for got, want in zip(as_they_are, independent(renders, mirror=False)):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    # the mirrored reading is not the same reading again
    assert max((a - b).abs().max().item() for a, b in zip(scores, as_they_are)) > 1e-4
    assert [category_answer(cs[int(s.argmax())]) for cs, s in zip(cands, scores)] == \
        [p["final"] for p in lines if p["mode"] == "best-of-3-second-look"]
    as_images = judged(images)  # no render: the blend is the image alone
    for got, want in zip(as_images, independent(images)):
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    # the tiny judge is sure of most records, so the render moves its probabilities by little, but
    # far beyond the float error of the two computations above
    assert max((a - b).abs().max().item() for a, b in zip(scores, as_images)) > 2e-5


def test_the_report_shows_the_stored_gate_and_its_fresh_gain(tiny_model, cot_setup, recon_model, tmp_path):
    """A gate chosen by ``occmllm.chain gate --save`` and read from the checkpoint: the report's chain
    row names it, with its gain where chosen and on views it was not chosen on; a run at another
    gate has neither gain."""
    import shutil
    work, _ = cot_setup
    model = shutil.copytree(tiny_model, tmp_path / "model")  # the gate is written into the checkpoint
    common = ["--checkpoint", f"m={model}", "--data", str(work / "test.jsonl"), "--mode", "cot", "--recon",
              str(recon_model), "--recon-resolution", "24", "--alpha", "0.5"]
    _run([*common, "--gate", "0", "--out", str(tmp_path / "all")])
    assert chain.main(["gate", "--predictions", str(tmp_path / "all/predictions.jsonl"), "--data",
                       str(work / "test.jsonl"), "--save", str(model)]) == 0
    stored = json.loads((model / chain.GATE_FILE).read_text())
    assert set(stored["gain_on_fresh_views"]) == {"mean", "p5", "p95", "share_positive", "resamples"}
    _run([*common, "--out", str(tmp_path / "gated")])
    row = json.loads((tmp_path / "gated/report.json").read_text())["rows"][0]
    assert row["cot"]["gate"] == pytest.approx(stored["gate"], abs=1e-6)
    choice = row["cot"]["gate_choice"]
    assert choice["fitted_gain"] == pytest.approx(100 * (stored["accuracy"] - stored["first_only_accuracy"]))
    assert choice["gain_on_fresh_views"] == stored["gain_on_fresh_views"]
    fresh = choice["gain_on_fresh_views"]
    assert f"{choice['fitted_gain']:+.1f} / {fresh['mean']:+.1f}" in (tmp_path / "gated/report.md").read_text()
    everywhere = json.loads((tmp_path / "all/report.json").read_text())["rows"][0]["cot"]
    assert everywhere["gate"] == 0 and "gate_choice" not in everywhere
