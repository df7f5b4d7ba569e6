"""``python -m train.evidence`` from a checkout; see :mod:`hacbo_jax.training.evidence`."""

import sys

from hacbo_jax.training.evidence import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.evidence"))
