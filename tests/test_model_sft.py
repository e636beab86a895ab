"""Model loading, the loss mask, a training step, LoRA merging, freezing and the stage-1 script."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from occmllm.conversation import IGNORE_INDEX, ConversationEncoder, conversation_key
from occmllm.errors import OccError
from occmllm.model import ImageOnlyInternVLProcessor, check_checkpoint, load_model
from occmllm.records import validate_conversation
from occmllm.questions import Q1, Q6
from occmllm.sft import Collator
from occmllm.stage import ModelArguments, RememberedTower, add_lora, freeze

ROOT = Path(__file__).resolve().parents[1]
Q1_Q6 = [{"from": "human", "value": Q1}, {"from": "gpt", "value": "The object is jar."},
         {"from": "human", "value": Q6}, {"from": "gpt", "value": "No."}]


def _image():
    return Image.new("RGB", (40, 40), (120, 30, 200))


def test_load_tiny_model(tiny_model):
    model, processor = load_model(tiny_model)
    assert model.config.model_type == "internvl" and model.dtype == torch.float32
    assert processor.image_seq_length == 4 and processor.tokenizer.eos_token == "<|im_end|>"
    enc = ConversationEncoder(processor)
    pixels, tiles = enc.pixel_values([_image()])
    assert pixels.shape == (1, 3, 32, 32) and tiles == [1]
    ids = enc.prompt_ids(tiles, Q1_Q6[:1])
    assert ids.count(model.config.image_token_id) == 4  # one image of 4 tokens
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > len(ids)


def test_prompt_ids_are_remembered_by_content(tiny_model):
    """The same prompt again gives the template's ids again (a fresh encoder computes the same), a
    caller changing its list does not change the next answer, and another conversation or another
    tiling is another prompt."""
    import copy
    processor = ImageOnlyInternVLProcessor.from_folder(tiny_model)
    enc = ConversationEncoder(processor)
    first = enc.prompt_ids([1], Q1_Q6[:1])
    first.append(-1)
    again = enc.prompt_ids([1], copy.deepcopy(Q1_Q6[:1]))
    assert again == ConversationEncoder(processor).prompt_ids([1], Q1_Q6[:1]) == first[:-1]
    assert enc.prompt_ids([2], Q1_Q6[:1]) != again and enc.prompt_ids([1], Q1_Q6[:3]) != again
    assert len(enc._prompts) == 3


def test_prompts_tokenised_together_are_the_templates_ids(tiny_model):
    """A batch's prompts, tokenised in one call (repeats among them, one already remembered), are
    the ids ``apply_chat_template`` gives each alone: multi-turn histories, answers with odd
    spacing and punctuation, several tiles."""
    from occmllm.conversation import to_messages
    processor = ImageOnlyInternVLProcessor.from_folder(tiny_model)
    enc = ConversationEncoder(processor)
    answers = ["It is a mug.", "  No,  it's\tnot!", "a knife\n\nreally", "yes.", ""]
    prompts = [([k % 3 + 1], [*Q1_Q6[:1], {"from": "gpt", "value": a}, {"from": "human", "value": f"Why {k}?"}])
               for k, a in enumerate(answers)]
    prompts += [([1], Q1_Q6[:1]), prompts[1], ([2], Q1_Q6[:3])]
    enc.prompt_ids([1], Q1_Q6[:1])
    alone = [list(processor.tokenizer.apply_chat_template(enc.expand(to_messages(c), tiles), tokenize=True,
                                                          return_dict=True, add_generation_prompt=True)["input_ids"])
             for tiles, c in prompts]
    assert enc.prompts_ids(prompts) == alone
    assert len(enc._prompts) == len(prompts) - 1


def _attention_by_distance(tower) -> list[float]:
    """Layer 0's attention among the position embeddings alone, per Manhattan distance on the patch
    grid (mean weight, times the number of patches: 1.0 is uniform), averaged over heads."""
    layer = tower.encoder.layer[0]
    pos = tower.embeddings.position_embeddings[0, 1:]
    n, grid = len(pos), int(len(pos) ** 0.5)
    rows, cols = torch.arange(n) // grid, torch.arange(n) % grid
    distance = (rows[:, None] - rows).abs() + (cols[:, None] - cols).abs()
    attn, dh = layer.attention, layer.attention.head_dim
    with torch.no_grad():
        x = layer.layernorm_before(pos)
        q, k = attn.q_proj(x).view(n, -1, dh).transpose(0, 1), attn.k_proj(x).view(n, -1, dh).transpose(0, 1)
        weights = (q @ k.transpose(1, 2) / dh ** 0.5).softmax(-1).mean(0)
    return [round(weights[distance == r].mean().item() * n, 2) for r in range(3)]


def test_vision_tower_starts_local_and_transformers_default_does_not(tiny_model):
    """The tiny model's tower (mimetic attention, sin-cos positions) attends first to nearby patches;
    the same config with transformers' own initialisation attends almost uniformly."""
    from transformers import InternVLVisionModel
    model, _ = load_model(tiny_model)
    tower = model.model.vision_tower
    ours = _attention_by_distance(tower)
    torch.manual_seed(0)
    default = _attention_by_distance(InternVLVisionModel(tower.config))
    print("attention by patch distance 0/1/2 (1.0 = uniform): ours", ours, "default", default)
    assert ours[0] > ours[1] > ours[2] and ours[0] > 1.5  # 32-px tiles: a 4x4 grid
    assert max(default) < 1.1
    for layer in tower.encoder.layer:  # W_v W_o starts near -0.4 I (the mimetic value/output pattern)
        vo = layer.attention.projection_layer.weight @ layer.attention.v_proj.weight
        assert -0.5 < vo.trace().item() / len(vo) < -0.3


