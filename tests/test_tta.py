"""Test-time adaptation with a CLIP reward (occmllm.tta, ``inference.py --tta clip``): the reward
baseline, one REINFORCE step's direction, images adapted together as each alone, and the command end to end.
The second-look judge (``--tta second-look``) is tested in test_cot.py, beside the chain it asks."""
import copy
import json

import pytest
import torch

import inference
from occmllm import tta
from occmllm.conversation import IGNORE_INDEX, ConversationEncoder, load_images
from occmllm.model import ImageOnlyInternVLProcessor, load_model
from occmllm.questions import CATEGORIES, Q1, category_answer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tiny_model, synth_small):
    torch.manual_seed(0)
    model, _ = load_model(tiny_model)  # its weights require gradients, as loaded
    encoder = ConversationEncoder(ImageOnlyInternVLProcessor.from_folder(tiny_model))
    images = sorted((synth_small / "scenes").glob("*/rgb_00.png"))[:3]
    tiled = [encoder.pixel_values(load_images([image])) for image in images]
    inputs = [tta.projector_inputs(model, pixels) for pixels, _ in tiled]
    return model, encoder, tiled, inputs


def plain_features(model, inputs):
    with torch.no_grad():
        return [tta.adapted_module(model)(x) for x in inputs]


def copies(episodes, image):
    return torch.cat([p[image].detach().flatten() for p in episodes.params.values()])


def same_steps(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor, optimizer: str, atol: float) -> bool:
    """Whether two computations of the same steps reached the same weights. Under SGD element by element.
    AdamW's first step is lr * g / (|g| + eps): on an element whose gradient is near eps, the float
    difference of two correct computations moves the result by a sizeable share of lr, so there
    the runs are compared by how far apart they end against how far they moved."""
    if optimizer == "sgd":
        return torch.allclose(a, b, atol=atol)
    return bool((a - b).norm() <= 1e-4 * (b - start).norm())


def test_rewards_sum_to_zero_over_the_candidates():
    scores = torch.tensor([2.5 * 0.31, 2.5 * 0.12, 0.0, 2.5 * 0.77])  # CLIP-S values
    rewards = tta.baseline_rewards(scores)
    assert abs(rewards.sum().item()) < 1e-6
    assert torch.equal(rewards.argsort(), scores.argsort())  # the ranking is CLIP's


def test_projector_inputs_through_the_projector_are_the_visual_tokens(setup):
    model, _, tiled, inputs = setup
    with torch.no_grad():
        tokens = model.get_image_features(pixel_values=tiled[0][0], return_dict=True).pooler_output
    assert torch.allclose(plain_features(model, inputs[:1])[0], tokens, atol=1e-6)
    episodes = tta.Episodes(model, 2)  # unadapted copies read the image as the model does
    with torch.no_grad():
        assert torch.allclose(episodes.project(inputs[:2])[0], tokens, atol=1e-5)


def test_one_step_moves_likelihood_toward_the_best_rewarded(setup):
    model, encoder, tiled, inputs = setup
    answers = [[category_answer(c) for c in CATEGORIES[:4]]]
    batch = tta.answer_batch(encoder, Q1, answers, [tiled[0][1]])
    rewards = tta.baseline_rewards(torch.tensor([0.4, 1.9, 0.7, 0.2]))  # candidate 1 is CLIP's favourite
    episodes = tta.Episodes(model, 1)
    with torch.no_grad():
        before = tta.answer_log_likelihoods(model, batch, episodes.project(inputs[:1]))
    tta.adapt(model, episodes, inputs[:1], batch, rewards, steps=1, lr=1e-3)
    with torch.no_grad():
        after = tta.answer_log_likelihoods(model, batch, episodes.project(inputs[:1]))
    change = after - before
    print("log-likelihood change per candidate:", [f"{c:+.4f}" for c in change.tolist()])
    # the candidates' mass moves to CLIP's favourite: its share among them rises, and most
    assert change[1] == change.max()
    assert torch.softmax(after, 0)[1] > torch.softmax(before, 0)[1]


