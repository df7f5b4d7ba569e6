"""``python -m train.sweep`` from a checkout (installed: ``hacbo-sweep``); see :mod:`hacbo_jax.experiments.sweep`."""

import sys

from hacbo_jax.experiments.sweep import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.sweep"))
