"""Episodic test-time adaptation of the category answer with a CLIP reward (RLCF: Zhao et al.,
"Test-time adaptation with CLIP reward for zero-shot generalization in vision-language models",
ICLR 2024), and its no-gradient baseline, best-of-K.

For one test image:

1. candidates: the K categories whose Q1 answers ("The object is {c}.") the model finds likeliest
   (teacher-forced log-likelihood of each of the eight answers), as RLCF does for classification;
2. reward: the judge's score of each candidate, minus the mean over the K candidates (the
   baseline: the rewards of one image sum to zero). Two judges (``occmllm.modes.TTA_JUDGES``):
   - ``clip`` (RLCF's): CLIP-S(caption of the candidate, image) = 2.5 max(cos, 0);
   - ``second-look``: the checkpoint's second look (``occmllm.chain``) reading the image blended
     with its reconstruction render, as the chain reads it (as they are and mirrored): its
     probability of the candidate's answer, renormalised over the K candidates. It sees what the
     policy does not, the render, and it is right where the policy is; an image-only CLIP of the
     demo's size is neither (benchmarks/RESULTS.md, "A judge that sees the render");
3. a few steps of REINFORCE on the candidates' log-likelihoods,
       L = -1/K sum_k r_k log pi(answer_k | image, Q1)     (log pi summed over the answer's tokens),
   by plain SGD by default, so the update's size follows the reward: where CLIP barely tells
   the candidates apart the model barely moves (AdamW, RLCF's choice, normalises every step to
   about the learning rate whatever the reward; ``optimizer="adamw"``),
   updating the multi-modal projector only: the small MLP between the vision tower and the
   language model, so the update changes how this image is read, not what the language model
   knows; it is a few percent of a real InternVL's parameters and has no state beyond its weights;
4. the adapted model answers Q1 greedily;
5. the episode ends: every test image starts from the same model.

Many images adapt at once, each in an episode of its own (``Episodes``): every image has its own
float32 copy of the projector's weights, applied to its own visual tokens (``torch.func.vmap``),
and the loss is the sum of the images' losses, so each copy's gradient is its own image's alone.
SGD and AdamW work element by element, so each copy takes exactly the steps a run over its image
alone would take. The vision tower runs once per image (the projector's input does not change)
and the model's own weights are never written.

Best-of-K answers with the candidate the judge ranks first, without any gradient step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call, vmap
from torch.nn.utils.rnn import pad_sequence

from occmllm.conversation import IGNORE_INDEX, ConversationEncoder, pad_batch, pad_id
from occmllm.errors import OccError
from occmllm.model import to_model
from occmllm.questions import CATEGORIES, category_answer


# each judge's learning rate: CLIP-S differences are a tenth of the second look's probabilities; the
# second look's was chosen on the demo's validation split, again once its judge had become far
# stronger than the policy (benchmarks/RESULTS.md, "Test-time adaptation reaches its judge's choice")
LEARNING_RATES = {"clip": 1e-3, "second-look": 0.3}


@dataclass(frozen=True)
class TTASettings:
    k: int = 4             # candidates per image
    steps: int = 3         # optimizer steps per image
    lr: float = LEARNING_RATES["clip"]  # the default judge's
    optimizer: str = "sgd"  # or "adamw"
    judge: str = "clip"    # the reward's judge: occmllm.modes.TTA_JUDGES


def adapted_module(model) -> torch.nn.Module:
    """The module test-time adaptation changes: the multi-modal projector."""
    return model.model.multi_modal_projector


def baseline_rewards(scores: torch.Tensor) -> torch.Tensor:
    """Reward = score minus the mean score of the candidates: (K,) -> (K,), summing to zero."""
    return scores - scores.mean()


def projector_inputs(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(tiles, image tokens, width): the visual tokens as the projector receives them (after the
    vision tower and pixel shuffle), without gradient."""
    captured = []
    hook = adapted_module(model).register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        with torch.no_grad():
            model.get_image_features(pixel_values=to_model(pixel_values, model))
    finally:
        hook.remove()
    return captured[0]


