"""``python -m train.autolrs`` from a checkout (installed: ``hacbo-autolrs``); see
:mod:`hacbo_jax.experiments.autolrs.run`."""

import sys

from hacbo_jax.experiments.autolrs.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.autolrs"))
