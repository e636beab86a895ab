"""Self-correction RL for the chain of thought (stage 4): policy gradient on sampled chains.

The chain is ``occmllm.chain``'s, as ``inference.py --mode cot`` runs it: attempt 1 = Q1 with the
image; the check (Q6 after it); where the sampled check says No, the second look = Q1 in a fresh
conversation over the image blended with its reconstruction render, at the blend weight the starting
checkpoint learnt (its ``dual_alpha.json``, kept fixed here). For each training view, K chains are
sampled from the current policy (``occmllm.rollout``) and each gets ``occmllm.chain.reward``:

    r = w_correct [final answer right] + w_cal [check parsed, and No exactly when attempt 1 was wrong]

Nothing pays for No by itself: a policy that always says No earns at most what one that answers
right and says Yes earns. The loss over the batch's sampled answer tokens T (attempt 1, the
check's answer, the second look, each with its end-of-turn token; never prompt, question or image
tokens) is

    L = 1/|T| sum_{t in T} [ -A(t) log pi(y_t | y_<t, images)  +  beta k3_t ]
    A = (r - mean of the K chains' rewards) [/ their std]           (GRPO's group baseline)

except that attempt 1's tokens take the advantage of r1 = w_correct [attempt 1 right] instead
(``separate_first_attempt``): the check's term pays a No after a wrong attempt 1, and on attempt
1's own tokens it would teach the policy to answer wrongly and then say No.
    k3_t = exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1     (pi_ref: a frozen copy of the start)

with log pi computed by one teacher-forced forward pass over exactly the token ids the policy
sampled (no decode / re-encode), at the sampling temperature. One rollout per optimizer step, so
GRPO's importance ratio is 1 and its clipping never acts: the gradient is REINFORCE's with the
group mean as baseline.

Why not TRL's GRPOTrainer: its rollouts are one completion after a prompt (or tool calls parsed
from the completion); this chain asks a second question and, on a sampled "No.", opens a second
conversation over a blended image, which neither its prompt/completion split nor its forward pass
can express. So the rollout (``occmllm.rollout``), the rewards and the loss are written by hand, and the HF
Trainer runs the loop (AdamW, schedule, accumulation, logging, checkpoints, DDP / DeepSpeed ZeRO-1/2).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from transformers import Trainer, TrainingArguments

from occmllm import chain as chain_rules
from occmllm import fileio, records
from occmllm.chain import RewardWeights
from occmllm.conversation import pad_batch, stop_ids
from occmllm.dual import ALPHA_FILE, check_alpha, read_alpha
from occmllm.errors import OccError
from occmllm.model import ImageOnlyInternVLProcessor, ResumesInternVL
from occmllm.questions import parse_category, parse_yes_no
from occmllm.rollout import Chain, ChainSampler, load_views, stacked, visual_inputs
from occmllm.stage import DataArguments, ModelArguments, SaveProcessor, build_model, fit, reference_model


@dataclass
class SelfCorrectArguments:
    rl_data: str | None = field(default=None, metadata={
        "help": "stage-4 JSONL (or meta JSON) whose check records (Q1, then Q6) give the views (default: train_data)"})
    renders: str | None = field(default=records.RECON_RENDERS, metadata={
        "help": "render folder under the dataset root (<view id>.png): the second look's render of each view"})
    rl_steps: int = field(default=200, metadata={"help": "optimizer steps of the RL phase"})
    rl_images_per_step: int = field(default=4, metadata={"help": "views per step and device"})
    rl_group_size: int = field(default=4, metadata={"help": "K: chains sampled per view (the group of the baseline)"})
    rl_learning_rate: float = 1e-4
    rl_warmup_steps: int = 0
    rl_save_steps: int = field(default=0, metadata={"help": "checkpoint every N RL steps (0: only the final model)"})
    rl_temperature: float = field(default=1.0, metadata={"help": "sampling temperature (the loss uses the same)"})
    rl_max_new_tokens: int = field(default=24, metadata={"help": "longest sampled answer in tokens"})
    kl_beta: float = field(default=0.02, metadata={"help": "weight of the k3 KL to the frozen start (0: no reference)"})
    reward_correct: float = field(default=1.0, metadata={"help": "reward for a right final answer"})
    reward_calibration: float = field(default=0.5, metadata={
        "help": "reward for a check (Q6) that says No exactly when attempt 1 was wrong"})
    scale_advantages: bool = field(default=True, metadata={"help": "divide advantages by the group's reward std"})
    separate_first_attempt: bool = field(default=True, metadata={
        "help": "score attempt 1's tokens on attempt 1 being right alone (false: on the chain's reward, whose "
                "check term pays a No after a wrong attempt 1)"})


# --- rewards and advantages ------------------------------------------------------------------

RewardFn = Callable[[Chain], float]


def chain_outcome(chain: Chain) -> dict[str, bool]:
    """What the chain did: attempt 1 right, the check answered (and No), the second look taken, final right."""
    first_right = parse_category(chain.answers[0]) == chain.view.category
    check = parse_yes_no(chain.answers[1]) if len(chain.answers) > 1 else None
    second = chain.answers[2] if len(chain.answers) > 2 else None
    final_right = parse_category(chain_rules.final_answer(chain.answers[0], second)) == chain.view.category
    return {"first_right": first_right, "q6_parsed": check is not None, "said_no": check is False,
            "asked_again": second is not None, "final_right": final_right}


def score_first(chain: Chain, weights: RewardWeights = RewardWeights()) -> float:
    """Attempt 1's own reward: right or not. Its tokens are scored on this alone, so the check's
    reward, which pays a truthful No. after a wrong attempt 1, cannot teach it to be wrong."""
    return weights.correct * chain_outcome(chain)["first_right"]


def score_chain(chain: Chain, weights: RewardWeights = RewardWeights()) -> float:
    """``occmllm.chain.reward`` of a sampled chain (an unparsable check earns its term nothing)."""
    o = chain_outcome(chain)
    return chain_rules.reward(o["first_right"], o["said_no"] if o["q6_parsed"] else None, o["final_right"], weights)


def group_advantages(rewards: torch.Tensor, k: int, scale: bool) -> torch.Tensor:
    """Reward minus the mean of its view's K chains (optionally over their std); (n,) -> (n,)."""
    groups = rewards.view(-1, k)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + 1e-4)
    return centred.reshape(-1)