def test_sgd_update_follows_the_reward_and_adamw_does_not(setup):
    """Halving every reward halves SGD's first step; AdamW's first step is about the learning rate
    whatever the reward's size."""
    model, encoder, tiled, inputs = setup
    batch = tta.answer_batch(encoder, Q1, [[category_answer(c) for c in CATEGORIES[:3]]], [tiled[0][1]])

    def first_step(rewards, optimizer, lr=1.0):  # steps far above the weights' float32 resolution
        episodes = tta.Episodes(model, 1)
        start = copies(episodes, 0)
        tta.adapt(model, episodes, inputs[:1], batch, rewards, steps=1, lr=lr, optimizer=optimizer)
        return copies(episodes, 0) - start
    rewards = tta.baseline_rewards(torch.tensor([1.0, 0.0, 0.5]))
    full, half = first_step(rewards, "sgd"), first_step(rewards / 2, "sgd")
    assert full.abs().max() > 1e-3 and torch.allclose(half, full / 2, rtol=1e-3, atol=1e-6)
    full, half = first_step(rewards, "adamw", 1e-2), first_step(rewards / 2, "adamw", 1e-2)
    assert abs(half.norm() / full.norm() - 1) < 0.05  # the same size (Adam's eps aside)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_images_adapted_together_move_as_each_would_alone(setup, optimizer):
    """Three images in one batch, with different answers and rewards, end with the weights each
    reaches alone; and those are the weights the model's own projector reaches when trained on the
    image directly (pixels through the whole model, the optimizer on the module's parameters). The
    model's weights are not written."""
    model, encoder, tiled, inputs = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    answers = [[category_answer(c) for c in CATEGORIES[i: i + 2 + i]] for i in range(3)]  # 2, 3 and 4 answers
    rewards = [tta.baseline_rewards(torch.rand(len(a), generator=torch.Generator().manual_seed(i)))
               for i, a in enumerate(answers)]
    tiles = [t for _, t in tiled]
    start = copies(tta.Episodes(model, 1), 0)
    together = tta.Episodes(model, 3)
    tta.adapt(model, together, inputs, tta.answer_batch(encoder, Q1, answers, tiles), torch.cat(rewards),
              steps=3, lr=1e-2, optimizer=optimizer)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    for i in range(3):
        alone = tta.Episodes(model, 1)
        tta.adapt(model, alone, inputs[i: i + 1], tta.answer_batch(encoder, Q1, answers[i: i + 1], tiles[i: i + 1]),
                  rewards[i], steps=3, lr=1e-2, optimizer=optimizer)
        # the same code on a batch of one: element by element, whatever the optimizer
        assert torch.allclose(copies(together, i), copies(alone, 0), atol=1e-6)
        # independently: the module itself, trained on the image's pixels
        module = copy.deepcopy(model)
        projector = tta.adapted_module(module)
        projector.requires_grad_(True)
        opt = tta.OPTIMIZERS[optimizer](list(projector.parameters()), 1e-2)
        batch = tta.answer_batch(encoder, Q1, answers[i: i + 1], tiles[i: i + 1])
        for _ in range(3):
            logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            pixel_values=torch.cat([tiled[i][0]] * len(answers[i]))).logits[:, :-1]
            targets = batch.labels[:, 1:]
            logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            loss = -(rewards[i] * (logp * (targets != IGNORE_INDEX)).sum(1)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        direct = torch.cat([p.detach().flatten() for p in projector.parameters()])
        assert same_steps(copies(together, i), direct, start, optimizer, atol=1e-5)
        assert not torch.allclose(direct, start)  # it did move


def test_candidates_are_the_likeliest_answers(setup):
    model, encoder, tiled, inputs = setup
    features = plain_features(model, inputs)
    tiles = [t for _, t in tiled]
    top = tta.candidates(model, encoder, Q1, features, tiles, k=3)
    everything = [category_answer(c) for c in CATEGORIES]
    for i in range(len(features)):
        with torch.no_grad():
            ll = tta.answer_log_likelihoods(model, tta.answer_batch(encoder, Q1, [everything], tiles[i: i + 1]),
                                            features[i: i + 1])
        assert top[i] == [CATEGORIES[j] for j in ll.argsort(descending=True)[:3].tolist()]


def test_one_prompt_serves_all_of_an_image_s_answers(setup):
    """``candidate_log_likelihoods`` (each image's prompt prefilled once, its keys and values shared
    by its answers) scores what ``answer_log_likelihoods`` scores row by row. Prompts of different
    lengths (one image shown as two tiles: its tile's tokens twice), each image with its own
    number of candidates."""
    model, encoder, tiled, inputs = setup
    features = plain_features(model, inputs)
    tiles = [t for _, t in tiled]
    features[1], tiles[1] = torch.cat([features[1], features[1]]), [2 * tiles[1][0]]
    answers = [[category_answer(c) for c in CATEGORIES[:k]] for k in (1, 3, 8)]
    got = tta.candidate_log_likelihoods(model, encoder, Q1, answers, features, tiles)
    with torch.no_grad():
        want = tta.answer_log_likelihoods(model, tta.answer_batch(encoder, Q1, answers, tiles), features)
    assert [len(g) for g in got] == [1, 3, 8]
    assert torch.allclose(torch.cat(got), want, rtol=0, atol=1e-5)
    assert want[4:].max() - want[4:].min() > 1e-2  # the eight answers to one image: far apart against that


# --- the command ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from occmllm import clip
    return clip.build(tmp_path_factory.mktemp("clip") / "clip", image_size=32)


@pytest.mark.slow
def test_tta_rows_in_the_report(tiny_model, synth_small, tiny_clip, tmp_path, monkeypatch):
    """--tta clip writes the rows tta and best-of-K, and resumes to the same file; each image is
    decoded once, for the policy's tiles and CLIP's judge alike."""
    from collections import Counter

    from occmllm import conversation
    decoded, load = Counter(), conversation.load_images

    def counted(paths, context=None):
        decoded.update(map(str, paths))
        return load(paths, context)

    monkeypatch.setattr(conversation, "load_images", counted)
    args = ["--checkpoint", f"m={tiny_model}", "--data", str(synth_small / "stages/test.jsonl"), "--tta", "clip",
            "--clip", str(tiny_clip), "--tta-k", "3", "--tta-steps", "2", "--out", str(tmp_path / "run")]
    torch.manual_seed(0)
    assert inference.main(args) == 0
    assert decoded and set(decoded.values()) == {1}
    lines = [json.loads(x) for x in (tmp_path / "run/predictions.jsonl").read_text().splitlines()]
    n = sum(1 for _ in (synth_small / "stages/test.jsonl").open())
    assert [line["mode"] for line in lines] == ["tta", "best-of-3"] * n
    assert all(set(line["answers"]) == {"Q1"} for line in lines)
    rows = json.loads((tmp_path / "run/report.json").read_text())["rows"]
    assert [(r["mode"], r["n"]) for r in rows] == [("tta", n), ("best-of-3", n)]
    assert rows[0]["samples_per_s"] is not None
    assert inference.main(args) == 0  # resumed: nothing new, the same file
    assert len((tmp_path / "run/predictions.jsonl").read_text().splitlines()) == 2 * n


def test_interrupted_tta_run_resumes_to_the_same_file(tiny_model, synth_small, tiny_clip, tmp_path, monkeypatch):
    """Episodic adaptation restores the projector after each record, so a run stopped in its second
    batch and started again writes the same predictions, byte for byte, as one never stopped."""
    from conftest import stop_inference_in_second_batch
    args = ["--checkpoint", f"m={tiny_model}", "--data", str(synth_small / "stages/test.jsonl"), "--tta", "clip",
            "--clip", str(tiny_clip), "--tta-k", "3", "--tta-steps", "2", "--batch-size", "1"]
    torch.manual_seed(0)
    assert inference.main([*args, "--out", str(tmp_path / "full")]) == 0
    stop_inference_in_second_batch(monkeypatch, "tta")
    with pytest.raises(SystemExit):
        inference.main([*args, "--out", str(tmp_path / "resumed")])
    assert len((tmp_path / "resumed/predictions.jsonl").read_text().splitlines()) == 2  # tta and best-of-3, 1 record
    monkeypatch.undo()
    assert inference.main([*args, "--out", str(tmp_path / "resumed")]) == 0
    full = (tmp_path / "full/predictions.jsonl").read_bytes()
    assert (tmp_path / "resumed/predictions.jsonl").read_bytes() == full and len(full.splitlines()) > 2


def test_tta_bad_input_is_one_line(tiny_model, synth_small, tmp_path, capsys):
    base = ["--checkpoint", f"m={tiny_model}", "--data", str(synth_small / "stages/test.jsonl")]
    cases = {"no clip": (["--tta", "clip"], "--clip PATH"),
             "not clip": (["--tta", "clip", "--clip", str(tiny_model)], "not a CLIP"),
             "clip without tta": (["--clip", str(tiny_model)], "--tta clip"),
             "with cot": (["--tta", "clip", "--clip", str(tiny_model), "--mode", "cot"], "--mode cot"),
             "judge without renders": (["--tta", "second-look"], "--tta second-look needs --recon"),
             "clip for another judge": (["--tta", "second-look", "--clip", str(tiny_model)], "--tta clip"),
             "judge without a blend weight": (["--tta", "second-look", "--recon", str(tmp_path / "recon")],
                                              "not a dual-path checkpoint")}
    for case, (extra, says) in cases.items():
        out = tmp_path / case.replace(" ", "_")
        with pytest.raises(SystemExit) as exc:
            inference.main([*base, *extra, "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and "\n" not in err and says in err, (case, err)
        assert not out.exists(), case
