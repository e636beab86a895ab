"""inference.py, occmllm.scoring and occmllm.report: batched greedy answers, resuming, scoring, reports,
bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import inference
from occmllm import report, scoring
from occmllm.questions import CATEGORIES, category_answer, is_correct

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _noisy_copy(src: Path, dst: Path, seed: int) -> Path:
    """The tiny checkpoint with its weights shaken and its end-of-turn token made likelier: random
    models of occmllm.tiny answer every prompt with the same newline; this one gives answers that
    vary with the image and the history and end at different lengths (what padding must survive)."""
    from transformers import InternVLForConditionalGeneration
    shutil.copytree(src, dst)
    model = InternVLForConditionalGeneration.from_pretrained(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        model.get_input_embeddings().weight[model.config.text_config.eos_token_id] *= 3.0
    model.save_pretrained(dst)
    return dst




@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("inference_models")
    return {"a": _noisy_copy(tiny_model, base / "a", 1), "b": _noisy_copy(tiny_model, base / "b", 2)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """16 scenes x 2 views at 64 px; test.jsonl asks Q1-Q5 about every view (32 records)."""
    from data_tools import builders
    from data_tools.synthocc import Settings, generate
    from occmllm.dataset import load_dataset
    out = generate(tmp_path_factory.mktemp("inference_data") / "data", Settings(scenes=16, views=2, seed=0, size=64),
                   progress=False)
    ds = load_dataset(out)
    builders.write_stage(builders.test_records(ds.split(None)), out / "test.jsonl", ds, "test")
    return out


def run(*argv) -> None:
    assert inference.main([str(a) for a in argv]) == 0


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def batched(models, dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("batched")
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", out, "--batch-size", 8)
    return out


def test_batched_and_one_by_one_give_the_same_answers(batched, models, dataset, tmp_path):
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", tmp_path, "--batch-size", 1)
    preds = lines(batched / "predictions.jsonl")
    assert len(preds) == 32 and [p["id"] for p in preds] == [p["id"] for p in lines(dataset / "test.jsonl")]
    finals = [p["final"] for p in preds]
    # the check means something only if answers differ between samples and in length (early stops)
    assert len(set(finals)) > 16
    assert len({len(a) for p in preds for a in p["answers"].values()}) > 10
    assert all(p["question_ids"] == ["Q1", "Q2", "Q3", "Q4", "Q5"] and p["final"] == p["answers"]["Q1"] for p in preds)
    assert (tmp_path / "predictions.jsonl").read_bytes() == (batched / "predictions.jsonl").read_bytes()


def test_each_turn_feeds_only_its_new_tokens_and_answers_as_whole_prompts(models, dataset):
    """The plain questioning keeps each turn's keys and values (occmllm.answering.Dialogue): turns
    2-5 feed the language model only what follows the last prompt, not the image or the history
    again, and every answer is the one of prompting each turn whole."""
    from occmllm.answering import Answerer, load_test, sample_of
    from occmllm.model import load_model
    from occmllm.modes import ask_in_turn
    model, processor = load_model(models["a"], device="cpu", dtype=torch.float32)
    answerer = Answerer(model, processor, 32)
    samples = [sample_of(r, dataset) for r in load_test(dataset / "test.jsonl", dataset, 8)]
    fed: list[int] = []  # the width of each prompt pass (decoding steps feed 1 token)

    def record(module, args, kwargs, output):
        width = kwargs["inputs_embeds"].shape[1]
        if width > 1:
            fed.append(width)

    hook = model.model.language_model.register_forward_hook(record, with_kwargs=True)
    try:
        results = {}
        for reuse in (False, True):
            fed.clear()
            results[reuse] = (ask_in_turn(answerer, samples, answerer.images([s.images for s in samples]), reuse),
                              list(fed))
    finally:
        hook.remove()
    (whole, whole_fed), (kept, kept_fed) = results[False], results[True]
    assert kept == whole
    assert len({a for r in kept for a in r["answers"].values()}) > 8  # answers that differ: a real check
    assert len(whole_fed) == len(kept_fed) == 5 and kept_fed[0] == whole_fed[0]
    # each row's new tokens are its whole prompt less at least the first prompt (image and Q1, the
    # same length in every row), so a turn feeds at most its whole width less the first's
    assert all(k <= w - whole_fed[0] for k, w in zip(kept_fed[1:], whole_fed[1:]))
    assert sum(kept_fed) < 0.6 * sum(whole_fed)


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_answers_and_compiles_once(batched, models, dataset, tmp_path):
    """--decoding compiled (static KV buffers, each decoding step one torch.compile graph): the same
    predictions file as today's dynamic decoding, and one compiled graph, made before the first
    batch (the warm-up's 12 short prompts), for batches of 12, 12 and 8 and their 5 turns of
    other widths: neither the last batch's size nor any prompt width compiles anew."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", tmp_path / "compiled",
        "--batch-size", 12, "--decoding", "compiled")
    assert counters["stats"]["unique_graphs"] == 1
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", tmp_path / "dynamic",
        "--batch-size", 12)
    for name in ("compiled", "dynamic"):  # batches of 12 answer as batches of 8 do
        assert (tmp_path / name / "predictions.jsonl").read_bytes() == (batched / "predictions.jsonl").read_bytes()
    torch._dynamo.reset()