# --- the loss ----------------------------------------------------------------------------------

@dataclass
class ChainBatch:
    """Every conversation of a batch of chains, one row each: the chains' first-answer-and-check
    conversations, then their second looks."""
    input_ids: torch.Tensor       # (rows, L) right padded
    attention_mask: torch.Tensor  # (rows, L)
    pixel_values: torch.Tensor    # (tiles of every row's images in order, 3, H, W)
    render_pixel_values: torch.Tensor | None  # the second looks' render tiles, blended with their images'
    rendered: torch.Tensor        # (tiles,) bool: the image tiles blended with a render
    alpha: float                  # the blend's image weight
    sampled: torch.Tensor         # (rows, L) bool: tokens the policy sampled (the loss's tokens)
    first: torch.Tensor           # (rows, L) bool: the sampled tokens of attempt 1
    owner: torch.Tensor           # (rows,) the chain each row belongs to
    temperature: float = 1.0      # the sampling distribution: logits / temperature,
    suppressed: tuple = ()        # without these token ids

    @property
    def columns(self) -> torch.Tensor:
        """(P,) the token positions where any row has a sampled token."""
        return self.sampled.any(dim=0).nonzero().squeeze(1)


def chain_batch(chains: list[Chain], sampler: ChainSampler) -> ChainBatch:
    rows = [(i, c.check) for i, c in enumerate(chains)] + [(i, c.second) for i, c in enumerate(chains) if c.second]
    ids, attention_mask = pad_batch([conv.ids for _, conv in rows], sampler.pad_id, "right")
    sampled = torch.zeros_like(ids, dtype=torch.bool)
    first = torch.zeros_like(sampled)
    for row, (_, conv) in enumerate(rows):
        sampled[row, conv.sampled] = True
        first[row, conv.sampled[: conv.first]] = True
    return ChainBatch(ids, attention_mask, *stacked([conv for _, conv in rows]), sampler.alpha, sampled, first,
                      torch.tensor([i for i, _ in rows]), sampler.temperature, tuple(sampler.suppressed))