class Episodes:
    """One adaptation episode per image of a batch: a float32 copy of the projector's parameters
    for each (``params``: name -> (images, *shape)), starting from the model's."""

    def __init__(self, model, images: int):
        self.projector = adapted_module(model)
        self.dtype = model.dtype
        self.params = {name: p.detach().float().expand(images, *p.shape).clone().requires_grad_(True)
                       for name, p in self.projector.named_parameters()}

    def project(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's projector inputs (tiles, tokens, width) through its own copy: its visual tokens."""
        flat = [x.reshape(-1, x.shape[-1]).float() for x in inputs]
        out = vmap(lambda params, x: functional_call(self.projector, params, (x,)))(
            self.params, pad_sequence(flat, batch_first=True))  # the projector is per token: padding is inert
        return [o[: len(f)].reshape(*x.shape[:-1], o.shape[-1]).to(self.dtype) for o, f, x in zip(out, flat, inputs)]


@dataclass
class AnswerBatch:
    """Questions with answers, teacher-forced in one batch: a row per (image, answer)."""
    input_ids: torch.Tensor       # (n, L) right padded
    attention_mask: torch.Tensor  # (n, L)
    labels: torch.Tensor          # (n, L): answer tokens and their end-of-turn token, IGNORE_INDEX elsewhere
    image: torch.Tensor           # (n,) the image each row shows


def answer_tokens(encoder: ConversationEncoder, question: str, answers: list[list[str]],
                  tiles: list[list[int]]) -> list[list[tuple[list[int], list[int]]]]:
    """Per image i (made of ``tiles[i]``), ``encoder.tokens`` of ``question`` answered by each of
    ``answers[i]``. The images of a batch mostly share their tiling, so each (tiling, answer) pair
    is encoded once: the chat template costs more than a small model's forward pass."""
    seen: dict[tuple, tuple[list[int], list[int]]] = {}

    def encoded(image_tiles: list[int], answer: str) -> tuple[list[int], list[int]]:
        key = (tuple(image_tiles), answer)
        if key not in seen:
            seen[key] = encoder.tokens(image_tiles, [{"from": "human", "value": question},
                                                     {"from": "gpt", "value": answer}])
        return seen[key]
    return [[encoded(image_tiles, a) for a in image_answers] for image_answers, image_tiles in zip(answers, tiles)]


def answer_batch(encoder: ConversationEncoder, question: str, answers: list[list[str]],
                 tiles: list[list[int]]) -> AnswerBatch:
    """Rows for image i (made of ``tiles[i]``) asked ``question`` and answering each of ``answers[i]``."""
    per_image = answer_tokens(encoder, question, answers, tiles)
    encoded = [pair for pairs in per_image for pair in pairs]
    image = [i for i, pairs in enumerate(per_image) for _ in pairs]
    pad = pad_id(encoder.tokenizer)
    ids, mask = pad_batch([i for i, _ in encoded], pad, "right")
    labels, _ = pad_batch([lab for _, lab in encoded], pad, "right", value_for_labels=IGNORE_INDEX)
    return AnswerBatch(ids, mask, labels, torch.tensor(image))


def answer_log_likelihoods(model, batch: AnswerBatch, features: list[torch.Tensor]) -> torch.Tensor:
    """(n,) log pi of each row's answer (its tokens' log-probabilities summed), its image read as the
    visual tokens ``features[image]``; with gradient where ``features`` have one."""
    from occmllm.dual import mm_outputs
    device = model.device
    tokens = torch.cat([features[i] for i in batch.image.tolist()]).to(device)
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                   mm_encoder_outputs=mm_outputs(tokens)).logits[:, :-1].float()
    targets = batch.labels[:, 1:].to(device)
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * keep).sum(dim=1)


