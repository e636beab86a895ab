"""The training stages in pipeline order: stage N trains from stage N-1's checkpoint.

Each stage folder holds a ``config.yaml`` beside its ``train.py``; a stage is known by the folder
of its default config. When a stage's starting checkpoint is missing, ``missing_checkpoint_hint``
says which stage writes it and how to run that stage.
"""
from __future__ import annotations

import os
from pathlib import Path

STAGES = ("step1_sft", "step2_multiquery", "step3_mpo", "step4_selfconsistency")


def stage_of(config: str | os.PathLike | None) -> str | None:
    """The stage whose folder holds ``config`` (a stage's default config), or None."""
    if config is None:
        return None
    folder = Path(config).resolve().parent.name
    return folder if folder in STAGES else None


def missing_checkpoint_hint(stage: str | None) -> str:
    """What to do when ``stage``'s starting checkpoint (``--model_name_or_path``) does not exist."""
    if stage is None:
        return "pass --model_name_or_path an InternVL checkpoint folder"
    k = STAGES.index(stage) + 1
    if k == 1:
        return ("stage 1 trains from a base model: build the tiny one (python -m occmllm.tiny --out DIR), or "
                "download an InternVL '-hf' checkpoint, and pass --model_name_or_path")
    return (f"stage {k} trains from stage {k - 1}'s checkpoint: run stage {k - 1} first "
            f"(bash {STAGES[k - 2]}/run.sh) or pass --model_name_or_path")
