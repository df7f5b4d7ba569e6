#!/usr/bin/env bash
# Test suite: creates .venv with the test extras (torch 2.13.0 CPU as the transformers reference).
# Extra arguments are passed to pytest.
source "$(dirname "$0")/_env.sh" "test"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec python -m pytest "$@"
