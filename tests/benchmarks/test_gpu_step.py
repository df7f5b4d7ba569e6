"""The prepared GPU script runs end to end on CPU in its dry-run shape (tiny model, XLA
attention): every side steps, its figures are filled in, the skipping sides see idle blocks,
and the logit check compares the same forward through two attention paths."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_step  # noqa: E402


@pytest.mark.slow
def test_gpu_step_dry_run_reports_every_side_and_the_logit_check(tmp_path, capsys):
    out = tmp_path / "gpu_step.json"
    results = gpu_step.main(["--dry-run", "--steps", "7", "--json", str(out)])
    for side in gpu_step.GPU_SIDES:
        r = results[side]
        assert 0 < r["min_s"] <= r["median_s"]
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    # every other block in probation (4 layers), 1 of 4 blocks drawn at pct 0.1 after epoch 1
    assert results["hacbo-gamma0-half-probation"]["idle_blocks_mean"] == 2
    assert results["adagradselect-0.1"]["idle_blocks_mean"] == 3
    assert results["adamw"]["idle_blocks_mean"] == 0
    logits = results["logits"]
    assert logits["xla_vs_xla_max_abs"] == 0.0
    # the host's einsum attention against XLA's attention, both bf16 compute
    assert logits["xla_vs_cpu_einsum_max_abs"] <= 0.05 * logits["logit_scale_max_abs"]
    assert out.exists()
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and "MFU" in printed and "/ adamw step" in printed
    with pytest.raises(SystemExit) as exit_info:  # an earlier record is never overwritten
        gpu_step.main(["--dry-run", "--steps", "7", "--json", str(out)])
    assert exit_info.value.code == 2


def test_gpu_step_refuses_too_few_timed_steps():
    with pytest.raises(SystemExit) as exit_info:
        gpu_step.main(["--dry-run", "--steps", "3"])
    assert exit_info.value.code == 2
