"""The controllers inside optax wrappers, and two known behaviours of their defaults made visible.

1. AdaGradSelect inside ``optax.masked`` / ``optax.partition`` and over ``optax.sm3``.
2. AdaGradSelect under ``optax.inject_hyperparams``.
3. ``optax.tree_map_params`` with labels given as a callable (and as a stacked label tree).
4. HACBO's sub-module starvation under the defaults: ``min_submodule_share`` and
   :func:`hacbo_starvation` show it, ``curvature_floor`` avoids it.
5. AdaGradSelect's lock-in under the defaults: ``selected_after_epoch1`` shows it,
   ``draw="without_replacement"`` avoids it.
6. ``optax.tree.get(state, "count")`` next to a controller: the filtering recipe.

docs/controller-behaviour.md explains each. Trees are tiny; the tests over 2 s (those that
compile AdaGradSelect twice) are in the slow tier.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hacbo_jax import adagradselect, adagradselect_stats, blac, hacbo, label_by_rules

LABELS = {"emb": "other", "blocks": [{"a": f"{b}/a", "b": f"{b}/b"} for b in range(3)]}
RULES = [(r"blocks/(\d+)/(a|b)$", r"\1/\2")]
SPREAD = "without_replacement"  # the selection moves between blocks within a few steps
MASK = {"emb": False, "blocks": [{"a": True, "b": True}] * 3}  # the uncontrolled leaf out


def params_of(seed, num_blocks=3):
    keys = jax.random.split(jax.random.key(seed), 2 * num_blocks + 1)
    return {
        "emb": jax.random.normal(keys[0], (3,)),
        "blocks": [
            {
                "a": jax.random.normal(keys[2 * b + 1], (2, 3)),
                "b": jax.random.normal(keys[2 * b + 2], (4,)),
            }
            for b in range(num_blocks)
        ],
    }


def selected(state):
    return set(np.flatnonzero(np.asarray(state.selected)).tolist())


# ------------------------------------------------------------- 1. masked, partition, sm3


def _run_blocks(tx, steps=5):
    """(updates, states) of ``steps`` jitted updates of ``tx`` on fixed random gradients."""
    params = params_of(0)
    st = tx.init(params)
    update = jax.jit(tx.update)
    outs, states = [], []
    for t in range(steps):
        out, st = update(params_of(10 + t), st, params)
        outs.append(out)
        states.append(st)
    return outs, states


def _ags(inner=None, steps_per_epoch=3, **kwargs):
    inner = optax.adamw(1e-2, weight_decay=0.1) if inner is None else inner
    return adagradselect(LABELS, inner, pct=0.4, steps_per_epoch=steps_per_epoch, seed=3, **kwargs)


@functools.cache
def _plain_run():
    return _run_blocks(_ags(draw=SPREAD))


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["masked", "partition"])
def test_adagradselect_inside_masked_and_partition(wrapper):
    """The embedding (uncontrolled) is masked out / given to SGD: the blocks are selected,
    updated and kept exactly as without the wrapper."""
    if wrapper == "masked":
        tx = optax.masked(_ags(draw=SPREAD), MASK)
        find = lambda st: st.inner_state
    else:
        labels = {"emb": "sgd", "blocks": [{"a": "select", "b": "select"}] * 3}
        tx = optax.partition({"select": _ags(draw=SPREAD), "sgd": optax.sgd(0.5)}, labels)
        find = lambda st: st.inner_states["select"].inner_state
    outs, states = _run_blocks(tx)
    plain_outs, plain_states = _plain_run()
    for t, (out, st, plain_out, plain_st) in enumerate(zip(outs, states, plain_outs, plain_states)):
        chex.assert_trees_all_equal(out["blocks"], plain_out["blocks"])
        inner = find(st)
        np.testing.assert_array_equal(inner.selected, plain_st.selected)
        chex.assert_trees_all_equal(inner.inner[0].mu["blocks"], plain_st.inner[0].mu["blocks"])
        grads = params_of(10 + t)
        expected = grads["emb"] if wrapper == "masked" else -0.5 * grads["emb"]
        np.testing.assert_allclose(out["emb"], expected, rtol=1e-6)
    assert len({tuple(np.asarray(s.selected).tolist()) for s in plain_states}) > 1


def test_adagradselect_over_sm3_keeps_the_state_of_idle_blocks():
    """sm3 keeps per-axis accumulators (a list per parameter: not parameter-shaped) and a
    parameter-shaped momentum; an idle block keeps both bit for bit."""
    outs, states = _run_blocks(_ags(optax.sm3(0.1, momentum=0.9), draw=SPREAD))
    assert len({tuple(np.asarray(s.selected).tolist()) for s in states}) > 1
    for prev, st, out in zip(states, states[1:], outs[1:]):
        chosen = selected(st)
        assert len(chosen) == 1
        sm3_prev, sm3_new = prev.inner[0], st.inner[0]
        for b in range(3):
            for sub in ("a", "b"):
                kept = [
                    (sm3_new.nu["blocks"][b][sub], sm3_prev.nu["blocks"][b][sub]),
                    *zip(sm3_new.mu["blocks"][b][sub], sm3_prev.mu["blocks"][b][sub]),
                ]
                if b in chosen:
                    assert np.any(np.asarray(out["blocks"][b][sub]) != 0)
                    assert any(not np.array_equal(new, old) for new, old in kept)
                else:
                    np.testing.assert_array_equal(out["blocks"][b][sub], 0.0)
                    for new, old in kept:
                        np.testing.assert_array_equal(new, old)


def test_adagradselect_over_sm3_with_stacked_labels():
    """A stacked leaf's per-axis accumulators mix the blocks: they advance; its momentum (of
    the leaf's shape) is kept slice by slice."""
    params = {"emb": jnp.ones(3), "layers": {"a": jnp.ones((3, 2, 3)), "b": jnp.ones((3, 4))}}
    labels = {"emb": "other", "layers": {"a": "*/a", "b": "*/b"}}
    tx = adagradselect(labels, optax.sm3(0.1, momentum=0.9), pct=0.4, steps_per_epoch=3)
    st = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(3):
        grads = jax.tree.map(lambda x, t=t: (t + 1.0) * jnp.cos(x + t), params)
        prev = st
        out, st = update(grads, st, params)
    (b,) = selected(st)
    idle = np.asarray([i for i in range(3) if i != b])
    momentum_new = np.asarray(st.inner[0].nu["layers"]["a"])
    momentum_old = np.asarray(prev.inner[0].nu["layers"]["a"])
    np.testing.assert_array_equal(momentum_new[idle], momentum_old[idle])
    assert not np.array_equal(momentum_new[b], momentum_old[b])
    np.testing.assert_array_equal(np.asarray(out["layers"]["a"])[idle], 0.0)
    chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(params), st)


