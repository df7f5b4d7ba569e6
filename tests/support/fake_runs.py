"""A stand-in for hacbo_jax.trainer.finetune.run in grid tests: writes what a finished run
leaves behind and counts its calls."""

import json
from pathlib import Path

from hacbo_jax.trainer.config import save_config


# The exact match each fake (method, seed) run reports.
FAKE_EM = {
    ("adamw", 0): 0.30,
    ("adamw", 1): 0.28,
    ("adamw", 2): 0.33,
    ("hacbo", 0): 0.34,
    ("hacbo", 1): 0.29,
    ("hacbo", 2): 0.37,
}


class FakeRun:
    """Stands in for hacbo_jax.trainer.finetune.run: writes what a finished run leaves, counts calls."""

    def __init__(self):
        self.calls: list[tuple[str, int, bool]] = []

    def __call__(self, cfg, *, resume: bool, show_progress: bool) -> dict:
        self.calls.append((cfg.method, cfg.seed, resume))
        run_dir = Path(cfg.output_dir)
        save_config(cfg, run_dir / "config.yaml")
        controller = (
            None
            if cfg.controller.kind == "none"
            else {
                "kind": "hacbo",
                "multipliers": [[0.25] * 4] * 2,
                "probation": [False, cfg.seed == 1],
            }
        )
        (run_dir / "metrics.jsonl").write_text(
            json.dumps({"step": 6, "loss": 1.0 + cfg.seed, "controller": controller}) + "\n"
        )
        summary = {
            "method": cfg.method,
            "seed": cfg.seed,
            "steps": 6,
            "final_exact_match": FAKE_EM[cfg.method, cfg.seed],
            "final_train_loss": 1.0 + cfg.seed,
            "diverged": False,
            "skipped_steps": 0,
            "wall_time_s": 10.0,
            "energy_kwh": None,
            "energy_source": "unavailable",
            "eval_examples": 200,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary
