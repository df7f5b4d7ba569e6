"""The common battery: every transformation of the package through the same optax checks.

In the spirit of optax's ``contrib/_common_test.py``: one parametrised suite over a list of
:class:`Entry` (one per transformation, written so that a new transformation is one more entry
in ``ENTRIES``), on one toy problem. The checks:

- convergence on a quadratic under ``lax.scan`` (defaults, time scales shrunk for the toy);
- an unexpected extra argument is accepted and a second call does not recompile;
- ``optax.inject_hyperparams`` of the injectable numeric arguments equals the plain
  transformation;
- updates keep the params' dtype (float32 and bfloat16);
- ``optax.MultiSteps``: nothing applied until the k-th mini-step, then the plain step;
- state structure, shapes and dtypes stable across updates and under ``lax.cond``;
- ``optax.tree_map_params`` (the way to derive the state's shardings) with tree and callable
  labels, the shardings then placed with ``jax.device_put``;
- ``optax.tree.get`` / ``optax.tree.set``;
- ``optax.masked``, ``optax.partition`` and ``optax.named_chain`` around the transformation;
- several base optimisers underneath (adamw, sgd, adam, lion, sm3, adafactor);
- a learning-rate schedule in the base optimiser;
- jit with the params and state donated;
- a serialisation round trip of the state (numpy ``savez`` of the leaves, and flax's
  ``to_state_dict`` / ``from_state_dict``), after which training continues identically.

Controllers (HACBO, BLAC) are chained after the base optimiser and get ``train_grads`` and a
dev gradient; AdaGradSelect wraps the base optimiser. Each test is a few tiny jitted steps
(under 5 s), but the 81 tests take about 100 s on 2 cores, most of it compilation (the checks
share the compiled steps of :func:`standard`): the whole module is in the slow tier
(``scripts/test.sh --slow`` / ``--all``, CI).
"""

from __future__ import annotations

import dataclasses
import functools
import io
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hacbo_jax import (
    AdaGradSelectState,
    BLACState,
    HACBOState,
    adagradselect,
    blac,
    hacbo,
    label_by_rules,
    outside_controllers,
)

# ---------------------------------------------------------------- the toy problem

NUM_BLOCKS = 3
TARGET = 1.0
LABELS = {"emb": "other", "blocks": [{"a": f"{b}/a", "b": f"{b}/b"} for b in range(NUM_BLOCKS)]}
RULES = [(r"blocks/(\d+)/(a|b)$", r"\1/\2")]


def callable_labels(params):
    return label_by_rules(params, RULES)


LABEL_FORMS = {"tree": LABELS, "callable": callable_labels}


def toy_params(dtype=jnp.float32):
    """Blocks start at different distances from TARGET; within a block "a" and "b" are equal,
    so HACBO's within-block split stays uniform (its starvation on uneven sub-modules is
    tests/controllers/test_wrapped_and_default_behaviour.py's subject)."""
    starts = (-1.0, 2.5, 0.25)
    return {
        "emb": jnp.asarray([0.0, 3.0, -2.0], dtype),
        "blocks": [
            {"a": jnp.full((2, 3), s, dtype), "b": jnp.full((2, 3), s, dtype)} for s in starts
        ],
    }


def toy_loss(params):
    leaves = jax.tree.leaves(params)
    return sum(0.5 * jnp.sum((x.astype(jnp.float32) - TARGET) ** 2) for x in leaves)


def toy_grads(params, seed=None):
    """The toy gradient, or a random gradient tree of the params' shapes and dtypes."""
    if seed is None:
        return jax.grad(toy_loss)(params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten(
        [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype) for k, x in zip(keys, leaves)]
    )


# ---------------------------------------------------------------- the entries