def test_label_mask_supervises_answers_and_end_of_turn_only(tiny_model):
    _, processor = load_model(tiny_model)
    enc = ConversationEncoder(processor)
    e = enc.encode([_image()], Q1_Q6)
    supervised = [processor.tokenizer.decode([t]) for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    print("supervised tokens:", supervised)
    assert "".join(supervised) == "The object is jar.<|im_end|>No.<|im_end|>"
    assert supervised[-1] == "<|im_end|>" and supervised.count("<|im_end|>") == 2
    # labels equal the ids where supervised
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(e.input_ids, e.labels))
    # the fallback for chat templates without {% generation %} markers finds the same tokens
    enc.has_generation_markers = False
    assert enc.encode([_image()], Q1_Q6).labels == e.labels


def test_an_answer_marked_untrained_is_context_without_loss(tiny_model):
    """``"train": false`` on a gpt turn keeps its tokens in the input and drops them from the
    labels; the other answers keep theirs, and the record encodes apart from its trained twin."""
    _, processor = load_model(tiny_model)
    enc = ConversationEncoder(processor)
    trained = enc.encode([_image()], Q1_Q6)
    q1_as_context = [dict(t) for t in Q1_Q6]
    q1_as_context[1]["train"] = False
    e = enc.encode([_image()], q1_as_context)
    assert e.input_ids == trained.input_ids
    supervised = [processor.tokenizer.decode([t]) for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX]
    assert "".join(supervised) == "No.<|im_end|>"
    assert conversation_key([1], q1_as_context) != conversation_key([1], Q1_Q6)
    with pytest.raises(OccError, match="turn 0 .* only a gpt turn may carry it"):
        validate_conversation({"id": "r", "image": "a.png", "conversations": [{**Q1_Q6[0], "train": False}, Q1_Q6[1]]},
                              "f.jsonl:1")
    with pytest.raises(OccError, match="turn 1 .* as true or false"):
        validate_conversation({"id": "r", "image": "a.png", "conversations": [Q1_Q6[0], {**Q1_Q6[1], "train": 0}]},
                              "f.jsonl:1")


def test_one_training_step_lowers_the_loss(tiny_model):
    torch.manual_seed(0)
    model, processor = load_model(tiny_model)
    model.train()
    enc = ConversationEncoder(processor)
    items = [enc.encode([_image()], Q1_Q6) for _ in range(4)]
    batch = Collator(processor.tokenizer.pad_token_id)(
        [{"input_ids": i.input_ids, "labels": i.labels, "pixel_values": i.pixel_values} for i in items])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model(**batch).loss
    before.backward()
    opt.step()
    with torch.no_grad():
        after = model(**batch).loss
    assert after.item() < before.item() - 1e-3


