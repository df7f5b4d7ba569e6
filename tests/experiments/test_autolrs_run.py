"""hacbo_jax.experiments.autolrs.run (``hacbo-autolrs``): AutoLRS on the training stack's run;
a run stopped inside a search and resumed equals the uninterrupted run."""

from __future__ import annotations

import json

import chex
import pytest

from hacbo_jax.experiments.autolrs import run as autolrs_method
from hacbo_jax.trainer.checkpoint import Checkpointer
from hacbo_jax.trainer.config import load_config
from hacbo_jax.experiments.report import write_report
from support.runs import CONFIG, quick_overrides

pytestmark = pytest.mark.slow  # three tiny runs (~1 min each on the loaded CPU)

AUTOLRS = (
    "controller.kind=none",
    "eval.at_start=false",
    "checkpoint.every=5",
    "autolrs.lr_min=1e-4",
    "autolrs.lr_max=1e-2",
    "autolrs.tau0=8",
    "autolrs.tau_prime0=4",
    "autolrs.num_candidates=2",
    "autolrs.tau_max=160",
)


def _params(run_dir, step, cfg):
    parts_state = autolrs_method.build_run(cfg, inject_lr=True).state
    with Checkpointer(run_dir / "checkpoints") as ckpt:
        (state, _), meta = ckpt.restore(step, abstract_target=(parts_state, parts_state))
    return state.params, meta


@pytest.mark.slow
def test_resume_inside_a_search_continues_the_same_stage(tiny_model_dir, tmp_path):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full_cfg = load_config(CONFIG, quick_overrides(tiny_model_dir, full_dir, *AUTOLRS))
    split_cfg = load_config(CONFIG, quick_overrides(tiny_model_dir, split_dir, *AUTOLRS))
    summary = autolrs_method.run(full_cfg)
    # 12 steps: candidates at steps 1-4 and 5-8, then the chosen rate for steps 9-12.
    assert summary["steps"] == 12 and summary["effective_steps"] == 4
    [[start, lr, tau]] = summary["schedule"]
    assert (start, tau) == (8, 8) and 1e-4 <= lr <= 1e-2
    # Step 6 is inside the second candidate: the checkpoint must hold the snapshot.
    assert autolrs_method.run(split_cfg, stop_after=6) == {"stopped_at": 6}
    _, meta = _params(split_dir, 6, split_cfg)
    assert meta["autolrs"]["phase"] == "search" and meta["autolrs"]["candidate"] == 1
    resumed = autolrs_method.run(split_cfg, resume=True)
    assert resumed["schedule"] == summary["schedule"]
    full_params, full_meta = _params(full_dir, 12, full_cfg)
    split_params, split_meta = _params(split_dir, 12, split_cfg)
    chex.assert_trees_all_equal(split_params, full_params)
    assert split_meta["autolrs"] == full_meta["autolrs"]
    driver = json.loads((full_dir / "autolrs.json").read_text())
    assert len(driver["trials"]) == 2 and driver["schedule"] == summary["schedule"]
    assert (full_dir / "autolrs_schedule.png").stat().st_size > 0
    rows = [json.loads(x) for x in (full_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert rows[-1]["phase"] == "exploit" and rows[-1]["lr"] == lr
    # train.report reads the run: loss curve and the chosen schedule.
    report = write_report([full_dir], tmp_path / "report")
    assert "autolrs_" in report.read_text()
