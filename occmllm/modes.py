"""The inference modes. Each answers a batch of samples with one checkpoint:
``runner(answerer, batch, context) -> [{"answers": {key: text}, "final": text, ...}]``, one per sample.

- ``plain``: every question of the record in order, multi-turn with the model's own answers;
- ``cot``: the chain of thought of ``occmllm.chain``, its second look blended with a reconstruction render;
- ``dual``: the plain questions on OCC-MLLM-Alpha's dual visual path (``occmllm.dual``);
- ``tta``, ``tta-second-look``: Q1 after episodic test-time adaptation to a judge's reward
  (``occmllm.tta``: CLIP, or the second look over the image and its render), with the best-of-K
  answer as a row of its own (``"also"``).
"""
from __future__ import annotations

from dataclasses import dataclass

from occmllm import chain
from occmllm.answering import Answerer, Dialogue, Prompt, Sample
from occmllm.errors import OccError
from occmllm.questions import CATEGORIES, NO, Q1, YES, answer_in_history, caption, category_answer
from occmllm.records import count_placeholders
from occmllm.scoring import final_key


@dataclass
class Context:
    """What a mode needs beside the model: renders (cot, dual, tta's second-look judge), the blend
    weight (cot, dual, per checkpoint), the CLIP reward model (tta's clip judge), TTA's settings."""
    renders: object | None = None       # paths(ids) -> render files: reconstruction.reconstruct.RenderCache
    alpha: float | None = None
    gate: float = chain.DEFAULT_GATE    # cot: the second look where P(No.) >= gate (per checkpoint)
    clip: tuple | None = None           # (model, tokenizer, image processor) from occmllm.clip.load
    tta: object | None = None           # occmllm.tta.TTASettings
    second_look: Answerer | None = None  # cot, tta's second-look judge: the checkpoint's own second-look model
    mirror: bool = True                 # cot, tta's second-look judge: the second look reads mirrored too


def run_plain(answerer: Answerer, batch: list[Sample], context: Context | None = None) -> list[dict]:
    """Ask every question of each sample in order, multi-turn with the model's own answers; the
    final answer is the category question's."""
    return ask_in_turn(answerer, batch, answerer.images([s.images for s in batch]))


def ask_in_turn(answerer: Answerer, batch: list[Sample], encoded: list[tuple], reuse: bool = True) -> list[dict]:
    """The plain questioning with given image features: ``encoded`` holds (features, tiles) per
    sample, computed once for all of its questions. ``reuse``: each turn feeds only its new tokens
    after the last turn's kept keys and values (``Dialogue``); else every turn is prompted whole
    (the same answers, more work: for benchmarks and tests)."""
    history: list[list[dict]] = [[] for _ in batch]
    answers: list[dict] = [{} for _ in batch]
    dialogue = Dialogue() if reuse else None
    for turn in range(max(len(s.questions) for s in batch)):
        active = [i for i, s in enumerate(batch) if turn < len(s.questions)]
        prompts = []
        for i in active:
            history[i].append({"from": "human", "value": batch[i].questions[turn][2]})
            used = count_placeholders(history[i])
            features, tiles = encoded[i]
            prompts.append(Prompt(list(history[i]), features[: sum(tiles[:used])] if used else None, tiles[:used]))
        for i, text in zip(active, answerer(prompts, dialogue)):
            answers[i][batch[i].questions[turn][0]] = text
            history[i].append({"from": "gpt", "value": answer_in_history(text)})
    return [{"answers": a, "final": a[final_key(s.keys)]} for s, a in zip(batch, answers)]


