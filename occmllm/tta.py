"""Episodic test-time adaptation of the category answer with a CLIP reward (RLCF: Zhao et al.,
"Test-time adaptation with CLIP reward for zero-shot generalization in vision-language models",
ICLR 2024), and its no-gradient baseline, best-of-K.

For one test image:

1. candidates: the K categories whose Q1 answers ("The object is {c}.") the model finds likeliest
   (teacher-forced log-likelihood of each of the eight answers), as RLCF does for classification;
2. reward: CLIP-S(caption of the candidate, image) = 2.5 max(cos, 0), minus the mean over the K
   candidates (the baseline: the rewards of one image sum to zero);
3. a few steps of REINFORCE on the candidates' log-likelihoods,
       L = -1/K sum_k r_k log pi(answer_k | image, Q1)     (log pi summed over the answer's tokens),
   by plain SGD by default, so the update's size follows the reward: where CLIP barely tells
   the candidates apart the model barely moves (AdamW, RLCF's choice, normalises every step to
   about the learning rate whatever the reward; ``optimizer="adamw"``),
   updating the multi-modal projector only: the small MLP between the vision tower and the
   language model, so the update changes how this image is read, not what the language model
   knows; it is a few percent of a real InternVL's parameters and has no state beyond its weights;
4. the adapted model answers Q1 greedily;
5. the projector's weights are put back bit for bit (``Episode``) and the optimizer is dropped,
   so every test image starts from the same model.

Best-of-K answers with the candidate CLIP-S ranks first, without any gradient step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from occmllm.conversation import IGNORE_INDEX, ConversationEncoder, pad_batch, pad_id
from occmllm.questions import CATEGORIES, category_answer


@dataclass(frozen=True)
class TTASettings:
    k: int = 4             # candidates per image
    steps: int = 3         # optimizer steps per image
    lr: float = 1e-3
    optimizer: str = "sgd"  # or "adamw"


def adapted_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters test-time adaptation changes: the multi-modal projector's."""
    return list(model.model.multi_modal_projector.parameters())


class Episode:
    """``with Episode(params):`` the parameters may change inside; on exit they hold exactly the
    values they had on entry."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params

    def __enter__(self) -> "Episode":
        self.saved = [p.detach().clone() for p in self.params]
        return self

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, self.saved):
                p.copy_(saved)
                p.grad = None


def baseline_rewards(scores: torch.Tensor) -> torch.Tensor:
    """Reward = score minus the mean score of the candidates: (K,) -> (K,), summing to zero."""
    return scores - scores.mean()


@dataclass
class AnswerBatch:
    """One image's question with several answers, teacher-forced in one batch."""
    input_ids: torch.Tensor       # (n, L) right padded
    attention_mask: torch.Tensor  # (n, L)
    labels: torch.Tensor          # (n, L): answer tokens and their end-of-turn token, IGNORE_INDEX elsewhere
    pixel_values: torch.Tensor    # the image's tiles, once per answer


def answer_batch(encoder: ConversationEncoder, question: str, answers: list[str], pixels: torch.Tensor,
                 tiles: list[int]) -> AnswerBatch:
    encoded = [encoder.tokens(tiles, [{"from": "human", "value": question}, {"from": "gpt", "value": a}])
               for a in answers]
    pad = pad_id(encoder.tokenizer)
    ids, mask = pad_batch([i for i, _ in encoded], pad, "right")
    labels, _ = pad_batch([lab for _, lab in encoded], pad, "right", value_for_labels=IGNORE_INDEX)
    return AnswerBatch(ids, mask, labels, torch.cat([pixels] * len(answers)))


def answer_log_likelihoods(model, batch: AnswerBatch) -> torch.Tensor:
    """(n,) log pi of each answer (its tokens' log-probabilities summed), with gradient where the
    model's parameters require it."""
    device, dtype = model.device, model.dtype
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                   pixel_values=batch.pixel_values.to(device=device, dtype=dtype)).logits[:, :-1].float()
    targets = batch.labels[:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(dim=1)


def candidates(model, encoder: ConversationEncoder, question: str, pixels: torch.Tensor, tiles: list[int],
               k: int) -> list[str]:
    """The K categories whose answers the model finds likeliest, likeliest first."""
    with torch.no_grad():
        ll = answer_log_likelihoods(model, answer_batch(encoder, question, [category_answer(c) for c in CATEGORIES],
                                                        pixels, tiles))
    return [CATEGORIES[i] for i in ll.topk(min(k, len(CATEGORIES))).indices.tolist()]


OPTIMIZERS = {"sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
              "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)}


def adapt(model, batch: AnswerBatch, rewards: torch.Tensor, steps: int, lr: float, optimizer: str = "sgd") -> list[float]:
    """REINFORCE on the answers of ``batch`` with ``rewards`` (K,), ``steps`` steps of ``optimizer``
    on the adapted parameters (a fresh one: no state from an earlier image). Returns the losses."""
    params = adapted_parameters(model)
    optimizer = OPTIMIZERS[optimizer](params, lr)
    rewards = rewards.to(model.device)
    losses = []
    for _ in range(steps):
        loss = -(rewards * answer_log_likelihoods(model, batch)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def only_adapted_trainable(model) -> None:
    """Gradients for the adapted parameters only (nothing else is updated, so nothing else needs them)."""
    model.requires_grad_(False)
    for p in adapted_parameters(model):
        p.requires_grad_(True)
