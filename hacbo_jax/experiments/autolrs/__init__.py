"""AutoLRS: the learning-rate search itself (``algorithm``: jax, optax, numpy, scipy) and
AutoLRS as a training method on the trainer (``run``, the ``hacbo-autolrs`` command)."""

from hacbo_jax.experiments.autolrs.algorithm import (
    AutoLRSConfig,
    AutoLRSResult,
    AutoLRSState,
    autolrs_forecast,
    autolrs_run,
    autolrs_stages,
    exponential_fit,
)

__all__ = [
    "AutoLRSConfig",
    "AutoLRSResult",
    "AutoLRSState",
    "autolrs_forecast",
    "autolrs_run",
    "autolrs_stages",
    "exponential_fit",
]