@dataclasses.dataclass(frozen=True)
class Entry:
    """One transformation of the package, as the battery drives it.

    Attributes:
      name: test id.
      factory: ``factory(labels, **kwargs)`` for a controller chained after the base optimiser,
        ``factory(labels, inner, **kwargs)`` when ``wraps`` (it replaces the base optimiser).
      wraps: see ``factory``.
      measures: ``update`` takes ``train_grads`` and a dev gradient (``dev_grads``).
      toy: keyword arguments for the toy: the defaults, with time scales (measurement interval,
        freezing step, epoch length) shrunk to a run of a few hundred steps.
      injectable: numeric keyword arguments (non-default values) that
        ``optax.inject_hyperparams`` may inject.
      static_args: what ``optax.inject_hyperparams`` must keep static.
      state_type: the transformation's state (a NamedTuple found by ``optax.tree.get``).
    """

    name: str
    factory: Callable[..., optax.GradientTransformation]
    wraps: bool
    measures: bool
    toy: dict[str, Any]
    injectable: dict[str, Any]
    static_args: tuple[str, ...]
    state_type: type

    def build(self, labels=LABELS, base=None, factory=None, **overrides):
        """The whole optimiser: ``chain(base, controller)`` or ``wrapper(labels, base)``."""
        base = optax.sgd(0.5) if base is None else base
        factory = self.factory if factory is None else factory
        kwargs = {**self.toy, **overrides}
        if self.wraps:
            return factory(labels, base, **kwargs)
        return optax.chain(base, factory(labels, **kwargs))

    def extra_args(self, grads, dev=None):
        if not self.measures:
            return {}
        return {"train_grads": grads, "dev_grads": grads if dev is None else dev}

    def update(self, tx, grads, state, params, **extra):
        return tx.update(grads, state, params, **self.extra_args(grads), **extra)


ENTRIES = [
    Entry(
        name="hacbo",
        factory=hacbo,
        wraps=False,
        measures=True,
        toy=dict(interval=5),
        injectable=dict(
            rho=0.7, theta_neg=0.1, gamma=0.5, eps=1e-6, update_norm_budget=5.0, curvature_floor=0.1
        ),
        static_args=("labels", "interval", "patience"),
        state_type=HACBOState,
    ),
    Entry(
        name="blac",
        factory=blac,
        wraps=False,
        measures=True,
        toy=dict(interval=5, freeze_after=20),
        injectable=dict(rho=0.6, update_norm_budget=5.0),
        static_args=("labels", "interval", "freeze_after"),
        state_type=BLACState,
    ),
    Entry(
        name="adagradselect",
        factory=adagradselect,
        wraps=True,
        measures=False,
        # 3 epochs in the 300-step convergence run, as in the paper. With steps_per_epoch=20
        # the default draw locks in after epoch 1 and a block stalls half-way (block 0 at 0.5,
        # target 1): the lock-in of docs/controller-behaviour.md
        toy=dict(pct=0.5, steps_per_epoch=100, seed=0),
        injectable=dict(steps_per_epoch=10, epsilon0=0.8, epsilon_decay=0.2, dirichlet_alpha=2.0),
        static_args=("labels", "pct", "seed"),
        state_type=AdaGradSelectState,
    ),
]
BY_NAME = {e.name: e for e in ENTRIES}
pytestmark = pytest.mark.slow
entries = pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])


def _step(entry, tx, p, st, g):
    u, st = entry.update(tx, g, st, p)
    return optax.apply_updates(p, u), st, u


def jitted_step(entry, tx):
    """``step(params, state, grads) -> (params, state, updates)``, jitted."""
    return jax.jit(functools.partial(_step, entry, tx))


@functools.cache
def standard(name, form="tree"):
    """The entry over ``optax.adamw(1e-2)`` and its jitted step, built once for the module
    (compiling AdaGradSelect's step takes a second or two; the checks share it)."""
    entry = BY_NAME[name]
    tx = entry.build(LABEL_FORMS[form], base=optax.adamw(1e-2))
    return tx, jitted_step(entry, tx)


def run_steps(entry, tx, params, steps, *, grad_seed=None, step=None):
    """(params, state, updates of the last step) after ``steps`` updates on the toy: the toy's
    gradient, or random gradients seeded ``grad_seed + i`` at step i."""
    step = jitted_step(entry, tx) if step is None else step
    st, u = tx.init(params), None
    for i in range(steps):
        g = toy_grads(params) if grad_seed is None else toy_grads(params, grad_seed + i)
        params, st, u = step(params, st, g)
    return params, st, u


