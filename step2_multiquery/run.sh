#!/usr/bin/env bash
# Stage 2: SFT from the stage-1 checkpoint on multi-turn records asking Q1-Q5.
# Defaults (step2_multiquery/config.yaml) run the CPU demo after stage 1.
#   bash step2_multiquery/run.sh [--flag value ...]
#   MODEL=ckpt/step1 DATA=step2.jsonl OUTPUT=ckpt/step2 NPROC=8 DEEPSPEED=zero2 \
#       bash step2_multiquery/run.sh --bf16 true --use_cpu false
source "$(dirname "$0")/../occmllm/launch.sh"
launch step2_multiquery.train "$@"
