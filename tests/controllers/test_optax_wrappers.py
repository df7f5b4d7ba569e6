"""The controllers compose with optax (jit without a dev source, inject_hyperparams,
MultiSteps, apply_if_finite, masked, scanned layers) and fail loudly instead of silently.

One test (or parametrised group) per composition; hand-computed where the reference
gives a rule. Trees are tiny and every test is fast.
"""

import math
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hacbo_jax import (
    BLACState,
    adagradselect,
    accumulate_gradients,
    blac,
    blac_multipliers,
    hacbo,
    hacbo_multipliers,
)
from hacbo_jax.controllers._groups import fake_int8, parse_labels, sign_cosine_and_sq_norms
from support.toy_trees import ONES, block_values, labels_for, ones_updates, state, tree


def step(tx, st, train, dev, updates, **kw):
    return tx.update(updates, st, None, train_grads=train, dev_grads=dev, **kw)


def assert_state_invariants(before, after):
    chex.assert_trees_all_equal_structs(before, after)
    chex.assert_trees_all_equal_shapes_and_dtypes(before, after)
    chex.assert_tree_all_finite(after)


# ------------------------------------------------------------- 1. omitted dev source under jit


@pytest.mark.parametrize("make", [hacbo, blac], ids=["hacbo", "blac"])
def test_omitted_dev_source_traces_no_measurement_and_counts_missed(make):
    train = tree([(ONES, ONES)] * 2)
    tx = make(labels_for(2), interval=2)
    st0 = tx.init(train)
    ordinary = jax.jit(lambda u, s: tx.update(u, s, None, train_grads=train))
    measuring = jax.jit(lambda u, s: tx.update(u, s, None, train_grads=train, dev_grads=train))
    st = st0
    for t in range(1, 5):  # t = 2 and 4 are measurement steps reached without a dev gradient
        out, st = ordinary(ones_updates(2), st)
        assert int(st.count) == t
        chex.assert_tree_all_finite(out)
    assert int(st.missed_measurements) == 2
    np.testing.assert_array_equal(st.agreement, [0, 0])  # never treated as "no agreement"
    np.testing.assert_array_equal(st.layer_weights, [0.5, 0.5])
    np.testing.assert_array_equal(st.cosine, [0, 0])
    assert_state_invariants(st0, st)
    for _ in range(2):  # t = 5, 6: the measurement step function measures at t = 6
        _, st = measuring(ones_updates(2), st)
    np.testing.assert_allclose(st.cosine, [1, 1], rtol=1e-6)
    assert int(st.missed_measurements) == 2


# ------------------------------------------------------------- 2. inject_hyperparams


def test_inject_hyperparams_numeric_hyperparameters_are_injectable():
    train = tree([([1, -2], [0, 3]), (ONES, ONES)])
    dev = tree([([2, 5], [0, -1]), (ONES, [1, -1])])
    numeric = dict(rho=0.7, theta_neg=0.3, gamma=0.5, eps=1e-6, update_norm_budget=2.0)
    injected = optax.inject_hyperparams(hacbo, static_args=("labels", "interval", "patience"))(
        labels=labels_for(2), interval=1, patience=1, **numeric
    )
    plain = hacbo(labels_for(2), interval=1, patience=1, **numeric)
    run = jax.jit(
        lambda tx_update, s: tx_update(ones_updates(2), s, None, train_grads=train, dev_grads=dev),
        static_argnums=0,
    )
    si, sp = injected.init(train), plain.init(train)
    for _ in range(3):
        ui, si = run(injected.update, si)
        up, sp = run(plain.update, sp)
        chex.assert_trees_all_close(ui, up, rtol=1e-6)
    chex.assert_trees_all_close(si.inner_state, sp, rtol=1e-6)
    assert_state_invariants(injected.init(train), si)
    # an outer driver changes gamma without recompiling
    si.hyperparams["gamma"] = jnp.asarray(0.0, jnp.float32)
    blac_injected = optax.inject_hyperparams(
        blac, static_args=("labels", "interval", "freeze_after")
    )(labels=labels_for(2), interval=1, freeze_after=0, rho=0.5)
    _, sb = jax.jit(
        lambda s: blac_injected.update(ones_updates(2), s, None, train_grads=train, dev_grads=dev)
    )(blac_injected.init(train))
    np.testing.assert_allclose(sb.inner_state.signed_agreement[1], 0.5 * 0.5, rtol=1e-6)


