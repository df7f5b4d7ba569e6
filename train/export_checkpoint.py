"""``python -m train.export_checkpoint``: a run's checkpoint as a Hugging Face model; see
:mod:`hacbo_jax.trainer.export`."""

import sys

from hacbo_jax.trainer.export import main

if __name__ == "__main__":
    sys.exit(main())