def run_cot(answerer: Answerer, batch: list[Sample], context: Context) -> list[dict]:
    """The chain of thought of ``occmllm.chain``: the first answer (Q1); the check (Q6 after it),
    read as P(``No.``); where P(``No.``) reaches the gate, the render is made and Q1 is asked again in
    a fresh conversation over the image blended with the render (``context.alpha``, the
    checkpoint's), by the checkpoint's second-look model where it has one (``context.second_look``),
    its answer the category ``second_look_log_likelihoods`` finds likeliest. Only the models' own
    answers decide."""
    tiled = [answerer.tiled(s.images[:1]) for s in batch]
    encoded = answerer.encode(tiled)
    dialogue = Dialogue()  # the check continues the first answer's conversation
    first = answerer([Prompt(chain.first_turns(), features, tiles) for features, tiles in encoded], dialogue)
    p_no = answerer.p_no([Prompt(chain.check_turns(answer), features, tiles)
                          for answer, (features, tiles) in zip(first, encoded)], dialogue)
    look = [i for i, p in enumerate(p_no) if chain.looks_again(p, context.gate)]
    second: dict[int, str] = {}
    if look:
        scores = second_look_log_likelihoods(answerer, [batch[i] for i in look], [tiled[i] for i in look],
                                             [list(CATEGORIES)] * len(look), context, [encoded[i] for i in look])
        second = {i: category_answer(CATEGORIES[int(row.argmax())]) for i, row in zip(look, scores)}
    out = []
    for i in range(len(batch)):
        answers = {chain.FIRST: first[i], chain.CHECK: NO if i in second else YES}
        if i in second:
            answers[chain.SECOND] = second[i]
        out.append({"answers": answers, "final": chain.final_answer(first[i], second.get(i)),
                    "chain": {"p_no": round(p_no[i], 6), "gate": context.gate, "mirror": context.mirror}})
    return out


def second_look_log_likelihoods(answerer: Answerer, batch: list[Sample], tiled: list[tuple],
                                candidates: list[list[str]], context: Context, encoded: list[tuple] | None = None) -> list:
    """The chain's second look (``occmllm.chain``): its model (``context.second_look``, else the
    checkpoint) reads each record's image blended with its reconstruction render, and with
    ``context.mirror`` also both flipped left to right, as training's flips showed them; per
    record, the log-likelihood of each candidate category's answer (teacher-forced), summed over
    the readings. A category's answer is scored whole, so it is always one of the candidates.
    ``encoded``: the images' features as ``answerer`` made them, reused where it is the reader."""
    import torch

    from occmllm import tta
    from occmllm.dual import blend
    reader = context.second_look or answerer
    readings = [(tiled, rendered_like(batch, tiled, answerer, context), encoded if reader is answerer else None)]
    if context.mirror:
        mirrored = [answerer.tiled(s.images[:1], mirrored=True) for s in batch]
        readings.append((mirrored, rendered_like(batch, mirrored, answerer, context, mirrored=True), None))
    answers = [[category_answer(c) for c in cs] for cs in candidates]
    total = [torch.zeros(len(cs)) for cs in candidates]
    for images, image_renders, image_features in readings:
        features = [blend(image, render, context.alpha) for (image, _), (render, _)
                    in zip(image_features or reader.encode(images), reader.encode(image_renders))]
        scores = tta.candidate_log_likelihoods(reader.model, reader.encoder, chain.SECOND_LOOK, answers, features,
                                               [t for _, t in images])
        total = [t + s for t, s in zip(total, scores)]
    return total


def rendered_like(batch: list[Sample], tiled: list[tuple], answerer: Answerer, context: Context,
                  mirrored: bool = False) -> list[tuple]:
    """Each sample's reconstruction render, tiled (``mirrored``: flipped left to right); a one-line
    error where a render's tiles differ from its image's (the blend is tile by tile)."""
    renders = [answerer.tiled([path], mirrored) for path in context.renders.paths([s.id for s in batch])]
    for s, (_, tiles), (_, render_tiles) in zip(batch, tiled, renders):
        if tiles != render_tiles:
            raise OccError(f"record {s.id!r}: its image makes {tiles} tiles and its render {render_tiles}; the "
                           "render is blended with its image tile by tile, so both need the same size")
    return renders


def run_dual(answerer: Answerer, batch: list[Sample], context: Context) -> list[dict]:
    """The plain questions on the dual visual path (OCC-MLLM-Alpha): the image's visual tokens
    blended with its reconstruction render's, alpha x image + (1 - alpha) x render."""
    images = [answerer.tiled(s.images[:1]) for s in batch]
    renders = rendered_like(batch, images, answerer, context)
    return ask_in_turn(answerer, batch, answerer.encode_dual(images, renders, context.alpha))