def test_inject_hyperparams_without_static_shape_arguments_names_the_fix():
    with pytest.raises(ValueError, match="static_args"):
        optax.inject_hyperparams(hacbo, static_args=("labels",))(labels=labels_for(2)).init(
            ones_updates(2)
        )


# ------------------------------------------------------------- 3. MultiSteps


def _mlp_loss(params, batch):
    x, y = batch
    h = x @ params["emb"]
    for block in params["blocks"]:
        h = h + jnp.tanh(h @ block["a"]) * block["b"]
    return jnp.mean((h - y) ** 2)


def _mlp_params():
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "emb": jax.random.normal(keys[0], (3, 3)),
        "blocks": [{"a": 0.5 * jax.random.normal(k, (3, 3)), "b": jnp.ones(3)} for k in keys[1:]],
    }


def _mlp_labels():
    return {"emb": "other", "blocks": [{"a": f"{b}/a", "b": f"{b}/b"} for b in range(3)]}


def _batch(seed, n):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, 3)), jax.random.normal(ky, (n, 3))


@pytest.mark.slow
def test_multi_steps_sees_accumulated_gradient_and_measures_once_per_step():
    params0 = _mlp_params()
    dev = _batch(99, 8)
    calls = []

    def dev_grad_fn(p):
        jax.debug.callback(lambda: calls.append(1))
        return jax.grad(_mlp_loss)(p, dev)

    inner = lambda: optax.chain(optax.adamw(1e-2), hacbo(_mlp_labels(), interval=2, patience=1))
    plain, accumulated = inner(), accumulate_gradients(inner(), every_k=2)

    @jax.jit
    def plain_step(params, st, batch):
        g = jax.grad(_mlp_loss)(params, batch)
        u, st = plain.update(g, st, params, train_grads=g, dev_grad_fn=dev_grad_fn)
        return optax.apply_updates(params, u), st

    @jax.jit
    def mini_step(params, st, batch):
        g = jax.grad(_mlp_loss)(params, batch)
        u, st = accumulated.update(g, st, params, dev_grad_fn=dev_grad_fn)
        return optax.apply_updates(params, u), st

    p_plain, s_plain = params0, plain.init(params0)
    p_acc, s_acc = params0, accumulated.init(params0)
    s_acc0 = s_acc
    for k in range(4):
        x, y = _batch(k, 8)
        p_plain, s_plain = plain_step(p_plain, s_plain, (x, y))
    jax.effects_barrier()
    plain_calls, calls[:] = len(calls), []
    for k in range(4):
        x, y = _batch(k, 8)
        for half in (slice(0, 4), slice(4, 8)):  # equal halves: mean of means = full mean
            p_acc, s_acc = mini_step(p_acc, s_acc, (x[half], y[half]))
    jax.effects_barrier()
    assert plain_calls == 2 and len(calls) == 2  # once per optimiser step t = 2, 4
    chex.assert_trees_all_close(p_acc, p_plain, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(s_acc.inner_opt_state[1], s_plain[1], rtol=1e-6, atol=1e-6)
    assert int(s_acc.inner_opt_state[1].count) == 4
    assert_state_invariants(s_acc0, s_acc)


# ------------------------------------------------------------- 4. apply_if_finite


def test_apply_if_finite_count_and_cadence_follow_applied_steps():
    train = tree([(ONES, ONES)] * 2)
    bad = tree([([math.nan, 1.0], ONES), (ONES, ONES)])
    tx = optax.apply_if_finite(hacbo(labels_for(2), interval=2, rho=0.5), 5)
    st0 = tx.init(train)
    update = jax.jit(lambda u, s: tx.update(u, s, None, train_grads=train, dev_grads=train))
    _, st = update(ones_updates(2), st0)  # applied: t = 1
    _, st = update(bad, st)  # rejected: count stays 1
    assert int(st.inner_state.count) == 1
    np.testing.assert_array_equal(st.inner_state.agreement, [0, 0])
    _, st = update(ones_updates(2), st)  # applied: t = 2, a measurement (cos = 1, a = 0.5)
    assert int(st.inner_state.count) == 2
    np.testing.assert_allclose(st.inner_state.agreement, [0.5, 0.5], rtol=1e-6)
    assert_state_invariants(st0, st)


# ------------------------------------------------------------- 5. budget


def test_budget_equals_clip_by_global_norm_last_and_masked_clips_only_the_subset():
    train = tree([(ONES, ONES)] * 2)
    updates = tree([([2, 0], [2, 0])] * 2, emb=(3.0, 4.0))
    tx = hacbo(labels_for(2), interval=5, update_norm_budget=1.0)
    out, st = step(tx, tx.init(train), train, train, updates)
    np.testing.assert_allclose(st.budget_scale, 1 / math.sqrt(29), rtol=1e-6)  # logged
    separate = optax.chain(hacbo(labels_for(2), interval=5), optax.clip_by_global_norm(1.0))
    out_sep, _ = step(separate, separate.init(train), train, train, updates)
    chex.assert_trees_all_close(out, out_sep, rtol=1e-6)  # reference step 10 == clip_by_global_norm
    # inside masked, the convenience budget sees (and clips) only the controlled subset
    labels = labels_for(2)
    mask = jax.tree.map(lambda label: label != "other", labels)
    masked = optax.masked(
        hacbo(labels, interval=5, update_norm_budget=1.0), mask, mask_compatible_extra_args=True
    )
    out_m, st_m = step(masked, masked.init(train), train, train, updates)
    assert_state_invariants(masked.init(train), st_m)
    np.testing.assert_array_equal(out_m["emb"], [3.0, 4.0])  # untouched, though over budget
    np.testing.assert_allclose(block_values(out_m, 0), [[0.5, 0], [0.5, 0]], rtol=1e-6)  # 1/2
    # the whole-update budget for masked use: clip_by_global_norm placed last
    whole = optax.chain(
        optax.masked(hacbo(labels, interval=5), mask, mask_compatible_extra_args=True),
        optax.clip_by_global_norm(1.0),
    )
    out_w, _ = step(whole, whole.init(train), train, train, updates)
    chex.assert_trees_all_close(out_w, out, rtol=1e-6)


# ------------------------------------------------------------- 6. logged multipliers


def test_logged_multipliers_are_those_applied_on_measurement_steps():
    tx = hacbo(labels_for(2), interval=1, rho=0.8, gamma=0.0)
    st = tx.init(ones_updates(2))
    st = st._replace(
        agreement=jnp.asarray([0.5, 0.5]),
        neg_count=jnp.asarray([6, 0], jnp.int32),
        probation=jnp.asarray([True, False]),
    )
    train = tree([([0.5, 0.5], [0.5, 0.5]), (ONES, ONES)])
    dev = tree([([-1, -1], [-1, -1]), (ONES, ONES)])
    _, st = step(tx, st, train, dev, ones_updates(2))
    # as in test_probation_exit_by_low_curvature_and_gamma_zero_freezes: w = (0.4, 0.6), the
    # update saw L_active = 1 (block 0 in probation), which it left after the update.
    np.testing.assert_allclose(st.multipliers, [[0.2, 0.2], [0.3, 0.3]], rtol=1e-6)
    np.testing.assert_allclose(hacbo_multipliers(st), [[0.4, 0.4], [0.6, 0.6]], rtol=1e-6)


# ------------------------------------------------------------- 7. non-finite measurement


@pytest.mark.parametrize("make", [hacbo, blac], ids=["hacbo", "blac"])
@pytest.mark.parametrize("which", ["dev", "train"])
def test_nonfinite_gradient_skips_the_measurement(make, which):
    good = tree([([1, -2], [0, 3]), (ONES, ONES)])
    nan = tree([([math.nan, 1.0], ONES), (ONES, ONES)])
    train, dev = (good, nan) if which == "dev" else (nan, good)
    tx = make(labels_for(2), interval=1)
    st0 = tx.init(good)
    out, st = jax.jit(lambda s: step(tx, s, train, dev, ones_updates(2)))(st0)
    chex.assert_tree_all_finite(out)
    assert int(st.skipped_measurements) == 1 and int(st.count) == 1
    for field in st0._fields:
        if field not in ("count", "skipped_measurements", "multipliers", "budget_scale"):
            chex.assert_trees_all_equal(getattr(st, field), getattr(st0, field))


# ------------------------------------------------------------- 8. validation


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(theta_neg=math.nan), "theta_neg"),
        (dict(gamma=math.inf), "gamma"),
        (dict(eps=math.inf), "eps"),
        (dict(rho=math.nan), "rho"),
        (dict(update_norm_budget=math.inf), "update_norm_budget"),
        (dict(theta_neg=-0.1), "theta_neg"),
        (dict(theta_neg=1.5), "theta_neg"),
        (dict(debias="no"), "debias"),
        (dict(probation=1), "probation"),
        (dict(curvature_weighting="yes"), "curvature_weighting"),
        (dict(interval=2.0), "interval"),
        (dict(patience=True), "patience"),
        (dict(curvature_floor=-1.0), "curvature_floor"),
        (dict(probation_share="equal"), "probation_share"),
    ],
)
def test_bad_hyperparameters_are_rejected_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        hacbo(labels_for(2), **kwargs)


