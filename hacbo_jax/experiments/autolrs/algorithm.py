"""AutoLRS: learning-rate schedules found by Bayesian optimisation during training.

Reference: Y. Jin et al., "AutoLRS: Automatic learning-rate schedule by Bayesian optimization on
the fly", ICLR 2021 (arXiv 2105.10762), and the authors' code (github.com/YuchenJin/autolrs,
``autolrs_server.py``), in the precise reading of ``docs/algorithm.md`` (AutoLRS).

AutoLRS is not an optax transformation: a stage restores the whole train state k + 1 times,
evaluates, fits curves and runs Bayesian optimisation on the host. :func:`autolrs_run` is a
driver around any jitted step; the learning rate reaches the optimiser through
``optax.inject_hyperparams`` (it is a traced array in the optimiser state, so changing it never
recompiles the step). The driver's own state, :class:`AutoLRSState`, is a JSON-able record that a
checkpoint can hold next to the train state (and the snapshot, while a search is under way); a
run resumed from it continues the same stage, step for step.

The Bayesian optimisation uses scikit-optimize (``pip install scikit-optimize``), as the authors
did; it is imported when a search starts.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import optimize
from scipy.interpolate import UnivariateSpline

PyTree = Any
StepFn = Callable[[PyTree, Any], tuple[PyTree, Any]]

DIVERGED_VALUE = 1e6  # what the BO is told for a candidate whose losses hold a NaN (the code's)
VAL_POINTS = 16  # validation losses per candidate in validation-loss mode
_MAX_REASKS = 100


# --------------------------------------------------------------------------------------------
# Forecast


def exponential_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares fit y(x) = a e^{b x} + c with b = -e^beta < 0 (the code's step (iii)).

    beta* minimises the residual of the *linear* least squares y ~ a e^{-e^beta x} + c (a, c
    solved exactly for each beta), by Nelder-Mead (``scipy.optimize.fmin``, start 0,
    xtol = ftol = 1e-5); then a, c are the least-squares solution at beta*.

    Returns:
      (a, b, c) as floats.
    """
    xs = np.asarray(x, np.float64)
    ys = np.asarray(y, np.float64)

    def design(beta: float) -> np.ndarray:
        return np.stack([np.exp(-np.exp(beta) * xs), np.ones_like(xs)], axis=1)

    def residual(beta: np.ndarray) -> float:
        basis = design(float(beta[0]))
        coef = np.linalg.lstsq(basis, ys, rcond=None)[0]
        return float(np.sum(np.square(basis @ coef - ys)))

    beta = float(optimize.fmin(residual, 0.0, xtol=1e-5, ftol=1e-5, disp=False)[0])
    a, c = np.linalg.lstsq(design(beta), ys, rcond=None)[0]
    return float(a), float(-np.exp(beta)), float(c)


def _drop_outliers(
    xs: np.ndarray, ys: np.ndarray, training: bool, spline_s: float | None
) -> tuple[np.ndarray, np.ndarray]:
    """The code's iterative outlier removal with a quadratic smoothing spline.

    bound = x[floor((n - 1) / 2)], fixed before the rounds. Training series: 10 rounds, each
    takes the round(0.03 n') points of largest |y - spline(x)| (n' = points left; ties: the
    later point) and drops those whose *position* in the current series is < bound (the code
    compares the position with an x value; after earlier drops the two differ, kept as the code
    does). Validation series: one round with the single worst point. Where round(0.03 n') = 0
    (n' <= 16) no point is dropped: the code's slice ``[-0:]`` would take every point, drop the
    whole first half and fail on the next spline (named deviation).
    """
    bound = xs[int((len(xs) - 1) * 0.5)]
    for _ in range(10 if training else 1):
        fitted = UnivariateSpline(xs, ys, k=2, s=spline_s)(xs)
        order = np.argsort(np.abs(ys - fitted), kind="stable")
        worst = int(round(len(xs) * 0.03)) if training else 1
        if worst == 0:
            continue
        dropped = [int(i) for i in order[len(order) - worst :] if i < bound]
        keep = np.ones(len(xs), bool)
        keep[dropped] = False
        xs, ys = xs[keep], ys[keep]
    return xs, ys