def test_graphed_decoding_gives_the_same_answers(batched, models, dataset, tmp_path):
    """--decoding graphed (fixed KV buffers, our own greedy loop; CUDA graphs only on a GPU): the
    same predictions file as generate's dynamic decoding, for batches of 12, 12 and 8, whose later
    turns are fed padded to a multiple of SUFFIX_STEP after the kept keys and values."""
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", tmp_path,
        "--batch-size", 12, "--decoding", "graphed")
    assert (tmp_path / "predictions.jsonl").read_bytes() == (batched / "predictions.jsonl").read_bytes()


def test_graphs_bookkeeping_off_a_gpu(batched, models, dataset, tmp_path, monkeypatch):
    """Graphed decoding's graph bookkeeping, run on the CPU: each pass is "captured" as a recording
    that later runs it again over the very buffers it was captured with, as a CUDA graph does (new
    inputs reach it only by being copied into them). The warm-up runs for real, so whatever it
    changes must be put back. The predictions file is still generate's, and
    a batch size needs few graphs: a decoding step and a width or two of new tokens."""
    from occmllm import decoding
    recorded = []

    def record(self, work):
        work()  # the warm-up (a capture only records)
        recorded.append(work)
        return work

    init = decoding.GraphedDecoder.__init__

    def init_with_graphs(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.graphs_on = True

    monkeypatch.setattr(decoding.GraphedDecoder, "_record", record)
    monkeypatch.setattr(decoding.GraphedDecoder, "__init__", init_with_graphs)
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", tmp_path,
        "--batch-size", 12, "--decoding", "graphed")
    assert (tmp_path / "predictions.jsonl").read_bytes() == (batched / "predictions.jsonl").read_bytes()
    assert 4 <= len(recorded) <= 6  # batch sizes 12 and 8: a decoding step each, and 1-2 widths of new tokens


def test_graphed_decoding_reads_the_check_as_generate_does(models, dataset):
    """The chain's check after its first answer (Answerer.p_no over a kept dialogue): graphed
    decoding's P(No.) is generate's, and its answers after the check too."""
    from occmllm.answering import Answerer, Dialogue, Prompt, load_test, sample_of
    from occmllm.model import load_model
    from occmllm.questions import Q1, Q2, answer_in_history
    model, processor = load_model(models["b"], device="cpu", dtype=torch.float32)
    samples = [sample_of(r, dataset) for r in load_test(dataset / "test.jsonl", dataset, 6)]
    out = {}
    for decoding in ("dynamic", "graphed"):
        answerer = Answerer(model, processor, 12, decoding)
        images = answerer.images([s.images for s in samples])
        dialogue, first = Dialogue(), [{"from": "human", "value": Q1}]
        answers = answerer([Prompt(first, f, t) for f, t in images], dialogue)
        turns = [[*first, {"from": "gpt", "value": answer_in_history(a)}, {"from": "human", "value": Q2}]
                 for a in answers]
        p_no = answerer.p_no([Prompt(c, f, t) for c, (f, t) in zip(turns, images)], dialogue)
        out[decoding] = answers, p_no, answerer([Prompt(c, f, t) for c, (f, t) in zip(turns, images)], dialogue)
    assert out["graphed"][0] == out["dynamic"][0] and out["graphed"][2] == out["dynamic"][2]
    assert out["graphed"][1] == pytest.approx(out["dynamic"][1], abs=1e-5)
    assert len(set(out["dynamic"][0])) > 1  # answers that differ between images: a real check