def test_numpy_scalars_are_accepted_everywhere():
    params = ones_updates(2)
    tx = hacbo(
        labels_for(2),
        interval=np.int64(5),
        patience=np.int32(2),
        rho=np.float32(0.8),
        theta_neg=np.float64(0.04),
        gamma=np.float32(0.1),
        eps=np.float64(1e-8),
        update_norm_budget=np.float32(1.0),
        debias=np.bool_(False),
    )
    tx.update(params, tx.init(params), None, train_grads=params)
    tx = blac(labels_for(2), interval=np.int64(5), freeze_after=np.int64(300), rho=np.float32(0.7))
    tx.update(params, tx.init(params), None, train_grads=params)
    for kwargs in [dict(freeze_after=1.5), dict(rho=math.nan), dict(update_norm_budget=-1.0)]:
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            blac(labels_for(2), **kwargs)


# ------------------------------------------------------------- 9. zero-gradient sub-module


def _four_blocks_ln_zero_mlp_small(**kwargs):
    labels = {"blocks": [{"ln": f"{b}/ln", "mlp": f"{b}/mlp"} for b in range(4)]}
    train = {"blocks": [{"ln": jnp.zeros(2), "mlp": jnp.full(2, 0.01)} for _ in range(4)]}
    tx = hacbo(labels, interval=1, rho=0.8, **kwargs)
    updates = {"blocks": [{"ln": jnp.ones(2), "mlp": jnp.ones(2)} for _ in range(4)]}
    _, st = tx.update(updates, tx.init(train), None, train_grads=train, dev_grads=train)
    _, st = tx.update(updates, st, None, train_grads=train, dev_grads=train)
    return st  # columns (ln, mlp)


