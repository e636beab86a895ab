"""The CLIP reward model: build/load, end-token pooling, CLIP-S, training and bad checkpoints."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel

from occmllm import clip
from occmllm.conversation import load_images
from occmllm.dataset import load_dataset
from occmllm.errors import OccError
from occmllm.questions import CATEGORIES, caption

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """An untrained tiny CLIP (never modified: tests that train copy it)."""
    return clip.build(tmp_path_factory.mktemp("clip") / "clip", image_size=32, seed=0)


@pytest.fixture(scope="module")
def loaded(clip_dir):
    return clip.load(clip_dir)


def _views_and_images(data, n=None):
    ds = load_dataset(data)
    views = ds.split(None)[:n]
    return views, load_images([ds.root / v["image"] for v in views])


def test_build_load_round_trip(clip_dir, loaded):
    model, tokenizer, image_processor = loaded
    plain = CLIPModel.from_pretrained(clip_dir)  # a normal checkpoint folder
    assert plain.config.model_type == "clip"
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
    assert not model.training
    assert image_processor.crop_size == {"height": 32, "width": 32}
    ids = tokenizer(caption("knife")).input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert model.config.text_config.eos_token_id == tokenizer.eos_token_id != 2  # 2 = transformers' legacy pooling


def _text_embed(model, ids):
    ids = torch.tensor([ids])
    return model.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output[0]


@torch.no_grad()
def test_text_pooling_reads_the_end_token(loaded):
    model, tokenizer, _ = loaded
    ids = tokenizer(caption("bottle")).input_ids
    end = tokenizer.eos_token_id
    a, b = tokenizer.convert_tokens_to_ids(["a", "b"])
    base = _text_embed(model, ids + [a, a])
    # tokens after the end token are invisible to it (causal attention), so pooling there ignores them
    assert torch.allclose(base, _text_embed(model, ids + [b, a]), atol=1e-6)
    # ... and a token before it changes the embedding
    changed = ids[:2] + [b if ids[2] != b else a] + ids[3:]
    assert not torch.allclose(base, _text_embed(model, changed + [a, a]), atol=1e-4)
    # pooled at the end token itself, not at a padding token or the last position
    hidden = model.text_model(input_ids=torch.tensor([ids + [a, a]])).last_hidden_state[0]
    assert torch.allclose(base, model.text_projection(hidden[ids.index(end)]), atol=1e-6)
    # padding a batch changes nothing
    short, long = caption("can"), "a photo of a cellphone in a hand. It is thin."
    batch = clip._text_embeds(model, tokenizer, [short, long])
    assert torch.allclose(batch[0], clip._text_embeds(model, tokenizer, [short])[0], atol=1e-5)


@torch.no_grad()
def test_scores_is_clip_s(loaded, synth_small):
    model, tokenizer, image_processor = loaded
    _, images = _views_and_images(synth_small, 5)
    texts = [caption(c) for c in CATEGORIES] + ["The object is jar."]
    got = clip.scores(model, tokenizer, image_processor, images, texts)
    assert got.shape == (5, 9) and (got >= 0).all()

    # independently: projected pooled states, normalised, 2.5 * max(cos, 0)
    pixels = image_processor(images=images, return_tensors="pt").pixel_values
    img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    txt = []
    for t in texts:
        ids = tokenizer(t).input_ids
        hidden = model.text_model(input_ids=torch.tensor([ids])).last_hidden_state[0, len(ids) - 1]
        txt.append(model.text_projection(hidden))
    cos = F.normalize(img, dim=-1) @ F.normalize(torch.stack(txt), dim=-1).T
    assert torch.allclose(got, 2.5 * cos.clamp(min=0), atol=1e-5)
    assert clip.scores(model, tokenizer, image_processor, [], texts).shape == (0, 9)


@torch.no_grad()
def test_loss_is_clips_own_when_categories_differ(loaded, synth_small):
    model, tokenizer, image_processor = loaded
    views, images = _views_and_images(synth_small)
    firsts = {v["category"]: i for i, v in reversed(list(enumerate(views)))}  # one view per category
    idx = sorted(firsts.values())
    labels = torch.tensor([CATEGORIES.index(views[i]["category"]) for i in idx])
    assert len(idx) >= 3
    enc = tokenizer([caption(CATEGORIES[k]) for k in labels], padding=True, return_tensors="pt")
    out = model(**enc, pixel_values=image_processor(images=[images[i] for i in idx], return_tensors="pt").pixel_values,
                return_loss=True)
    assert torch.allclose(clip.contrastive_loss(out.logits_per_image, labels), out.loss, atol=1e-6)
    # repeated categories: an image matching every caption of its category is right, not wrong
    spread = torch.tensor([[5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    diagonal = 5.0 * torch.eye(3)
    shared, distinct = torch.tensor([1, 1, 2]), torch.tensor([1, 2, 3])
    assert clip.contrastive_loss(spread, shared) < clip.contrastive_loss(diagonal, shared)
    assert clip.contrastive_loss(diagonal, distinct) < clip.contrastive_loss(spread, distinct)


@torch.no_grad()
def _loss_on(clip_dir, data):
    model, tokenizer, image_processor = clip.load(clip_dir)
    views, images = _views_and_images(data)
    labels = torch.tensor([CATEGORIES.index(v["category"]) for v in views])
    enc = tokenizer([caption(v["category"]) for v in views], padding=True, return_tensors="pt")
    out = model(**enc, pixel_values=image_processor(images=images, return_tensors="pt").pixel_values)
    return clip.contrastive_loss(out.logits_per_image, labels).item()


def test_training_lowers_the_loss(clip_dir, synth_small, tmp_path):
    work = tmp_path / "clip"
    shutil.copytree(clip_dir, work)
    before = _loss_on(work, synth_small)
    result = clip.train(work, synth_small, split=None, steps=12, batch_size=16, lr=2e-3, seed=0, progress=False)
    assert result["steps"] == 12 and result["loss_last"] < result["loss_first"]
    assert _loss_on(work, synth_small) < before - 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # no temporary folder left behind
    # the same seed gives the same model
    again = tmp_path / "again"
    shutil.copytree(clip_dir, again)
    assert clip.train(again, synth_small, split=None, steps=12, batch_size=16, progress=False)["loss_last"] \
        == result["loss_last"]

    acc = clip.zero_shot(work, synth_small, split=None, limit=10)
    assert acc["n"] == 10 and sum(r["n"] for r in acc["by_category"].values()) == 10
    assert 0 <= acc["accuracy"] <= 1 and acc["chance"] == 1 / 8


def _one_line_error(call, *names):
    with pytest.raises(OccError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for name in names:
        assert str(name) in message
    return message


def test_bad_checkpoints(tiny_model, clip_dir, tmp_path):
    assert "not a CLIP checkpoint" in _one_line_error(lambda: clip.load(tiny_model), tiny_model, "internvl")
    missing = tmp_path / "nowhere"
    assert "not found" in _one_line_error(lambda: clip.load(missing), missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _one_line_error(lambda: clip.load(empty), empty)

    broken = tmp_path / "broken"
    shutil.copytree(clip_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "does not load" in _one_line_error(lambda: clip.load(broken), broken)
    weights.unlink()
    _one_line_error(lambda: clip.load(broken), broken)


def test_cli(clip_dir, synth_small, tmp_path, capsys):
    for command in ("build", "train", "zero-shot"):
        with pytest.raises(SystemExit) as done:
            clip.main([command, "--help"])
        assert done.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        clip.main(["zero-shot", "--clip", str(tmp_path / "nowhere"), "--data", str(synth_small)])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "nowhere" in err
    assert clip.main(["zero-shot", "--clip", str(clip_dir), "--data", str(synth_small), "--split", "test",
                      "--limit", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("{") and '"n": 1' in out[-1] and out[0].split()[:2] == ["category", "n"]
