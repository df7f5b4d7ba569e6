"""Export any checkpoint of a run as a Hugging Face model directory.

    python -m train.export_checkpoint RUN_DIR --step N --out DIR [--overwrite]

The run's own ``config.yaml`` rebuilds its parts (:func:`~hacbo_jax.trainer.run_parts.build_run`),
the checkpoint of step N is restored onto them, and the params are written with
``save_pretrained`` together with the tokenizer. The controller state of that step is written
beside them (``controller_state.npz``: one array per field) so that tools such as the curvature
probe can read HACBO's curvature EMA without orbax. A non-empty ``--out`` (an earlier export)
is refused unless ``--overwrite`` is given. A LoRA run's checkpoint is exported merged, and its
adapters also in PEFT's format in ``adapter/`` inside ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from hacbo_jax.trainer.cli_common import (
    ArgumentParser,
    add_overwrite_argument,
    check_output_target,
    cli_main,
)

__all__ = ["export_checkpoint", "main"]


def export_checkpoint(run_dir: str | Path, step: int | None, out_dir: str | Path) -> Path:
    """Writes step ``step`` (None: the newest) of ``run_dir`` as an HF model to ``out_dir``."""
    import jax

    from hacbo_jax.trainer.checkpoint import Checkpointer
    from hacbo_jax.trainer.config import load_config
    from hacbo_jax.trainer.controller_registry import find_controller_state
    from hacbo_jax.trainer.run_parts import build_run

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(run_dir / "config.yaml")
    parts = build_run(cfg)
    with Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep) as ckpt:
        state, _ = ckpt.restore(step, abstract_target=parts.state)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "controller_state.npz").unlink(missing_ok=True)  # an earlier export's (--overwrite)
    parts.model_at(state.params).save_pretrained(out_dir)  # a LoRA run's merged
    parts.tokenizer.save_pretrained(out_dir)
    if parts.lora:
        parts.save_adapter(state.params, out_dir / "adapter")
    controller_state = find_controller_state(state.opt_state)
    if controller_state is not None:
        fields = {
            k: np.asarray(v)
            for k, v in jax.device_get(controller_state._asdict()).items()
            if v is not None
        }
        np.savez(out_dir / "controller_state.npz", **fields)
    return out_dir


@cli_main
def main(
    argv: Sequence[str] | None = None, *, prog: str = "python -m train.export_checkpoint"
) -> int:
    parser = ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    add_overwrite_argument(parser, "an earlier export in --out")
    args = parser.parse_args(argv)
    if args.step is not None and args.step < 0:
        raise ValueError(f"--step {args.step}: must be >= 0")
    if not (args.run_dir / "config.yaml").is_file():
        raise ValueError(f"RUN_DIR {str(args.run_dir)!r} is not a run directory (no config.yaml)")
    check_output_target(args.out, overwrite=args.overwrite)
    args.out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before the restore
    out = export_checkpoint(args.run_dir, args.step, args.out)
    print(f"wrote {out}")
    return 0