@pytest.mark.slow
def test_zero_gradient_submodule_default_and_curvature_floor():
    # every block: cos = 1, w = 1/4, L_active = 4. c_ln = 0, c_mlp = 0.36 * 0.01 = 0.0036.
    st = _four_blocks_ln_zero_mlp_small()
    np.testing.assert_allclose(st.multipliers, np.tile([1.0, 0.0], (4, 1)), atol=1e-4)
    # curvature_floor = 0.5: c_ln -> 0.5 * mean(0, 0.0036) = 0.0009; v = (1/.0009, 1/.0036)
    # normalised = (0.8, 0.2) (eps = 1e-8 is negligible here)
    st = _four_blocks_ln_zero_mlp_small(curvature_floor=0.5)
    np.testing.assert_allclose(st.multipliers, np.tile([0.8, 0.2], (4, 1)), rtol=1e-4)
    np.testing.assert_allclose(
        hacbo_multipliers(st, curvature_floor=0.5), np.tile([0.8, 0.2], (4, 1)), rtol=1e-4
    )


def test_sign_cosine_is_clipped_to_one():
    # 2 agreeing coordinates: 2 / (sqrt(2) sqrt(2)) = 1.0000001 in float32 before the clip
    layout = parse_labels({"x": "0/a"})
    cos, _ = sign_cosine_and_sq_norms(layout, [jnp.ones(2)], [jnp.ones(2)])
    assert float(cos[0]) <= 1.0
    cos, _ = sign_cosine_and_sq_norms(layout, [jnp.ones(2)], [-jnp.ones(2)])
    assert float(cos[0]) >= -1.0