def run_tta(answerer: Answerer, batch: list[Sample], context: Context) -> list[dict]:
    """Episodic test-time adaptation to the judge's reward (occmllm.tta), every record of the batch
    in an episode of its own: Q1 answered by its adapted projector. Each result also carries the
    best-of-K answer (the candidate the judge ranks first, no gradient), written as its own row."""
    import torch

    from occmllm import tta
    model, encoder, settings = answerer.model, answerer.encoder, context.tta
    tiled = [answerer.tiled(s.images[:1]) for s in batch]
    tiles = [t for _, t in tiled]
    inputs = list(tta.projector_inputs(model, answerer.pixels_on_device(tiled)).split([len(p) for p, _ in tiled]))
    with torch.no_grad():
        plain = [tta.adapted_module(model)(x) for x in inputs]
    cands = tta.candidates(model, encoder, Q1, plain, tiles, settings.k)
    scores = TTA_JUDGES[settings.judge](answerer, batch, tiled, cands, context)
    answers = tta.answer_batch(encoder, Q1, [[category_answer(c) for c in cs] for cs in cands], tiles)
    episodes = tta.Episodes(model, len(batch))
    tta.adapt(model, episodes, inputs, answers, torch.cat([tta.baseline_rewards(s) for s in scores]),
              settings.steps, settings.lr, settings.optimizer)
    with torch.no_grad():
        adapted = episodes.project(inputs)
    final = answerer([Prompt([{"from": "human", "value": Q1}], features, t) for features, t in zip(adapted, tiles)])
    best_of = f"best-of-{settings.k}{judge_suffix(settings.judge)}"
    out = []
    for answer, cs, s in zip(final, cands, scores):
        best = category_answer(cs[int(s.argmax())])
        out.append({"answers": {"Q1": answer}, "final": answer,
                    "also": {best_of: {"answers": {"Q1": best}, "final": best}}})
    return out


def clip_scores(answerer: Answerer, batch: list[Sample], tiled: list[tuple], candidates: list[list[str]],
                context: Context) -> list:
    """TTA judge ``clip``: CLIP-S of each candidate's caption with the record's image (the decoded
    image, for CLIP's own image processor)."""
    from occmllm import clip
    images = answerer.decoded([s.images[0] for s in batch])
    every = clip.scores(*context.clip, images, [caption(c) for c in CATEGORIES])  # (records, categories)
    return [row[[CATEGORIES.index(c) for c in cs]] for row, cs in zip(every, candidates)]


def second_look_scores(answerer: Answerer, batch: list[Sample], tiled: list[tuple], candidates: list[list[str]],
                       context: Context) -> list:
    """TTA judge ``second-look``: the chain's second look (``second_look_log_likelihoods``, as
    ``run_cot`` asks it): its probability of each candidate's answer, renormalised over the
    candidates."""
    return [row.softmax(0) for row in second_look_log_likelihoods(answerer, batch, tiled, candidates, context)]


# --tta JUDGE -> its scores(answerer, batch, tiled images, candidates per record, context):
# one tensor per record
TTA_JUDGES = {"clip": clip_scores, "second-look": second_look_scores}


def judge_suffix(judge: str) -> str:
    """What a TTA run's report rows carry after ``tta`` and ``best-of-K``: nothing for CLIP, RLCF's
    judge; another judge's name, so both can share a report."""
    return "" if judge == "clip" else f"-{judge}"


def tta_mode(judge: str) -> str:
    """The mode (and the adapted answer's report row) of a TTA run with ``judge``."""
    return f"tta{judge_suffix(judge)}"


TTA_MODES = {tta_mode(judge) for judge in TTA_JUDGES}

# --mode NAME -> its function(answerer, batch, context)
MODE_RUNNERS = {"plain": run_plain, "cot": run_cot, "dual": run_dual,
                **{tta_mode(judge): run_tta for judge in TTA_JUDGES}}