def autolrs_forecast(
    losses: Sequence[float],
    horizon: float,
    *,
    training: bool = True,
    spline_s: float | None = None,
) -> float:
    r"""Forecast of a loss series ``horizon`` points ahead of its first point (the code's).

    With x = 0, 1, ..., n - 1 for the n losses:

    1. outliers: a quadratic smoothing spline (``UnivariateSpline``, k = 2, smoothing
       ``spline_s``, default scipy's s = number of points) is fitted and the worst points of the
       first half dropped, 10 rounds for a training series (3% of the points per round), one
       round of one point for a validation series (:func:`_drop_outliers`);
    2. the spline refitted on the kept points is evaluated at every x (smoothed series ys);
    3. ys ~ a e^{b x} + c by :func:`exponential_fit`; the forecast is a e^{b h} + c, h =
       ``horizon``.

    The default smoothing biases the forecast: for y = 2 e^{-0.01 x} + 0.5, x = 0..99, it gives
    about 0.385 at h = 1000 where the fit alone gives 0.5; this is the code's procedure, kept
    (pass ``spline_s`` to change it).
    """
    ys = np.asarray(losses, np.float64)
    if ys.ndim != 1 or len(ys) < 4:
        raise ValueError(f"losses must be a series of at least 4 values, got shape {ys.shape}")
    xs = np.arange(len(ys), dtype=np.float64)
    kept_x, kept_y = _drop_outliers(xs, ys, training, spline_s)
    smoothed = UnivariateSpline(kept_x, kept_y, k=2, s=spline_s)(xs)
    a, b, c = exponential_fit(xs, smoothed)
    return float(a * np.exp(b * horizon) + c)


# --------------------------------------------------------------------------------------------
# Bayesian optimisation over log10(lr)


class AutoLRSSearch:
    """One stage's Bayesian optimisation over the learning rate (scikit-optimize, as the code).

    ``skopt.Optimizer([Real(lr_min, lr_max, "log-uniform")], "GP", n_initial_points=1,
    acq_func="LCB", acq_func_kwargs={"kappa": 1e6})``: the GP works on log10(lr) scaled to
    [0, 1] with skopt's defaults (kernel Constant(1, [0.01, 1000]) x Matern(nu = 2.5, length in
    [0.01, 100]) + white noise, normalize_y); LCB mu - kappa sigma with kappa = 1e6 is in effect
    maximum sigma, a space-filling search; the first lr is random. A learning rate asked again
    within the stage is told its earlier value and asked anew, as the code does.

    The search is rebuilt from its observations by replaying the same ask/tell calls, so a
    resumed run asks exactly what the uninterrupted one would have.
    """

    def __init__(
        self,
        lr_min: float,
        lr_max: float,
        random_state: int,
        observations: Iterable[tuple[float, float]] = (),
    ):
        try:
            from skopt import Optimizer
            from skopt.space import Real
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "AutoLRS needs scikit-optimize for its Bayesian optimisation: "
                "pip install scikit-optimize"
            ) from err
        self._optimizer = Optimizer(
            [Real(lr_min, lr_max, prior="log-uniform")],
            "GP",
            n_initial_points=1,
            acq_func="LCB",
            acq_func_kwargs={"kappa": 1e6},
            random_state=int(random_state),
        )
        self._seen: dict[float, float] = {}
        for lr, value in observations:
            asked = self.ask()
            if asked != lr:
                raise ValueError(
                    f"replaying the search asked lr={asked!r} where the saved run had {lr!r}: "
                    "the saved driver state comes from another config, seed or scikit-optimize "
                    "version"
                )
            self.tell(lr, value)

    @property
    def optimizer(self) -> Any:
        """The underlying ``skopt.Optimizer``."""
        return self._optimizer

    def ask(self) -> float:
        """The next learning rate to try (never one already told in this search)."""
        for _ in range(_MAX_REASKS):
            with warnings.catch_warnings():
                # skopt warns when it replaces a duplicate proposal by a random point
                warnings.simplefilter("ignore", UserWarning)
                lr = float(self._optimizer.ask()[0])
            if lr not in self._seen:
                return lr
            self._optimizer.tell([lr], self._seen[lr])
        raise RuntimeError(f"the search proposed only learning rates seen before {_MAX_REASKS}x")

    def tell(self, lr: float, value: float) -> None:
        self._seen[float(lr)] = float(value)
        self._optimizer.tell([float(lr)], float(value))


