"""Stage 4 training from the stage-3 checkpoint (the demo: stage 2's), in two phases
(``config.yaml`` beside this file):

1. chain-of-thought SFT on the stage-4 records (``occmllm.sft``) into ``sft_output_dir``;
2. self-correction RL from that checkpoint (``occmllm.selfcorrect``) into ``output_dir``.

With ``second_look_model`` (the demo's config), phase 1 trains two models from the start
checkpoint: the blended second-look records into its ``second_look/`` folder (``occmllm.chain``),
and the records without a render (first answer, check, replay, plan) into the checkpoint itself,
so that learning to read the blend cannot move the first look. The RL phase samples a chain from
one model and needs ``--second_look_model false``.

The demo's config runs phase 1 alone (into ``output_dir``): on its validation split the RL phase
lowered accuracy (``benchmarks/RESULTS.md``, "The recipe with one chain of thought").

    python -m step4_selfconsistency.train [--config step4_selfconsistency/config.yaml] [--flag value ...]

``--phases sft`` or ``--phases rl`` runs one phase (the RL phase alone starts from
``--model_name_or_path``).
"""
import gc
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from transformers import TrainingArguments

from occmllm import chain, selfcorrect, sft, stage
from occmllm.errors import OccError


@dataclass
class PhaseArguments:
    phases: str = field(default="sft,rl", metadata={"help": "which phases to run: sft,rl (in that order), sft or rl"})
    sft_output_dir: str | None = field(default=None, metadata={
        "help": "where the chain-of-thought SFT phase saves its checkpoint [<output_dir>_cot_sft with the RL phase, "
                "else output_dir]"})
    second_look_model: bool = field(default=False, metadata={
        "help": "train the second look (the records with a render) as a model of its own, saved in the "
                "checkpoint's second_look/ folder with the blend weight; the other records train the checkpoint "
                "without the blend"})
    freeze_first_look_projector: bool = field(default=True, metadata={
        "help": "with second_look_model: keep the first look's projector as stage 3 left it (the first look reads no "
                "render, and trained it moved Q1 answers on fresh views); freeze_projector sets the second look's. "
                "false: the first look's follows freeze_projector too"})


def parse_phases(text: str) -> list[str]:
    phases = [p.strip() for p in text.split(",") if p.strip()]
    if phases not in (["sft", "rl"], ["sft"], ["rl"]):
        raise OccError(f"--phases {text!r}: expected sft,rl, sft or rl")
    return phases


def train(model_args: stage.ModelArguments, data_args: stage.DataArguments, phase_args: PhaseArguments,
          rl_args: selfcorrect.SelfCorrectArguments, training: TrainingArguments) -> Path:
    phases = parse_phases(phase_args.phases)
    if phase_args.second_look_model and "rl" in phases:
        raise OccError("the RL phase samples the whole chain from one model: with --phases "
                       f"{phase_args.phases} set --second_look_model false")
    if not phase_args.second_look_model and model_args.keep_first_answer and "sft" in phases:
        raise OccError("--second_look_model false trains one model that blends the render into every record it "
                       "can, and keep_first_answer holds answers read without one: set --keep_first_answer 0")
    out = Path(model_args.model_name_or_path)
    if "sft" in phases:
        # without the RL phase the SFT phase's checkpoint is the stage's own
        default = f"{training.output_dir.rstrip('/')}_cot_sft" if "rl" in phases else training.output_dir
        sft_dir = phase_args.sft_output_dir or default
        if phase_args.second_look_model:
            out = train_both_looks(model_args, data_args, training, sft_dir, phase_args.freeze_first_look_projector)
        elif data_args.resume and stage.is_finished(sft_dir):
            print(f"chain-of-thought SFT: already finished in {sft_dir}"
                  + ("; resuming the RL phase" if "rl" in phases else ""), flush=True)
            out = Path(sft_dir)
        else:
            out = sft.train(model_args, data_args, replace(training, output_dir=sft_dir))
        gc.collect()  # the SFT phase's model and optimizer state go before the RL phase loads its two models
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "rl" in phases:  # the blend weight comes with the SFT phase's checkpoint (or dual_alpha, without one)
        out = selfcorrect.train(replace(model_args, model_name_or_path=str(out)), data_args, rl_args, training)
    return out


def train_both_looks(model_args: stage.ModelArguments, data_args: stage.DataArguments,
                     training: TrainingArguments, out_dir: str, freeze_first_look_projector: bool = True) -> Path:
    """Phase 1 as two models from the same start: the second-look records into
    ``out_dir/second_look`` (blended, with ``dual_alpha``), then the records without a render into
    ``out_dir`` itself (no blend), whose processor files, written last, mark the whole checkpoint
    finished. ``keep_first_answer`` holds the first look's Q1 answers only: the second look must
    learn to move them. The second look trains its projector as ``freeze_projector`` says (it learns
    to read renders through it); with ``freeze_first_look_projector`` the first look's stays as it
    was. With ``resume`` a finished model is kept."""
    freeze_first = model_args.freeze_projector or freeze_first_look_projector
    looks = [(Path(out_dir) / chain.SECOND_LOOK_DIR, replace(model_args, keep_first_answer=0.0), chain.is_second_look,
              "second-look records (with a render)"),
             (Path(out_dir), replace(model_args, dual_alpha=None, dual_learnable=False, freeze_projector=freeze_first),
              lambda rec: not chain.is_second_look(rec), "first-look records (without a render)")]
    for folder, args, keep, part in looks:
        if data_args.resume and stage.is_finished(folder):
            print(f"chain-of-thought SFT: {part} already finished in {folder}", flush=True)
            continue
        sft.train(args, data_args, replace(training, output_dir=str(folder)), keep, part)
        gc.collect()
    return Path(out_dir)


run, main = stage.stage_commands(train, (stage.ModelArguments, stage.DataArguments, PhaseArguments,
                                         selfcorrect.SelfCorrectArguments, TrainingArguments))

if __name__ == "__main__":
    main(default_config=Path(__file__).with_name("config.yaml"))