def test_workers_make_every_image_and_answer_alike(batched, models, dataset, tmp_path, monkeypatch):
    """--workers 2: worker processes decode and tile every image (the main process decodes none),
    and the predictions file is byte for byte the one made without workers."""
    import os

    from occmllm import conversation
    main, load = os.getpid(), conversation.load_images

    def load_off_main(paths, context=None):
        assert os.getpid() != main, f"{paths}: decoded on the main process"
        return load(paths, context)

    monkeypatch.setattr(conversation, "load_images", load_off_main)
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", tmp_path, "--batch-size", 8,
        "--workers", 2)
    assert (tmp_path / "predictions.jsonl").read_bytes() == (batched / "predictions.jsonl").read_bytes()


def test_images_made_ahead_are_the_images_made_in_place(models, dataset, tmp_path):
    """A sample of two images (one tiled into several tiles) gets the same pixel tiles and counts
    from ``ready_images`` as from decoding it in place."""
    from PIL import Image

    from occmllm.answering import Answerer, Sample, ready_images
    from occmllm.model import load_model
    model, processor = load_model(models["a"], device="cpu", dtype=torch.float32)
    processor.image_processor.crop_to_patches, processor.image_processor.max_patches = True, 6  # dynamic tiles
    answerer = Answerer(model, processor, 4)
    small = sorted(dataset.glob("scenes/*/rgb_00.png"))[0]
    wide = tmp_path / "wide.png"
    Image.open(small).resize((256, 64)).save(wide)  # a wide image: several tiles and a thumbnail
    batch = [Sample("a", (small, wide), ()), Sample("b", (wide,), ())]
    in_place = [answerer.tiled(s.images) for s in batch]
    answerer.ready = ready_images(answerer.encoder, batch)
    ahead = [answerer.tiled(s.images) for s in batch]
    assert in_place[0][1][1] > 1 and in_place[0][1] == ahead[0][1] and in_place[1][1] == ahead[1][1]
    for (a, _), (b, _) in zip(in_place, ahead):
        assert torch.equal(a, b)


def unlabelled_copy(src: Path, dst: Path) -> Path:
    """The test file with its answers and meta removed: the questions alone (human turns only)."""
    recs = lines(src)
    for rec in recs:
        rec.pop("meta", None)
        rec["conversations"] = [t for t in rec["conversations"] if t["from"] == "human"]
    dst.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return dst


def test_unlabelled_records_are_answered_as_the_labelled_ones(batched, models, dataset, tmp_path):
    data = unlabelled_copy(dataset / "test.jsonl", tmp_path / "questions.jsonl")
    run("--checkpoint", f"a={models['a']}", "--data", data, "--data-root", dataset, "--out", tmp_path / "run",
        "--batch-size", 8)
    assert (tmp_path / "run/predictions.jsonl").read_bytes() == (batched / "predictions.jsonl").read_bytes()
    rep = json.loads((tmp_path / "run/report.json").read_text())
    assert rep["unlabelled"] is True and rep["labelled"] == 0 and rep["confusion"] is None
    row, = rep["rows"]
    assert row["n"] == 32 and row["final_accuracy"] is None and row["accuracy"] == {} and row["final_scored"] == 0
    md = (tmp_path / "run/report.md").read_text()
    assert "unlabelled" in md and "predictions.jsonl" in md and "0.000" not in md
    # the labelled run scores every record
    labelled = json.loads((batched / "report.json").read_text())
    assert labelled["unlabelled"] is False and labelled["labelled"] == 32
    assert labelled["rows"][0]["final_scored"] == 32


