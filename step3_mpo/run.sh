#!/usr/bin/env bash
# Stage 3: Mixed Preference Optimization (DPO + BCO + SFT losses) from the stage-2 checkpoint.
# Defaults (step3_mpo/config.yaml) run the CPU demo after stage 2 and step3_mpo.make_data.
#   bash step3_mpo/run.sh [--flag value ...]
#   MODEL=ckpt/step2 DATA=step3.jsonl OUTPUT=ckpt/step3 NPROC=8 DEEPSPEED=zero2 \
#       bash step3_mpo/run.sh --bf16 true --use_cpu false
source "$(dirname "$0")/../occmllm/launch.sh"
launch step3_mpo.train "$@"