# ------------------------------------------------------------- 10. probation share


@pytest.mark.slow
def test_probation_share_uniform_gives_gamma_a_real_share():
    gamma = 0.5
    u0a, u0b = np.array([0.3, -1.0]), np.array([0.5, 0.25])
    updates = tree([(u0a, u0b), (ONES, ONES)])
    train = tree([(ONES, ONES)] * 2)
    st = state(2, probation=[True, False], layer_weights=[0.1, 0.9], neg_count=[6, 0])
    q = lambda x: gamma * np.asarray(fake_int8(jnp.asarray(x, jnp.float32)))
    for share, m0 in [("weights", 1 * 0.1 * 0.5), ("uniform", 0.5)]:
        tx = hacbo(labels_for(2), interval=100, gamma=gamma, probation_share=share)
        out, new = step(tx, st, train, train, updates)
        # reference: gamma * fake_int8(L_active w_0 v * u), L_active = 1; uniform: v = 1/2 only
        np.testing.assert_allclose(block_values(out, 0)[0], q(m0 * u0a), rtol=1e-5)
        np.testing.assert_allclose(block_values(out, 0)[1], q(m0 * u0b), rtol=1e-5)
        np.testing.assert_allclose(block_values(out, 1), np.full((2, 2), 0.45), rtol=1e-6)
        np.testing.assert_allclose(new.multipliers[0], [m0, m0], rtol=1e-6)
    # every block in probation: L_active = 0; reference -> nothing trains, uniform -> gamma x share
    st = state(2, probation=[True, True], neg_count=[6, 6])
    for share, expected in [("weights", 0.0), ("uniform", gamma * 0.5)]:
        tx = hacbo(labels_for(2), interval=100, gamma=gamma, probation_share=share)
        out, _ = step(tx, st, train, train, ones_updates(2))
        np.testing.assert_allclose(block_values(out, 1), np.full((2, 2), expected), rtol=1e-6)


# ------------------------------------------------------------- 11. BLAC weights


BLAC_TRAIN = tree([(ONES, ONES)] * 3)
BLAC_OPPOSE = tree([([-1, -1], [-1, -1])] * 3)  # cos = -1 everywhere: S = 0


def _blac_state(weights, signed, frozen=(False, False, False)):
    return BLACState(
        jnp.int32(0),
        jnp.zeros(3),
        jnp.asarray(signed, jnp.float32),
        jnp.asarray(frozen),
        jnp.asarray(weights, jnp.float32),
        jnp.zeros(3),
    )


