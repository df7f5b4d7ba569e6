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

Two placements exist (:attr:`ControllerEntry.wraps`): HACBO and BLAC are chained *after* AdamW
and measure with a micro-dev gradient every ``interval`` steps; AdaGradSelect *wraps* AdamW
(``adagradselect(labels, adamw, ...)``), needs no dev gradient and takes ``steps_per_epoch`` and
``seed`` from the run rather than from its config section.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

import jax
import numpy as np
import optax

from hacbo_jax import (
    AdaGradSelectState,
    BLACState,
    HACBOState,
    adagradselect,
    adagradselect_stats,
    blac,
    blac_multipliers,
    hacbo,
    hacbo_starvation,
)
from hacbo_jax.controllers import adagradselect_idle_units, blac_idle_blocks, hacbo_idle_blocks
from hacbo_jax.trainer.config_fields import in_range, option

__all__ = [
    "AdaGradSelectConfig",
    "BLACConfig",
    "CONTROLLERS",
    "ControllerEntry",
    "HACBOConfig",
    "build_controller",
    "controller_idle_blocks",
    "controller_stats",
    "controller_warning",
    "find_controller_state",
]


@dataclass(frozen=True)
class HACBOConfig:
    """Arguments of ``hacbo_jax.controllers.hacbo`` (reference defaults); each key's help is the
    function's docstring entry for it (``--help``)."""

    rho: float = option(0.8, in_range(0, 1, lo_open=True, hi_open=True))
    interval: int = option(30, in_range(1))
    theta_neg: float = option(0.04, in_range(0, 1))
    patience: int = option(6, in_range(1))
    gamma: float = option(0.1, in_range(0, 1))
    eps: float = option(1e-8, in_range(0, lo_open=True))
    curvature_norm: Literal["rms", "l2"] = "rms"
    debias: bool = False
    update_norm_budget: Optional[float] = option(None, in_range(0, lo_open=True))
    curvature_weighting: bool = True
    probation: bool = True
    curvature_floor: float = option(0.0, in_range(0, 1))
    probation_share: Literal["weights", "uniform"] = "weights"
    record_true_cosine: bool = False


@dataclass(frozen=True)
class AdaGradSelectConfig:
    """Arguments of ``hacbo_jax.adagradselect`` except ``inner`` (AdamW of ``optim``),
    ``steps_per_epoch`` (from the data) and ``seed`` (the run's ``seed``).

    ``pct`` has no default in the function; 0.1 is the blog's setting (one block of 16 per step).
    """

    pct: float = option(0.1, in_range(0, 1, lo_open=True))
    epsilon0: float = option(1.0, in_range(0, 1, lo_open=True))
    epsilon_decay: Optional[float] = option(None, in_range(0, lo_open=True))
    dirichlet_alpha: float = option(1.0, in_range(0, lo_open=True))
    score: Literal["l2", "rms"] = "l2"
    draw: Literal["top_k", "without_replacement"] = "top_k"
    other_mode: Literal["always", "frozen", "unit"] = "always"
    moments: Literal["keep", "advance"] = "keep"


@dataclass(frozen=True)
class BLACConfig:
    """Arguments of ``hacbo_jax.controllers.blac`` (the paper's run values); each key's help is
    the entry of ``blac``'s docstring."""

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


def _measurement_counters(state: Any) -> dict[str, Any]:
    """Measurement counters: measurements reached without a dev gradient, measurements skipped
    for a non-finite gradient, and the factor the update-norm budget applied at the last step."""
    return {
        "count": int(state.count),
        "missed_measurements": int(state.missed_measurements),
        "skipped_measurements": int(state.skipped_measurements),
        "budget_scale": float(state.budget_scale),
    }


def _hacbo_stats(state: HACBOState, hyper: HACBOConfig) -> dict[str, Any]:
    del hyper  # the applied multipliers are in the state (hacbo_multipliers gives the next's)
    probation = np.asarray(state.probation)
    return {
        **_common_stats(state),
        **_measurement_counters(state),
        "multipliers": np.asarray(state.multipliers).tolist(),
        "probation": probation.tolist(),
        "curvature": np.asarray(state.curvature).tolist(),
        "l_active": int(np.sum(~probation)),
        # updates applied in probation per block, cumulative: a block that entered and left at
        # one measurement is not in ``probation`` (the state after the exit test), but is here
        "probation_steps": np.asarray(state.probation_steps).tolist(),
        "min_submodule_share": np.asarray(state.min_submodule_share).tolist(),
        **(
            {}
            if state.true_cosine is None
            else {"true_cosine": np.asarray(state.true_cosine).tolist()}
        ),
    }