def sampled_log_probs(model, batch: ChainBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi of the sampled tokens by one teacher-forced pass, under the distribution they were
    sampled from: ``(logp, mask)``, both (n, P) over the P columns where any chain has a sampled
    token (logits only there: the vocabulary of a real InternVL is 150k wide). Entries where
    ``mask`` is False are 0."""
    core = getattr(model, "module", model)  # DDP / DeepSpeed wrap the model; the forward goes through the wrapper
    device = core.device
    columns = batch.columns
    # the vision tower runs on the unwrapped model, inside this autograd graph: the wrapper still
    # reduces every gradient that reaches the loss
    images = visual_inputs(core, batch.pixel_values, batch.render_pixel_values, batch.rendered, batch.alpha)
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), **images,
                logits_to_keep=(columns - 1).to(device), use_cache=False)  # the logits at t-1 predict the token at t
    logits = out.logits.float() / batch.temperature               # (n, P, vocab)
    # an id past the logits (a converted checkpoint's added <video> token) can never be sampled anyway
    suppressed = [i for i in batch.suppressed if i < logits.shape[-1]]
    if suppressed:
        logits[..., suppressed] = float("-inf")
    targets = batch.input_ids[:, columns].to(device)              # (n, P)
    logp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    mask = batch.sampled[:, columns].to(device)
    return torch.where(mask, logp, torch.zeros_like(logp)), mask


def token_advantages(chains: list[Chain], batch: ChainBatch, rewards: torch.Tensor, k: int, scale: bool,
                     first_reward_fn: RewardFn | None = None) -> torch.Tensor:
    """The advantage of each sampled token, (rows, P) over ``batch.columns``: its chain's group
    advantage, except on attempt 1's tokens where ``first_reward_fn`` gives attempt 1 its own."""
    chain_adv = group_advantages(rewards, k, scale)[batch.owner][:, None].expand_as(batch.sampled)
    if first_reward_fn is not None:
        first = group_advantages(torch.tensor([first_reward_fn(c) for c in chains], dtype=torch.float32), k, scale)
        chain_adv = torch.where(batch.first, first[batch.owner][:, None], chain_adv)
    return chain_adv[:, batch.columns]


def policy_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, ref_logp: torch.Tensor | None = None,
                beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, kl)``: -mean over sampled tokens of advantage x log pi, plus beta x the mean k3
    estimate of KL(pi || pi_ref) on the same tokens (kl is 0 without a reference). ``advantages``
    is one per row (rows,) or one per token (rows, P)."""
    n = mask.sum().clamp(min=1)
    advantages = advantages.to(logp.device)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    loss = -(advantages * logp).sum() / n
    kl = torch.zeros((), device=logp.device)
    if ref_logp is not None:
        delta = torch.where(mask, ref_logp - logp, torch.zeros_like(logp))
        kl = (torch.exp(delta) - delta - 1).sum() / n
        loss = loss + beta * kl
    return loss, kl


# --- training ----------------------------------------------------------------------------------

class SelfCorrectTrainer(ResumesInternVL, Trainer):
    """The HF Trainer with a rollout-and-policy-gradient ``compute_loss``; each batch is a list of
    views (``{"views": [...]}``)."""

    def __init__(self, *, sampler: ChainSampler, rl_args: SelfCorrectArguments, reward_fn: RewardFn,
                 first_reward_fn: RewardFn | None = None, ref_model=None, **kwargs):
        super().__init__(data_collator=lambda views: {"views": views}, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean per step: the Trainer divides by accumulation
        self.sampler, self.rl_args, self.reward_fn = sampler, rl_args, reward_fn
        self.first_reward_fn = first_reward_fn  # None: attempt 1's tokens take the chain's advantage too
        self.ref_model = ref_model.to(self.args.device) if ref_model is not None else None
        if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
            raise OccError("self-correction samples with the whole model on each device: use DeepSpeed ZeRO-1 or "
                           "ZeRO-2 (or none), not ZeRO-3")
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        k = self.rl_args.rl_group_size
        chains = self.sampler.sample(self.accelerator.unwrap_model(model), inputs["views"], k)
        rewards = torch.tensor([self.reward_fn(c) for c in chains], dtype=torch.float32)
        batch = chain_batch(chains, self.sampler)
        advantages = token_advantages(chains, batch, rewards, k, self.rl_args.scale_advantages, self.first_reward_fn)
        logp, mask = sampled_log_probs(model, batch)
        ref_logp = None
        if self.ref_model is not None:
            with torch.no_grad():
                ref_logp, _ = sampled_log_probs(self.ref_model, batch)
        loss, kl = policy_loss(logp, mask, advantages, ref_logp, self.rl_args.kl_beta)
        outcomes = [chain_outcome(c) for c in chains]
        self._metrics["reward"].append(rewards.mean().item())
        self._metrics["kl"].append(kl.item())
        for key in ("first_right", "said_no", "final_right"):
            self._metrics[key].append(sum(o[key] for o in outcomes) / len(outcomes))
        self._metrics["answer_tokens"].append(mask.sum().item() / len(chains))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:  # training logs get the mean rollout figures since the last log
            logs = {**logs, **{f"rl/{k}": round(sum(v) / len(v), 4) for k, v in self._metrics.items()}}
            self._metrics.clear()
        super().log(logs, start_time)


def rl_training_arguments(training: TrainingArguments, rl: SelfCorrectArguments) -> TrainingArguments:
    """The RL phase's Trainer settings: the stage's, with the RL phase's steps, batch and rate."""
    if rl.rl_group_size < 2:
        raise OccError(f"rl_group_size must be at least 2 (the group mean is the baseline), got {rl.rl_group_size}")
    save = {"save_strategy": "steps", "save_steps": rl.rl_save_steps} if rl.rl_save_steps > 0 else {
        "save_strategy": "no"}
    return replace(training, max_steps=rl.rl_steps, learning_rate=rl.rl_learning_rate,
                   per_device_train_batch_size=rl.rl_images_per_step, warmup_steps=rl.rl_warmup_steps,
                   remove_unused_columns=False, **save)