# --------------------------------------------------------------------------------------------
# Config, stage lengths, driver state


@dataclasses.dataclass(frozen=True)
class AutoLRSConfig:
    """AutoLRS settings; the defaults are the authors' code's (lr_min, lr_max have none).

    Attributes:
      lr_min, lr_max: the learning-rate range searched (log-uniform), 0 < lr_min < lr_max.
      tau0: tau of the first stage, steps trained at the chosen rate (code: 1000).
      tau_prime0: tau' of the first stage, steps each candidate is trained (code: 100).
      num_candidates: k, candidates per stage (code: 10).
      tau_max: tau' doubles (with tau) while tau' < tau_max / 10 (code: 8000).
      warmup_steps, warmup_lr: optional linear warm-up before the first stage, lr =
        warmup_lr (i + 1) / warmup_steps at step i (not searched).
      rewind_data: False (the code): each candidate and the exploitation draw fresh batches.
        True: each of them starts from the data position of the snapshot (needs ``batches``
        to be a callable position -> batch).
      spline_s: smoothing of the forecast's spline (None: scipy's default, the code's).
      bo_seed: seed of the searches; stage s uses ``SeedSequence([bo_seed, s])``.
    """

    lr_min: float
    lr_max: float
    tau0: int = 1000
    tau_prime0: int = 100
    num_candidates: int = 10
    tau_max: int = 8000
    warmup_steps: int = 0
    warmup_lr: float = 0.0
    rewind_data: bool = False
    spline_s: float | None = None
    bo_seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.lr_min < self.lr_max:
            raise ValueError(
                f"need 0 < lr_min < lr_max, got lr_min={self.lr_min!r}, lr_max={self.lr_max!r}"
            )
        for name in ("tau0", "tau_prime0", "num_candidates", "tau_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.tau_prime0 < 4:
            raise ValueError(
                f"tau_prime0 must be >= 4 (the forecast fits a curve to the candidate's "
                f"losses), got {self.tau_prime0}"
            )
        if not isinstance(self.warmup_steps, (int, np.integer)) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.warmup_steps and not self.warmup_lr > 0:
            raise ValueError(f"warmup_lr must be > 0 with warm-up, got {self.warmup_lr!r}")
        if self.spline_s is not None and not self.spline_s >= 0:
            raise ValueError(f"spline_s must be None or >= 0, got {self.spline_s!r}")
        final_tau_prime = autolrs_stages(self, 64)[-1][0]
        if final_tau_prime < VAL_POINTS:
            raise ValueError(
                f"validation-loss mode evaluates {VAL_POINTS} times per candidate, so tau' must "
                f"reach {VAL_POINTS}; with tau_prime0={self.tau_prime0} and "
                f"tau_max={self.tau_max} it stops at {final_tau_prime}"
            )


def next_stage(tau_prime: int, tau: int, val_mode: bool, tau_max: int) -> tuple[int, int, bool]:
    """(tau', tau, val_mode) of the stage after one with these: both double while tau' <
    tau_max / 10, after that validation-loss mode, for good."""
    if not val_mode and tau_prime < tau_max / 10:
        return 2 * tau_prime, 2 * tau, False
    return tau_prime, tau, True


def autolrs_stages(config: AutoLRSConfig, num_stages: int) -> list[tuple[int, int, bool]]:
    """(tau', tau, val_mode) of the first ``num_stages`` stages; a stage takes k tau' + tau
    steps. Defaults: (100, 1000), (200, 2000), (400, 4000), (800, 8000), then (800, 8000) on
    validation loss."""
    stages = [(config.tau_prime0, config.tau0, False)]
    while len(stages) < num_stages:
        stages.append(next_stage(*stages[-1], config.tau_max))
    return stages


@dataclasses.dataclass
class AutoLRSState:
    """The driver's state: plain Python values only (``to_dict`` / ``from_dict`` for JSON).

    Attributes:
      stage: stage index, from 0.
      tau, tau_prime: the current stage's tau and tau'.
      val_mode: whether candidates are judged on validation loss (for good once set).
      init_loss: training loss at the first stage's snapshot (first step of its first
        candidate); None before.
      phase: ``"warmup"``, ``"search"`` (training candidates) or ``"exploit"``.
      candidate: index of the candidate in training (search phase).
      lr: learning rate of the current candidate or exploitation (0 before the first step).
      phase_step: steps done in the current candidate or exploitation.
      losses: the current candidate's recorded losses (training, or validation in val_mode).
      obs: this stage's candidates so far as [lr, value told to the BO, finite]; finite is
        False when the candidate's losses held a NaN or inf (value 1e6).
      trials: every stage's candidates as [stage, lr, value, finite] (for reports).
      schedule: [global_step, lr*, tau] per exploitation started.
      global_step: steps taken in all (warm-up, candidates, exploitation).
      effective_step: exploitation steps only.
      data_position: position of the next batch.
      snapshot_data_position: data position when the snapshot was taken.
      bo_seed: the config's bo_seed (checked on resume).
    """

    stage: int = 0
    tau: int = 0
    tau_prime: int = 0
    val_mode: bool = False
    init_loss: float | None = None
    phase: str = "warmup"
    candidate: int = 0
    lr: float = 0.0
    phase_step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    obs: list[list] = dataclasses.field(default_factory=list)
    trials: list[list] = dataclasses.field(default_factory=list)
    schedule: list[list] = dataclasses.field(default_factory=list)
    global_step: int = 0
    effective_step: int = 0
    data_position: int = 0
    snapshot_data_position: int = 0
    bo_seed: int = 0

    @classmethod
    def initial(cls, config: AutoLRSConfig) -> AutoLRSState:
        return cls(tau=config.tau0, tau_prime=config.tau_prime0, bo_seed=config.bo_seed)

    @property
    def needs_snapshot(self) -> bool:
        """Whether resuming from here needs the snapshot (a search has started)."""
        return self.phase == "search" and (self.candidate > 0 or self.phase_step > 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AutoLRSState:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown AutoLRS state fields {unknown}; known: {sorted(fields)}")
        return cls(**data)


class AutoLRSResult(NamedTuple):
    """What :func:`autolrs_run` returns.

    Attributes:
      state: the train state after the last step (during a search, the current candidate's).
      driver: the driver state (save ``driver.to_dict()`` with the checkpoint).
      snapshot: the train state the current stage started from (save it too when
        ``driver.needs_snapshot``); None before the first stage.
    """

    state: PyTree
    driver: AutoLRSState
    snapshot: PyTree | None


def set_learning_rate(state: PyTree, lr: float) -> PyTree:
    """``state`` with every ``learning_rate`` hyperparameter set to ``lr`` (float32).

    Works on any pytree holding an ``optax.inject_hyperparams`` state (for example a tuple
    ``(params, opt_state)``), through ``optax.tree_utils.tree_set``. The value is a strongly
    typed float32 scalar, so once the step is compiled for it no new value recompiles it.
    """
    return optax.tree_utils.tree_set(state, learning_rate=jnp.asarray(lr, jnp.float32))


def _stage_random_state(bo_seed: int, stage: int) -> int:
    return int(np.random.SeedSequence([bo_seed, stage]).generate_state(1)[0])


def _value_of(losses: Sequence[float], driver: AutoLRSState, config: AutoLRSConfig):
    """(value told to the BO, finite) for a finished candidate (step 3 of the reference)."""
    y = np.asarray(losses, np.float64)
    if not np.all(np.isfinite(y)):
        return DIVERGED_VALUE, False
    if driver.val_mode:
        if driver.init_loss is not None and np.max(y) >= driver.init_loss:
            return float(y[-1]), True
        horizon = driver.tau // (driver.tau_prime // VAL_POINTS)
        value = autolrs_forecast(y, horizon, training=False, spline_s=config.spline_s)
    else:
        value = autolrs_forecast(y, driver.tau, training=True, spline_s=config.spline_s)
    if not math.isfinite(value):  # a degenerate fit of finite losses: treat as diverged
        return DIVERGED_VALUE, False
    return value, True


def _best_lr(obs: Sequence[Sequence]) -> float:
    """lr* = argmin of the values, among the finite candidates when there is one."""
    finite = [o for o in obs if o[2]]
    pool = finite if finite else list(obs)
    return float(min(pool, key=lambda o: o[1])[0])


# --------------------------------------------------------------------------------------------
# Driver


def autolrs_run(
    step_fn: StepFn,
    eval_fn: Callable[[PyTree], Any] | None,
    state: PyTree,
    batches: Iterable | Callable[[int], Any],
    config: AutoLRSConfig,
    *,
    num_steps: int,
    driver: AutoLRSState | None = None,
    snapshot: PyTree | None = None,
    set_lr: Callable[[PyTree, float], PyTree] = set_learning_rate,
    copy_snapshot: bool = False,
    on_step: Callable[[AutoLRSState, Any], None] | None = None,
) -> AutoLRSResult:
    r"""Trains with AutoLRS until ``num_steps`` steps in all (or the batches run out).

    Each stage (docs/algorithm.md, AutoLRS):

    1. C <- state (the snapshot); a new :class:`AutoLRSSearch` (seeded by bo_seed and the stage).
    2. For i = 1..k: lr_i = ask(); state <- C; train tau' steps at lr_i recording y, the training
       loss of every step, or in validation-loss mode ``eval_fn(state)`` every tau' / 16 steps.
    3. y_i = :func:`autolrs_forecast` (y, h) with h = tau (validation: h = tau / (tau' / 16));
       in validation mode, if max(y) >= init_loss, y_i = y[-1]; a NaN (or inf) in y gives
       y_i = 1e6, whatever else. tell(lr_i, y_i).
    4. lr* = argmin y_i (among candidates with finite losses while there is one); state <- C;
       train tau steps at lr*.
    5. (tau', tau) double while tau' < tau_max / 10; after that validation-loss mode for good.

    Search steps equal training steps with the code's k tau' = tau: AutoLRS takes twice the steps.
    ``global_step`` counts all steps, ``effective_step`` the exploitation steps.

    Args:
      step_fn: ``(state, batch) -> (state, loss)``, typically jitted; ``loss`` is the training
        loss of ``batch`` (a scalar). If it donates its inputs pass ``copy_snapshot=True``.
      eval_fn: ``state -> validation loss``; needed once validation-loss mode starts.
      state: the train state; ``set_lr(state, lr)`` must set its learning rate (default
        :func:`set_learning_rate`, for a pytree holding an ``inject_hyperparams`` state).
      batches: an iterable of batches (consumed in order; on resume pass it positioned at
        ``driver.data_position``), or a callable ``position -> batch`` (needed for
        ``rewind_data``; resumes by itself).
      config: :class:`AutoLRSConfig`.
      num_steps: stop when ``driver.global_step`` reaches this.
      driver: the state of an earlier run to continue (None: a fresh start).
      snapshot: the earlier run's snapshot, needed when ``driver.needs_snapshot``.
      set_lr: how to set the learning rate in ``state``.
      copy_snapshot: copy the snapshot (``jnp.copy`` of every array) instead of keeping a
        reference, for a step that donates its input buffers.
      on_step: called after every step with the driver state and the step's loss (a device
        scalar; converting it to float waits for the step).

    Returns:
      :class:`AutoLRSResult` ``(state, driver, snapshot)``.
    """
    if driver is None:
        driver = AutoLRSState.initial(config)
    else:
        driver = AutoLRSState.from_dict(driver.to_dict())  # a copy: the input stays as it was
        if driver.bo_seed != config.bo_seed:
            raise ValueError(
                f"driver state has bo_seed={driver.bo_seed} but config.bo_seed="
                f"{config.bo_seed}: resume with the config of the saved run"
            )
        if driver.needs_snapshot and snapshot is None:
            raise ValueError(
                f"the driver state is inside a search (stage {driver.stage}, candidate "
                f"{driver.candidate}, step {driver.phase_step}): pass the saved snapshot="
            )
    if not callable(batches):
        if config.rewind_data:
            raise ValueError(
                "rewind_data=True needs batches as a callable position -> batch, got an iterable"
            )
        batch_iter: Iterator = iter(batches)

        def next_batch():
            return next(batch_iter)
    else:

        def next_batch():
            return batches(driver.data_position)

    def take_snapshot(tree):
        return jax.tree.map(jnp.copy, tree) if copy_snapshot else tree

    search: AutoLRSSearch | None = None
    pending: list = []  # device losses of the current candidate not yet read back
    lr_in_state: float | None = None  # the lr last written into state by this call

    def flush():
        driver.losses.extend(float(x) for x in pending)
        pending.clear()

    def get_search() -> AutoLRSSearch:
        nonlocal search
        if search is None:
            search = AutoLRSSearch(
                config.lr_min,
                config.lr_max,
                _stage_random_state(config.bo_seed, driver.stage),
                [(o[0], o[1]) for o in driver.obs],
            )
        return search

    while driver.global_step < num_steps:
        # Phase transitions that happen before a step.
        if driver.phase == "warmup" and driver.global_step >= config.warmup_steps:
            driver.phase, driver.candidate, driver.phase_step = "search", 0, 0
        if driver.phase == "search" and driver.phase_step == 0:
            if driver.candidate == 0:
                snapshot = take_snapshot(state)
                driver.snapshot_data_position = driver.data_position
            else:
                state = take_snapshot(snapshot)
                lr_in_state = None
            lr = get_search().ask()
            driver.lr = lr
            if config.rewind_data:
                driver.data_position = driver.snapshot_data_position
        elif driver.phase == "search" and search is None:
            # resumed inside a candidate: rebuild the search up to this candidate's ask
            if get_search().ask() != driver.lr:
                raise ValueError(
                    f"replaying stage {driver.stage}'s search did not ask the saved candidate "
                    f"lr={driver.lr!r}: the saved driver state comes from another config, seed "
                    "or scikit-optimize version"
                )
        if driver.phase == "warmup":
            driver.lr = config.warmup_lr * (driver.global_step + 1) / config.warmup_steps

        try:
            batch = next_batch()
        except StopIteration:
            break
        if lr_in_state != driver.lr:
            state = set_lr(state, driver.lr)
            lr_in_state = driver.lr
        state, loss = step_fn(state, batch)
        driver.global_step += 1
        driver.data_position += 1
        driver.phase_step += 1

        if driver.phase == "search":
            if driver.init_loss is None:
                driver.init_loss = float(loss)
            if not driver.val_mode:
                pending.append(loss)
            elif driver.phase_step % (driver.tau_prime // VAL_POINTS) == 0:
                if eval_fn is None:
                    raise ValueError("validation-loss mode has started: autolrs_run needs eval_fn")
                pending.append(eval_fn(state))
            if driver.phase_step == driver.tau_prime:
                flush()
                value, finite = _value_of(driver.losses, driver, config)
                lr = driver.lr
                get_search().tell(lr, value)
                driver.obs.append([lr, value, finite])
                driver.trials.append([driver.stage, lr, value, finite])
                driver.losses = []
                driver.candidate += 1
                driver.phase_step = 0
                if driver.candidate == config.num_candidates:
                    driver.lr = _best_lr(driver.obs)
                    state = take_snapshot(snapshot)
                    lr_in_state = None
                    driver.phase = "exploit"
                    driver.schedule.append([driver.global_step, driver.lr, driver.tau])
                    if config.rewind_data:
                        driver.data_position = driver.snapshot_data_position
        elif driver.phase == "exploit":
            driver.effective_step += 1
            if driver.phase_step == driver.tau:
                driver.tau_prime, driver.tau, driver.val_mode = next_stage(
                    driver.tau_prime, driver.tau, driver.val_mode, config.tau_max
                )
                driver.stage += 1
                driver.phase, driver.candidate, driver.phase_step = "search", 0, 0
                driver.obs = []
                search = None
        if on_step is not None:
            on_step(driver, loss)

    flush()
    return AutoLRSResult(state, driver, snapshot)