def test_blac_weights_renormalised_over_active_blocks_when_agreement_sum_is_zero():
    labels = {"emb": "other", "blocks": [{"a": f"{b}/a", "b": f"{b}/b"} for b in range(3)]}
    tx = blac(labels, interval=1, rho=0.5, freeze_after=0)
    upd = tree([(ONES, ONES)] * 3)
    # block 0's s = -0.5 + ... < 0 freezes it; blocks 1, 2 start at s = 1 and stay >= 0
    st = _blac_state([0.2, 0.3, 0.5], [-1.0, 1.0, 1.0])
    out, st = tx.update(upd, st, None, train_grads=BLAC_TRAIN, dev_grads=BLAC_OPPOSE)
    np.testing.assert_array_equal(st.frozen, [True, False, False])
    np.testing.assert_allclose(st.layer_weights, [0, 0.375, 0.625], rtol=1e-6)  # (.3, .5) / .8
    np.testing.assert_allclose(blac_multipliers(st), [0, 0.75, 1.25], rtol=1e-6)
    np.testing.assert_allclose(out["blocks"][2]["a"], [1.25, 1.25], rtol=1e-6)
    assert int(st.all_frozen_steps) == 0
    # kept weights of the active blocks sum to 0: uniform over them
    st = _blac_state([1.0, 0.0, 0.0], [-1.0, 1.0, 1.0])
    _, st = tx.update(upd, st, None, train_grads=BLAC_TRAIN, dev_grads=BLAC_OPPOSE)
    np.testing.assert_allclose(st.layer_weights, [0, 0.5, 0.5], rtol=1e-6)
    # every block frozen: nothing trains, the weights are 0 and the state counts it
    st = _blac_state([0.2, 0.3, 0.5], [-1.0, -1.0, -1.0])
    out, st = tx.update(upd, st, None, train_grads=BLAC_TRAIN, dev_grads=BLAC_OPPOSE)
    np.testing.assert_array_equal(st.frozen, [True] * 3)
    np.testing.assert_array_equal(st.layer_weights, [0, 0, 0])
    np.testing.assert_array_equal(out["blocks"][1]["b"], [0, 0])
    assert int(st.all_frozen_steps) == 1


# ------------------------------------------------------------- 12. controller before Adam