def run_standard(entry, steps, params=None, *, grad_seed=None, form="tree"):
    tx, step = standard(entry.name, form)
    params = toy_params() if params is None else params
    return run_steps(entry, tx, params, steps, grad_seed=grad_seed, step=step)


# ---------------------------------------------------------------- 1. convergence


@entries
def test_converges_on_a_quadratic_under_scan(entry):
    tx = entry.build()
    params = toy_params()

    def body(carry, _):
        p, st = carry
        g = toy_grads(p)
        u, st = entry.update(tx, g, st, p)
        return (optax.apply_updates(p, u), st), toy_loss(p)

    (params, _), losses = jax.jit(lambda c: jax.lax.scan(body, c, length=300))(
        (params, tx.init(params))
    )
    assert float(losses[0]) > 10.0
    target = jax.tree.map(lambda x: jnp.full_like(x, TARGET), params)
    chex.assert_trees_all_close(params, target, atol=1e-3)


# ---------------------------------------------------------------- 2. extra args, compilation


@entries
def test_accepts_extra_args_and_does_not_recompile(entry):
    tx = entry.build()
    params = toy_params()

    @jax.jit
    def step(p, st):
        g = toy_grads(p)
        u, st = entry.update(tx, g, st, p, unexpected_extra_arg_for_the_transformation=1)
        return optax.apply_updates(p, u), st

    st = tx.init(params)
    for _ in range(3):
        params, st = step(params, st)
    assert step._cache_size() == 1


# ---------------------------------------------------------------- 3. inject_hyperparams