def test_partly_labelled_file_scores_the_labelled_records_only(batched, models, dataset, tmp_path):
    recs = lines(dataset / "test.jsonl")
    for rec in recs[::2]:  # every other record loses its answers
        rec["conversations"] = [t for t in rec["conversations"] if t["from"] == "human"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run("--checkpoint", f"a={models['a']}", "--data", tmp_path / "t.jsonl", "--data-root", dataset,
        "--out", tmp_path / "run", "--batch-size", 8)
    row = json.loads((tmp_path / "run/report.json").read_text())["rows"][0]
    preds = {p["id"]: p for p in lines(batched / "predictions.jsonl")}
    scored = recs[1::2]
    expected = sum(is_correct("Q1", preds[r["id"]]["final"], r["conversations"][1]["value"]) for r in scored)
    assert row["n"] == 32 and row["final_scored"] == 16 and row["final_correct"] == expected
    assert row["answered"]["Q1"] == 16 and sum(b["n"] for b in row["by_occlusion"]) == 16
    assert "Only 16 of them have reference answers" in (tmp_path / "run/report.md").read_text()


def test_answers_do_not_depend_on_reference_answers_or_meta(batched, models, dataset, tmp_path):
    recs = lines(dataset / "test.jsonl")
    for rec in recs:  # wrong reference answers and meta: generation must not see them
        rec["meta"] = {"category": "knife", "occlusion": 0.0}
        for turn in rec["conversations"]:
            if turn["from"] == "gpt":
                turn["value"] = "The object is knife."
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    run("--checkpoint", f"a={models['a']}", "--data", tmp_path / "t.jsonl", "--data-root", dataset,
        "--out", tmp_path / "run", "--batch-size", 8)
    assert (tmp_path / "run/predictions.jsonl").read_bytes() == (batched / "predictions.jsonl").read_bytes()


def test_an_interrupted_run_resumes_to_the_same_file(models, dataset, tmp_path):
    args = ["--checkpoint", f"a={models['a']}", "--checkpoint", f"b={models['b']}", "--data", dataset / "test.jsonl",
            "--limit", 10, "--batch-size", 4]
    run(*args, "--out", tmp_path / "full")
    full = (tmp_path / "full/predictions.jsonl").read_bytes()
    rows = full.splitlines(keepends=True)
    assert len(rows) == 20 and [json.loads(r)["checkpoint"] for r in rows] == ["a"] * 10 + ["b"] * 10
    for k in (0, 13):  # killed in the first checkpoint's first batch, and in the second checkpoint
        out = tmp_path / f"resumed{k}"
        out.mkdir()
        (out / "predictions.jsonl").write_bytes(b"".join(rows[:k]) + rows[k][: len(rows[k]) // 2])
        run(*args, "--out", out)
        assert (out / "predictions.jsonl").read_bytes() == full
        run(*args, "--out", out)  # all done: nothing is added
        assert (out / "predictions.jsonl").read_bytes() == full
    # a resumed run with other generation settings would mix answers: refused
    with pytest.raises(SystemExit) as exc:
        inference.main([str(a) for a in [*args, "--out", tmp_path / "full", "--max-new-tokens", 5]])
    assert exc.value.code == 2


def test_several_test_files_in_one_command_are_each_as_alone(models, dataset, tmp_path):
    """Two (--data, --out) pairs in one command write, file for file, what a command per pair writes."""
    second = tmp_path / "second.jsonl"
    second.write_text("".join((dataset / "test.jsonl").read_text().splitlines(keepends=True)[5:12]))
    common = ["--checkpoint", f"a={models['a']}", "--checkpoint", f"b={models['b']}", "--data-root", dataset,
              "--limit", 6, "--batch-size", 4]
    run(*common, "--data", dataset / "test.jsonl", "--out", tmp_path / "one", "--data", second, "--out", tmp_path / "two")
    run(*common, "--data", dataset / "test.jsonl", "--out", tmp_path / "one_alone")
    run(*common, "--data", second, "--out", tmp_path / "two_alone")
    for together, alone in (("one", "one_alone"), ("two", "two_alone")):
        assert (tmp_path / together / "predictions.jsonl").read_bytes() == \
            (tmp_path / alone / "predictions.jsonl").read_bytes()
        rows = [json.loads((tmp_path / folder / "report.json").read_text())["rows"] for folder in (together, alone)]
        for row in rows[0] + rows[1]:
            row.pop("samples_per_s"), row.pop("seconds")
        assert rows[0] == rows[1] and len(rows[0]) == 2
    with pytest.raises(SystemExit) as exc:  # a run folder for each test file
        inference.main([str(a) for a in [*common, "--data", second, "--data", second, "--out", tmp_path / "x"]])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()


def test_a_log_gets_about_ten_progress_lines_a_run(models, dataset, tmp_path, capsys):
    """Written to a log (not a terminal), a run of 24 batches prints 10 progress lines, the last
    at the end; each gives the rate since the line before. On a terminal, a line per batch."""
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", tmp_path / "log",
        "--limit", 24, "--batch-size", 1, "--max-new-tokens", 2)
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  a: ")]
    assert len(progress) == 10 and progress[-1].startswith("  a: 24/24 (") and progress[-1].endswith(" samples/s)")
    assert [int(line.split()[1].split("/")[0]) for line in progress] == [2, 5, 7, 10, 12, 14, 17, 19, 22, 24]
    assert inference.progress_marks(24, terminal=True) == set(range(24))
    assert inference.progress_marks(7, terminal=False) == set(range(7))


def _independent_scores(preds: list[dict], recs: list[dict]):
    by_id = {r["id"]: r for r in recs}
    correct, total, final = {}, {}, []
    for p in preds:
        conv = by_id[p["id"]]["conversations"]
        for k, qid in enumerate(p["question_ids"]):
            ok = is_correct(qid, p["answers"][qid], conv[2 * k + 1]["value"])
            correct[qid] = correct.get(qid, 0) + ok
            total[qid] = total.get(qid, 0) + 1
        final.append((by_id[p["id"]]["meta"]["occlusion"], is_correct("Q1", p["final"], conv[1]["value"])))
    return {q: correct[q] / total[q] for q in total}, final


def test_report_matches_an_independent_count(batched, models, dataset, tmp_path):
    batched = Path(shutil.copytree(batched, tmp_path / "run"))
    recs = lines(dataset / "test.jsonl")
    preds = lines(batched / "predictions.jsonl")
    # make some answers right (as if the model knew), so the counts are not all zero
    for k, (p, r) in enumerate(zip(preds, recs)):
        for j, qid in enumerate(p["question_ids"]):
            if (k + j) % 3 == 0:
                p["answers"][qid] = r["conversations"][2 * j + 1]["value"].lower()
        p["final"] = p["answers"]["Q1"]
    (batched / "predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    run("--checkpoint", f"a={models['a']}", "--data", dataset / "test.jsonl", "--out", batched)  # all done: report only
    rep = json.loads((batched / "report.json").read_text())
    accuracy, final = _independent_scores(preds, recs)
    (row,) = rep["rows"]
    assert row["checkpoint"] == "a" and row["mode"] == "plain" and row["n"] == 32
    assert row["accuracy"] == pytest.approx(accuracy) and set(row["accuracy"]) == {"Q1", "Q2", "Q3", "Q4", "Q5"}
    assert 0 < row["final_accuracy"] < 1
    assert row["final_accuracy"] == pytest.approx(sum(ok for _, ok in final) / 32) == row["accuracy"]["Q1"]
    assert sum(b["n"] for b in row["by_occlusion"]) == 32
    for b in row["by_occlusion"]:
        lo, hi = b["range"]
        inside = [ok for occ, ok in final if lo <= occ < hi or (hi == 1.0 and occ == 1.0)]
        assert b["n"] == len(inside)
        assert b["accuracy"] == (pytest.approx(sum(inside) / len(inside)) if inside else None)
    # the standard error and the most-occluded third, counted here independently
    p = sum(ok for _, ok in final) / 32
    assert row["final_se"] == pytest.approx((p * (1 - p) / 32) ** 0.5)
    top = sorted(zip(final, [r["id"] for r in recs]), key=lambda x: (-x[0][0], x[1]))[:11]  # ceil(32 / 3)
    third = row["most_occluded_third"]
    assert third["n"] == 11 and third["correct"] == sum(ok for (_, ok), _ in top)
    assert third["min_occlusion"] == min(occ for (occ, _), _ in top)
    assert third["se"] == pytest.approx((third["accuracy"] * (1 - third["accuracy"]) / 11) ** 0.5)
    assert row["samples_per_s"] > 0
    cats = [r["meta"]["category"] for r in recs]
    assert rep["q1_majority_rate"] == pytest.approx(max(map(cats.count, CATEGORIES)) / 32)
    assert rep["q1_chance_rate"] == 1 / 8 and rep["test_file"].endswith("test.jsonl")
    assert sum(map(sum, rep["confusion"]["matrix"])) == 32
    for name in ("report.md", "accuracy.png", "accuracy_vs_occlusion.png", "confusion.png", "gains.png"):
        assert (batched / name).stat().st_size > 0
    assert "| a | plain | 32 |" in (batched / "report.md").read_text()
    assert rep["training"] == [] and "## Training" not in (batched / "report.md").read_text()  # an untrained model
    assert not list(batched.glob(".*.tmp"))


def test_the_report_lists_each_trained_checkpoints_log(tmp_path):
    """Each checkpoint that run.json names and whose folder holds a training log gets a line, and so
    does its second-look model: its last logged step and its loss at the first and last (the closing
    summary is no step). A folder named twice is listed once, under its first name."""
    from occmllm import curves
    trained = tmp_path / "step4"
    curves.save_training_log([{"loss": 2.0, "step": 10}, {"loss": 0.5, "step": 20},
                              {"train_runtime": 3.0, "train_loss": 1.2, "step": 20}], trained, "step4")
    curves.save_training_log([{"loss": 0.1, "step": 5}], trained / "second_look", "second look")
    (tmp_path / "untrained").mkdir()
    out = tmp_path / "report"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"checkpoints": {"base": str(tmp_path / "untrained"),
                                                              "step4": str(trained), "step4-again": str(trained)}}))
    rows = [{"checkpoint": "base", "mode": "plain"}, {"checkpoint": "step4", "mode": "plain"},
            {"checkpoint": "step4-again", "mode": "cot"}]
    rep = inference.with_checkpoint_files({"rows": rows}, out)
    assert rep["training"] == [
        {"checkpoint": "step4", "log": str(trained / "train_log.jsonl"), "plot": str(trained / "training.png"),
         "steps": 20, "first_loss": 2.0, "last_loss": 0.5},
        {"checkpoint": "step4 second look", "log": str(trained / "second_look/train_log.jsonl"),
         "plot": str(trained / "second_look/training.png"), "steps": 5, "first_loss": 0.1, "last_loss": 0.1}]
    assert report.training_table(rep).splitlines()[2] == f"| step4 | 20 | 2 -> 0.5 | {trained / 'training.png'} |"


