"""Stage 2 (SFT on several questions) and stage 3 (MPO with TRL's DPOTrainer): training from the
previous stage's checkpoint, the preference rows TRL sees, the reference file format, and the
errors for a missing starting checkpoint and for a pair whose answers are the same."""
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_tools import builders
from occmllm import mpo, records, sft
from occmllm.config import parse_config
from occmllm.conversation import IGNORE_INDEX, ConversationEncoder, load_images
from occmllm.dataset import load_dataset
from occmllm.errors import OccError
from occmllm.model import load_model
from occmllm.questions import category_answer, description, parse_category
from conftest import _predictions

ROOT = Path(__file__).resolve().parents[1]
STEP2_CONFIG = ROOT / "step2_multiquery/config.yaml"
STEP3_CONFIG = ROOT / "step3_mpo/config.yaml"
REFERENCE_DPO = "v1/train_Q1_Q6_balanced_dpo_10140.jsonl"


# --- configs and errors ----------------------------------------------------------------------

def test_stage_configs_parse():
    model, data, training = parse_config((sft.ModelArguments, sft.DataArguments, sft.TrainingArguments), [],
                                         STEP2_CONFIG)
    assert model.model_name_or_path == "outputs/demo/checkpoints/step1"
    assert data.train_data == "outputs/demo/stages/step2_train.jsonl"
    assert training.output_dir == "outputs/demo/checkpoints/step2"
    assert training.num_train_epochs == 3 and training.learning_rate == 5e-4
    model, data, config = parse_config((sft.ModelArguments, mpo.PreferenceDataArguments, mpo.DPOConfig), [],
                                       STEP3_CONFIG)
    assert model.model_name_or_path == "outputs/demo/checkpoints/step2"
    assert data.train_data == "outputs/demo/stages/step3_train.jsonl"
    assert config.output_dir == "outputs/demo/checkpoints/step3"
    assert config.loss_type == ["sigmoid", "bco_pair", "sft"] and config.loss_weights == [0.8, 0.2, 1.0]
    assert config.beta == 0.1 and config.use_cpu and not config.bf16


def test_help_shows_the_stage_config_values(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config((sft.ModelArguments, mpo.PreferenceDataArguments, mpo.DPOConfig), ["--help"], STEP3_CONFIG)
    assert exc.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: outputs/demo/checkpoints/step2)" in help_text and "(default: outputs/demo/models/tiny)" not in help_text


@pytest.mark.parametrize("main, config, message", [
    (sft.main, ROOT / "step1_sft/config.yaml", "stage 1 trains from a base model: build the tiny one "
     "(python -m occmllm.tiny --out DIR), or download an InternVL '-hf' checkpoint, and pass --model_name_or_path"),
    (sft.main, STEP2_CONFIG, "stage 2 trains from stage 1's checkpoint: run stage 1 first (bash step1_sft/run.sh) "
     "or pass --model_name_or_path"),
    (mpo.main, STEP3_CONFIG, "stage 3 trains from stage 2's checkpoint: run stage 2 first "
     "(bash step2_multiquery/run.sh) or pass --model_name_or_path"),
])
def test_missing_previous_checkpoint_is_one_line_error(main, config, message, tmp_path, capsys):
    missing = tmp_path / "checkpoints/previous"
    with pytest.raises(SystemExit) as exc:
        main(["--model_name_or_path", str(missing), "--output_dir", str(tmp_path / "out")], default_config=config)
    assert exc.value.code == 2
    assert capsys.readouterr().err == f"error: {missing}: checkpoint folder not found; {message}\n"
    assert not (tmp_path / "out").exists()


def test_launcher_reports_missing_checkpoint(tmp_path):
    """Through run.sh as users start it: one line on stderr, exit status 2."""
    missing = tmp_path / "step2"
    out = subprocess.run(["bash", "step3_mpo/run.sh", "--model_name_or_path", str(missing)], cwd=ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == (f"error: {missing}: checkpoint folder not found; stage 3 trains from stage "
                                           "2's checkpoint: run stage 2 first (bash step2_multiquery/run.sh) or pass "
                                           "--model_name_or_path")


def test_preference_with_same_answers_is_an_error(tiny_model, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "question": "Is it clear to identify the object in the hand?\n",
              "chosen": "Yes.", "rejected": "No."},
             {"image": "a.png", "question": "Is it clear to identify the object in the hand?\n",
              "chosen": "No.", "rejected": "No. "}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(SystemExit) as exc:
        mpo.main(["--model_name_or_path", str(tiny_model), "--train_data", str(path), "--data_root", str(tmp_path),
                  "--output_dir", str(tmp_path / "out")], default_config=STEP3_CONFIG)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"error: {path}:2: preference chosen and rejected are the same ('No.'); "
                                       "a pair must differ\n")


