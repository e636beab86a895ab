"""What every training stage shares: its arguments, model building (freezing, LoRA, the dual visual
path, DeepSpeed's start), the frozen reference copy, saving, and the stage command.

The training stages run in pipeline order: stage N trains from stage N-1's checkpoint. Each stage
folder holds a ``config.yaml`` beside its ``train.py``; a stage is known by the folder of its default
config, and when its starting checkpoint is missing, ``missing_checkpoint_hint`` says which stage
writes it and how to run that stage. ``occmllm.sft``, ``occmllm.mpo`` and ``occmllm.selfcorrect``
build their trainers on this module.
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import InternVLForConditionalGeneration, Trainer, TrainerCallback, TrainingArguments
from transformers.modeling_outputs import BaseModelOutputWithPooling

from occmllm import curves, dual
from occmllm.config import parse_config, read_config
from occmllm.errors import OccError, cli
from occmllm.model import check_checkpoint, checkpoint_dtype, default_attention

PLOT_EVERY_S = 300  # a training stage refreshes its train_log.jsonl and training.png at most this often
LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="outputs/demo/models/tiny",
                                    metadata={"help": "InternVL checkpoint folder (the previous stage's output)"})
    freeze_vision: bool = field(default=False, metadata={"help": "freeze the vision tower"})
    cache_vision: bool = field(default=False, metadata={
        "help": "with freeze_vision: remember the tower's output for each image (by its pixels), so an image "
                "seen again (a later epoch, a copy of a record, another record of the same view) skips the tower; "
                "costs the tower's output per distinct image in memory (tokens x width x 4 bytes)"})
    freeze_projector: bool = field(default=False, metadata={"help": "freeze the vision-language projector"})
    freeze_llm: bool = field(default=False, metadata={"help": "freeze the language model (and its head)"})
    use_lora: bool = field(default=False, metadata={"help": "LoRA on the language model's linear layers"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa | flash_attention_2 | eager"})
    dual_alpha: float | None = field(default=None, metadata={
        "help": "OCC-MLLM-Alpha's dual visual path: the image's visual tokens become alpha * image + (1 - alpha) "
                "* render, the render of the record's 3D reconstruction (see dual_renders); alpha in [0, 1]; "
                "unset: off (the plain model)"})
    dual_learnable: bool = field(default=False, metadata={
        "help": "with dual_alpha: train alpha with the model, starting from dual_alpha"})
    keep_first_answer: float = field(default=0.0, metadata={
        "help": "weight of a term that holds the trained answers to the first question (Q1, the category) to the "
                "starting checkpoint's: KL(start || model), averaged over those tokens in the batch (learning without "
                "forgetting); 0: off. Keeps a frozen copy of the start in memory; not with DeepSpeed ZeRO-3 or "
                "dual_alpha"})
    compile_layers: bool = field(default=False, metadata={
        "help": "compile each layer of the vision tower and the language model (torch.compile, one graph per "
                "layer kind, shapes dynamic): their norms, activations and residual adds run fused, with fewer "
                "kernel launches; compiles in the first steps. Not with DeepSpeed ZeRO-3"})


@dataclass
class DataArguments:
    train_data: str = field(default="outputs/demo/stages/step1_train.jsonl",
                            metadata={"help": "conversation JSONL or InternVL meta JSON (root, annotation, repeat_time)"})
    data_root: str | None = field(default=None, metadata={
        "help": "image root for a JSONL (default: from the JSONL's .meta.json beside it)"})
    max_length: int = field(default=4096, metadata={"help": "longest conversation in tokens"})
    augment: bool = field(default=False, metadata={"help": "random horizontal flips (for models trained from scratch)"})
    cache_encoded: bool = field(default=False, metadata={
        "help": "keep every encoded sample (tokens, labels, pixels) in memory after its first epoch: "
                "no image decoding or preprocessing after that; for datasets that fit in RAM"})
    packed: bool = field(default=False, metadata={
        "help": "each batch as one row without padding: position ids restart at every sample and attention "
                "stays inside it, so no compute goes to padding when samples differ in length (dynamic tiles). "
                "For flash-attention 2, which attends each sample alone; SDPA masks one attention over the row"})
    resume: bool = field(default=False, metadata={"help": "resume from the last checkpoint in output_dir"})
    dual_renders: str | None = field(default=None, metadata={
        "help": "with dual_alpha: folder under the image root holding <record id>.png, the render of each "
                "record's (single) image, for records that name no 'render' of their own (python -m "
                "data_tools.renders writes oracle renders to renders/oracle); unset: only records with a 'render' "
                "are blended, the others stay plain"})


class SaveProcessor(TrainerCallback):
    """Every checkpoint folder gets the processor, so each loads by path in inference.py."""

    def __init__(self, processor):
        self.processor = processor

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                self.processor.save_pretrained(folder)


class PlotsTraining(TrainerCallback):
    """``train_log.jsonl`` and ``training.png`` in the output folder: while a stage trains, at most
    every ``every_s`` seconds of logging, so a long run's curves can be looked at before it ends,
    and once more when it ends (a resumed run's include the first run's points)."""

    def __init__(self, title: str, every_s: float = PLOT_EVERY_S):
        self.title, self.every_s = title, every_s
        self.last = time.monotonic()

    def on_log(self, args, state, control, **kwargs):
        if time.monotonic() - self.last >= self.every_s:
            self.on_train_end(args, state, control)
            self.last = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            curves.save_training_log(state.log_history, args.output_dir, self.title)


# --- model -----------------------------------------------------------------------------------

def freeze(model: InternVLForConditionalGeneration, vision: bool, projector: bool, llm: bool) -> None:
    parts = [(vision, model.model.vision_tower), (projector, model.model.multi_modal_projector),
             (llm, model.model.language_model), (llm, model.lm_head)]
    for frozen, module in parts:
        if frozen:
            module.requires_grad_(False)


class RememberedTower:
    """A frozen vision tower's forward that remembers its output per image, keyed by the image's
    pixels: the tower is then run once per distinct image (and flip) for the whole stage.

    Installed as the tower's ``forward`` (``nn.Module.__call__`` calls it; the weights and the
    state dict stay the tower's own). Training is the same as without it to float rounding: an
    image's output does not depend on the other images of its batch, except in the last bits at
    some shapes where the batch's size picks another matrix kernel (not at the demo model's)."""

    def __init__(self, tower: torch.nn.Module, vision_feature_layer):
        if any(p.requires_grad for p in tower.parameters()):
            raise OccError("cache_vision remembers the frozen vision tower's outputs: it needs freeze_vision "
                           "(to train the tower, set cache_vision false)")
        if vision_feature_layer != -1:
            raise OccError(f"cache_vision keeps the tower's last layer, but the model reads layer {vision_feature_layer} "
                           "(vision_feature_layer): unset cache_vision")
        config = tower.config
        random = {k: getattr(config, k) for k in ("attention_dropout", "hidden_dropout_prob", "drop_path_rate",
                                                  "projection_dropout") if getattr(config, k, None)}
        if random:
            raise OccError(f"cache_vision: the vision tower is random in training ({random}), so its output is not "
                           "a function of the image: unset cache_vision")
        self.tower = tower
        self.outputs: dict[bytes, torch.Tensor] = {}
        tower.forward = self

    def forward(self, **kwargs):
        """The tower's own forward (its class's: a copy of the model calls its own tower)."""
        return type(self.tower).forward(self.tower, **kwargs)

    @staticmethod
    def key(image: torch.Tensor) -> bytes:
        return hashlib.blake2b(image.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes(), digest_size=16).digest()

    def __call__(self, pixel_values: torch.Tensor, bool_masked_pos=None, **kwargs):
        # get_image_features asks for the layer it reads (output_hidden_states=-1): the last one, kept here
        if bool_masked_pos is not None or kwargs.get("output_hidden_states") not in (None, False, -1) \
                or kwargs.get("output_attentions"):
            return self.forward(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos, **kwargs)
        kwargs.pop("output_hidden_states", None)
        keys = [self.key(image) for image in pixel_values]
        new: dict[bytes, int] = {}  # images not seen before -> their first index in the batch
        for i, k in enumerate(keys):
            if k not in self.outputs and k not in new:
                new[k] = i
        if new:
            with torch.no_grad():
                hidden = self.forward(pixel_values=pixel_values[list(new.values())], **kwargs).last_hidden_state
            self.outputs.update(zip(new, hidden))
        return BaseModelOutputWithPooling(last_hidden_state=torch.stack([self.outputs[k] for k in keys]))


def add_lora(model, args: ModelArguments):
    """LoRA adapters on the language model's attention and MLP projections only."""
    from peft import LoraConfig, get_peft_model
    target = r".*language_model.*\.(" + "|".join(LLM_LINEAR) + r")$"
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=target, bias="none")
    return get_peft_model(model, config)


