"""``python -m train.sweep_lrwd`` from a checkout (installed: ``hacbo-sweep-lrwd``); see
:mod:`hacbo_jax.training.sweep_lrwd`."""

import sys

from hacbo_jax.training.sweep_lrwd import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.sweep_lrwd"))