@pytest.mark.slow
@pytest.mark.parametrize("make", [hacbo, blac], ids=["hacbo", "blac"])
def test_controller_before_the_optimiser_warns_once(make):
    params = _mlp_params()
    g = jax.grad(_mlp_loss)(params, _batch(0, 8))
    first = optax.chain(make(_mlp_labels(), interval=5), optax.adam(1e-3))
    st = first.init(params)
    with pytest.warns(UserWarning, match="after the base optimiser"):
        _, st = first.update(g, st, params, train_grads=g, dev_grads=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.update(g, st, params, train_grads=g, dev_grads=g)  # once per transformation
        after = optax.chain(optax.adam(1e-3), make(_mlp_labels(), interval=5))
        jax.jit(lambda s: after.update(g, s, params, train_grads=g, dev_grads=g))(
            after.init(params)
        )


# ------------------------------------------------------------- 13. scanned-layer labels


def _stacked_and_unrolled(seed):
    """A stacked tree (leading block axis 3) and its unrolled twin, with the same numbers."""
    k = jax.random.split(jax.random.key(seed), 4)
    emb = jax.random.normal(k[0], (2,))
    attn = jax.random.normal(k[1], (3, 2, 2))
    mlp = jax.random.normal(k[2], (3, 2))
    extra = jax.random.normal(k[3], (2,))  # block 1's numbered "1/mlp" leaf in both forms
    stacked = {"emb": emb, "layers": {"attn": attn, "mlp": mlp}, "extra": extra}
    unrolled = {
        "emb": emb,
        "blocks": [{"attn": attn[i], "mlp": mlp[i]} for i in range(3)],
        "extra": extra,
    }
    return stacked, unrolled


STACKED_LABELS = {"emb": "other", "layers": {"attn": "*/attn", "mlp": "*/mlp"}, "extra": "1/mlp"}
UNROLLED_LABELS = {
    "emb": "other",
    "blocks": [{"attn": f"{i}/attn", "mlp": f"{i}/mlp"} for i in range(3)],
    "extra": "1/mlp",
}


def _unstack(stacked):
    return {
        "emb": stacked["emb"],
        "blocks": [
            {"attn": stacked["layers"]["attn"][i], "mlp": stacked["layers"]["mlp"][i]}
            for i in range(3)
        ],
        "extra": stacked["extra"],
    }


@pytest.mark.parametrize(
    "make",
    [
        lambda labels: hacbo(labels, interval=2, patience=1, theta_neg=0.3, gamma=0.5, rho=0.5),
        lambda labels: blac(labels, interval=2, freeze_after=2, rho=0.5),
    ],
    ids=["hacbo", "blac"],
)
def test_stacked_labels_match_the_unrolled_tree(make):
    stacked_tx = optax.chain(optax.adamw(1e-2), make(STACKED_LABELS))
    unrolled_tx = optax.chain(optax.adamw(1e-2), make(UNROLLED_LABELS))
    params_s, params_u = _stacked_and_unrolled(0)
    ss0 = ss = stacked_tx.init(params_s)
    su = unrolled_tx.init(params_u)

    def run(tx, params, st, train, dev):
        return tx.update(train, st, params, train_grads=train, dev_grads=dev)

    run = jax.jit(run, static_argnums=0)
    probation_seen = False
    for t in range(8):
        train_s, train_u = _stacked_and_unrolled(10 + t)
        dev_s, dev_u = _stacked_and_unrolled(100 + t)
        out_s, ss = run(stacked_tx, params_s, ss, train_s, dev_s)
        out_u, su = run(unrolled_tx, params_u, su, train_u, dev_u)
        chex.assert_trees_all_close(_unstack(out_s), out_u, rtol=1e-6, atol=1e-7)
        # float sums may run in another order (bit-identical on CPU today); the discrete
        # fields (count, counters, probation / frozen, neg_count) must be identical
        chex.assert_trees_all_close(ss[1], su[1], rtol=1e-6, atol=1e-7)
        for a, b in zip(ss[1], su[1]):
            if a is None:  # an option's field that is off (HACBO's true_cosine)
                assert b is None
                continue
            if not jnp.issubdtype(a.dtype, jnp.floating):
                np.testing.assert_array_equal(a, b)
        flags = getattr(ss[1], "probation", getattr(ss[1], "frozen", None))
        probation_seen |= bool(np.any(flags))
    assert probation_seen  # the run exercised probation / freezing
    assert_state_invariants(ss0, ss)


def test_stacked_labels_fix_the_number_of_blocks_and_check_it():
    params_s, _ = _stacked_and_unrolled(0)
    tx = hacbo(STACKED_LABELS, interval=1)
    assert tx.init(params_s).curvature.shape == (3, 2)
    bad = dict(STACKED_LABELS, extra="5/mlp")  # numbered block 5 but the stacked axis is 3
    with pytest.raises(ValueError, match="leading"):
        hacbo(bad, interval=1).init(params_s)
    with pytest.raises(ValueError, match="stacked"):
        parse_labels(STACKED_LABELS)  # the layout needs the tree to know B


@pytest.mark.slow
@pytest.mark.parametrize("other_mode", ["unit", "always"])
@pytest.mark.parametrize("moments", ["keep", "advance"])
def test_adagradselect_stacked_labels_match_the_unrolled_tree(other_mode, moments):
    """A scanned model's "*/sub" leaves: AdaGradSelect scores, selects and masks block i's
    slice of a stacked leaf exactly as the unrolled tree's block i."""

    def make(labels):
        return adagradselect(
            labels,
            optax.adamw(1e-2),
            pct=0.4,
            steps_per_epoch=3,
            seed=3,
            other_mode=other_mode,
            moments=moments,
        )

    params_s, params_u = _stacked_and_unrolled(0)
    stacked_tx, unrolled_tx = make(STACKED_LABELS), make(UNROLLED_LABELS)
    ss, su = stacked_tx.init(params_s), unrolled_tx.init(params_u)
    run = jax.jit(lambda tx, g, st, p: tx.update(g, st, p), static_argnums=0)
    selections = set()
    for t in range(6):
        grads_s, grads_u = _stacked_and_unrolled(10 + t)
        out_s, ss = run(stacked_tx, grads_s, ss, params_s)
        out_u, su = run(unrolled_tx, grads_u, su, params_u)
        chex.assert_trees_all_close(_unstack(out_s), out_u, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(ss.selected, su.selected)
        np.testing.assert_array_equal(ss.freq, su.freq)
        np.testing.assert_allclose(ss.scores, su.scores, rtol=1e-6)
        chex.assert_trees_all_close(_unstack(ss.inner[0].mu), su.inner[0].mu, rtol=1e-6)
        selections.add(tuple(np.asarray(ss.selected).tolist()))
    assert len(selections) > 1  # the selection moved between blocks
