"""``python -m train.finetune`` from a checkout (installed: ``hacbo-finetune``); see :mod:`hacbo_jax.trainer.finetune`."""

import sys

from hacbo_jax.trainer.finetune import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m train.finetune"))