def _hacbo_warning(state: HACBOState, hyper: HACBOConfig) -> str | None:
    del hyper
    return hacbo_starvation(state)


def _adagradselect_warning(state: AdaGradSelectState, hyper: AdaGradSelectConfig) -> str | None:
    never = adagradselect_stats(state).get("never_selected_after_epoch1", 0)
    if not never:
        return None
    return (
        f"AdaGradSelect lock-in: {never} block(s) never selected since the end of epoch 1 "
        f"(draw={hyper.draw!r}); Dirichlet(1 + counts) keeps picking the blocks of epoch 1. "
        "controller.adagradselect.draw=without_replacement spreads the selection "
        "(docs/controller-behaviour.md)"
    )


def _blac_stats(state: BLACState, hyper: BLACConfig) -> dict[str, Any]:
    del hyper
    frozen = np.asarray(state.frozen)
    return {
        **_common_stats(state),
        **_measurement_counters(state),
        # frozen does not change after a step's measurement: these are the applied multipliers.
        "multipliers": np.asarray(blac_multipliers(state)).tolist(),
        "frozen": frozen.tolist(),
        "signed_agreement": np.asarray(state.signed_agreement).tolist(),
        "l_active": int(np.sum(~frozen)),
        "all_frozen": bool(np.all(frozen)),
        "all_frozen_steps": int(state.all_frozen_steps),
    }


def _adagradselect_stats(state: AdaGradSelectState, hyper: AdaGradSelectConfig) -> dict[str, Any]:
    del hyper
    return {"count": int(state.count), **adagradselect_stats(state)}


@dataclass(frozen=True)
class ControllerEntry:
    """One controller of the training stack (``none`` has no transformation at all).

    Attributes:
      config_type: frozen dataclass of the ``controller.<kind>`` section; its fields are the
        keyword arguments of ``transform`` after the label tree (a test checks the defaults).
      transform: ``transform(labels, **hyper) -> optax.GradientTransformationExtraArgs``.
      state_type: the NamedTuple state of ``transform`` (looked up in the optimiser state).
      stats: ``stats(state, hyper_config) -> dict`` of plain lists/numbers for the logs.
      wraps: False: ``transform(labels, **hyper)`` is chained after AdamW; True: it wraps AdamW,
        ``transform(labels, adamw, **hyper, **run_args)``.
      measures: the controller takes a micro-dev gradient every ``hyper.interval`` applied steps
        (the loop compiles an ordinary and a measurement step, and refreshes the micro-dev
        buffer).
      run_args: keyword arguments the run supplies (``steps_per_epoch``, ``seed``).
      warning: ``warning(state, hyper_config) -> str | None``: a known failure mode of the
        defaults that the state shows (HACBO's sub-module starvation, AdaGradSelect's lock-in);
        the loop prints it once it persists over several log points.
      idle_blocks: ``idle_blocks(state, hyper_config, **run_args) -> bool[B or more]``: the
        blocks whose next update is exactly zero whatever the gradient, on a step that does not
        measure (traced; ``controller.skip_weight_grads`` skips their weight gradients).
      idle_when_measuring: the measurement reads nothing of the idle blocks' gradients (BLAC's
        frozen blocks), so the measuring programs may skip them too.
    """

    config_type: type | None = None
    transform: Callable[..., Any] | None = None
    state_type: type | None = None
    stats: Callable[[Any, Any], dict[str, Any]] | None = None
    wraps: bool = False
    measures: bool = False
    run_args: tuple[str, ...] = ()
    warning: Callable[[Any, Any], str | None] | None = None
    idle_blocks: Callable[..., Any] | None = None
    idle_when_measuring: bool = False


def _hacbo_idle(state: HACBOState, hyper: HACBOConfig) -> jax.Array:
    return hacbo_idle_blocks(state, gamma=hyper.gamma, probation=hyper.probation)


def _blac_idle(state: BLACState, hyper: BLACConfig) -> jax.Array:
    return blac_idle_blocks(state)


def _adagradselect_idle(
    state: AdaGradSelectState, hyper: AdaGradSelectConfig, *, steps_per_epoch: int, seed: int
) -> jax.Array:
    del seed  # read once by init; the state's key carries it
    return adagradselect_idle_units(
        state,
        pct=hyper.pct,
        steps_per_epoch=steps_per_epoch,
        epsilon0=hyper.epsilon0,
        epsilon_decay=hyper.epsilon_decay,
        dirichlet_alpha=hyper.dirichlet_alpha,
        draw=hyper.draw,
    )


