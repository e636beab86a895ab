#!/usr/bin/env bash
# Stage 4: chain-of-thought SFT, then self-correction RL, from the stage-3 checkpoint (the demo:
# stage 2's, as it leaves stage 3 out). Defaults (step4_selfconsistency/config.yaml) run the CPU demo
# after stage 2 and step4_selfconsistency.make_data.
#   bash step4_selfconsistency/run.sh [--flag value ...]
#   MODEL=ckpt/step3 DATA=step4.jsonl OUTPUT=ckpt/step4 NPROC=8 DEEPSPEED=zero2 \
#       bash step4_selfconsistency/run.sh --bf16 true --use_cpu false
source "$(dirname "$0")/../occmllm/launch.sh"
launch step4_selfconsistency.train "$@"