def train(model_args: ModelArguments, data_args: DataArguments, rl_args: SelfCorrectArguments,
          training: TrainingArguments, reward_fn: RewardFn | None = None) -> Path:
    """Self-correction RL from ``model_args.model_name_or_path`` into ``training.output_dir`` (a
    plain InternVL folder with its processor). ``reward_fn`` defaults to ``score_chain`` with the
    configured weights."""
    if rl_args.rl_steps < 1:
        raise OccError(f"rl_steps must be at least 1 for the RL phase, got {rl_args.rl_steps}")
    views = load_views(rl_args.rl_data or data_args.train_data, data_args.data_root, rl_args.renders)
    args = rl_training_arguments(training, rl_args)
    alpha = second_look_alpha(model_args)
    processor = ImageOnlyInternVLProcessor.from_folder(model_args.model_name_or_path)
    model = build_model(replace(model_args, dual_alpha=None, dual_learnable=False), args)
    sampler = ChainSampler(processor, alpha, rl_args.rl_max_new_tokens, rl_args.rl_temperature,
                           stop_ids(processor.tokenizer, model.generation_config))
    first_reward_fn = None
    if reward_fn is None:
        weights = RewardWeights(rl_args.reward_correct, rl_args.reward_calibration)
        reward_fn = lambda chain: score_chain(chain, weights)  # noqa: E731
        if rl_args.separate_first_attempt:
            first_reward_fn = lambda chain: score_first(chain, weights)  # noqa: E731
    ref = reference_model(model_args.model_name_or_path, model) if rl_args.kl_beta > 0 else None
    trainer = SelfCorrectTrainer(model=model, args=args, train_dataset=views, sampler=sampler, rl_args=rl_args,
                                 reward_fn=reward_fn, first_reward_fn=first_reward_fn, ref_model=ref,
                                 callbacks=[SaveProcessor(processor)])
    steps_per_epoch = math.ceil(len(views) / (args.per_device_train_batch_size * args.world_size))
    print(f"self-correction: {args.max_steps} steps of {args.per_device_train_batch_size} views x "
          f"{rl_args.rl_group_size} chains ({args.max_steps / steps_per_epoch:.2f} passes over the views)", flush=True)
    if args.should_save:  # the checkpoint carries the blend weight its second look was trained with
        fileio.write_json(Path(args.output_dir) / ALPHA_FILE, {"alpha": alpha, "learnable": False})
    return fit(trainer, processor, data_args.resume)


def second_look_alpha(model_args: ModelArguments) -> float:
    """The second look's blend weight, fixed in the RL phase: the starting checkpoint's (stage 4's
    SFT phase learns it), else ``dual_alpha``."""
    alpha = read_alpha(model_args.model_name_or_path)
    if alpha is None:
        alpha = model_args.dual_alpha
    if alpha is None:
        raise OccError(f"{model_args.model_name_or_path}: no {ALPHA_FILE}, and no dual_alpha given: the chain's "
                       "second look blends the image with its render at a weight stage 4's SFT phase learns "
                       "(dual_alpha there); start the RL phase from that checkpoint, or set dual_alpha")
    return check_alpha(alpha, "dual_alpha")