# ------------------------------------------------------------- 2. inject_hyperparams


@pytest.mark.slow
def test_adagradselect_numeric_hyperparameters_are_injectable():
    numeric = dict(steps_per_epoch=4, epsilon0=0.7, epsilon_decay=0.5, dirichlet_alpha=2.0)
    injected = optax.inject_hyperparams(adagradselect, static_args=("labels", "pct", "seed"))(
        LABELS, optax.adamw(1e-2), pct=0.4, seed=5, **numeric
    )
    plain = adagradselect(LABELS, optax.adamw(1e-2), pct=0.4, seed=5, **numeric)
    params = params_of(0)
    si, sp = injected.init(params), plain.init(params)
    assert set(si.hyperparams) == set(numeric)
    run = jax.jit(lambda tx_update, g, s: tx_update(g, s, params), static_argnums=0)
    for t in range(6):
        ui, si = run(injected.update, params_of(10 + t), si)
        up, sp = run(plain.update, params_of(10 + t), sp)
        chex.assert_trees_all_close(ui, up, rtol=1e-6)
        np.testing.assert_array_equal(si.inner_state.selected, sp.selected)
    np.testing.assert_allclose(si.inner_state.epsilon, sp.epsilon, rtol=1e-6)
    # a driver changes dirichlet_alpha without recompiling
    si.hyperparams["dirichlet_alpha"] = jnp.asarray(0.5, jnp.float32)
    run(injected.update, params_of(99), si)


@pytest.mark.parametrize("static_args", [(), ("labels",), ("labels", "seed")])
def test_adagradselect_under_inject_hyperparams_names_the_static_arguments(static_args):
    tx = optax.inject_hyperparams(adagradselect, static_args=static_args)(
        LABELS, optax.sgd(0.1), pct=0.4, steps_per_epoch=4
    )
    with pytest.raises(ValueError, match=r"static_args=\('labels', 'pct', 'seed'\)"):
        tx.init(params_of(0))


# ------------------------------------------------------------- 3. tree_map_params


def _factories():
    return {
        "hacbo": lambda labels: optax.chain(optax.adamw(1e-2), hacbo(labels)),
        "blac": lambda labels: optax.chain(optax.adamw(1e-2), blac(labels)),
        "adagradselect": lambda labels: adagradselect(
            labels, optax.adamw(1e-2), pct=0.4, steps_per_epoch=3
        ),
    }


STACKED_PARAMS = {"emb": jnp.ones(3), "layers": {"a": jnp.ones((3, 2, 3)), "b": jnp.ones((3, 4))}}
STACKED_LABELS = {"emb": "other", "layers": {"a": "*/a", "b": "*/b"}}


