"""OCC-MLLM-Alpha's dual visual path (occmllm.dual): the blend, its limits (alpha = 1 is the plain
model, alpha = 0 the plain model shown the render), a learnable alpha, dual checkpoints, and
stage-1 training with renders."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import TrainingArguments
from transformers.modeling_outputs import BaseModelOutputWithPooling

from data_tools.renders import render_views
from occmllm import dual
from occmllm.conversation import ConversationEncoder, pad_batch
from occmllm.errors import OccError
from occmllm.model import ImageOnlyInternVLProcessor, load_model
from occmllm.questions import Q1
from occmllm.records import load_training_records
from occmllm.rollout import visual_inputs
from occmllm.sft import Collator, ConversationDataset, run
from occmllm.stage import ModelArguments, build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "step1_sft/config.yaml"
RENDERS = "renders/dual_test"
CONVERSATION = [{"from": "human", "value": Q1}, {"from": "gpt", "value": "The object is jar."}]

pytestmark = pytest.mark.usefixtures("one_thread")


def _pictures(seed: int, n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def loaded(tiny_model):
    model, processor = load_model(tiny_model)
    return model, processor


@pytest.fixture(scope="module")
def batch(loaded):
    """Two training conversations, their images' tiles and other pictures' tiles as 'renders'."""
    model, processor = loaded
    enc = ConversationEncoder(processor)
    images, renders = _pictures(0), _pictures(1)
    items = [enc.encode([im], CONVERSATION) for im in images]
    out = Collator(processor.tokenizer.pad_token_id)(
        [{"input_ids": e.input_ids, "labels": e.labels, "pixel_values": e.pixel_values} for e in items])
    out["render_pixel_values"] = enc.pixel_values(renders)[0]
    assert out["pixel_values"].shape == out["render_pixel_values"].shape == (2, 3, 32, 32)
    return out


def _logits(model, batch, **visual):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **visual).logits


def test_blend_values():
    x, y = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4, 8)
    assert torch.equal(dual.blend(x, y, 1.0), x) and torch.equal(dual.blend(x, y, torch.tensor(1.0)), x)
    assert torch.equal(dual.blend(x, y, 0.0), y)
    torch.testing.assert_close(dual.blend(x, y, torch.tensor(0.25)), 0.25 * x + 0.75 * y)
    with pytest.raises(ValueError, match="differ in shape"):
        dual.blend(x, y[:2], 0.5)


def test_alpha_one_is_the_plain_model(loaded, batch):
    model, processor = loaded
    wrapped = dual.DualVisual(model, 1.0).eval()
    plain = _logits(model, batch, pixel_values=batch["pixel_values"])
    blended = _logits(wrapped, batch, pixel_values=batch["pixel_values"],
                      render_pixel_values=batch["render_pixel_values"])
    assert torch.equal(blended, plain)
    # greedy generation with the blended tokens (as inference's --mode dual gives them): the same tokens
    enc = ConversationEncoder(processor)
    prompts = [enc.prompt_ids([1], CONVERSATION[:1])] * 2
    ids, mask = pad_batch(prompts, processor.tokenizer.pad_token_id, "left")
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                  pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        a = model.generate(pixel_values=batch["pixel_values"], **common)
        blended = dual.blended_features(model, batch["pixel_values"], batch["render_pixel_values"], 1.0)
        b = model.generate(mm_encoder_outputs=dual.mm_outputs(blended), **common)
    assert a.shape[1] > ids.shape[1] and torch.equal(a, b)


def test_alpha_zero_is_the_render_and_between_is_the_blend(loaded, batch):
    model, _ = loaded
    zero = dual.DualVisual(model, 0.0).eval()
    both = dict(pixel_values=batch["pixel_values"], render_pixel_values=batch["render_pixel_values"])
    assert torch.equal(_logits(zero, batch, **both), _logits(model, batch, pixel_values=batch["render_pixel_values"]))
    # 0 < alpha < 1: the blend of separately computed features, fed as mm_encoder_outputs
    with torch.no_grad():
        x1 = model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
        x2 = model.get_image_features(pixel_values=batch["render_pixel_values"], return_dict=True).pooler_output
        mixed = 0.3 * x1 + 0.7 * x2
        torch.testing.assert_close(dual.DualVisual(model, 0.3).features(**both), mixed, atol=1e-6, rtol=1e-6)
    expected = _logits(model, batch, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=mixed)})
    got = _logits(dual.DualVisual(model, 0.3).eval(), batch, **both)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _logits(model, batch, pixel_values=batch["pixel_values"]), atol=1e-4)


def test_only_the_rendered_tiles_are_blended(loaded, batch):
    """``rendered`` marks the tiles that have a render: those are blended, the others keep their own
    tokens, against features computed separately; the wrapper's forward and the RL rollout's
    generation inputs (``rollout.visual_inputs``) agree with them."""
    model, processor = loaded
    images, renders = batch["pixel_values"], batch["render_pixel_values"]
    rendered = torch.tensor([False, True])
    with torch.no_grad():
        x1 = model.get_image_features(pixel_values=images, return_dict=True).pooler_output
        x2 = model.get_image_features(pixel_values=renders[1:], return_dict=True).pooler_output
        got = dual.blended_features(model, images, renders[1:], 0.3, rendered)
    assert torch.equal(got[0], x1[0])
    torch.testing.assert_close(got[1], 0.3 * x1[1] + 0.7 * x2[0], atol=1e-6, rtol=1e-6)
    wrapped = dual.DualVisual(model, 0.3).eval()
    expected = _logits(model, batch, mm_encoder_outputs=dual.mm_outputs(got))
    torch.testing.assert_close(_logits(wrapped, batch, pixel_values=images, render_pixel_values=renders[1:],
                                       rendered=rendered), expected, atol=1e-5, rtol=1e-5)
    enc = ConversationEncoder(processor)
    ids, mask = pad_batch([enc.prompt_ids([1], CONVERSATION[:1])] * 2, processor.tokenizer.pad_token_id, "left")
    common = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                  pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        sampled = model.generate(**visual_inputs(model, images, renders[1:], rendered, 0.3), **common)
        assert sampled.shape[1] > ids.shape[1]
        assert torch.equal(sampled, model.generate(mm_encoder_outputs=dual.mm_outputs(got), **common))
    with pytest.raises(ValueError, match="one render tile per marked image tile"):
        dual.blended_features(model, images, renders, 0.3, rendered)


def test_learnable_alpha_trains_and_fixed_alpha_is_no_parameter(tiny_model, batch):
    torch.manual_seed(0)
    model, _ = load_model(tiny_model)
    learnable = dual.DualVisual(model, 0.5, learnable=True)
    assert isinstance(learnable.alpha, torch.nn.Parameter) and "alpha" in dict(learnable.named_parameters())
    loss = learnable(**batch).loss
    loss.backward()
    assert learnable.alpha.grad is not None and learnable.alpha.grad.abs().item() > 0
    torch.optim.SGD([learnable.alpha], lr=0.5).step()
    assert learnable.alpha.item() != 0.5 and learnable.alpha_value() == min(max(learnable.alpha.item(), 0.0), 1.0)
    fixed = dual.DualVisual(model, 0.5)
    assert "alpha" not in dict(fixed.named_parameters()) and "alpha" in dict(fixed.named_buffers())
    assert not fixed.alpha.requires_grad
    with pytest.raises(OccError, match=r"in \[0, 1\]"):
        dual.DualVisual(model, 1.5)


def test_save_and_read_alpha(loaded, tmp_path):
    model, processor = loaded
    out = tmp_path / "ckpt"
    dual.save(dual.DualVisual(model, 0.25, learnable=True), out)
    processor.save_pretrained(out)
    assert json.loads((out / dual.ALPHA_FILE).read_text()) == {"alpha": 0.25, "learnable": True}
    assert dual.read_alpha(out) == 0.25
    plain, _ = load_model(out)  # a normal InternVL checkpoint
    for (name, a), (_, b) in zip(model.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name
    assert dual.resolve_alpha(out) == 0.25 and dual.resolve_alpha(out, 0.5) == 0.5
    assert dual.read_alpha(tmp_path) is None  # no file: a plain checkpoint
    with pytest.raises(OccError, match="not a dual-path checkpoint"):
        dual.resolve_alpha(tmp_path)
    for text, message in [("{not json", "invalid JSON"), ('{"alpha": 1.5}', r"in \[0, 1\]"),
                          ('{"alpha": "x"}', r"in \[0, 1\]"), ("[0.5]", "malformed"),
                          ('{"alpha": 0.5, "learnable": "yes"}', "malformed")]:
        (out / dual.ALPHA_FILE).write_text(text)
        with pytest.raises(OccError, match=message) as exc:
            dual.read_alpha(out)
        assert "\n" not in str(exc.value) and dual.ALPHA_FILE in str(exc.value)


# --- training ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def renders(synth_small) -> Path:
    """Oracle renders of every view of the small set under ``RENDERS``."""
    render_views(synth_small, RENDERS, None, progress=False)
    return synth_small


def _flags(tiny_model, data: Path, out: Path, *extra) -> list[str]:
    return ["--model_name_or_path", str(tiny_model), "--train_data", str(data / "stages/step1.jsonl"),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--logging_steps", "1",
            "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--disable_tqdm", "true", *extra]


def test_stage1_trains_the_dual_path(tiny_model, renders, tmp_path):
    dual_flags = ["--dual_alpha", "0.5", "--dual_learnable", "true", "--dual_renders", RENDERS]
    out = run(_flags(tiny_model, renders, tmp_path / "ckpt", "--max_steps", "2", "--save_strategy", "steps",
                     "--save_steps", "2", *dual_flags), default_config=CONFIG)
    assert out == tmp_path / "ckpt"
    saved = dual.read_dual(out)
    assert saved["learnable"] and 0.0 <= saved["alpha"] <= 1.0 and saved["alpha"] != 0.5  # alpha trained
    model, _ = load_model(out)  # the stage checkpoint loads as a plain InternVL folder
    assert model.config.model_type == "internvl"
    assert dual.read_alpha(out / "checkpoint-2") == saved["alpha"]  # checkpoints are dual checkpoints too
    load_model(out / "checkpoint-2")
    # a checkpoint loads back into a DualVisual (the Trainer's resume), and training resumes from it
    fresh = dual.DualVisual(load_model(tiny_model)[0], 0.5, learnable=True)
    dual.load_weights(fresh, out / "checkpoint-2")
    assert fresh.alpha_value() == saved["alpha"]
    for (name, a), (_, b) in zip(fresh.model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    run(_flags(tiny_model, renders, tmp_path / "ckpt", "--max_steps", "3", "--save_strategy", "steps",
               "--save_steps", "3", "--resume", "true", *dual_flags), default_config=CONFIG)
    state = json.loads((out / "checkpoint-3/trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]  # resumed, not restarted
    assert dual.read_alpha(out) != saved["alpha"]


def test_missing_render_and_bad_settings_are_one_line_errors(tiny_model, renders, tmp_path):
    with pytest.raises(OccError, match=r"record s\d+_v\d+: no render at .*renders/nowhere/s\d+_v\d+\.png") as exc:
        run(_flags(tiny_model, renders, tmp_path / "x", "--max_steps", "1", "--dual_alpha", "0.5",
                   "--dual_renders", "renders/nowhere"), default_config=CONFIG)
    assert "\n" not in str(exc.value)
    for extra, message in [(["--dual_alpha", "1.5"], r"in \[0, 1\]"),
                           (["--dual_learnable", "true"], "set dual_alpha"),
                           (["--dual_alpha", "0.5", "--use_lora", "true"], "use_lora with dual_alpha")]:
        with pytest.raises(OccError, match=message):
            run(_flags(tiny_model, renders, tmp_path / "x", "--max_steps", "1", *extra), default_config=CONFIG)
    # stages whose trainers are not the SFT one refuse it
    with pytest.raises(OccError, match="SFT phases only"):
        build_model(ModelArguments(model_name_or_path=str(tiny_model), dual_alpha=0.5),
                    TrainingArguments(output_dir=str(tmp_path / "y"), use_cpu=True, report_to="none"))


def test_dataset_renders_follow_their_images(tiny_model, renders):
    """The render is flipped with its image, cached like it, and a record needs exactly one image."""
    items = load_training_records(renders / "stages/step1.jsonl")[:6]
    encoder = ConversationEncoder(ImageOnlyInternVLProcessor.from_folder(tiny_model))
    fresh = ConversationDataset(items, encoder, augment_images=True, seed=3, renders=RENDERS)
    cached = ConversationDataset(items, encoder, augment_images=True, seed=3, cache=True, renders=RENDERS)
    flips = 0
    for epoch in range(2):
        fresh.epoch = cached.epoch = epoch
        for i in range(len(items)):
            a, b = fresh[i], cached[i]
            torch.testing.assert_close(a["render_pixel_values"], b["render_pixel_values"], atol=1e-5, rtol=0)
            image_flipped = not torch.equal(b["pixel_values"], fresh._tiled(i, False)[0])
            render_flipped = not torch.equal(b["render_pixel_values"], fresh._encode_render(i, False))
            assert image_flipped == render_flipped
            flips += image_flipped
    assert 0 < flips < 12
    batch = Collator(encoder.tokenizer.pad_token_id)([fresh[0], fresh[1]])
    assert batch["render_pixel_values"].shape == batch["pixel_values"].shape
    plain = ConversationDataset(items, encoder)[0]
    assert set(plain) == {"input_ids", "labels", "pixel_values"}
    assert "render_pixel_values" not in Collator(encoder.tokenizer.pad_token_id)([plain])
    root, record = items[0]
    with pytest.raises(OccError, match=f"record {record['id']}: 2 images"):
        ConversationDataset([(root, {**record, "image": [record["image"], record["image"]]})], encoder,
                            renders=RENDERS)


def test_records_that_name_their_render_are_blended_and_the_others_stay_plain(tiny_model, renders, tmp_path):
    """Stage 4's mix: a record's own ``render`` is blended with its image; records without one are
    plain, in the same batch (the collator marks which tiles have a render)."""
    items = load_training_records(renders / "stages/step1.jsonl")[:3]
    root, first = items[0]
    own = f"{RENDERS}/{items[1][1]['id']}.png"  # another view's render: the record's own field decides
    mixed = [(root, {**first, "render": own}), *items[1:]]
    encoder = ConversationEncoder(ImageOnlyInternVLProcessor.from_folder(tiny_model))
    dataset = ConversationDataset(mixed, encoder)
    assert dataset.has_renders
    expected, _ = encoder.pixel_values([Image.open(root / own).convert("RGB")])
    torch.testing.assert_close(dataset[0]["render_pixel_values"], expected)
    assert "render_pixel_values" not in dataset[1]
    batch = Collator(encoder.tokenizer.pad_token_id)([dataset[1], dataset[0], dataset[2]])
    assert batch["rendered"].tolist() == [False, True, False]
    torch.testing.assert_close(batch["render_pixel_values"], expected)
    assert not ConversationDataset(items, encoder).has_renders
    # a file of such records trains only on the dual path, and its renders must exist
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for _, r in mixed))
    with pytest.raises(OccError, match="set dual_alpha"):
        run(_flags(tiny_model, renders, tmp_path / "x", "--max_steps", "1", "--train_data", str(data),
                   "--data_root", str(root)), default_config=CONFIG)
    with pytest.raises(OccError, match="no render at"):
        ConversationDataset([(root, {**first, "render": f"{RENDERS}/missing.png"})], encoder)