def init_deepspeed_comm(training: TrainingArguments) -> None:
    """ZeRO-3 partitions weights as they load (``deepspeed.zero.Init``), which needs DeepSpeed's
    process group before the model exists; on CPU the Trainer only creates it later, at
    ``deepspeed.initialize``."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    if training.deepspeed and training.world_size > 1 and is_deepspeed_zero3_enabled():
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() and not training.use_cpu
                                   else "gloo")


def check_dual(args: ModelArguments, supported: bool = True) -> bool:
    """Whether the dual visual path is on; a one-line error for settings it cannot train with."""
    if args.dual_alpha is None:
        if args.dual_learnable:
            raise OccError("dual_learnable trains the dual visual path's alpha: set dual_alpha (its starting value)")
        return False
    if not supported:
        raise OccError("dual_alpha: the dual visual path trains in the SFT phases only (stages 1, 2 and stage 4's "
                       "first phase); unset dual_alpha for this stage")
    dual.check_alpha(args.dual_alpha)
    if args.use_lora:
        raise OccError("use_lora with dual_alpha is not supported: train the dual visual path without LoRA")
    return True


def load_start(args: ModelArguments, device: torch.device) -> InternVLForConditionalGeneration:
    """The checkpoint the stage starts from, as loaded for training. fp32 weights whatever bf16/fp16
    say: the Trainer then computes in half precision under autocast and steps fp32 weights
    (DeepSpeed keeps its own fp32 master copy). Half-precision weights stepped in half precision
    lose every update under half a bf16 step (benchmarks/RESULTS.md, "Mixed precision that learns")."""
    return InternVLForConditionalGeneration.from_pretrained(
        args.model_name_or_path, use_safetensors=True, dtype=torch.float32,
        attn_implementation=args.attn_implementation or default_attention(device))


def build_model(args: ModelArguments, training: TrainingArguments, dual_supported: bool = False):
    """The model to train. With ``dual_alpha`` (only where the caller passes ``dual_supported``:
    the SFT stages and stage 4's SFT phase, whose data carry renders) it is wrapped in
    ``occmllm.dual.DualVisual``."""
    is_dual = check_dual(args, dual_supported)
    config = check_checkpoint(args.model_name_or_path)
    init_deepspeed_comm(training)
    model = load_start(args, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model.saved_dtype = checkpoint_dtype(config)  # save_final stores the stage in the dtype it started from
    freeze(model, args.freeze_vision, args.freeze_projector, args.freeze_llm)
    if args.cache_vision:
        RememberedTower(model.model.vision_tower, model.config.vision_feature_layer)
    if args.use_lora:
        if args.freeze_llm:
            raise OccError("use_lora adapts the language model: it cannot also be frozen (freeze_llm)")
        model = add_lora(model, args)
    if is_dual:
        model = dual.DualVisual(model, args.dual_alpha, learnable=args.dual_learnable)
    if not any(p.requires_grad for p in model.parameters()):
        raise OccError("every part of the model is frozen: nothing to train")
    if args.compile_layers:
        compile_layers(model)
    return model


def compile_layers(model) -> None:
    """Each transformer layer of the tower and the language model compiled in place
    (``nn.Module.compile``: the state dict keeps its names, so checkpoints are unchanged). Layers
    of one kind share their code, so the compiler traces each kind once; LoRA adapters, when
    present, are inside the layers and compiled with them."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    if is_deepspeed_zero3_enabled():
        raise OccError("compile_layers: DeepSpeed ZeRO-3 gathers each layer's weights by hooks the compiler cannot "
                       "trace: unset compile_layers, or use ZeRO-1/2")
    internvl = next(m for m in model.modules() if isinstance(m, InternVLForConditionalGeneration))
    for layer in (*internvl.model.vision_tower.encoder.layer, *internvl.model.language_model.layers):
        layer.compile(dynamic=True)


def is_finished(output_dir: str | os.PathLike) -> bool:
    """Whether a stage finished in ``output_dir``: ``save_final`` writes the processor last, after
    the weights, so its files mark a complete stage checkpoint."""
    return (Path(output_dir) / "processor_config.json").is_file() and (Path(output_dir) / "config.json").is_file()


def save_final(trainer: Trainer, processor, output_dir: str) -> None:
    """The stage's checkpoint: a plain InternVL folder (LoRA merged in) with its processor. With
    the dual visual path, ``occmllm.sft.DualTrainer`` saves it by ``dual.save``: the same folder
    plus ``dual_alpha.json``. Trained in fp32, the weights are stored in the dtype of the checkpoint
    the stage started from (a bf16 InternVL stays bf16: half the size); DeepSpeed saves its own."""
    model = trainer.model
    lora = hasattr(model, "merge_and_unload")
    if lora:
        model = model.merge_and_unload()
    internvl = model.model if isinstance(model, dual.DualVisual) else model
    dtype = getattr(internvl, "saved_dtype", torch.float32)
    if dtype != torch.float32 and not trainer.is_deepspeed_enabled:
        model.to(dtype)  # training is over: nothing steps these weights again
    if not lora:
        trainer.save_model(output_dir)
    elif trainer.args.should_save:
        model.save_pretrained(output_dir)
    if trainer.args.should_save:
        processor.save_pretrained(output_dir)


def reference_model(path, policy) -> InternVLForConditionalGeneration:
    """A frozen copy of the starting checkpoint, in the policy's dtype and attention: MPO's
    reference and the RL phase's KL anchor."""
    model = InternVLForConditionalGeneration.from_pretrained(
        path, use_safetensors=True, dtype=policy.dtype, attn_implementation=policy.config._attn_implementation)
    model.requires_grad_(False)
    return model.eval()


# --- the stage command ---------------------------------------------------------------------------

STAGE_FOLDERS = ("step1_sft", "step2_multiquery", "step3_mpo", "step4_selfconsistency")


def stage_of(config: str | os.PathLike | None) -> str | None:
    """The stage whose folder holds ``config`` (a stage's default config), or None."""
    if config is None:
        return None
    folder = Path(config).resolve().parent.name
    return folder if folder in STAGE_FOLDERS else None


def _writer_before(stage: int, checkpoint: str) -> int | None:
    """The stage before ``stage`` (1-4) whose default config writes ``checkpoint`` (its
    ``output_dir``), or None."""
    for k, folder in enumerate(STAGE_FOLDERS[: stage - 1], 1):
        config = Path(__file__).resolve().parents[1] / folder / "config.yaml"
        out = read_config(config).get("output_dir") if config.is_file() else None
        if out is not None and Path(out) == Path(checkpoint):
            return k
    return None


def missing_checkpoint_hint(stage: str | None, checkpoint: str | None = None) -> str:
    """What to do when ``stage``'s starting checkpoint (``--model_name_or_path``: ``checkpoint``)
    does not exist: run the stage whose default config writes it (the demo's stage 4 starts from
    stage 2's, stage 3 being left out of it), else the stage before."""
    if stage is None:
        return "pass --model_name_or_path an InternVL checkpoint folder"
    k = STAGE_FOLDERS.index(stage) + 1
    if k == 1:
        return ("stage 1 trains from a base model: build the tiny one (python -m occmllm.tiny --out DIR), or "
                "download an InternVL '-hf' checkpoint, and pass --model_name_or_path")
    writer = (checkpoint is not None and _writer_before(k, checkpoint)) or k - 1
    return (f"stage {k} trains from stage {writer}'s checkpoint: run stage {writer} first "
            f"(bash {STAGE_FOLDERS[writer - 1]}/run.sh) or pass --model_name_or_path")


def fit(trainer: Trainer, processor, resume: bool) -> Path:
    """Train (with ``resume``, from the last checkpoint in output_dir if there is one) and save the
    stage checkpoint there, with its logged figures and their plot (``PlotsTraining``). The
    processor's files, which mark a finished stage, come last."""
    out = trainer.args.output_dir
    resume = resume and any(Path(out).glob("checkpoint-*"))
    trainer.add_callback(PlotsTraining(f"{Path(out).resolve().name}: {type(trainer).__name__}"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    save_final(trainer, processor, out)
    return Path(out)


def run_stage(train_fn, dataclass_types: tuple, argv=None, default_config: Path | None = None) -> Path:
    """A stage's command: its config and flags parsed into ``dataclass_types`` (model arguments
    first, training arguments last), its starting checkpoint checked (a missing one names the stage
    that writes it), then ``train_fn(*arguments)``."""
    model_args, *rest = parse_config(dataclass_types, argv, default_config)
    start = model_args.model_name_or_path
    # the hint reads the stages' configs: only for a start that is missing
    check_checkpoint(start, None if Path(start).is_dir() else missing_checkpoint_hint(stage_of(default_config), start))
    out = train_fn(model_args, *rest)
    if rest[-1].should_save:
        print(f"saved the stage checkpoint to {out}")
    close_process_group()
    return out


def close_process_group() -> None:
    """End the distributed run in order, once every rank has finished (never after an error: a rank
    still waiting in a collective would hang the others here).

    A process that exits with its process group alive leaves gloo's worker threads holding work
    objects whose tensors reference Python objects; the interpreter's teardown then races those
    threads and the rank aborts (``terminate called without an active exception``) after its work
    is written. The DeepSpeed engine and the Trainer are garbage by now; collecting them first lets
    their communication handles go before the group does."""
    import gc

    import torch.distributed as dist
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stage_commands(train_fn, dataclass_types: tuple):
    """A stage's ``run(argv, default_config) -> checkpoint folder`` and its command-line ``main``
    (errors as one line), both by ``run_stage``."""
    def run(argv=None, default_config: Path | None = None) -> Path:
        return run_stage(train_fn, dataclass_types, argv, default_config)

    @cli
    def main(argv=None, default_config: Path | None = None) -> int:
        run(argv, default_config)
        return 0

    return run, main
