"""``python -m train.pretrain_base``: rebuild the embedded base model; see
:mod:`hacbo_jax.training.pretrain_base`."""

from hacbo_jax.training.pretrain_base import main

if __name__ == "__main__":
    main()
