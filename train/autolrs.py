"""``python -m train.autolrs`` from a checkout (installed: ``hacbo-autolrs``); see
:mod:`hacbo_jax.training.autolrs_method`."""

import sys

from hacbo_jax.training.autolrs_method import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.autolrs"))
