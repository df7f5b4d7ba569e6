#!/usr/bin/env bash
# Tests: creates .venv-test with the test extras (every extra, pytest, chex, hypothesis, mkdocs,
# and torch 2.13.0 CPU as the transformers reference) on first use.
#
#   bash scripts/test.sh          the fast tier: every module, unit and short integration tests
#                                 (under 5 minutes on 2 idle cores); run it before every commit
#   bash scripts/test.sh --slow   the slow tier only: end-to-end runs, subprocesses, the wheel
#   bash scripts/test.sh --all    both tiers (what CI runs, in two steps)
#
# Any other argument goes to pytest (for example tests/controllers -k budget).
source "$(dirname "$0")/_env.sh" .venv-test test
tier=(-m "not slow")
args=()
for arg in "$@"; do
  case "$arg" in
    --all) tier=() ;;
    --slow) tier=(-m slow) ;;
    *) args+=("$arg") ;;
  esac
done
status=0
python -m pytest "${tier[@]}" "${args[@]}" || status=$?
# pytest's 5 = no test collected (a -k or path that selects only the other tier): not a failure.
[ "$status" -eq 5 ] && status=0
exit "$status"
