#!/usr/bin/env bash
# Stage 1: SFT on the category question. Defaults (step1_sft/config.yaml) run the CPU demo.
#   bash step1_sft/run.sh [--flag value ...]
#   MODEL=path/to/InternVL3-1B-hf DATA=step1.jsonl OUTPUT=ckpt/step1 NPROC=8 DEEPSPEED=zero2 \
#       bash step1_sft/run.sh --bf16 true --use_cpu false
source "$(dirname "$0")/../occmllm/launch.sh"
launch step1_sft.train "$@"
