"""``python -m train.compare`` from a checkout (installed: ``hacbo-compare``); see :mod:`hacbo_jax.experiments.compare.run`."""

import sys

from hacbo_jax.experiments.compare.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.compare"))