def candidate_log_likelihoods(model, encoder: ConversationEncoder, question: str, answers: list[list[str]],
                              features: list[torch.Tensor], tiles: list[list[int]]) -> list[torch.Tensor]:
    """Per image, log pi of each of its ``answers[i]`` to ``question`` (as ``answer_log_likelihoods``
    scores ``answer_batch`` rows), without gradient. Each image's prompt, its visual tokens
    included, runs through the language model once, and its keys and values serve all of its
    answers: rows of the whole prompt per answer would prefill the image once per answer."""
    from transformers import DynamicCache

    from occmllm.dual import mm_outputs
    device = model.device
    prompts, continuations, labelled = [], [], []
    for pairs in answer_tokens(encoder, question, answers, tiles):
        for k, (ids, labels) in enumerate(pairs):
            start = next(j for j, label in enumerate(labels) if label != IGNORE_INDEX)
            if k == 0:
                prompts.append(ids[:start])
            elif ids[:start] != prompts[-1]:
                raise OccError("an answer changed the tokens of its prompt; score it with answer_log_likelihoods")
            continuations.append(ids[start:])
            labelled.append([label != IGNORE_INDEX for label in labels[start:]])
    pad = pad_id(encoder.tokenizer)
    prompt_ids, prompt_mask = pad_batch(prompts, pad, "left")
    per_image = torch.tensor([len(a) for a in answers])
    row_image = torch.repeat_interleave(torch.arange(len(answers)), per_image)
    cont_ids, cont_mask = pad_batch(continuations, pad, "right")
    keep, _ = pad_batch([[int(x) for x in row] for row in labelled], 0, "right")
    with torch.inference_mode():
        cache = DynamicCache()
        prompted = model(input_ids=prompt_ids.to(device), attention_mask=prompt_mask.to(device),
                         position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0).to(device),
                         mm_encoder_outputs=mm_outputs(torch.cat(features).to(device)), past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        cache.batch_select_indices(row_image.to(device))
        mask = torch.cat([prompt_mask[row_image], cont_mask], dim=1)
        positions = prompt_mask.sum(-1)[row_image, None] + torch.arange(cont_ids.shape[1])
        answered = model(input_ids=cont_ids.to(device), attention_mask=mask.to(device),
                         position_ids=positions.to(device), past_key_values=cache, use_cache=True)
        # the answer's first token is predicted at the prompt's last position, each later one at the one before it
        logits = torch.cat([prompted.logits[row_image.to(device)], answered.logits[:, :-1]], dim=1).float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, cont_ids.to(device).unsqueeze(-1)).squeeze(-1)
        total = (logp * keep.to(device)).sum(dim=1).cpu()
    return list(total.split(per_image.tolist()))


def candidates(model, encoder: ConversationEncoder, question: str, features: list[torch.Tensor],
               tiles: list[list[int]], k: int) -> list[list[str]]:
    """Per image (its visual tokens and tiles), the K categories whose answers the model finds
    likeliest, likeliest first."""
    everything = [category_answer(c) for c in CATEGORIES]
    ll = candidate_log_likelihoods(model, encoder, question, [everything] * len(features), features, tiles)
    return [[CATEGORIES[i] for i in row.topk(min(k, len(CATEGORIES))).indices.tolist()] for row in ll]


OPTIMIZERS = {"sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
              "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)}


def adapt(model, episodes: Episodes, inputs: list[torch.Tensor], batch: AnswerBatch, rewards: torch.Tensor,
          steps: int, lr: float, optimizer: str = "sgd") -> list[float]:
    """REINFORCE, ``steps`` steps of a fresh ``optimizer`` on each image's copy in ``episodes``:
    image i's loss is -mean over its rows of reward x log pi, ``rewards`` one per row of ``batch``,
    ``inputs[i]`` its projector inputs. Returns the summed loss of each step."""
    params = list(episodes.params.values())
    optimizer = OPTIMIZERS[optimizer](params, lr)
    rewards = rewards.to(model.device)
    rows_of_image = torch.bincount(batch.image).to(model.device)[batch.image.to(model.device)]
    losses = []
    for _ in range(steps):
        log_pi = answer_log_likelihoods(model, batch, episodes.project(inputs))
        loss = -(rewards * log_pi / rows_of_image).sum()
        # the copies' gradient alone: the model's own weights get none, whatever their requires_grad
        for p, grad in zip(params, torch.autograd.grad(loss, params)):
            p.grad = grad
        optimizer.step()
        losses.append(loss.item())
    return losses