@pytest.mark.parametrize("name", ["hacbo", "blac", "adagradselect"])
@pytest.mark.parametrize("form", ["callable", "stacked"])
def test_tree_map_params_with_callable_or_stacked_labels(name, form):
    if form == "callable":
        params, labels = params_of(0), (lambda p: label_by_rules(p, RULES))
    else:
        params, labels = STACKED_PARAMS, STACKED_LABELS
    tx = _factories()[name](labels)
    state = tx.init(params)
    specs = jax.tree.map(lambda x: f"spec{x.ndim}", params)
    mapped = optax.tree_map_params(
        tx, lambda _, spec: spec, state, specs, transform_non_params=lambda _: "none"
    )
    assert jax.tree.structure(mapped) == jax.tree.structure(jax.tree.map(lambda _: 0, state))
    adam = optax.tree.get(mapped, "ScaleByAdamState")
    assert adam.mu == specs and adam.nu == specs and adam.count == "none"
    controller_fields = [v for v in jax.tree.leaves(mapped) if v == "none"]
    assert len(controller_fields) == len(jax.tree.leaves(state)) - 2 * len(jax.tree.leaves(params))


# ------------------------------------------------------------- 4. HACBO starvation


def test_hacbo_state_records_the_smallest_submodule_share():
    """Blocks (ln, mlp): c_ln = 0, c_mlp = 0.0036 after two measurements of RMS 0 and 0.01
    (the example of test_optax_wrappers): v_mlp = (1/(0.0036 + 1e-8)) / (1/1e-8 + ...) =
    2.78e-6 under the reference rule; curvature_floor = 0.5 gives v = (0.8, 0.2)."""
    labels = {"blocks": [{"ln": f"{b}/ln", "mlp": f"{b}/mlp"} for b in range(4)]}
    train = {"blocks": [{"ln": jnp.zeros(2), "mlp": jnp.full(2, 0.01)} for _ in range(4)]}
    updates = jax.tree.map(jnp.ones_like, train)
    for floor, expected in [(0.0, 1e-8 / (0.0036 + 2e-8)), (0.5, 0.2)]:
        tx = hacbo(labels, interval=1, rho=0.8, curvature_floor=floor)
        st = tx.init(train)
        assert st.min_submodule_share.dtype == jnp.float32
        np.testing.assert_array_equal(st.min_submodule_share, np.full(4, 0.5, np.float32))
        update = jax.jit(lambda s: tx.update(updates, s, None, train_grads=train, dev_grads=train))
        for _ in range(2):
            _, st = update(st)
        np.testing.assert_allclose(st.min_submodule_share, np.full(4, expected), rtol=1e-4)


def _parabola_run(**options):
    """SGD + HACBO on 0.5 |x - 1|^2, two blocks whose sub-module "a" starts at distance 0.5
    from its optimum and "b" at distance 4; 300 steps under lax.scan, a measurement every 5."""
    from hacbo_jax import hacbo_starvation

    labels = {"blocks": [{"a": "0/a", "b": "0/b"}, {"a": "1/a", "b": "1/b"}]}
    params = {"blocks": [{"a": jnp.full(4, 0.5), "b": jnp.full(4, -3.0)}] * 2}
    loss = lambda p: 0.5 * sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))
    tx = optax.chain(optax.sgd(0.5), hacbo(labels, interval=5, **options))

    def body(carry, _):
        p, st = carry
        g = jax.grad(loss)(p)
        u, st = tx.update(g, st, p, train_grads=g, dev_grads=g)
        return (optax.apply_updates(p, u), st), None

    (p, st), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=300))((params, tx.init(params)))
    controller = optax.tree.get(st, "HACBOState")
    return p, controller, hacbo_starvation(controller)


def test_default_hacbo_starves_a_submodule_on_a_parabola_and_the_floor_avoids_it():
    p, st, warning = _parabola_run()
    # "a" converged, its curvature EMA fell to ~1e-7, and 1 / (c + eps) gave it the whole
    # block: "b" stalls about 0.49 short of its optimum 1 (it started 4 away).
    assert float(np.max(st.min_submodule_share)) < 1e-6
    assert float(np.min(np.abs(np.asarray(p["blocks"][0]["b"]) - 1.0))) > 0.4
    assert warning is not None and "curvature_floor" in warning
    p, st, warning = _parabola_run(curvature_floor=0.1)
    assert float(np.min(st.min_submodule_share)) > 0.04  # c_a >= 0.1 mean(c): v_b >= ~1/21
    np.testing.assert_allclose(p["blocks"][0]["b"], 1.0, atol=5e-3)
    assert warning is None