def test_score_reference(dataset, tmp_path):
    recs = lines(dataset / "test.jsonl")
    cats = [r["meta"]["category"] for r in recs]
    wrong = {c: CATEGORIES[(CATEGORIES.index(c) + 1) % 8] for c in CATEGORIES}
    answers = {r["id"]: category_answer(c if k < 12 else wrong[c]) for k, (r, c) in enumerate(zip(recs, cats))}
    answers["not_in_the_test_set"] = "The object is jar."
    (tmp_path / "pred.json").write_text(json.dumps(answers))
    run("--score-reference", tmp_path / "pred.json", "--data", dataset / "test.jsonl", "--out", tmp_path / "r",
        "--name", "sft1")
    (row,) = json.loads((tmp_path / "r/report.json").read_text())["rows"]
    assert row["checkpoint"] == "sft1" and row["mode"] == "reference" and row["n"] == 32
    assert row["accuracy"] == {"Q1": 12 / 32} and row["final_accuracy"] == 12 / 32
    # ids from another test set, or too few of this one
    (tmp_path / "other.json").write_text(json.dumps({"00000000": "The object is jar."}))
    del answers[recs[5]["id"]]
    (tmp_path / "few.json").write_text(json.dumps(answers))
    for name, says in (("other.json", "none of its 1 ids"), ("few.json", "answers only 31 of the 32")):
        with pytest.raises(SystemExit) as exc:
            inference.main(["--score-reference", str(tmp_path / name), "--data", str(dataset / "test.jsonl"),
                            "--out", str(tmp_path / name.replace(".", "_"))])
        assert exc.value.code == 2
        assert not (tmp_path / name.replace(".", "_") / "report.json").exists()


