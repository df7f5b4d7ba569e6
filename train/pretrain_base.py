"""``python -m train.pretrain_base``: rebuild the embedded base model; see
:mod:`hacbo_jax.trainer.pretrain_base`.

The command line is checked before any work, as for every other entry point (bad input is one
``PROG: error: ...`` line and exit 2): every number's range, an option given twice, and
``--out``. The builder replaces its output directory when it saves, so ``--out`` must not exist,
be empty, or be the embedded model's own directory (the default: rebuilding it is this tool's
job); any other non-empty directory is refused unless ``--overwrite`` is given, and a file
always.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from hacbo_jax.trainer.cli_common import cli_main, usage_error

PROG = "python -m train.pretrain_base"


def _repeated(argv: Sequence[str]) -> list[str]:
    """Options given more than once (every option of the builder takes a value)."""
    seen: dict[str, int] = {}
    for token in argv:
        if token == "--":
            break
        if token.startswith("--"):
            name = token.split("=", 1)[0]
            seen[name] = seen.get(name, 0) + 1
    return [name for name, n in seen.items() if n > 1]


def argument_problems(args) -> list[str]:
    """Every out-of-range value of the builder's arguments (one line each)."""
    problems = []

    def at_least(name: str, low: int) -> None:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value < low:
            problems.append(f"{name} {value}: must be >= {low}")

    for name in ("--steps", "--batch-size", "--hidden-size", "--intermediate-size",
                 "--num-layers", "--num-heads", "--num-kv-heads", "--head-dim", "--eval-n"):  # fmt: skip
        at_least(name, 1)
    at_least("--seq-len", 2)
    at_least("--warmup", 0)
    at_least("--eval-every", 0)
    at_least("--vocab-size", 259)  # 256 bytes + pad, eos, bos
    if not 0 <= args.seed < 2**32:
        problems.append(f"--seed {args.seed}: must be in [0, 2**32)")
    if args.warmup >= args.steps >= 1:
        problems.append(f"--warmup {args.warmup}: must be < --steps {args.steps}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        problems.append(f"--lr {args.lr}: must be a finite number > 0")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        problems.append(f"--weight-decay {args.weight_decay}: must be a finite number >= 0")
    if not (math.isfinite(args.gsm8k_share) and 0 <= args.gsm8k_share <= 1):
        problems.append(f"--gsm8k-share {args.gsm8k_share}: must be in [0, 1]")
    if args.num_heads >= 1 and args.num_kv_heads >= 1 and args.num_heads % args.num_kv_heads:
        problems.append(
            f"--num-heads {args.num_heads}: must be a multiple of --num-kv-heads "
            f"{args.num_kv_heads}"
        )
    from hacbo_jax.data.synthetic import PRESETS

    if args.task not in PRESETS:
        problems.append(f"--task {args.task!r}: not a synthetic task ({', '.join(PRESETS)})")
    return problems


def out_problem(out: Path, default: Path, overwrite: bool) -> str | None:
    if out.exists() and not out.is_dir():
        return f"--out {str(out)!r} is a file, not a directory"
    if not out.is_dir() or overwrite or not any(out.iterdir()):
        return None
    if out.resolve() == default.resolve():
        return None  # the embedded model's directory: rebuilding it is the tool's job
    return (
        f"--out {str(out)!r} is not empty; the builder replaces the whole directory when it "
        "saves. Pass --overwrite to replace it, or choose another directory"
    )


@cli_main
def main(argv: Sequence[str] | None = None, *, prog: str = PROG) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    repeated = _repeated(argv)
    if repeated:
        raise SystemExit(usage_error(prog, "; ".join(
            f"option {name} given twice" for name in repeated) + "; give each option once"))
    overwrite = "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    if any(a in ("-h", "--help") for a in argv):
        print("--overwrite              replace a non-empty --out (other than the embedded "
              "model's own directory)")
    from hacbo_jax.trainer import pretrain_base

    args = pretrain_base.parse_args(argv)
    problems = argument_problems(args)
    why = out_problem(Path(args.out), pretrain_base.DEFAULT_OUT, overwrite)
    if why:
        problems.append(why)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError("invalid arguments:\n" + "\n".join(f"  - {p}" for p in problems))
    pretrain_base.main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog=PROG))
