"""``python -m train.report`` from a checkout (installed: ``hacbo-report``); see :mod:`hacbo_jax.experiments.report`."""

import sys

from hacbo_jax.experiments.report import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.report"))
