"""``python -m train.evidence`` from a checkout; see :mod:`hacbo_jax.experiments.evidence.run`."""

import sys

from hacbo_jax.experiments.evidence.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.evidence"))
