"""``python -m train.sweep_lrwd`` from a checkout (installed: ``hacbo-sweep-lrwd``); see
:mod:`hacbo_jax.experiments.lrwd.run`."""

import sys

from hacbo_jax.experiments.lrwd.run import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.sweep_lrwd"))
