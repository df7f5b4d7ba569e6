#!/usr/bin/env bash
# Main job: fine-tune the embedded tiny Qwen3 with HACBO on CPU, offline, and print exact match
# before and after. Creates .venv with the trainer's dependencies on first use.
# Extra arguments go to train.finetune (for example output_dir=runs/mine seed=1).
source "$(dirname "$0")/_env.sh" .venv train
exec python -m train.finetune --config tiny_cpu "$@"
