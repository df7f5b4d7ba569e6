"""Entry-point scripts of a checkout (``python -m train.finetune`` ...). Everything they run lives
in :mod:`hacbo_jax.trainer`; an installed package offers the same as ``hacbo-*`` commands."""