@entries
def test_inject_hyperparams_of_the_numeric_arguments(entry):
    kwargs = {**entry.toy, **entry.injectable}
    factory = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)
    injected = entry.build(factory=factory, **kwargs)
    plain = entry.build(**kwargs)
    params = toy_params()
    p_i, s_i, u_i = run_steps(entry, injected, params, 6, grad_seed=0)
    p_p, s_p, u_p = run_steps(entry, plain, params, 6, grad_seed=0)
    chex.assert_trees_all_close(u_i, u_p, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(p_i, p_p, rtol=1e-5, atol=1e-6)
    found = optax.tree.get(s_i, "InjectStatefulHyperparamsState")
    assert set(found.hyperparams) == set(entry.injectable)
    controller = optax.tree.get(s_i, entry.state_type.__name__)
    reference = optax.tree.get(s_p, entry.state_type.__name__)
    chex.assert_trees_all_close(controller, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 4. dtype


@entries
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_updates_keep_the_params_dtype(entry, dtype):
    params = toy_params(dtype)
    _, _, updates = run_standard(entry, 2, params)
    chex.assert_trees_all_equal_dtypes(updates, params)
    assert all(jnp.isfinite(x.astype(jnp.float32)).all() for x in jax.tree.leaves(updates))


# ---------------------------------------------------------------- 5. MultiSteps


@entries
def test_multi_steps(entry):
    """MultiSteps(k = 2) on a constant gradient: zero updates on the first mini-step, then the
    plain transformation's step (params and inner state)."""
    params = toy_params()
    grads = toy_grads(params)
    multi = optax.MultiSteps(entry.build(base=optax.adamw(1e-2)), every_k_schedule=2)
    plain, plain_step = standard(entry.name)
    update_multi = jax.jit(lambda st: entry.update(multi, grads, st, params))
    s_m, s_p = multi.init(params), plain.init(params)
    for _ in range(3):
        u, s_m = update_multi(s_m)
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
        u_m, s_m = update_multi(s_m)
        _, s_p, u_p = plain_step(params, s_p, grads)
        chex.assert_trees_all_close(u_m, u_p, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(s_m.inner_opt_state, s_p, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- 6. state stability


@entries
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_state_shapes_and_dtypes_are_stable_across_updates_and_under_cond(entry, dtype):
    tx = entry.build(base=optax.adamw(1e-2))
    params = toy_params(dtype)

    @jax.jit
    def step(p, st):
        g = toy_grads(p)
        cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0  # opaque to the compiler
        u, st = jax.lax.cond(cond, lambda: entry.update(tx, g, st, p), lambda: (p, st))
        return optax.apply_updates(p, u), st

    st0 = st = tx.init(params)
    for _ in range(3):
        params, new = step(params, st)
        assert jax.tree.leaves(params)[0].dtype == dtype
        cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        st = jax.lax.cond(cond, lambda: st, lambda: new)  # noqa: B023
    chex.assert_trees_all_equal_structs(st0, st)
    chex.assert_trees_all_equal_shapes_and_dtypes(st0, st)


# ---------------------------------------------------------------- 7. tree_map_params


@entries
@pytest.mark.parametrize("form", list(LABEL_FORMS))
def test_tree_map_params_gives_the_state_shardings(entry, form):
    tx, _ = standard(entry.name, form)
    params = toy_params()
    _, st, _ = run_standard(entry, 2, params, form=form)
    # a no-op map gives the state back (optax's check)
    chex.assert_trees_all_equal(optax.tree_map_params(tx, lambda v: v, st), st)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    by_dim = lambda x: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    param_shardings = jax.tree.map(by_dim, params)
    shardings = optax.tree_map_params(
        tx, lambda _, s: s, st, param_shardings, transform_non_params=lambda _: replicated
    )
    zeros = lambda tree: jax.tree.map(lambda _: 0, tree)
    chex.assert_trees_all_equal_structs(zeros(st), zeros(shardings))
    adam = optax.tree.get(shardings, "ScaleByAdamState")
    assert adam.mu == param_shardings and adam.count == replicated
    placed = jax.device_put(st, shardings)
    chex.assert_trees_all_equal(placed, st)


# ---------------------------------------------------------------- 8. optax.tree.get / set


@entries
def test_tree_get_and_set(entry):
    _, st, _ = run_standard(entry, 3)
    name = entry.state_type.__name__
    controller = optax.tree.get(st, name)
    assert isinstance(controller, entry.state_type) and int(controller.count) == 3
    # the base optimiser's count, next to the controller's (docs/controller-behaviour.md)
    assert int(optax.tree.get(st, "count", filtering=outside_controllers)) == 3
    changed = optax.tree.set(st, **{name: controller._replace(count=jnp.asarray(9, jnp.int32))})
    assert int(optax.tree.get(changed, name).count) == 9
    assert int(optax.tree.get(changed, "ScaleByAdamState").count) == 3
    chex.assert_trees_all_equal_structs(changed, st)


# ---------------------------------------------------------------- 9-11. wrappers


MASK = {"emb": False, "blocks": [{"a": True, "b": True}] * NUM_BLOCKS}
PARTS = {"emb": "emb", "blocks": [{"a": "ctrl", "b": "ctrl"}] * NUM_BLOCKS}


def _wrapped(entry, wrapper, labels):
    base = optax.adamw(1e-2)
    if wrapper == "masked":
        return optax.masked(entry.build(labels, base), MASK, mask_compatible_extra_args=True)
    if wrapper == "partition":
        transforms = {"ctrl": entry.build(labels, base), "emb": optax.sgd(0.5)}
        return optax.partition(transforms, PARTS, mask_compatible_extra_args=True)
    clip = optax.clip_by_global_norm(10.0)
    if wrapper == "named_chain":
        return optax.named_chain(("clip", clip), ("opt", entry.build(labels, base)))
    return optax.chain(clip, entry.build(labels, base))


@entries
@pytest.mark.parametrize("form", list(LABEL_FORMS))
@pytest.mark.parametrize("wrapper", ["masked", "partition", "named_chain"])
def test_inside_masked_partition_and_named_chain(entry, form, wrapper):
    """The blocks train as without the wrapper; the embedding is left to the wrapper (masked:
    passed through, partition: SGD's step)."""
    tx = _wrapped(entry, wrapper, LABEL_FORMS[form])
    params = toy_params()
    p_w, s_w, u_w = run_steps(entry, tx, params, 4, grad_seed=0)
    p_r, u_r = _reference_run(entry.name, wrapper == "named_chain")
    chex.assert_trees_all_close(u_w["blocks"], u_r["blocks"], rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(p_w["blocks"], p_r["blocks"], rtol=1e-6, atol=1e-7)
    emb_grad = toy_grads(params, 3)["emb"]
    expected_emb = {"masked": emb_grad, "partition": -0.5 * emb_grad}.get(wrapper, u_r["emb"])
    np.testing.assert_allclose(u_w["emb"], expected_emb, rtol=1e-6, atol=1e-7)
    assert isinstance(optax.tree.get(s_w, entry.state_type.__name__), entry.state_type)
    if wrapper == "named_chain":
        assert set(s_w) == {"clip", "opt"}


@functools.cache
def _reference_run(name, clipped):
    """Params and last updates of the unwrapped optimiser (with the clip for named_chain)."""
    entry = BY_NAME[name]
    if clipped:
        p, _, u = run_steps(entry, _wrapped(entry, "chain", LABELS), toy_params(), 4, grad_seed=0)
    else:
        p, _, u = run_standard(entry, 4, grad_seed=0)
    return p, u


# ---------------------------------------------------------------- 12. base optimisers

BASES = {
    "adamw": lambda: optax.adamw(0.05, weight_decay=1e-3),
    "sgd": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.05),
    "lion": lambda: optax.lion(0.01),
    "sm3": lambda: optax.sm3(0.5),
    "adafactor": lambda: optax.adafactor(0.05),
}


@entries
@pytest.mark.parametrize("base", list(BASES))
def test_over_several_base_optimisers(entry, base):
    tx = entry.build(base=BASES[base]())
    params = toy_params()
    p, st, _ = run_steps(entry, tx, params, 20)
    assert float(toy_loss(p)) < 0.9 * float(toy_loss(params))
    chex.assert_tree_all_finite(p)
    chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(params), st)


# ---------------------------------------------------------------- 13. schedules


@entries
def test_learning_rate_schedule_in_the_base_optimiser(entry):
    params = toy_params()
    with_schedule = entry.build(base=optax.adamw(optax.constant_schedule(1e-2)))
    p_s, _, _ = run_steps(entry, with_schedule, params, 5)
    p_f, _, _ = run_standard(entry, 5, params)
    chex.assert_trees_all_close(p_s, p_f, rtol=1e-6)


# ---------------------------------------------------------------- 14. donation


@entries
def test_jit_with_donated_params_and_state(entry):
    tx, _ = standard(entry.name)
    params = toy_params()
    donating = jax.jit(functools.partial(_step, entry, tx), donate_argnums=(0, 1))
    p_d, s_d = jax.tree.map(jnp.copy, params), tx.init(params)
    for _ in range(3):
        p_d, s_d, _ = donating(p_d, s_d, toy_grads(p_d))
    p_r, s_r, _ = run_standard(entry, 3, params)
    chex.assert_trees_all_equal(p_d, p_r)
    chex.assert_trees_all_equal(s_d, s_r)


# ---------------------------------------------------------------- 15. serialisation


def _npz_round_trip(state):
    leaves, treedef = jax.tree.flatten(state)
    buffer = io.BytesIO()
    np.savez(buffer, *[np.asarray(x) for x in leaves])
    buffer.seek(0)
    with np.load(buffer) as loaded:
        restored = [jnp.asarray(loaded[f"arr_{i}"]) for i in range(len(leaves))]
    return treedef.unflatten(restored)


def _flax_round_trip(state, target):
    serialization = pytest.importorskip("flax.serialization")
    state_dict = serialization.to_state_dict(jax.device_get(state))
    restored = serialization.from_state_dict(target, state_dict)
    return jax.tree.map(jnp.asarray, restored)


@entries
@pytest.mark.parametrize("how", ["npz", "flax"])
def test_state_serialisation_round_trip(entry, how):
    tx, step = standard(entry.name)
    params = toy_params()
    p, st, _ = run_standard(entry, 3, params, grad_seed=0)
    if how == "npz":
        restored = _npz_round_trip(st)
    else:
        restored = _flax_round_trip(st, tx.init(params))
    chex.assert_trees_all_equal_structs(restored, st)
    chex.assert_trees_all_equal(restored, st)
    g = toy_grads(p, 7)
    chex.assert_trees_all_equal(step(p, restored, g), step(p, st, g))