# Insertion order is the order of the allowed values in config messages.
CONTROLLERS: dict[str, ControllerEntry] = {
    "none": ControllerEntry(),
    "blac": ControllerEntry(
        BLACConfig,
        blac,
        BLACState,
        _blac_stats,
        measures=True,
        idle_blocks=_blac_idle,
        idle_when_measuring=True,
    ),
    "hacbo": ControllerEntry(
        HACBOConfig,
        hacbo,
        HACBOState,
        _hacbo_stats,
        measures=True,
        warning=_hacbo_warning,
        idle_blocks=_hacbo_idle,
    ),
    "adagradselect": ControllerEntry(
        AdaGradSelectConfig,
        adagradselect,
        AdaGradSelectState,
        _adagradselect_stats,
        wraps=True,
        run_args=("steps_per_epoch", "seed"),
        warning=_adagradselect_warning,
        idle_blocks=_adagradselect_idle,
    ),
}


def controller_entry(kind: str) -> ControllerEntry:
    """The registered entry of ``kind``; ValueError naming the registered kinds otherwise."""
    if kind not in CONTROLLERS:
        raise ValueError(
            f"controller kind {kind!r} is not one of " + ", ".join(map(repr, CONTROLLERS))
        )
    return CONTROLLERS[kind]


def build_controller(
    kind: str, labels: Any, hyper: Any = None, **run_args: Any
) -> optax.GradientTransformationExtraArgs | Callable[..., Any] | None:
    """The transformation of controller ``kind`` over the label tree ``labels`` (None: ``none``).

    ``hyper`` is the controller's config section (an instance of its ``config_type``); None
    uses that section's defaults. For a controller that wraps AdamW (``entry.wraps``) this is a
    function ``inner -> transformation`` (``hacbo_jax.trainer.step.build_optimizer`` calls it
    with AdamW); ``run_args`` must then hold the entry's ``run_args`` (ValueError naming them).
    """
    entry = controller_entry(kind)
    if entry.transform is None:
        return None
    hyper = entry.config_type() if hyper is None else hyper
    if not entry.wraps:
        return entry.transform(labels, **dataclasses.asdict(hyper))
    missing = [name for name in entry.run_args if run_args.get(name) is None]
    if missing:
        raise ValueError(
            f"controller kind {kind!r} needs the run's {', '.join(missing)} "
            f"(build_controller(..., {', '.join(f'{m}=...' for m in missing)}))"
        )
    kwargs = {**dataclasses.asdict(hyper), **{n: run_args[n] for n in entry.run_args}}
    return functools.partial(entry.transform, labels, **kwargs)


def measures(kind: str) -> bool:
    """Whether controller ``kind`` takes micro-dev gradients (see :class:`ControllerEntry`)."""
    return controller_entry(kind).measures


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


def controller_idle_blocks(
    kind: str, hyper: Any, num_blocks: int, **run_args: Any
) -> Callable[[Any], jax.Array] | None:
    """``opt_state -> bool[num_blocks]``: the blocks whose next update controller ``kind``
    (built from ``hyper``) will set to exactly zero whatever the gradient, if that step does
    not measure; None for a controller that never knows this in advance (``none``).

    Traced inside the training step, before its backward pass: the step then skips those
    blocks' weight gradients (``controller.skip_weight_grads``).
    """
    entry = controller_entry(kind)
    if entry.idle_blocks is None:
        return None
    hyper = entry.config_type() if hyper is None else hyper
    kwargs = {n: run_args[n] for n in entry.run_args}

    def idle(opt_state: Any) -> jax.Array:
        state = find_controller_state(opt_state)
        return entry.idle_blocks(state, hyper, **kwargs)[:num_blocks]

    return idle


def controller_stats(kind: str, hyper: Any, opt_state: Any) -> dict[str, Any] | None:
    """Controller ``kind``'s state in ``opt_state`` as plain lists for the JSONL log (None
    without a controller). ``hyper`` is the config section the controller was built from."""
    entry = controller_entry(kind)
    state = find_controller_state(opt_state)
    if entry.stats is None or state is None:
        return None
    return {"kind": kind, **entry.stats(jax.device_get(state), hyper)}


def controller_warning(kind: str, hyper: Any, opt_state: Any) -> str | None:
    """The controller's warning about its state (see :attr:`ControllerEntry.warning`), or None."""
    entry = controller_entry(kind)
    state = find_controller_state(opt_state)
    if entry.warning is None or state is None:
        return None
    return entry.warning(jax.device_get(state), hyper)
