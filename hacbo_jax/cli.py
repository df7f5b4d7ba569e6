"""Console scripts (``[project.scripts]`` in pyproject.toml).

Each one calls the ``main`` of a :mod:`hacbo_jax.trainer` module. They never import the
checkout's ``train`` package, so a ``train.py`` in the user's directory cannot shadow them.
"""

from __future__ import annotations

import sys


def finetune() -> int:
    """``hacbo-finetune --config NAME|FILE [key=value ...] [--resume] [--print-config]``."""
    from hacbo_jax.trainer.finetune import main

    return main(sys.argv[1:], prog="hacbo-finetune")


def compare() -> int:
    """``hacbo-compare --config NAME|FILE --seeds N --methods a,b ...``."""
    from hacbo_jax.experiments.compare.run import main

    return main(sys.argv[1:], prog="hacbo-compare")


def sweep() -> int:
    """``hacbo-sweep --config NAME|FILE --methods a,b --trials N ...``."""
    from hacbo_jax.experiments.sweep import main

    return main(sys.argv[1:], prog="hacbo-sweep")


def report() -> int:
    """``hacbo-report RUN_DIR [RUN_DIR ...] [--out DIR]``."""
    from hacbo_jax.experiments.report import main

    return main(sys.argv[1:], prog="hacbo-report")


def probe_curvature() -> int:
    """``hacbo-probe-curvature MODEL_DIR --out DIR [--hacbo-state PATH] ...``."""
    from hacbo_jax.experiments.curvature.run import main

    return main(sys.argv[1:], prog="hacbo-probe-curvature")


def sweep_lrwd() -> int:
    """``hacbo-sweep-lrwd --out DIR [--lr ETA --wd LAMBDA --steps T --full ...]``."""
    from hacbo_jax.experiments.lrwd.run import main

    return main(sys.argv[1:], prog="hacbo-sweep-lrwd")


def autolrs() -> int:
    """``hacbo-autolrs --config NAME|FILE [key=value ...] [--resume]``."""
    from hacbo_jax.experiments.autolrs.run import main

    return main(sys.argv[1:], prog="hacbo-autolrs")


def evidence() -> int:
    """``hacbo-evidence tune|budget|stability|report [--out DIR] ...``."""
    from hacbo_jax.experiments.evidence.run import main

    return main(sys.argv[1:], prog="hacbo-evidence")
