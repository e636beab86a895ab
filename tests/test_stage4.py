"""Stage 4: self-correction RL (occmllm.selfcorrect) and the stage's two-phase command.

The policy-gradient loss moves the model only through the sampled answer tokens and only when
the chains' rewards differ; the KL to the separately loaded reference starts at zero and grows;
a few RL steps raise the mean reward of a briefly fine-tuned tiny model; the stage's data,
config and missing-checkpoint error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainingArguments

from conftest import STAGE4_RENDERS as RENDERS
from occmllm import chain as rules
from occmllm import records
from occmllm import rollout
from occmllm import selfcorrect as sc
from occmllm.conversation import IGNORE_INDEX, ConversationEncoder, load_images
from occmllm.dual import read_alpha, read_dual
from occmllm.model import load_model
from occmllm.stage import DataArguments, ModelArguments, reference_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "step4_selfconsistency/config.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")


def _scripted(sampler, tokenizer, answers):
    """Replace sampling by fixed answers (token ids as a tokenizer writes them), one list per turn."""
    turns = iter(answers)

    def generate(model, prompts, convs):
        text, close = next(turns)
        return [tokenizer.encode(text) + ([tokenizer.eos_token_id] if close else []) for _ in prompts]
    sampler.generate = generate


def _chain(answers, category="jar"):
    return rollout.Chain(rollout.View("v", Path("a.png"), Path("r.png"), category), answers=answers)


# --- (b) which tokens the loss reads ------------------------------------------------------------

def _supervised(tok, conv):
    return "".join(tok.decode([conv.ids[i]]) for i in conv.sampled)


def test_loss_mask_is_the_sampled_answer_tokens(tiny_model, stage4_file):
    model, processor = load_model(tiny_model)
    tok = processor.tokenizer
    view = rollout.load_views(stage4_file, renders=RENDERS)[0]
    sampler = rollout.ChainSampler(processor, 0.5, max_new_tokens=8)
    _scripted(sampler, tok, [("The object is jar.", True), ("No.", True), ("The object is can.", True)])
    chain, = sampler.sample(model, [view], 1)
    assert _supervised(tok, chain.check) == "The object is jar.<|im_end|>No.<|im_end|>"
    assert _supervised(tok, chain.second) == "The object is can.<|im_end|>"
    assert chain.answers == ["The object is jar.", "No.", "The object is can."]
    # each conversation is exactly what SFT encodes for the same turns, supervised on the same
    # positions (answers + end-of-turn tokens): no prompt, question or image token is in the loss
    encoder = ConversationEncoder(processor)
    for conv, turns in ((chain.check, rules.check_turns(*chain.answers[:2])),
                        (chain.second, rules.second_look_turns(chain.answers[2]))):
        enc = encoder.encode(load_images([view.image]), turns)
        assert conv.ids == enc.input_ids[: len(conv.ids)]
        assert conv.sampled == [i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX]
        assert torch.equal(conv.pixel_values, enc.pixel_values)
        image_token = tok.convert_tokens_to_ids(processor.image_token)
        assert sum(t == image_token for t in conv.ids) == processor.image_seq_length
        assert not any(conv.ids[i] == image_token for i in conv.sampled)
    # the check shows the image alone; the second look blends it with the render's tiles
    assert chain.check.render_pixel_values is None
    assert torch.equal(chain.second.render_pixel_values, encoder.pixel_values(load_images([view.render]))[0])
    # the second look cannot see the first answer: its prompt is the fresh second-look question alone
    prompt = chain.second.ids[: chain.second.sampled[0]]
    assert prompt == encoder.prompt_ids([1], rules.second_look_turns())
    assert "jar" not in tok.decode(prompt)
    first = len(sampler.encoder.prompt_ids([1], rules.first_turns()))
    assert chain.check.sampled[:6] == list(range(first, first + 6))  # attempt 1 follows the first prompt directly
    batch = sc.chain_batch([chain], sampler)
    assert batch.owner.tolist() == [0, 0] and batch.sampled[0].nonzero().squeeze(1).tolist() == chain.check.sampled
    assert tok.decode(batch.input_ids[0, batch.first[0]].tolist()) == "The object is jar.<|im_end|>"  # attempt 1
    assert not batch.first[1].any()
    assert torch.equal(batch.pixel_values, torch.cat([chain.check.pixel_values, chain.second.pixel_values]))
    assert batch.rendered.tolist() == [False, True] and torch.equal(batch.render_pixel_values,
                                                                    chain.second.render_pixel_values)

    # "Yes." ends the chain after the check; an answer cut off by max_new_tokens gets an end-of-turn
    # token to close the turn, which the policy did not sample and the loss does not read
    _scripted(sampler, tok, [("The object is", False), ("Yes.", True)])
    chain, = sampler.sample(model, [view], 1)
    assert _supervised(tok, chain.check) == "The object isYes.<|im_end|>"
    assert chain.second is None and len(chain.answers) == 2
    closing = chain.check.sampled[len(tok.encode("The object is")) - 1] + 1
    assert chain.check.ids[closing] == tok.eos_token_id and closing not in chain.check.sampled


def test_rewards_and_advantages():
    w = rules.RewardWeights(1.0, 0.5)
    assert sc.score_chain(_chain(["The object is can.", "No.", "The object is jar."]), w) == 1.5  # fixed
    assert sc.score_chain(_chain(["The object is jar.", "Yes."]), w) == 1.5        # right and sure
    assert sc.score_chain(_chain(["The object is jar.", "No.", "The object is can."]), w) == 0.0  # broke it
    assert sc.score_chain(_chain(["The object is can.", "Yes."]), w) == 0.0        # wrong and sure
    assert sc.score_chain(_chain(["The object is can.", "No.", "The object is can."]), w) == 0.5  # knew, no fix
    assert sc.score_chain(_chain(["The object is jar.", "No.", "The object is jar."]), w) == 1.0  # looked for nothing
    assert sc.score_chain(_chain(["The object is jar.", "maybe"]), w) == 1.0       # no calibration credit
    adv = sc.group_advantages(torch.tensor([2.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 3, scale=False)
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0, 0.0, 0.0]
    scaled = sc.group_advantages(torch.tensor([2.0, 0.0, 1.0, 1.0, 1.0, 1.0]), 3, scale=True)
    assert torch.allclose(scaled[:3], torch.tensor([1.0, -1.0, 0.0]), atol=1e-3) and scaled[3:].abs().sum() == 0


def test_attempt_one_is_scored_on_its_own(tiny_model, stage4_file):
    """Attempt 1 wrong, then No. and a fixed answer: the best chain of its group, yet its attempt-1
    tokens get a negative advantage (right first answers are better), and its check and second-look
    tokens the chain's positive one."""
    model, processor = load_model(tiny_model)
    tok = processor.tokenizer
    view = rollout.load_views(stage4_file, renders=RENDERS)[0]
    right = f"The object is {view.category}."
    wrong = f"The object is {'can' if view.category != 'can' else 'jar'}."
    sampler = rollout.ChainSampler(processor, 0.5, max_new_tokens=8)
    scripts = [[(wrong, True), ("No.", True), (right, True)],  # fixed: r 1.5, r1 0
               [(right, True), ("No.", True), (right, True)]]  # right, looked for nothing: r 1.0, r1 1
    chains = []
    for script in scripts:
        _scripted(sampler, tok, script)
        chains += sampler.sample(model, [view], 1)
    w = rules.RewardWeights(1.0, 0.5)
    rewards = torch.tensor([sc.score_chain(c, w) for c in chains])
    assert rewards.tolist() == [1.5, 1.0] and [sc.score_first(c, w) for c in chains] == [0.0, 1.0]
    batch = sc.chain_batch(chains, sampler)
    assert batch.owner.tolist() == [0, 1, 0, 1]  # both checks, then both second looks
    first = batch.first[:, batch.columns]
    sampled = batch.sampled[:, batch.columns]
    split = sc.token_advantages(chains, batch, rewards, 2, False, lambda c: sc.score_first(c, w))
    assert (split[0][first[0]] == -0.5).all() and (split[0][sampled[0] & ~first[0]] == 0.25).all()
    assert (split[1][first[1]] == 0.5).all() and (split[1][sampled[1] & ~first[1]] == -0.25).all()
    assert (split[2][sampled[2]] == 0.25).all() and (split[3][sampled[3]] == -0.25).all()  # the second looks
    whole = sc.token_advantages(chains, batch, rewards, 2, False)  # without it: the chain's advantage throughout
    assert (whole[0][sampled[0]] == 0.25).all() and (whole[1][sampled[1]] == -0.25).all()