def _bad_test_files(dataset: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    recs = lines(dataset / "test.jsonl")[:3]

    def write(name, records):
        (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        return tmp / name

    missing = json.loads(json.dumps(recs))
    missing[2]["image"] = "scenes/s99999/rgb_00.png"
    two = json.loads(json.dumps(recs))
    two[1]["conversations"][2]["value"] += "\n<image>"
    return {"missing image": (write("missing.jsonl", missing), "not found"),
            "placeholders": (write("two.jsonl", two), "2 <image> placeholder(s) for 1 image(s)"),
            "empty": (write("empty.jsonl", []), "empty")}


def test_bad_input_is_one_line_and_leaves_no_report(models, dataset, tmp_path, capsys):
    not_internvl = tmp_path / "bert"
    not_internvl.mkdir()
    (not_internvl / "config.json").write_text(json.dumps({"model_type": "bert"}))
    no_tokenizer = shutil.copytree(models["a"], tmp_path / "no_tokenizer",
                                   ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"))
    test = dataset / "test.jsonl"
    cases = {"not InternVL": (["--checkpoint", f"a={models['a']}", "--checkpoint", f"b={not_internvl}",
                               "--data", test], "not an InternVL checkpoint"),
             "no tokenizer": (["--checkpoint", f"a={models['a']}", "--checkpoint", f"b={no_tokenizer}",
                               "--data", test], "no tokenizer files"),
             "NAME=PATH": (["--checkpoint", str(models["a"]), "--data", test], "expected NAME=PATH"),
             "workers": (["--checkpoint", f"a={models['a']}", "--data", test, "--workers", "-1"],
                         "--workers must be at least 0")}
    for case, (data, says) in _bad_test_files(dataset, tmp_path).items():
        cases[case] = (["--checkpoint", f"a={models['a']}", "--data", data, "--data-root", dataset], says)
    for case, (argv, says) in cases.items():
        out = tmp_path / case.replace(" ", "_")
        with pytest.raises(SystemExit) as exc:
            inference.main([str(a) for a in [*argv, "--out", out]])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2, case
        assert err.startswith("error: ") and "\n" not in err and says in err, (case, err)
        assert not (out / "report.json").exists() and not (out / "predictions.jsonl").exists(), case


def test_command_line(models, tmp_path):
    help_text = subprocess.run([sys.executable, "inference.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert help_text.returncode == 0 and "--score-reference" in help_text.stdout
    bad = subprocess.run([sys.executable, "inference.py", "--checkpoint", "a:" + str(models["a"]), "--data",
                          str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "o")],
                         cwd=ROOT, capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert not (tmp_path / "o").exists()


def test_inference_loads_no_trainer():
    """Inference and every mode's code import neither the HF Trainer nor ``datasets``: on the CPU
    that import was 1 of the first batch's 1.2 s (benchmarks/RESULTS.md, "Inference no longer
    imports the trainer")."""
    modules = ("inference", "occmllm.modes", "occmllm.answering", "occmllm.decoding", "occmllm.dual", "occmllm.tta",
               "occmllm.clip", "occmllm.chain", "occmllm.report")
    code = (f"import sys\nfor m in {modules!r}:\n    __import__(m)\n"
            "print(sorted(m for m in ('transformers.trainer', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_occlusion_bins_edges():
    def rec(x):
        return {"meta": {"occlusion": x}}
    assert [scoring.occlusion_bin(rec(x)) for x in (0.0, 0.19999, 0.2, 0.4, 0.6, 0.8, 0.99, 1.0)] == \
        [0, 0, 1, 2, 3, 4, 4, 4]
    assert scoring.occlusion_bin({"meta": {}}) is None and scoring.occlusion_bin({}) is None


def test_paired_gains_match_an_independent_computation(tmp_path):
    """Each row's gain over the row it is compared with, the se of the per-record differences and
    McNemar's p, recomputed here with numpy and scipy; every row against the last plain row above it."""
    import numpy as np
    from scipy.stats import binomtest
    rng = np.random.default_rng(0)
    n = 60
    records = [{"id": f"r{i}", "conversations": [{"from": "human", "value": "What's the object in the hand?\n<image>"},
                                                  {"from": "gpt", "value": category_answer(CATEGORIES[i % 8])}],
                "meta": {"occlusion": float(rng.uniform()), "category": CATEGORIES[i % 8]}} for i in range(n)]
    right = {name: rng.uniform(size=n) < p for name, p in (("s1", 0.5), ("s2", 0.6), ("cot", 0.7), ("s3", 0.65))}
    right["s2"][:50] = right["s1"][:50]  # rows that agree on most records, as stages do

    def preds(ok):
        return {r["id"]: {"answers": {"Q1": category_answer(CATEGORIES[i % 8] if ok[i] else CATEGORIES[(i + 1) % 8])},
                          "final": category_answer(CATEGORIES[i % 8] if ok[i] else CATEGORIES[(i + 1) % 8])}
                for i, r in enumerate(records)}
    runs = [{"checkpoint": "s1", "mode": "plain", "predictions": preds(right["s1"])},
            {"checkpoint": "s2", "mode": "plain", "predictions": preds(right["s2"])},
            {"checkpoint": "s2", "mode": "cot", "predictions": preds(right["cot"])},
            {"checkpoint": "s3", "mode": "plain", "predictions": preds(right["s3"])}]
    rep = scoring.build_report("t.jsonl", records, runs)
    pairs = [(tuple(g["row"]), tuple(g["against"])) for g in rep["gains"]]
    assert pairs == [(("s2", "plain"), ("s1", "plain")), (("s2", "cot"), ("s2", "plain")),
                     (("s3", "plain"), ("s2", "plain"))]
    third = np.argsort([-r["meta"]["occlusion"] for r in records])[:20]
    for g in rep["gains"]:
        a, b = right[g["row"][0] if g["row"][1] == "plain" else "cot"], right[g["against"][0]]
        for got, idx in ((g["final"], np.arange(n)), (g["most_occluded_third"], third)):
            d = a[idx].astype(float) - b[idx].astype(float)
            assert got["n"] == len(idx)
            assert got["delta"] == pytest.approx(d.mean())
            assert got["se"] == pytest.approx(d.std() / np.sqrt(len(idx)))
            assert (got["gained"], got["lost"]) == (int((d > 0).sum()), int((d < 0).sum()))
            changed = int((d != 0).sum())
            assert got["p"] == pytest.approx(binomtest(int((d > 0).sum()), changed, 0.5).pvalue if changed else 1.0)
    # agreeing rows: the paired se is below the se either accuracy has alone
    s2 = rep["gains"][0]["final"]
    assert s2["se"] < min(r["final_se"] for r in rep["rows"][:2])
    text = report.markdown(rep)
    assert "## Gains, record by record" in text
    first = rep["gains"][0]["final"]
    assert f"(+{first['gained']} / -{first['lost']}, p {first['p']:.3f})" in text
    # gains.png: a row a gain, so a report with fewer gains draws a shorter plot
    from matplotlib.image import imread
    report.plot_gains(rep, tmp_path / "all.png")
    report.plot_gains({**rep, "gains": rep["gains"][:1]}, tmp_path / "one.png")
    assert imread(tmp_path / "all.png").shape[0] > imread(tmp_path / "one.png").shape[0]


def test_a_turn_continues_the_last_only_where_each_row_extends_it():
    """Dialogue.suffixes: each row's new tokens where every row extends its last prompt with the
    same image features and no new image token; None (prompt whole) otherwise."""
    from occmllm.answering import Dialogue, Prompt
    image = torch.zeros(1, 4, 8)
    other = torch.zeros(1, 4, 8)
    last = [Prompt([], image, [1]), Prompt([], None, [])]
    dialogue = Dialogue()
    assert dialogue.suffixes(last, [[1, 2], [3]], image_token=9) is None  # nothing kept yet
    dialogue.remember(last, [[1, 2], [3]], torch.ones(2, 2), torch.ones(2, 2), cache=object())
    same = [Prompt([], image[:1], [1]), Prompt([], None, [])]  # a view of the same features
    assert dialogue.suffixes(same, [[1, 2, 5, 6], [3, 7]], image_token=9) == [[5, 6], [7]]
    assert dialogue.suffixes(same, [[1, 2, 5], [4, 7]], image_token=9) is None      # row 2 is another prompt
    assert dialogue.suffixes(same, [[1, 2], [3, 7]], image_token=9) is None         # row 1 adds nothing
    assert dialogue.suffixes(same, [[1, 2, 9], [3, 7]], image_token=9) is None      # a new image
    assert dialogue.suffixes([Prompt([], other, [1]), last[1]], [[1, 2, 5], [3, 7]], image_token=9) is None
    assert dialogue.suffixes(same[:1], [[1, 2, 5]], image_token=9) is None          # other rows


def test_cudnn_attention_is_off_only_while_generating():
    """The Answerer's generation on a GPU runs without cuDNN's attention (a plan per shape); the
    switch is scoped: the process's setting is back afterwards, and attention still computes."""
    from occmllm.answering import without_cudnn_attention
    before = torch.backends.cuda.cudnn_sdp_enabled()
    q = torch.randn(2, 3, 5, 8)
    with without_cudnn_attention():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    assert torch.allclose(out, torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ q, atol=1e-5)


def test_warm_up_sets_up_what_a_real_batch_uses(models, dataset, monkeypatch):
    """Answerer.warm_up's made-up batch (on a GPU, and for compiled decoding): the vision tower
    reads a batch's worth of tiles at once, as a real batch's first pass does, and graphed decoding
    records the graphs that a real batch of that size replays, so that the first real batch
    records none (run here with the graph bookkeeping on, as in the test above)."""
    from occmllm import decoding
    from occmllm.answering import Answerer, load_test, sample_of
    from occmllm.model import load_model
    from occmllm.modes import MODE_RUNNERS, Context
    recorded = []

    def record(self, work):
        work()
        recorded.append(work)
        return work

    monkeypatch.setattr(decoding.GraphedDecoder, "_record", record)
    model, processor = load_model(models["a"], device="cpu", dtype=torch.float32)
    tiles_read = []
    features = model.get_image_features

    def read(*args, **kwargs):
        tiles_read.append(len(kwargs["pixel_values"]))
        return features(*args, **kwargs)

    monkeypatch.setattr(model, "get_image_features", read)
    answerer = Answerer(model, processor, 16, "graphed")
    answerer._graphed.graphs_on = True
    answerer._answer_made_up_batch(12)
    assert tiles_read == [12] and recorded
    made_up = len(recorded)
    samples = [sample_of(r, dataset) for r in load_test(dataset / "test.jsonl", dataset, 12)]
    MODE_RUNNERS["plain"](answerer, samples, Context())
    assert tiles_read == [12, 12] and len(recorded) == made_up
