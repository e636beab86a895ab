# Shared launcher for the stages' run.sh (sourced, not run). Usage inside run.sh:
#   source "$(dirname "$0")/../occmllm/launch.sh"; launch step1_sft.train "$@"
# Environment:
#   NPROC=N           processes on this node (default 1: plain python; N > 1: torchrun)
#   DEEPSPEED=zero2   ZeRO config from occmllm/deepspeed/ (zero1|zero2|zero3) or a JSON path
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   multi-node torchrun settings (one node without
#                     MASTER_PORT: a free port, torchrun --standalone)
#   MODEL, DATA, OUTPUT   shortcuts for --model_name_or_path, --train_data, --output_dir
#   PYTHON            interpreter (default: .venv/bin/python if present, else python)
set -euo pipefail

launch() {
    local module=$1; shift
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
    local py=${PYTHON:-}
    if [ -z "$py" ]; then
        if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python; fi
    fi
    local args=()
    [ -n "${MODEL:-}" ] && args+=(--model_name_or_path "$MODEL")
    [ -n "${DATA:-}" ] && args+=(--train_data "$DATA")
    [ -n "${OUTPUT:-}" ] && args+=(--output_dir "$OUTPUT")
    if [ -n "${DEEPSPEED:-}" ]; then
        local ds=$DEEPSPEED
        [ -f "$ds" ] || ds=occmllm/deepspeed/$DEEPSPEED.json
        args+=(--deepspeed "$ds")
    fi
    local nproc=${NPROC:-1}
    if [ "${NNODES:-1}" -gt 1 ] || { [ "$nproc" -gt 1 ] && [ -n "${MASTER_PORT:-}" ]; }; then
        exec "$py" -m torch.distributed.run --nproc_per_node "$nproc" --nnodes "${NNODES:-1}" \
            --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-127.0.0.1}" \
            --master_port "${MASTER_PORT:-29500}" -m "$module" "${args[@]}" "$@"
    fi
    if [ "$nproc" -gt 1 ]; then
        # one node and no MASTER_PORT: torchrun's rendezvous takes a free port, so two jobs on one
        # machine never collide on a fixed one
        exec "$py" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m "$module" "${args[@]}" "$@"
    fi
    exec "$py" -m "$module" "${args[@]}" "$@"
}