# --- stage-3 data ----------------------------------------------------------------------------

def test_reference_clarity_pairs(synth_small, tmp_path):
    """--reference-clarity: the reference file's question text, clarity pairs only, balanced, with
    No. chosen exactly where the model's answer was wrong."""
    views = load_dataset(synth_small).split(None)
    preds = _predictions(views)
    (tmp_path / "p.json").write_text(json.dumps(preds))
    from step3_mpo.make_data import main
    assert main(["--data", str(synth_small), "--split", "train", "--part", "all", "--out", str(tmp_path / "ref.jsonl"),
                 "--predictions", str(tmp_path / "p.json"), "--reference-clarity"]) == 0
    ref = records.read_records(tmp_path / "ref.jsonl", "preference")
    assert {r["question"] for r in ref} == {"Is it clear to identify the object in the hand?\n"}
    assert Counter(r["chosen"] for r in ref) == {"Yes.": len(ref) // 2, "No.": len(ref) // 2}
    for r in ref:
        assert (r["chosen"] == "No.") == (preds[r["id"].split("#")[0]] != category_answer(r["meta"]["category"]))


def test_replay_pairs_follow_the_test_conversation(synth_small, tmp_path):
    """--replay: after each category pair, one pair per later question, asked after the test
    record's earlier turns; the truth over the other yes/no answer, and the view's description over
    that of the category the pair rejected."""
    views = load_dataset(synth_small).split(None)
    (tmp_path / "p.json").write_text(json.dumps(_predictions(views)))
    pairs = builders.stage3_pairs(views, tmp_path / "p.json", replay=True)
    tests = {r["id"]: r["conversations"] for r in builders.test_records(views)}
    by_view = {}
    for p in pairs:
        by_view.setdefault(p["id"].split("#")[0], {})[p["id"].split("#")[1]] = p
    assert len(by_view) == len(views)
    for view_id, got in by_view.items():
        assert set(got) == {"category", "Q2", "Q3", "Q4", "Q5"}
        truth = tests[view_id]
        for k, qid in enumerate(("Q2", "Q3", "Q4", "Q5"), start=1):
            p = got[qid]
            assert p["history"] == truth[:2 * k] and p["question"] == truth[2 * k]["value"]
            assert p["chosen"] == truth[2 * k + 1]["value"] and p["rejected"] != p["chosen"]
        for qid in ("Q2", "Q3", "Q4"):
            assert {got[qid]["chosen"], got[qid]["rejected"]} == {"Yes.", "No."}
        rejected = parse_category(got["category"]["rejected"])
        assert got["Q5"]["rejected"] == description(rejected, got["Q5"]["meta"]["colour"])
    path = builders.write_stage(pairs, tmp_path / "replay.jsonl", load_dataset(synth_small), "step3",
                                kind="preference")
    assert records.read_records(path, "preference") == pairs


@pytest.mark.parametrize("history", [
    [{"from": "gpt", "value": "The object is jar."}],  # an answer without its question
    [{"from": "gpt", "value": "The object is jar."}, {"from": "human", "value": "What's the object in the hand?"}],
    [{"from": "human", "value": "What's the object in the hand?"}],  # a question without its answer
], ids=["lone-answer", "answer-first", "unanswered"])
def test_a_preference_history_must_alternate(tmp_path, history):
    bad = {"id": "a", "image": "x.png", "question": "Is the object in hand round?", "chosen": "Yes.", "rejected": "No.",
           "history": history}
    (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(OccError, match=r"bad.jsonl:1: preference 'history' must be a list of answered turns"):
        records.read_records(tmp_path / "bad.jsonl", "preference")


def _sft_encoding(encoder, root, rec, answer):
    images = load_images([root / p for p in records.images_of(rec)])
    turns = [*rec.get("history", []), {"from": "human", "value": rec["question"]}, {"from": "gpt", "value": answer}]
    return encoder.encode(images, turns)


def test_preference_rows_are_the_sft_tokens(tiny_model, synth_small, tmp_path):
    """What DPOTrainer's vision collator builds from our rows is token for token the SFT/inference
    encoding of the same conversation and answer, supervised on the same tokens (answer + end of
    turn): for category pairs, and for replay pairs asked after their history."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    _, processor = load_model(tiny_model)
    views = load_dataset(synth_small).split(None)
    (tmp_path / "p.json").write_text(json.dumps(_predictions(views)))
    path = builders.write_stage(builders.stage3_pairs(views, tmp_path / "p.json", replay=True),
                                tmp_path / "step3.jsonl", load_dataset(synth_small), "step3", kind="preference")
    dataset = mpo.preference_dataset(path, None, processor)
    recs = records.read_records(path, "preference")
    assert len(dataset) == len(recs) and dataset[0]["id"] == recs[0]["id"]
    # a pair against the model's wrong answer, one against another category, and two replay pairs
    picks = [next(k for k, r in enumerate(recs) if not r["meta"]["correct"] and r["id"].endswith("#category")),
             next(k for k, r in enumerate(recs) if r["meta"]["correct"] and r["id"].endswith("#category")),
             next(k for k, r in enumerate(recs) if r["id"].endswith("#Q3")),
             next(k for k, r in enumerate(recs) if r["id"].endswith("#Q5"))]
    batch = DataCollatorForVisionPreference(processor)([dict(dataset[k]) for k in picks])
    encoder = ConversationEncoder(processor)
    rows = [(k, "chosen") for k in picks] + [(k, "rejected") for k in picks]  # TRL's order: chosen, then rejected
    for i, (k, side) in enumerate(rows):
        enc = _sft_encoding(encoder, synth_small, recs[k], recs[k][side])
        keep = batch["attention_mask"][i].bool()
        ids, supervised = batch["input_ids"][i][keep].tolist(), batch["completion_mask"][i][keep].tolist()
        n = len(ids)  # SFT's text also has the unsupervised newline after the end-of-turn token
        assert ids == enc.input_ids[:n] and enc.labels[n:] == [IGNORE_INDEX] * (len(enc.labels) - n)
        # SFT supervises every answer; the pair only its last
        last = [int(lab != IGNORE_INDEX) for lab in enc.labels[:n]]
        start = max(j for j in range(n) if last[j] and (j == 0 or not last[j - 1]))
        assert supervised == [0] * start + last[start:]
        assert torch.equal(batch["pixel_values"][i % 4: i % 4 + 1], enc.pixel_values)


def test_reads_the_reference_preference_file(fixtures, tiny_model, tmp_path):
    """The reference's pairs (no id, no <image> placeholder) train as they are: the image goes in
    front of the question, ids come from the image names."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
    with open(fixtures / REFERENCE_DPO, encoding="utf-8") as fh:
        head = [next(fh) for _ in range(20)]
    path = tmp_path / "dpo.jsonl"
    path.write_text("".join(head))
    root = tmp_path / "images"
    root.mkdir()
    originals = [json.loads(line) for line in head]
    for k, rec in enumerate(originals):
        Image.new("RGB", (48, 40), (10 * k, 80, 160)).save(root / rec["image"])
    _, processor = load_model(tiny_model)
    with pytest.raises(OccError, match="no --data_root given and no dpo.meta.json beside it"):
        mpo.preference_dataset(path, None, processor)
    dataset = mpo.preference_dataset(path, str(root), processor)
    assert dataset["id"] == [Path(r["image"]).stem for r in originals]
    formatter = mpo.PreferenceFormatter(processor)
    for row, rec in zip(dataset, originals):
        assert row["prompt"] == formatter.prompt([{"from": "human", "value": "<image>\n" + rec["question"]}])
        assert row["prompt"].index("<IMG_CONTEXT>") < row["prompt"].index("Is it clear")
        assert (row["chosen"], row["rejected"]) == (rec["chosen"] + "<|im_end|>", rec["rejected"] + "<|im_end|>")
        assert row["images"][0].size == (48, 40) and row["images"][0].mode == "RGB"
    batch = DataCollatorForVisionPreference(processor)([dict(dataset[k]) for k in range(4)])
    image_tokens = (batch["input_ids"] == processor.image_token_id).sum(dim=1)
    assert image_tokens.tolist() == [processor.image_seq_length] * 8 and batch["pixel_values"].shape[0] == 8


# --- training --------------------------------------------------------------------------------

@pytest.mark.slow
def test_stage2_trains_from_stage1_checkpoint(tiny_model, synth_small, tmp_path):
    step1 = shutil.copytree(tiny_model, tmp_path / "step1")  # a stage-1-like checkpoint
    ds = load_dataset(synth_small)
    views = ds.split(None)
    step2 = builders.write_stage(builders.stage2_records(views),
                                 tmp_path / "step2.jsonl", ds, "step2")
    out = subprocess.run([sys.executable, "-m", "step2_multiquery.train", "--model_name_or_path", str(step1),
                          "--train_data", str(step2), "--output_dir", str(tmp_path / "step2"), "--max_steps", "2",
                          "--per_device_train_batch_size", "2", "--warmup_steps", "0", "--save_strategy", "no",
                          "--disable_tqdm", "true"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    trained, _ = load_model(tmp_path / "step2")  # a plain InternVL checkpoint folder
    before, _ = load_model(step1)
    args = torch.load(tmp_path / "step2/training_args.bin", weights_only=False)
    assert args.learning_rate == 5e-4 and args.max_steps == 2  # stage 2's config, flags on top
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before.get_parameter(n))]
    assert any("language_model" in n for n in changed) and not any("vision_tower" in n for n in changed)  # frozen


def _log_ratio_margins(policy, reference, encoder, root, recs) -> torch.Tensor:
    """Per pair: [log p(chosen) - log p(rejected)] under the policy minus the same under the
    reference, each log p summed over the answer's supervised tokens (as SFT encodes them)."""
    def logp(model, rec, answer):
        enc = _sft_encoding(encoder, root, rec, answer)
        ids, labels = torch.tensor([enc.input_ids]), torch.tensor([enc.labels])
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=enc.pixel_values).logits[0, :-1]
        target = labels[0, 1:]
        keep = target != IGNORE_INDEX
        return torch.log_softmax(logits[keep], dim=-1).gather(1, target[keep, None]).sum()
    return torch.stack([(logp(policy, r, r["chosen"]) - logp(policy, r, r["rejected"]))
                        - (logp(reference, r, r["chosen"]) - logp(reference, r, r["rejected"])) for r in recs])


@pytest.mark.slow
def test_mpo_raises_chosen_over_rejected(tiny_model, synth_small, step3_file, tmp_path, capsys):
    out = mpo.run(["--model_name_or_path", str(tiny_model), "--train_data", str(step3_file),
                   "--output_dir", str(tmp_path / "step3"), "--max_steps", "8", "--per_device_train_batch_size", "6",
                   "--learning_rate", "0.002", "--warmup_steps", "0", "--lr_scheduler_type", "constant",
                   "--logging_steps", "1", "--save_strategy", "no", "--disable_tqdm", "true"],
                  default_config=STEP3_CONFIG)
    assert out == tmp_path / "step3" and "saved the stage checkpoint" in capsys.readouterr().out
    reference, processor = load_model(tiny_model)
    trained, _ = load_model(out)  # a plain InternVL checkpoint with its processor
    assert (out / "processor_config.json").is_file()
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "rewards/margins" in e] == list(range(1, 9))  # TRL's figures, every step
    assert Image.open(out / "training.png").size[0] > 0
    encoder = ConversationEncoder(processor)
    recs = records.read_records(step3_file, "preference")
    before = _log_ratio_margins(reference, reference, encoder, synth_small, recs)
    after = _log_ratio_margins(trained, reference, encoder, synth_small, recs)
    print("log-ratio margins after", [f"{r['id']}: {m:+.3f}" for r, m in zip(recs, after.tolist())])
    assert before.abs().max() == 0  # the policy starts as the reference
    # The mean margin is what the DPO term pushes up. In 8 steps the tiny model learns answer-level
    # preferences (which category answers are rejected, a shift between Yes. and No.), not yet
    # image-dependent ones, so balanced clarity pairs move in both directions and cancel out.
    assert after.mean() > 0.05