# --- (a) the gradient ----------------------------------------------------------------------------

def _grads(model, sampler, chains, advantages):
    model.zero_grad()
    logp, mask = sc.sampled_log_probs(model, sc.chain_batch(chains, sampler))
    loss, _ = sc.policy_loss(logp, mask, advantages)
    loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


def test_policy_gradient_is_zero_exactly_when_rewards_are_equal(tiny_model, stage4_file):
    torch.manual_seed(0)
    model, processor = load_model(tiny_model)
    model.train()
    sampler = rollout.ChainSampler(processor, 0.5, max_new_tokens=6)
    views = rollout.load_views(stage4_file, renders=RENDERS)[:2]
    chains = sampler.sample(model, views, 3)
    assert all(c.check.sampled for c in chains)
    varied = sc.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.0]), 3, scale=True)
    grads = _grads(model, sampler, chains, varied)
    assert sum(g.abs().sum().item() for g in grads if g is not None) > 0
    assert model.lm_head.weight.grad.abs().sum() > 0 and any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.vision_tower.parameters())
    equal = sc.group_advantages(torch.full((6,), 0.7), 3, scale=True)
    assert equal.abs().sum() == 0
    grads = _grads(model, sampler, chains, equal)
    assert all(g is None or g.abs().sum() == 0 for g in grads)