def test_answer_logits_only_follows_the_full_logits_loss(tiny_model):
    """Three AdamW steps, two copies of one model: the loss from logits made at the answer positions
    only (occmllm.model.AnswerLogitsOnly's path) equals the model's own loss over every position,
    step by step, with and without the Trainer's num_items_in_batch."""
    from occmllm.model import answer_positions, answer_token_loss
    torch.manual_seed(0)
    full_model, processor = load_model(tiny_model)
    kept_model, _ = load_model(tiny_model)
    enc = ConversationEncoder(processor)
    collate = Collator(processor.tokenizer.pad_token_id)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (full_model, kept_model)]
    for step in range(3):
        items = [enc.encode([_image()], Q1_Q6[: 2 + 2 * ((k + step) % 3)]) for k in range(4)]  # ragged lengths
        batch = collate([{"input_ids": i.input_ids, "labels": i.labels, "pixel_values": i.pixel_values}
                         for i in items])
        keep = answer_positions(batch["labels"])
        n_labels = int((batch["labels"] != IGNORE_INDEX).sum())
        assert int(keep.sum()) == n_labels - int((batch["labels"][:, 0] != IGNORE_INDEX).sum())
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = kept_model(**inputs, logits_to_keep=keep)
        assert out.logits.shape == (int(keep.sum()), kept_model.config.text_config.vocab_size)
        full = full_model(**batch).loss
        kept = answer_token_loss(out, batch["labels"])
        assert kept.item() == pytest.approx(full.item(), rel=1e-5)
        n = torch.tensor(n_labels + 3)  # as if accumulated with another batch: sum / n
        assert answer_token_loss(out, batch["labels"], n).item() == pytest.approx(
            full_model(**batch, num_items_in_batch=n).loss.item(), rel=1e-5)
        for opt, loss in zip(opts, (full, kept)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    for a, b in zip(full_model.parameters(), kept_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_packed_batches_train_as_padded_ones(tiny_model):
    """Samples of different lengths packed into one row (``Collator(packed=True)``) give the padded
    batch's loss and gradients, through the answer-logits-only loss the trainer uses: attention and
    the loss stay inside each sample. The packed row holds no padding."""
    from occmllm.model import answer_positions, answer_token_loss
    torch.manual_seed(0)
    model, processor = load_model(tiny_model)
    model.train()
    enc = ConversationEncoder(processor)
    items = [enc.encode([_image()], Q1_Q6[: 2 + 2 * k]) for k in range(3)]  # 1, 2 and 3 turns
    samples = [{"input_ids": i.input_ids, "labels": i.labels, "pixel_values": i.pixel_values} for i in items]
    results = []
    for packed in (False, True):
        batch = Collator(processor.tokenizer.pad_token_id, packed=packed)(samples)
        model.zero_grad()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs, logits_to_keep=answer_positions(batch["labels"]))
        loss = answer_token_loss(out, batch["labels"])
        loss.backward()
        results.append((batch, loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (padded, padded_loss, padded_grads), (packed, packed_loss, packed_grads) = results
    assert packed["input_ids"].shape == (1, sum(len(i.input_ids) for i in items))
    assert padded["attention_mask"].sum() == packed["input_ids"].numel() < padded["input_ids"].numel()
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    for a, b in zip(packed_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # without the restarting position ids the samples would see each other: the loss moves
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    with torch.no_grad():
        out = model(**{k: v for k, v in leaky.items() if k != "labels"},
                    logits_to_keep=answer_positions(leaky["labels"]))
    assert answer_token_loss(out, leaky["labels"]).item() != pytest.approx(padded_loss, rel=1e-3)


def _steps(model_dir: Path, compiled: bool):
    """Four AdamW steps on batches of samples of one and two turns (other sizes and widths each
    step), as the stage trainer makes them: the losses, the model, and the frames the compiler
    traced for it."""
    from torch._dynamo.utils import counters
    from occmllm.model import answer_positions, answer_token_loss
    from occmllm.stage import compile_layers
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model, processor = load_model(model_dir)
    model.train()
    names = list(model.state_dict())
    if compiled:
        compile_layers(model)
    assert list(model.state_dict()) == names  # checkpoints keep their names
    enc = ConversationEncoder(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    curve = []
    for size in (1, 3, 2, 3):
        items = [enc.encode([_image()], Q1_Q6[: 2 + 2 * (k % 2)]) for k in range(size)]
        batch = Collator(processor.tokenizer.pad_token_id)(
            [{"input_ids": i.input_ids, "labels": i.labels, "pixel_values": i.pixel_values} for i in items])
        out = model(**{k: v for k, v in batch.items() if k != "labels"},
                    logits_to_keep=answer_positions(batch["labels"]))
        loss = answer_token_loss(out, batch["labels"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve, model, counters["frames"]["total"]


@pytest.mark.slow
def test_compiled_layers_train_as_eager_ones(tiny_model, tmp_path):
    """compile_layers (each tower and language-model layer compiled in place) keeps the numerics:
    four steps give the eager model's losses and weights. The compiler traces each kind of layer
    alone, not each layer: a model twice as deep compiles as many frames (a batch's key-value
    cache, which training never reads, would have it compile each layer's place in the cache)."""
    from occmllm.tiny import build
    eager_curve, eager, _ = _steps(tiny_model, compiled=False)
    compiled_curve, compiled, frames = _steps(tiny_model, compiled=True)
    assert frames > 0  # the compiler ran
    assert compiled_curve == pytest.approx(eager_curve, rel=1e-4)
    assert eager_curve[-1] != pytest.approx(eager_curve[0], rel=1e-2)  # the steps moved the model
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    deep = build(tmp_path / "deep", image_size=32, vision_hidden=32, vision_layers=4, text_hidden=64, text_layers=4)
    assert _steps(deep, compiled=True)[2] == frames


def test_compiled_layers_are_refused_under_zero3(tiny_model, monkeypatch):
    """ZeRO-3 gathers each layer's weights by hooks the compiler cannot trace: a one-line error,
    nothing compiled."""
    import transformers.integrations
    from occmllm.stage import compile_layers
    model, _ = load_model(tiny_model)
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(OccError, match="compile_layers: DeepSpeed ZeRO-3"):
        compile_layers(model)
    assert all(layer._compiled_call_impl is None for layer in model.model.language_model.layers)


def test_lora_merge_matches_adapter_logits(tiny_model):
    torch.manual_seed(0)
    model, processor = load_model(tiny_model)
    peft_model = add_lora(model, ModelArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    names = [n for n, _ in peft_model.named_parameters() if "lora_" in n]
    assert names and all("language_model" in n for n in names)  # adapters on the LLM only
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:  # B starts at zero; make the adapter do something
            p.data.normal_(0, 0.05)
    enc = ConversationEncoder(processor)
    e = enc.encode([_image()], Q1_Q6)
    inputs = dict(input_ids=torch.tensor([e.input_ids]), pixel_values=e.pixel_values)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(**inputs).logits
        merged = peft_model.merge_and_unload()(**inputs).logits
        base, _ = load_model(tiny_model)
        plain = base(**inputs).logits
    assert torch.allclose(adapted, merged, atol=1e-4)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapter changed the model


def test_freeze_switches(tiny_model):
    model, _ = load_model(tiny_model)
    freeze(model, vision=True, projector=False, llm=True)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert not any(p.requires_grad for p in model.model.language_model.parameters())
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())


def test_remembered_tower_trains_as_the_tower_does(tiny_model):
    """With the frozen tower's outputs remembered by image, three AdamW steps over batches that
    share images (in other places, other company, flipped) give the losses and weights of the tower
    run every time (to float rounding: at some shapes a batch's size moves the tower's last bits),
    and the tower sees each distinct image once."""
    from PIL import Image, ImageOps
    rng = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(40, 40, 3, generator=rng) * 255).byte().numpy()) for _ in range(3)]
    images.append(ImageOps.mirror(images[0]))
    batches = [[0, 1, 1], [2, 0, 3, 1], [3, 2]]  # image indices of each step's records
    runs = []
    for remember in (False, True):
        torch.manual_seed(0)
        model, processor = load_model(tiny_model)
        freeze(model, vision=True, projector=False, llm=False)
        tower = model.model.vision_tower
        seen = []
        tower.embeddings.register_forward_hook(lambda module, args, out: seen.append(len(out)))
        memo = RememberedTower(tower, model.config.vision_feature_layer) if remember else None
        model.train()
        enc = ConversationEncoder(processor)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        losses = []
        for batch in batches:
            items = [enc.encode([images[i]], Q1_Q6) for i in batch]
            inputs = Collator(processor.tokenizer.pad_token_id)(
                [{"input_ids": i.input_ids, "labels": i.labels, "pixel_values": i.pixel_values} for i in items])
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        if remember:  # a copy of the model (a reference model, say) runs and remembers with its own tower
            import copy
            clone = copy.deepcopy(model)
            with torch.no_grad():
                image = inputs["pixel_values"]
                assert torch.equal(clone.model.vision_tower(pixel_values=image).last_hidden_state,
                                   tower(pixel_values=image).last_hidden_state)
            assert clone.model.vision_tower.forward.tower is clone.model.vision_tower
        runs.append((losses, model.state_dict(), sum(seen), memo))
    (plain_losses, plain_state, plain_seen, _), (losses, state, seen, memo) = runs
    assert losses == pytest.approx(plain_losses, rel=1e-6) and losses[-1] < losses[0]
    # an AdamW step moves a weight by about lr (1e-3); rounding differences stay far below it
    assert max((state[k] - plain_state[k]).abs().max().item() for k in plain_state) < 1e-5
    assert plain_seen == 9 and seen == 4 and len(memo.outputs) == 4


def test_remembered_tower_needs_a_frozen_deterministic_tower(tiny_model):
    model, _ = load_model(tiny_model)
    with pytest.raises(OccError, match="needs freeze_vision"):
        RememberedTower(model.model.vision_tower, -1)
    freeze(model, vision=True, projector=False, llm=False)
    with pytest.raises(OccError, match="reads layer -2"):
        RememberedTower(model.model.vision_tower, -2)
    model.model.vision_tower.config.attention_dropout = 0.1
    with pytest.raises(OccError, match="random in training.*attention_dropout"):
        RememberedTower(model.model.vision_tower, -1)


def test_checkpoint_errors(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert/config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(OccError, match="not an InternVL checkpoint"):
        check_checkpoint(tmp_path / "bert")
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote/config.json").write_text(json.dumps(
        {"model_type": "internvl_chat", "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}}))
    with pytest.raises(OccError, match="remote-code layout.*convert"):
        check_checkpoint(tmp_path / "remote")
    with pytest.raises(OccError, match="not found"):
        check_checkpoint(tmp_path / "missing")


def test_tiny_build_refuses_widths_its_heads_cannot_split(tmp_path):
    from occmllm.tiny import build
    for flag, kwargs in (("--vision-hidden 34", {"vision_hidden": 34}), ("--text-hidden 130", {"text_hidden": 130})):
        with pytest.raises(OccError, match=f"{flag} must be a multiple of 4"):
            build(tmp_path / "tiny", **kwargs)
    assert not (tmp_path / "tiny").exists()


def test_tiny_build_merges_patches_into_fewer_image_tokens(tmp_path):
    """``merge`` patches per side become one image token: 32 px tiles of 8 px patches are 4 x 4
    patches, so 4 tokens a tile at merge 2 (InternVL's pixel shuffle) and 1 at merge 4, whose
    projector then reads all 16 patches, each in its place. A merge that does not divide the grid
    is refused."""
    from occmllm.tiny import build
    for merge, tokens in ((2, 4), (4, 1)):
        out = build(tmp_path / f"m{merge}", image_size=32, vision_hidden=32, vision_layers=1, text_hidden=32,
                    text_layers=1, merge=merge)
        model, processor = load_model(out)
        assert processor.image_seq_length == tokens
        features = model.get_image_features(pixel_values=torch.zeros(3, 3, 32, 32), return_dict=True).pooler_output
        assert features.shape == (3, tokens, 32)
        assert model.model.multi_modal_projector.linear_1.in_features == 32 * merge * merge
    with pytest.raises(OccError, match="multiple of --merge x --patch-size"):
        build(tmp_path / "m3", image_size=32, merge=3)
    with pytest.raises(OccError, match="--merge 0 must be at least 1"):
        build(tmp_path / "m0", image_size=32, merge=0)


def _train(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "step1_sft.train", *args], capture_output=True, text=True,
                          cwd=cwd, env=env)


def test_unknown_yaml_key_is_one_line_error(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("learning_rate: 0.001\nlearnin_rate: 0.1\n")
    out = _train("--config", str(cfg))
    assert out.returncode == 2 and out.stderr == f"error: {cfg}: unknown key learnin_rate; see --help for the valid options\n"


def test_stage1_trains_saves_and_resumes(tiny_model, synth_small, tmp_path):
    common = ["--model_name_or_path", str(tiny_model), "--train_data", str(synth_small / "stages/step1.jsonl"),
              "--output_dir", str(tmp_path / "ckpt"), "--per_device_train_batch_size", "4",
              "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true"]
    out = _train(*common, "--max_steps", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "ckpt/checkpoint-2/processor_config.json").is_file()
    model, _ = load_model(tmp_path / "ckpt")  # the stage checkpoint loads as a plain InternVL folder
    out = _train(*common, "--max_steps", "4", "--resume", "true")
    assert out.returncode == 0, out.stderr[-2000:]
    state = json.loads((tmp_path / "ckpt/checkpoint-4/trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps == [1, 2, 3, 4]  # steps 1-2 come from the first run: resumed, not restarted
    # the stage's logged figures and their plot lie beside its checkpoint, the first run's included
    log = [json.loads(x) for x in (tmp_path / "ckpt/train_log.jsonl").read_text().splitlines()]
    assert [h["step"] for h in log if "loss" in h] == [1, 2, 3, 4]
    assert [h["loss"] for h in log if "loss" in h] == [h["loss"] for h in state["log_history"] if "loss" in h]
    assert Image.open(tmp_path / "ckpt/training.png").size[0] > 0


def test_dataloader_workers_train_as_the_main_process(tiny_model, synth_small, tmp_path):
    """Batches made by two dataloader workers (started afresh each epoch, so they see the epoch
    that draws the flips) give the losses of batches made on the main process, over two epochs
    with augmentation; persistent workers, which would keep epoch 0's flips, are refused."""
    def losses(name, *flags):
        out = _train("--model_name_or_path", str(tiny_model), "--train_data", str(synth_small / "stages/step1.jsonl"),
                     "--output_dir", str(tmp_path / name), "--per_device_train_batch_size", "4", "--num_train_epochs",
                     "2", "--augment", "true", "--cache_encoded", "false", "--save_strategy", "no",
                     "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", *flags)
        assert out.returncode == 0, out.stderr[-2000:]
        return [float(x) for x in re.findall(r"'loss': '?([0-9.]+)", out.stdout + out.stderr)]

    main = losses("main", "--dataloader_num_workers", "0")
    assert len(main) >= 4 and len(set(main)) > 1
    assert losses("workers", "--dataloader_num_workers", "2") == main
    out = _train("--model_name_or_path", str(tiny_model), "--train_data", str(synth_small / "stages/step1.jsonl"),
                 "--output_dir", str(tmp_path / "persistent"), "--augment", "true", "--dataloader_num_workers", "2",
                 "--dataloader_persistent_workers", "true")
    assert out.returncode == 2 and "dataloader_persistent_workers false" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "persistent").exists()


def test_bf16_training_steps_fp32_weights(tiny_model, synth_small, tmp_path):
    """--bf16 true computes in bf16 but steps fp32 weights: three AdamW steps at lr 1e-5 move at
    least 90% of every trained matrix's elements (bf16 weights stepped in bf16 moved about 15%:
    most updates are under half a bf16 step and round away). Stage 1's config trains the whole
    model, the tower included; with --freeze_vision true the tower stays as it was."""
    from safetensors.torch import load_file

    def moved_by(run: str, *flags) -> dict[str, float]:
        out = _train("--model_name_or_path", str(tiny_model), "--train_data", str(synth_small / "stages/step1.jsonl"),
                     "--output_dir", str(tmp_path / run), "--bf16", "true", "--use_cpu", "true", "--learning_rate",
                     "1e-5", "--warmup_steps", "0", "--lr_scheduler_type", "constant", "--max_steps", "3",
                     "--per_device_train_batch_size", "4", "--save_strategy", "no", "--disable_tqdm", "true", *flags)
        assert out.returncode == 0, out.stderr[-2000:]
        before, after = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / run / "model.safetensors")
        assert all(after[k].dtype == torch.float32 for k in before if before[k].dim() == 2)
        return {k: (after[k] != before[k]).float().mean().item() for k in before if before[k].dim() == 2}

    moved = moved_by("whole")
    assert {k.split(".")[0] for k in moved} == {"vision_tower", "multi_modal_projector", "language_model"}
    assert all(m >= 0.9 for m in moved.values()), min(moved.items(), key=lambda kv: kv[1])
    moved = moved_by("frozen_tower", "--freeze_vision", "true", "--cache_vision", "true")
    assert all((m == 0.0) == k.startswith("vision_tower.") for k, m in moved.items())
    assert all(m >= 0.9 for k, m in moved.items() if not k.startswith("vision_tower."))


def _held_items(processor) -> list[dict]:
    """Training items of stage 4's three kinds, each with its ``held`` tokens: a Q1-Q5 replay, a
    check after a wrong first answer, and a plan."""
    from occmllm import chain
    from occmllm.questions import Q0, QUESTIONS, answers_for
    from occmllm.sft import HELD_QUESTIONS
    enc = ConversationEncoder(processor)
    answers = answers_for("camera", "gray")
    replay = [t for q in ("Q1", "Q2", "Q3", "Q4", "Q5")
              for t in ({"from": "human", "value": QUESTIONS[q]}, {"from": "gpt", "value": answers[q]})]
    check = chain.check_training_turns("The object is jar.", first_right=False)
    plan = [{"from": "human", "value": Q0}, {"from": "gpt", "value": "Step 1: look."}]
    items = []
    for turns in (replay, check, plan):
        item = enc.encode([_image()], turns)
        items.append({"input_ids": item.input_ids, "labels": item.labels, "pixel_values": item.pixel_values,
                      "held": enc.answers_to([len(item.pixel_values)], turns, HELD_QUESTIONS)})
    return items


def test_the_start_reads_up_to_the_held_answers(tiny_model):
    """keep_first_answer's start model reads a batch only up to its last held token and image token
    (``held_prefix``): its logits at the held answers are those it gives reading the whole batch,
    padded or packed, and a padded batch of replays is cut after Q1's answer."""
    from occmllm.model import positions_predicting
    from occmllm.sft import held_prefix
    model, processor = load_model(tiny_model)
    items = _held_items(processor)
    replay = items[0]
    for batch, cut in ((Collator(processor.tokenizer.pad_token_id)(items), False),
                       (Collator(processor.tokenizer.pad_token_id, packed=True)(items), False),
                       (Collator(processor.tokenizer.pad_token_id)([replay, replay]), True)):
        held = batch.pop("held")
        predicting = positions_predicting(held)
        prefix = held_prefix(batch, held, model.config.image_token_id)
        width, end = batch["input_ids"].shape[1], prefix["input_ids"].shape[1]
        assert end <= width and (end < width / 2 if cut else True)
        assert "labels" not in prefix and prefix["pixel_values"] is batch["pixel_values"]
        with torch.no_grad():
            whole = model(**{k: v for k, v in batch.items() if k != "labels"}, logits_to_keep=predicting).logits
            part = model(**prefix, logits_to_keep=predicting[:, :end]).logits
        assert whole.shape == part.shape and len(whole) == int(held.sum())
        torch.testing.assert_close(part, whole, rtol=1e-4, atol=1e-5)


def test_held_tokens_are_q1s_trained_answers(tiny_model):
    """keep_first_answer holds the trained answers to Q1 and nothing else: not a Q1 answer kept as
    context (stage 4's check), not the check, not a plan; padded and packed batches hold the same
    tokens."""
    from occmllm.questions import answers_for
    processor = ImageOnlyInternVLProcessor.from_folder(tiny_model)
    items = _held_items(processor)
    tok = processor.tokenizer
    held = [tok.decode([t for t, h in zip(i["input_ids"], i["held"]) if h]) for i in items]
    assert held == [answers_for("camera", "gray")["Q1"] + "<|im_end|>", "", ""]
    for i in items:  # only trained tokens are held
        assert all(label != IGNORE_INDEX for label, h in zip(i["labels"], i["held"]) if h)
    padded = Collator(tok.pad_token_id)(items)
    packed = Collator(tok.pad_token_id, packed=True)(items)
    assert padded["held"].dtype == packed["held"].dtype == torch.bool
    assert padded["input_ids"][padded["held"]].tolist() == packed["input_ids"][packed["held"]].tolist()


def test_keep_first_answer_holds_q1_to_the_start(tiny_model, synth_small, tmp_path):
    """Six steps at a high learning rate on Q1-Q5 records: with keep_first_answer the model's
    distribution over Q1's answer tokens stays far closer to the starting checkpoint's than without,
    while the later answers are learnt as without it."""
    from PIL import Image
    from occmllm.model import answer_positions, positions_predicting
    from occmllm.records import load_training_records
    from occmllm.sft import HELD_QUESTIONS
    data = synth_small / "stages/test.jsonl"

    def trained(name, weight):
        out = _train("--model_name_or_path", str(tiny_model), "--train_data", str(data), "--output_dir",
                     str(tmp_path / name), "--keep_first_answer", str(weight), "--learning_rate", "3e-3",
                     "--warmup_steps", "0", "--max_steps", "6", "--per_device_train_batch_size", "4",
                     "--freeze_vision", "true", "--save_strategy", "no", "--disable_tqdm", "true")
        assert out.returncode == 0, out.stderr[-2000:]
        return load_model(tmp_path / name)[0]

    start, processor = load_model(tiny_model)
    enc = ConversationEncoder(processor)
    batch = []
    for root, rec in load_training_records(str(data))[:6]:
        item = enc.encode([Image.open(root / rec["image"]).convert("RGB")], rec["conversations"])
        batch.append({"input_ids": item.input_ids, "labels": item.labels, "pixel_values": item.pixel_values,
                      "held": enc.answers_to([len(item.pixel_values)], rec["conversations"], HELD_QUESTIONS)})
    batch = Collator(processor.tokenizer.pad_token_id)(batch)
    first = positions_predicting(batch.pop("held"))
    later = answer_positions(batch["labels"]) & ~first
    assert first.any() and later.any()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def log_probs(model):
        with torch.no_grad():
            return model(**inputs).logits.float().log_softmax(-1)

    def later_nll(lp):
        targets = batch["labels"][:, 1:][later[:, :-1]]
        return -lp[:, :-1][later[:, :-1]].gather(-1, targets[:, None]).mean().item()

    def drift(lp):  # KL(start || model) at Q1's answer tokens
        return torch.nn.functional.kl_div(lp[first], start_lp[first], log_target=True, reduction="batchmean").item()

    start_lp = log_probs(start)
    free, kept = log_probs(trained("free", 0)), log_probs(trained("kept", 100))
    assert drift(free) > 0.02 and drift(kept) < drift(free) / 5, (drift(free), drift(kept))
    assert later_nll(kept) < later_nll(start_lp) - 0.5 and later_nll(free) < later_nll(start_lp) - 0.5
    out = _train("--model_name_or_path", str(tiny_model), "--train_data", str(data), "--output_dir",
                 str(tmp_path / "bad"), "--keep_first_answer", "-1")
    assert out.returncode == 2 and "keep_first_answer must be 0 or more, got -1.0" in out.stderr
    out = _train("--model_name_or_path", str(tiny_model), "--train_data", str(data), "--output_dir",
                 str(tmp_path / "dual"), "--keep_first_answer", "1", "--dual_alpha", "0.5")
    assert out.returncode == 2 and "keep_first_answer holds the start's answers, which read no render" in out.stderr


def test_keep_first_answer_is_refused_under_zero3(tiny_model, monkeypatch):
    """ZeRO-3 would partition the start's copy as it loads, with no engine to gather it: a one-line
    error before anything loads."""
    import transformers.integrations
    from occmllm.sft import frozen_start
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(OccError, match="keep_first_answer: DeepSpeed ZeRO-3"):
        frozen_start(ModelArguments(model_name_or_path=str(tiny_model), keep_first_answer=1.0), None,
                     torch.device("cpu"))


def test_stage_saves_in_the_dtype_it_started_from(tiny_model, synth_small, tmp_path):
    """A bf16 checkpoint trains in fp32 and its stage checkpoint is stored in bf16 again (a real
    InternVL's size), plain and with LoRA merged in."""
    from safetensors.torch import load_file
    from transformers import InternVLForConditionalGeneration
    from occmllm.model import ImageOnlyInternVLProcessor, checkpoint_dtype
    source = tmp_path / "bf16_source"
    InternVLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(source)
    ImageOnlyInternVLProcessor.from_folder(tiny_model).save_pretrained(source)
    assert checkpoint_dtype(json.loads((source / "config.json").read_text())) == torch.bfloat16
    for name, extra in (("plain", []), ("lora", ["--use_lora", "true", "--lora_r", "4"])):
        out = _train("--model_name_or_path", str(source), "--train_data", str(synth_small / "stages/step1.jsonl"),
                     "--output_dir", str(tmp_path / name), "--max_steps", "2", "--per_device_train_batch_size", "2",
                     "--save_strategy", "no", "--disable_tqdm", "true", *extra)
        assert out.returncode == 0, out.stderr[-2000:]
        saved = load_file(tmp_path / name / "model.safetensors")
        assert {t.dtype for t in saved.values()} == {torch.bfloat16}, name
        assert checkpoint_dtype(json.loads((tmp_path / name / "config.json").read_text())) == torch.bfloat16
        load_model(tmp_path / name)


def test_stage1_lora_saves_merged_model(tiny_model, synth_small, tmp_path):
    out = _train("--model_name_or_path", str(tiny_model), "--train_data", str(synth_small / "stages/step1.jsonl"),
                 "--output_dir", str(tmp_path / "lora"), "--use_lora", "true", "--lora_r", "4", "--max_steps", "1",
                 "--per_device_train_batch_size", "2", "--save_strategy", "no", "--disable_tqdm", "true")
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads((tmp_path / "lora/config.json").read_text())
    assert config["model_type"] == "internvl" and not (tmp_path / "lora/adapter_config.json").exists()
    load_model(tmp_path / "lora")


@pytest.mark.slow
def test_two_process_deepspeed_zero2(tiny_model, synth_small, tmp_path):
    """torchrun --nproc_per_node 2, gloo, DeepSpeed ZeRO-2 through the stage launcher."""
    import os
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}  # a free port (torchrun --standalone)
    env.update(NPROC="2", DEEPSPEED="zero2", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", "step1_sft/run.sh", "--model_name_or_path", str(tiny_model),
                          "--train_data", str(synth_small / "stages/step1.jsonl"), "--output_dir", str(tmp_path / "ds"),
                          "--max_steps", "3", "--per_device_train_batch_size", "2", "--save_strategy", "no",
                          "--logging_steps", "1", "--disable_tqdm", "true"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    load_model(tmp_path / "ds")


def test_cached_dataset_gives_the_uncached_items(tiny_model, synth_small):
    """The encoded-sample cache (flip applied to the cached pixels) matches encoding afresh."""
    from occmllm.conversation import ConversationEncoder
    from occmllm.records import load_training_records
    from occmllm.sft import ConversationDataset
    items = load_training_records(synth_small / "stages/step1.jsonl")[:6]
    encoder = ConversationEncoder(ImageOnlyInternVLProcessor.from_folder(tiny_model))
    fresh = ConversationDataset(items, encoder, augment_images=True, seed=3)
    cached = ConversationDataset(items, encoder, augment_images=True, seed=3, cache=True)
    flips = 0
    for epoch in range(3):
        fresh.epoch = cached.epoch = epoch
        for i in range(len(items)):
            a, b = fresh[i], cached[i]
            assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
            torch.testing.assert_close(a["pixel_values"], b["pixel_values"], atol=1e-5, rtol=0)
            flips += not torch.equal(a["pixel_values"], fresh._tiled(i, False)[0])
    assert 0 < flips < 18  # some draws flipped, some did not


def test_cache_encodes_shared_content_once(tiny_model, synth_small):
    """Copies of a record (other ids, same image and turns) and records that show the same image
    share one encoding of what they share, and each item is what encoding it afresh gives."""
    import copy

    from occmllm.conversation import ConversationEncoder
    from occmllm.records import load_training_records
    from occmllm.sft import ConversationDataset
    items = load_training_records(synth_small / "stages/step1.jsonl")[:3]
    copies = []
    for k in range(3):
        for root, rec in items:
            rec = copy.deepcopy(rec)
            rec["id"] = f"{rec['id']}-copy{k}"
            copies.append((root, rec))
    other_turns = copy.deepcopy(items[0][1])  # the first record's image, asked something else
    other_turns["id"] = "other"
    other_turns["conversations"][0]["value"] += " Answer briefly."
    everything = [*items, *copies, (items[0][0], other_turns)]
    encoder = ConversationEncoder(ImageOnlyInternVLProcessor.from_folder(tiny_model))
    fresh = ConversationDataset(everything, encoder)
    cached = ConversationDataset(everything, encoder, cache=True)
    for i in range(len(everything)):
        a, b = fresh[i], cached[i]
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert len(cached._images) == 3  # three images, decoded once each
    assert len(cached._tokens) == len({str(rec["conversations"]) for _, rec in everything}) < len(everything) / 2


def test_grouped_batches_pad_less_and_lengths_read_no_pixels(tiny_model, synth_small, tmp_path, monkeypatch):
    """Dynamic tiles (1 to 7 tiles an image): ``ConversationDataset.lengths()`` is each item's token
    count without decoding an image, and ``--train_sampling_strategy group_by_length`` batches hold
    every item once an epoch with less padding than random batches."""
    import copy

    from PIL import Image
    from transformers import TrainingArguments

    from occmllm import sft
    from occmllm.conversation import pad_id
    from occmllm.records import load_training_records
    processor = ImageOnlyInternVLProcessor.from_folder(tiny_model)
    processor.image_processor.crop_to_patches, processor.image_processor.max_patches = True, 6
    grids = [(1, 1), (2, 1), (1, 2), (3, 1), (2, 2), (3, 2)]  # with the thumbnail: 1, 3, 3, 4, 5, 7 tiles
    views, items = load_training_records(synth_small / "stages/step1.jsonl"), []
    for k in range(96):  # enough for the sampler to sort groups of 6 batches (it sorts 50 in real data)
        (root, rec), (cols, rows) = views[k % len(views)], grids[k % len(grids)]
        Image.open(root / rec["image"]).resize((32 * cols, 32 * rows)).save(tmp_path / f"{k}.png")
        items.append((tmp_path, {**copy.deepcopy(rec), "id": f"{rec['id']}-{k}", "image": f"{k}.png"}))
    dataset = sft.ConversationDataset(items, ConversationEncoder(processor))

    def no_decoding(*args, **kwargs):
        raise AssertionError("lengths() decoded an image")
    with monkeypatch.context() as patched:
        patched.setattr(sft, "load_images", no_decoding)
        lengths = dataset.lengths()
    assert lengths == [len(dataset[i]["input_ids"]) for i in range(len(items))]
    assert len(set(lengths)) >= 4  # the grids give several lengths

    model, _ = load_model(tiny_model)
    padding, order = {}, {}
    for strategy in ("random", "group_by_length"):
        args = TrainingArguments(output_dir=str(tmp_path / strategy), per_device_train_batch_size=4, use_cpu=True,
                                 report_to="none", remove_unused_columns=False, train_sampling_strategy=strategy, seed=0)
        trainer = sft.ConversationTrainer(model=model, args=args, train_dataset=dataset,
                                          data_collator=sft.Collator(pad_id(processor.tokenizer), False))
        with monkeypatch.context() as patched:  # the sampler orders by lengths() alone, no image decoded
            patched.setattr(sft, "load_images", no_decoding)
            assert sorted(trainer._get_train_sampler()) == list(range(len(items)))
        batches = list(trainer.get_train_dataloader())
        masks = [b["attention_mask"] for b in batches]
        padding[strategy] = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        order[strategy] = sorted(int(n) for m in masks for n in m.sum(dim=1))
    assert order["group_by_length"] == order["random"] == sorted(lengths)  # each item once
    assert padding["group_by_length"] < padding["random"] / 2
