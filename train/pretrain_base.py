"""``python -m train.pretrain_base``: rebuild the embedded base model; see
:mod:`hacbo_jax.trainer.pretrain_base`."""

from hacbo_jax.trainer.pretrain_base import main

if __name__ == "__main__":
    main()