# --- (d) the KL to the reference -------------------------------------------------------------------

def test_kl_to_the_reference_starts_at_zero_and_grows(tiny_model, stage4_file):
    torch.manual_seed(0)
    policy, processor = load_model(tiny_model)
    reference = reference_model(tiny_model, policy)  # loaded again from the checkpoint, frozen
    assert reference is not policy and not any(p.requires_grad for p in reference.parameters())
    policy.train()
    sampler = rollout.ChainSampler(processor, 0.5, max_new_tokens=6)
    chains = sampler.sample(policy, rollout.load_views(stage4_file, renders=RENDERS)[:2], 3)
    batch = sc.chain_batch(chains, sampler)
    advantages = sc.group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.0, 2.0, 0.0]), 3, scale=True)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    kls = []
    for _ in range(3):
        logp, mask = sc.sampled_log_probs(policy, batch)
        with torch.no_grad():
            ref_logp, _ = sc.sampled_log_probs(reference, batch)
        loss, kl = sc.policy_loss(logp, mask, advantages, ref_logp, beta=0.02)
        kls.append(kl.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("KL by step:", kls)
    assert kls[0] == 0.0 and kls[-1] > 1e-6


# --- (c) learning -----------------------------------------------------------------------------------

def says_no(chain) -> float:
    """A reward for one behaviour: asking for the second look (the check answered No)."""
    return float(sc.chain_outcome(chain)["said_no"])


def mean_outcomes(model, sampler, views, k: int, reward_fn, seed: int) -> dict:
    """Mean reward and outcome rates of K chains per view, sampled with a fixed seed (the global
    random state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        chains = sampler.sample(model, views, k)
    outcomes = [sc.chain_outcome(c) for c in chains]
    out = {"reward": sum(reward_fn(c) for c in chains) / len(chains)}
    for key in ("first_right", "said_no", "final_right"):
        out[key] = sum(o[key] for o in outcomes) / len(outcomes)
    return out


@pytest.mark.slow
def test_rl_steps_raise_the_mean_reward(tiny_model, stage4_file, tmp_path):
    from step4_selfconsistency.train import run
    # phase 1 alone, through the stage command: brief CoT SFT so Q1 gets categories and Q6 Yes./No.
    sft_dir = run(["--phases", "sft", "--second_look_model", "false", "--keep_first_answer", "0",
                   "--model_name_or_path", str(tiny_model),
                   "--train_data", str(stage4_file),
                   "--output_dir", str(tmp_path / "step4"), "--sft_output_dir", str(tmp_path / "sft"),
                   "--max_steps", "150", "--per_device_train_batch_size", "8", "--learning_rate", "0.003",
                   "--warmup_steps", "0", "--augment", "false", "--save_strategy", "no", "--logging_steps", "50",
                   "--disable_tqdm", "true"], default_config=CONFIG)
    assert sft_dir == tmp_path / "sft" and not (tmp_path / "step4").exists()
    views = rollout.load_views(stage4_file, renders=RENDERS)
    model, processor = load_model(sft_dir)
    sampler = rollout.ChainSampler(processor, read_alpha(sft_dir), max_new_tokens=10)
    before = mean_outcomes(model, sampler, views, 4, says_no, seed=1)
    print("before RL:", before)
    assert before["said_no"] < 0.9  # room to learn

    rl = sc.SelfCorrectArguments(renders=RENDERS, rl_steps=12, rl_images_per_step=4, rl_group_size=4,
                                 rl_learning_rate=0.002, rl_max_new_tokens=10, kl_beta=0.02)
    training = TrainingArguments(output_dir=str(tmp_path / "rl"), use_cpu=True, report_to="none", seed=0,
                                 logging_steps=4, disable_tqdm=True, lr_scheduler_type="constant")
    out = sc.train(ModelArguments(model_name_or_path=str(sft_dir)), DataArguments(train_data=str(stage4_file)), rl,
                   training, reward_fn=says_no)
    assert out == tmp_path / "rl" and (out / "processor_config.json").is_file()
    model, processor = load_model(out)  # a plain InternVL folder, with the blend weight phase 1 learnt
    assert read_alpha(out) == read_alpha(sft_dir)
    after = mean_outcomes(model, rollout.ChainSampler(processor, read_alpha(out), max_new_tokens=10), views, 4,
                          says_no, seed=1)
    print("after RL:", after)
    assert after["reward"] > before["reward"] + 0.15


# --- the stage command --------------------------------------------------------------------------------

def test_stage4_config_and_views(stage4_file):
    from occmllm.config import parse_config
    from step4_selfconsistency.train import PhaseArguments
    model, data, phases, rl, training = parse_config(
        (ModelArguments, DataArguments, PhaseArguments, sc.SelfCorrectArguments, TrainingArguments), [], CONFIG)
    assert model.model_name_or_path == "outputs/demo/checkpoints/step2"  # the demo leaves stage 3 out
    assert data.train_data == "outputs/demo/stages/step4_train.jsonl"
    assert training.output_dir == "outputs/demo/checkpoints/step4" and phases.phases == "sft"
    assert (rl.reward_correct, rl.reward_calibration, rl.kl_beta) == (1.0, 0.5, 0.02)
    args = sc.rl_training_arguments(training, rl)
    assert (args.max_steps, args.learning_rate, args.per_device_train_batch_size) == (
        rl.rl_steps, rl.rl_learning_rate, rl.rl_images_per_step)
    recs = records.read_records(stage4_file)
    views = rollout.load_views(stage4_file, renders=RENDERS)
    assert [v.id for v in views] == [r["id"] for r in recs if "#" not in r["id"]]  # the check records
    assert all(v.render.parent.name == "stage4_test" and v.render.name == f"{v.id}.png" for v in views)
    no_render = rollout.load_views(stage4_file, renders="renders/none")  # no render: the image itself
    assert all(v.render == v.image for v in no_render)


@pytest.mark.slow
def test_stage4_runs_both_phases(tiny_model, stage4_file, tmp_path):
    from step4_selfconsistency.train import run
    out = run(["--model_name_or_path", str(tiny_model), "--train_data", str(stage4_file), "--output_dir",
               str(tmp_path / "step4"), "--max_steps", "2", "--per_device_train_batch_size", "4", "--augment", "false",
               "--save_strategy", "no", "--rl_steps", "2", "--rl_images_per_step", "2", "--rl_group_size", "2",
               "--rl_max_new_tokens", "6", "--renders", RENDERS, "--disable_tqdm", "true", "--phases", "sft,rl",
               "--second_look_model", "false", "--keep_first_answer", "0"], default_config=CONFIG)
    assert out == tmp_path / "step4"
    load_model(tmp_path / "step4_cot_sft")  # phase 1's checkpoint, where phase 2 started
    load_model(out)
    # phase 1 learnt the second look's blend weight; phase 2 kept it fixed and saved it with its checkpoint
    assert read_dual(out) == {"alpha": read_alpha(tmp_path / "step4_cot_sft"), "learnable": False}
    # the config's phase 1 alone saves the stage's checkpoint into output_dir, its second look a model of its own
    alone = run(["--model_name_or_path", str(tiny_model), "--train_data", str(stage4_file), "--output_dir",
                 str(tmp_path / "sft_only"), "--max_steps", "1", "--per_device_train_batch_size", "4", "--augment",
                 "false", "--save_strategy", "no", "--disable_tqdm", "true"], default_config=CONFIG)
    assert alone == tmp_path / "sft_only" and not (tmp_path / "sft_only_cot_sft").exists()
    load_model(alone)
    assert read_dual(alone) is None  # the first look never blends
    second = rules.second_look_model(alone)
    assert second == alone / rules.SECOND_LOOK_DIR and read_dual(second)["learnable"] is True
    load_model(second)


def test_each_look_trains_on_its_own_records(tiny_model, stage4_file, tmp_path):
    """With ``second_look_model`` the records with a render train the second look's model (blended)
    and the others the checkpoint itself; either set empty, or the RL phase, is a one-line error."""
    import math

    from occmllm.errors import OccError
    from step4_selfconsistency.train import run
    recs = records.read_records(stage4_file)
    blended = [r for r in recs if records.render_of(r)]  # the records stage 4's builder gave a render
    assert 0 < len(blended) < len(recs)
    # one epoch each, saved at its end: a model's checkpoint-N counts the batches of its own records
    out = run(["--model_name_or_path", str(tiny_model), "--train_data", str(stage4_file), "--output_dir",
               str(tmp_path / "looks"), "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--augment",
               "false", "--save_strategy", "epoch", "--disable_tqdm", "true"], default_config=CONFIG)
    steps = {p.name for p in out.glob("checkpoint-*")}
    second_steps = {p.name for p in (out / rules.SECOND_LOOK_DIR).glob("checkpoint-*")}
    assert steps == {f"checkpoint-{math.ceil((len(recs) - len(blended)) / 8)}"}
    assert second_steps == {f"checkpoint-{math.ceil(len(blended) / 8)}"}
    # the config trains the second look's projector (it reads renders through it) and keeps the first look's
    start = load_file(tiny_model / "model.safetensors")

    def moved(folder: Path, part: str) -> bool:
        weights = load_file(folder / "model.safetensors")
        names = [k for k in start if part in k]
        assert names
        return any(not torch.equal(weights[k], start[k]) for k in names)
    assert not moved(out, "multi_modal_projector") and moved(out, "language_model")
    assert moved(out / rules.SECOND_LOOK_DIR, "multi_modal_projector")
    argv = ["--model_name_or_path", str(tiny_model), "--output_dir", str(tmp_path / "s4"), "--max_steps", "1",
            "--save_strategy", "no", "--disable_tqdm", "true"]
    with pytest.raises(OccError, match="--second_look_model false"):
        run([*argv, "--train_data", str(stage4_file), "--phases", "sft,rl"], default_config=CONFIG)
    with pytest.raises(OccError, match="set --keep_first_answer 0"):  # one blended model: nothing plain to hold
        run([*argv, "--train_data", str(stage4_file), "--phases", "sft", "--second_look_model", "false"],
            default_config=CONFIG)
    plain = tmp_path / "plain.jsonl"  # the chain's records without its second looks
    plain.write_text("".join(json.dumps(r) + "\n" for r in recs if not records.render_of(r)))
    root = records.root_from_meta(stage4_file, "--data_root")
    with pytest.raises(OccError, match="no second-look records"):
        run([*argv, "--train_data", str(plain), "--data_root", str(root)], default_config=CONFIG)
    assert not (tmp_path / "s4").exists()


def test_missing_stage3_checkpoint_is_one_line_error(tmp_path, capsys):
    from step4_selfconsistency.train import main
    missing = tmp_path / "checkpoints/step3"
    with pytest.raises(SystemExit) as exc:
        main(["--model_name_or_path", str(missing), "--output_dir", str(tmp_path / "out")], default_config=CONFIG)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (f"error: {missing}: checkpoint folder not found; stage 4 trains from stage 3's "
                                       "checkpoint: run stage 3 first (bash step3_mpo/run.sh) or pass "
                                       "--model_name_or_path\n")
    assert not (tmp_path / "out").exists()


def test_the_demo_trains_stage4_from_stage2_unless_asked_for_stage3():
    """make demo leaves stage 3 out (no gain on validation): stage 4 starts from stage 2 and the
    reports ask no step3; DEMO_STAGE3=1 trains stage 3 after stage 2's held-out answers, starts
    stage 4 from it and reports it."""
    def commands(*targets, flags=()):
        out = subprocess.run(["make", "-n", *targets, "PY=python", *flags], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.replace("\\\n", " ")

    stages, reports = commands("demo-stages"), commands("demo-report-val-plain", "demo-report-test-plain")
    assert "step3" not in stages and "demo-stage3" not in stages
    assert "step4_selfconsistency/run.sh --disable_tqdm true --model_name_or_path outputs/demo/checkpoints/step2" \
        in stages
    assert "step2=outputs/demo/checkpoints/step2" in reports and "step3=" not in reports
    stages = commands("demo-stages", flags=["DEMO_STAGE3=1"])
    assert stages.index("step2_heldout") < stages.index("demo-stage3") < stages.index("step4_selfconsistency/run.sh")
    assert "--model_name_or_path outputs/demo/checkpoints/step3" in stages
    assert commands("demo-report-val-plain", flags=["DEMO_STAGE3=1"]).count("step3=outputs/demo/checkpoints/step3") == 1
    stage3 = commands("demo-stage3")
    assert "step3_mpo.make_data" in stage3 and "--predictions outputs/demo/predictions/step2_heldout" in stage3
    assert "step3_mpo/run.sh" in stage3


def test_missing_demo_start_checkpoint_names_the_stage_that_writes_it():
    """The demo's stage 4 starts from stage 2's checkpoint (stage 3 is left out of it): the hint for
    the config's own start names stage 2, and any other missing folder the stage before, stage 3."""
    from occmllm.stage import missing_checkpoint_hint
    assert missing_checkpoint_hint("step4_selfconsistency", "outputs/demo/checkpoints/step2") == (
        "stage 4 trains from stage 2's checkpoint: run stage 2 first (bash step2_multiquery/run.sh) or pass "
        "--model_name_or_path")
    assert missing_checkpoint_hint("step4_selfconsistency", "outputs/demo/checkpoints/step3").startswith(
        "stage 4 trains from stage 3's checkpoint: run stage 3 first (bash step3_mpo/run.sh)")
    for other in ("elsewhere/ckpt", "outputs/demo/checkpoints/step4"):  # stage 4's own output is no start
        assert missing_checkpoint_hint("step4_selfconsistency", other).startswith(
            "stage 4 trains from stage 3's checkpoint")


def test_launcher_reports_missing_stage3_checkpoint(tmp_path):
    """Through run.sh as users start it: one line on stderr, exit status 2."""
    missing = tmp_path / "step3"
    out = subprocess.run(["bash", "step4_selfconsistency/run.sh", "--model_name_or_path", str(missing)], cwd=ROOT,
                         env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.splitlines()[-1] == (f"error: {missing}: checkpoint folder not found; stage 4 trains from stage "
                                           "3's checkpoint: run stage 3 first (bash step3_mpo/run.sh) or pass "
                                           "--model_name_or_path")