def test_min_submodule_share_does_not_change_any_update():
    """The statistic is read off the multipliers' own split: dropping it from the state (a state
    written by hand without it) gives the same update and the same other fields."""
    labels = LABELS
    tx = hacbo(labels, interval=1, patience=1, theta_neg=0.3)
    params = params_of(0)
    st = tx.init(params)
    bare = st._replace(min_submodule_share=None)
    update = jax.jit(lambda u, s, g, d: tx.update(u, s, None, train_grads=g, dev_grads=d))
    for t in range(3):
        u, g, d = params_of(30 + t), params_of(10 + t), params_of(20 + t)
        out, st = update(u, st, g, d)
        out_bare, bare = update(u, bare, g, d)
        chex.assert_trees_all_equal(out, out_bare)
        chex.assert_trees_all_equal(st, bare)


# ------------------------------------------------------------- 5. AdaGradSelect lock-in


def _lock_in_run(draw, seed=0):
    """8 blocks (one stacked leaf), k = 2, epoch 1 = 20 steps, 100 steps under lax.scan; every
    block's gradient is drawn from the same distribution, so only the selection rule decides."""
    num_b = 8
    params = {"a": jnp.ones((num_b, 2))}
    tx = adagradselect(
        {"a": "*/a"}, optax.sgd(0.0), pct=0.25, steps_per_epoch=20, seed=seed, draw=draw
    )

    def body(st, key):
        return tx.update({"a": jax.random.normal(key, (num_b, 2))}, st, params)[1], None

    keys = jax.random.split(jax.random.key(seed), 100)
    st, _ = jax.jit(lambda s: jax.lax.scan(body, s, keys))(tx.init(params))
    return st


def test_selected_after_epoch1_counts_steps_after_epoch_one():
    tx = _ags()  # N = 3, k = 1
    params = params_of(0)
    st = tx.init(params)
    np.testing.assert_array_equal(st.selected_after_epoch1, [0, 0, 0])
    assert "never_selected_after_epoch1" not in adagradselect_stats(st)
    update = jax.jit(tx.update)
    for t in range(1, 8):
        _, st = update(params_of(10 + t), st, params)
        assert int(np.sum(st.selected_after_epoch1)) == max(0, t - 3)  # k = 1 a step, t > N
        stats = adagradselect_stats(st)
        assert ("never_selected_after_epoch1" in stats) == (t > 3)
    assert stats["selected_after_epoch1"] == np.asarray(st.selected_after_epoch1).tolist()
    never = int(np.sum(np.asarray(st.selected_after_epoch1) == 0))
    assert stats["never_selected_after_epoch1"] == never


@pytest.mark.slow
def test_default_adagradselect_locks_in_and_without_replacement_spreads():
    st = _lock_in_run("top_k")
    stats = adagradselect_stats(st)
    # after epoch 1 the counts f are ~5 per block and uneven: the top 2 of a Dirichlet(1 + f)
    # draw is nearly always the top 2 of f, whose lead grows (seeds 0-9 leave 3 to 6 of the 8
    # blocks unselected for 80 steps)
    assert stats["never_selected_after_epoch1"] >= 3, stats
    st = _lock_in_run("without_replacement")
    assert adagradselect_stats(st)["never_selected_after_epoch1"] == 0


# ------------------------------------------------------------- 6. optax.tree.get


@pytest.mark.parametrize("name", ["hacbo", "blac", "adagradselect"])
def test_tree_get_count_next_to_a_controller(name):
    from hacbo_jax import outside_controllers

    params = params_of(0)
    tx = _factories()[name](LABELS)
    st = tx.init(params)
    extra = {} if name == "adagradselect" else dict(train_grads=params, dev_grads=params)
    for _ in range(2):
        _, st = tx.update(params, st, params, **extra)
    with pytest.raises(KeyError, match="multiple values"):  # optax's rule is kept
        optax.tree.get(st, "count")
    adam_count = optax.tree.get(st, "ScaleByAdamState").count
    # the recipe: name the optimiser state that holds the count ...
    by_name = lambda path, _: getattr(path[-1], "tuple_name", None) == "ScaleByAdamState"
    assert int(optax.tree.get(st, "count", filtering=by_name)) == int(adam_count) == 2
    # ... or skip the controllers' own fields, whatever the base optimiser
    assert int(optax.tree.get(st, "count", filtering=outside_controllers)) == 2
    new_count = jnp.asarray(7, jnp.int32)
    if name == "adagradselect":
        # optax.tree.set does not look below a node that holds the key itself (here the
        # AdaGradSelectState, which has a count): set it in the inner state
        changed = st._replace(inner=optax.tree.set(st.inner, count=new_count))
    else:
        changed = optax.tree.set(st, outside_controllers, count=new_count)
    assert int(optax.tree.get(changed, "ScaleByAdamState").count) == 7
    controller = {"hacbo": "HACBOState", "blac": "BLACState", "adagradselect": "AdaGradSelectState"}
    assert int(optax.tree.get(changed, controller[name]).count) == 2
