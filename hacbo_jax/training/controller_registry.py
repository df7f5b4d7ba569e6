"""The controllers the training stack knows, in one table: ``controller.kind`` -> entry.

Each :class:`ControllerEntry` names the config section of the controller's hyper-parameters (a
frozen dataclass whose fields are exactly the keyword arguments of its optax transformation),
the transformation itself, the type of its state (found inside the optimiser state with
``optax.tree_utils``) and a function turning that state into plain numbers for the logs.
Everything else is derived from the table: the allowed values of ``controller.kind``, the
``controller.<kind>`` config sections, the optimiser chain (:func:`build_controller`) and the
per-block statistics of ``metrics.jsonl`` (:func:`controller_stats`), which read the
hyper-parameters from the config section the controller was built from, so the logs need no
second copy of them. Adding a controller (or a learning-rate driver) is one more entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import jax
import numpy as np
import optax

from hacbo_jax import BLACState, HACBOState, blac, blac_multipliers, hacbo, hacbo_multipliers
from hacbo_jax.training.config_fields import in_range, option

__all__ = [
    "BLACConfig",
    "CONTROLLERS",
    "ControllerEntry",
    "HACBOConfig",
    "build_controller",
    "controller_stats",
    "find_controller_state",
]


@dataclass(frozen=True)
class HACBOConfig:
    """Arguments of ``hacbo_jax.controllers.hacbo`` (spec defaults)."""

    rho: float = option(0.8, in_range(0, 1, lo_open=True, hi_open=True))
    interval: int = option(30, in_range(1))  # K
    theta_neg: float = option(0.04, in_range(0, 1))
    patience: int = option(6, in_range(1))  # F
    gamma: float = option(0.1, in_range(0, 1))
    eps: float = option(1e-8, in_range(0, lo_open=True))
    curvature_norm: Literal["rms", "l2"] = "rms"
    debias: bool = False
    update_norm_budget: Optional[float] = option(None, in_range(0, lo_open=True))  # lambda
    curvature_weighting: bool = True
    probation: bool = True


@dataclass(frozen=True)
class BLACConfig:
    """Arguments of ``hacbo_jax.controllers.blac`` (the paper's run values)."""

    rho: float = option(0.7436, in_range(0, 1, lo_open=True, hi_open=True))
    interval: int = option(20, in_range(1))  # K
    freeze_after: int = option(300, in_range(0))  # U
    update_norm_budget: Optional[float] = option(None, in_range(0, lo_open=True))


def _common_stats(state: Any) -> dict[str, Any]:
    return {
        "agreement": np.asarray(state.agreement).tolist(),
        "cosine": np.asarray(state.cosine).tolist(),
        "layer_weights": np.asarray(state.layer_weights).tolist(),
    }


def _hacbo_stats(state: HACBOState, hyper: HACBOConfig) -> dict[str, Any]:
    multipliers = hacbo_multipliers(
        state,
        eps=hyper.eps,
        rho=hyper.rho,
        debias=hyper.debias,
        curvature_weighting=hyper.curvature_weighting,
        interval=hyper.interval,
    )
    probation = np.asarray(state.probation)
    return {
        **_common_stats(state),
        "multipliers": np.asarray(multipliers).tolist(),
        "probation": probation.tolist(),
        "curvature": np.asarray(state.curvature).tolist(),
        "l_active": int(np.sum(~probation)),
    }


def _blac_stats(state: BLACState, hyper: BLACConfig) -> dict[str, Any]:
    frozen = np.asarray(state.frozen)
    return {
        **_common_stats(state),
        "multipliers": np.asarray(blac_multipliers(state)).tolist(),
        "frozen": frozen.tolist(),
        "signed_agreement": np.asarray(state.signed_agreement).tolist(),
        "l_active": int(np.sum(~frozen)),
    }


@dataclass(frozen=True)
class ControllerEntry:
    """One controller of the training stack (``none`` has no transformation at all).

    Attributes:
      config_type: frozen dataclass of the ``controller.<kind>`` section; its fields are the
        keyword arguments of ``transform`` after the label tree (a test checks the defaults).
      transform: ``transform(labels, **hyper) -> optax.GradientTransformationExtraArgs``.
      state_type: the NamedTuple state of ``transform`` (looked up in the optimiser state).
      stats: ``stats(state, hyper_config) -> dict`` of plain lists/numbers for the logs.
    """

    config_type: type | None = None
    transform: Callable[..., optax.GradientTransformationExtraArgs] | None = None
    state_type: type | None = None
    stats: Callable[[Any, Any], dict[str, Any]] | None = None


# Insertion order is the order of the allowed values in config messages.
CONTROLLERS: dict[str, ControllerEntry] = {
    "none": ControllerEntry(),
    "blac": ControllerEntry(BLACConfig, blac, BLACState, _blac_stats),
    "hacbo": ControllerEntry(HACBOConfig, hacbo, HACBOState, _hacbo_stats),
}


def controller_entry(kind: str) -> ControllerEntry:
    """The registered entry of ``kind``; ValueError naming the registered kinds otherwise."""
    if kind not in CONTROLLERS:
        raise ValueError(
            f"controller kind {kind!r} is not one of " + ", ".join(map(repr, CONTROLLERS))
        )
    return CONTROLLERS[kind]


def build_controller(
    kind: str, labels: Any, hyper: Any = None
) -> optax.GradientTransformationExtraArgs | None:
    """The transformation of controller ``kind`` over the label tree ``labels`` (None: ``none``).

    ``hyper`` is the controller's config section (an instance of its ``config_type``); None
    uses that section's defaults.
    """
    entry = controller_entry(kind)
    if entry.transform is None:
        return None
    hyper = entry.config_type() if hyper is None else hyper
    return entry.transform(labels, **dataclasses.asdict(hyper))


def find_controller_state(opt_state: Any) -> Any | None:
    """The state of the (one) registered controller inside a chained, wrapped optimiser state."""
    for entry in CONTROLLERS.values():
        if entry.state_type is None:
            continue
        found = optax.tree_utils.tree_get(
            opt_state,
            entry.state_type.__name__,
            filtering=lambda _, value, cls=entry.state_type: isinstance(value, cls),
        )
        if found is not None:
            return found
    return None


def controller_stats(kind: str, hyper: Any, opt_state: Any) -> dict[str, Any] | None:
    """Controller ``kind``'s state in ``opt_state`` as plain lists for the JSONL log (None
    without a controller). ``hyper`` is the config section the controller was built from."""
    entry = controller_entry(kind)
    state = find_controller_state(opt_state)
    if entry.stats is None or state is None:
        return None
    return {"kind": kind, **entry.stats(jax.device_get(state), hyper)}
