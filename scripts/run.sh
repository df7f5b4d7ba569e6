#!/usr/bin/env bash
# Main job: fine-tune the embedded default model with HACBO on CPU, offline, and print exact match.
# Extra arguments are passed to train.finetune (for example output_dir=runs/mine seed=1).
source "$(dirname "$0")/_env.sh" ""
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m train.finetune --config tiny_cpu "$@"
