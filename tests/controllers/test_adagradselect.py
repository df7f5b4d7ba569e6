"""AdaGradSelect: one hand-computed test per rule of docs/algorithm.md (AdaGradSelect).

The trees are tiny: U blocks with sub-modules "a" and "b" of two coordinates each, and an
uncontrolled leaf "emb". Expected values are worked out by hand in each test.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from hacbo_jax import (
    AdaGradSelectState,
    adagradselect,
    adagradselect_epsilon,
    adagradselect_num_selected,
    adagradselect_stats,
)


def labels_for(num_blocks):
    return {"emb": "other", "blocks": [{"a": f"{b}/a", "b": f"{b}/b"} for b in range(num_blocks)]}


def tree(blocks, emb=(0.5, -0.5)):
    """blocks: [(a_values, b_values)] per block."""
    return {
        "emb": jnp.asarray(emb, jnp.float32),
        "blocks": [
            {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32)} for a, b in blocks
        ],
    }


def norm_grads(norms):
    """A gradient whose block b has L2 norm norms[b] (all of it in coordinate a[0])."""
    return tree([([n, 0.0], [0.0, 0.0]) for n in norms])


def random_tree(key, num_blocks):
    keys = jax.random.split(key, 2 * num_blocks + 1)
    return {
        "emb": jax.random.normal(keys[0], (2,)),
        "blocks": [
            {
                "a": jax.random.normal(keys[2 * b + 1], (2,)),
                "b": jax.random.normal(keys[2 * b + 2], (2,)),
            }
            for b in range(num_blocks)
        ],
    }


def selected_units(state):
    return set(np.flatnonzero(np.asarray(state.selected)).tolist())


@pytest.mark.parametrize(
    "num_units, pct, k",
    [
        (16, 0.1, 1),
        (24, 0.1, 2),
        (24, 0.2, 4),
        (24, 0.3, 7),
        (28, 0.1, 2),
        (28, 0.2, 5),
        (28, 0.3, 8),
    ],
)
def test_number_of_selected_units(num_units, pct, k):
    # k = max(1, floor(p U)): 1.6 -> 1; 2.4, 4.8, 7.2 -> 2, 4, 7; 2.8, 5.6, 8.4 -> 2, 5, 8
    assert adagradselect_num_selected(pct, num_units) == k


def test_number_selected_is_at_least_one_and_floor_is_robust():
    assert adagradselect_num_selected(0.01, 16) == 1  # floor(0.16) = 0 -> 1
    assert adagradselect_num_selected(0.29, 100) == 29  # 0.29 * 100 = 28.999... in floats


@pytest.mark.slow
def test_sum_of_counts_is_k_times_t():
    # U = 24, p = 0.3 -> k = 7 units per step, whichever branch; after t steps sum f = 7 t
    num_b = 24
    params = random_tree(jax.random.key(0), num_b)
    tx = adagradselect(labels_for(num_b), optax.sgd(0.1), pct=0.3, steps_per_epoch=3, seed=1)
    st = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(1, 6):
        _, st = update(random_tree(jax.random.key(t), num_b), st, params)
        assert int(np.sum(st.selected)) == 7
        assert int(np.sum(st.freq)) == 7 * t


def test_epsilon_schedule():
    n = 10
    decay = math.log(100.0) / (n - 1)
    eps = [float(adagradselect_epsilon(t, n)) for t in range(1, n + 6)]
    assert eps[0] == 1.0  # epsilon_1 = epsilon_0 = 1
    assert eps[n - 1] == 0.0 and eps[n + 4] == 0.0  # epsilon_N = epsilon_{N+5} = 0
    ratios = [eps[i + 1] / eps[i] for i in range(n - 2)]  # t = 1 .. N-2: eps_{t+1} / eps_t
    np.testing.assert_allclose(ratios, math.exp(-decay), rtol=1e-5)
    # epsilon_{N-1} = exp(-ln(100) (N-2)/(N-1)) = 100^(-8/9)
    np.testing.assert_allclose(eps[n - 2], 100.0 ** (-8 / 9), rtol=1e-5)
    # the state records epsilon_t of each step
    tx = adagradselect(labels_for(2), optax.sgd(0.1), pct=0.5, steps_per_epoch=n)
    params = random_tree(jax.random.key(0), 2)
    st = tx.init(params)
    for t in range(1, n + 2):
        _, st = tx.update(params, st, params)
        assert float(st.epsilon) == eps[t - 1]


def test_first_step_takes_top_k_by_gradient_norm():
    # t = 1: epsilon_1 = 1, so the epsilon branch; norms [3, 1, 4, 2], p = .5 -> k = 2,
    # S = top 2 = {2, 0}, f = [1, 0, 1, 0]
    tx = adagradselect(labels_for(4), optax.sgd(1.0), pct=0.5, steps_per_epoch=100, seed=7)
    grads = norm_grads([3.0, 1.0, 4.0, 2.0])
    st = tx.init(grads)
    out, st = tx.update(grads, st, grads)
    assert bool(st.explored)
    assert selected_units(st) == {0, 2}
    np.testing.assert_array_equal(st.freq, [1, 0, 1, 0])
    np.testing.assert_allclose(st.scores, [3.0, 1.0, 4.0, 2.0])
    # sgd(1): the update of a selected block is -g, that of the others exactly 0
    np.testing.assert_array_equal(out["blocks"][2]["a"], [-4.0, 0.0])
    np.testing.assert_array_equal(out["blocks"][0]["a"], [-3.0, 0.0])
    np.testing.assert_array_equal(out["blocks"][1]["a"], [0.0, 0.0])
    np.testing.assert_array_equal(out["blocks"][3]["a"], [0.0, 0.0])
    np.testing.assert_array_equal(out["emb"], [-0.5, 0.5])  # other_mode="always"


def test_rms_score_ranks_by_size_normalised_norm():
    # block 0 has 4 coordinates of 1 (L2 2, RMS 1), block 1 one of 1.5 in a 4-coordinate block
    # (L2 1.5, RMS .75), block 2 zero. p = 1/3 -> k = 1: L2 picks block 0, and so does RMS; make
    # block 1 smaller instead: labels put only "a" in block 1, "b" of block 1 is "other".
    labels = {"emb": "other", "blocks": [{"a": "0/a", "b": "0/b"}, {"a": "1/a", "b": "other"}]}
    grads = tree([([1.0, 1.0], [1.0, 1.0]), ([1.2, 1.2], [0.0, 0.0])])
    # L2: block 0 = 2, block 1 = 1.697 -> {0}; RMS: block 0 = 1, block 1 = 1.2 -> {1}
    for score, expected in (("l2", {0}), ("rms", {1})):
        tx = adagradselect(labels, optax.sgd(1.0), pct=0.5, steps_per_epoch=10, score=score)
        _, st = tx.update(grads, tx.init(grads), grads)
        assert selected_units(st) == expected, score


def exploit_state(tx, params, seed, freq, count):
    st = tx.init(params)
    return st._replace(
        count=jnp.int32(count),
        freq=jnp.asarray(freq, jnp.int32),
        key=jax.random.key_data(jax.random.key(seed, impl="threefry2x32")),
    )


def test_exploit_branch_draws_from_the_dirichlet_of_the_counts():
    # t > N so epsilon = 0: pi ~ Dirichlet(1 + f), f = [1000, 0, 0, 1000] puts almost all mass
    # on units 0 and 3, so S = {0, 3} for (nearly) every seed; and S is exactly top_k of the
    # Dirichlet recomputed from the same key (key, k_b, k_d = split(key, 3)).
    freq = [1000, 0, 0, 1000]
    params = norm_grads([3.0, 1.0, 4.0, 2.0])  # the scores would pick {2, 0}
    tx = adagradselect(labels_for(4), optax.sgd(1.0), pct=0.5, steps_per_epoch=2)
    hits = 0
    for seed in range(100):
        st = exploit_state(tx, params, seed, freq, count=5)
        _, new = tx.update(params, st, params)
        assert not bool(new.explored)
        _, _, key_draw = jax.random.split(jax.random.wrap_key_data(st.key), 3)
        pi = jax.random.dirichlet(key_draw, 1.0 + jnp.asarray(freq, jnp.float32))
        assert selected_units(new) == set(np.asarray(jax.lax.top_k(pi, 2)[1]).tolist())
        hits += selected_units(new) == {0, 3}
        np.testing.assert_array_equal(new.freq - st.freq, np.asarray(new.selected, np.int32))
    assert hits >= 99


def test_draw_without_replacement():
    freq = [1000, 0, 0, 1000]
    params = norm_grads([3.0, 1.0, 4.0, 2.0])
    tx = adagradselect(
        labels_for(4), optax.sgd(1.0), pct=0.5, steps_per_epoch=2, draw="without_replacement"
    )
    hits = 0
    for seed in range(50):
        _, new = tx.update(params, exploit_state(tx, params, seed, freq, 5), params)
        assert int(np.sum(new.selected)) == 2  # k distinct units
        hits += selected_units(new) == {0, 3}
    assert hits >= 48  # pi puts ~1 - 1e-3 on units 0 and 3


def adamw_setup(num_b=4, wd=0.1):
    adamw = optax.adamw(0.05, weight_decay=wd)
    params = random_tree(jax.random.key(0), num_b)
    return adamw, params


def test_unselected_blocks_keep_params_and_moments_selected_equal_plain_adamw():
    adamw, params = adamw_setup()
    tx = adagradselect(labels_for(4), adamw, pct=0.5, steps_per_epoch=2, seed=3)
    st = tx.init(params)
    for t in range(3):  # a few steps so that mu and nu are not zero
        grads = random_tree(jax.random.key(10 + t), 4)
        out, st = tx.update(grads, st, params)
        params = optax.apply_updates(params, out)
    grads = random_tree(jax.random.key(99), 4)
    out, new = tx.update(grads, st, params)
    new_params = optax.apply_updates(params, out)
    plain_out, plain_state = adamw.update(grads, st.inner, params)
    chosen = selected_units(new)
    assert len(chosen) == 2
    mu_old, nu_old = st.inner[0].mu, st.inner[0].nu
    mu_new, nu_new = new.inner[0].mu, new.inner[0].nu
    for b in range(4):
        for sub in ("a", "b"):
            if b in chosen:  # bitwise one plain AdamW step from the same state
                np.testing.assert_array_equal(out["blocks"][b][sub], plain_out["blocks"][b][sub])
                np.testing.assert_array_equal(
                    mu_new["blocks"][b][sub], plain_state[0].mu["blocks"][b][sub]
                )
                np.testing.assert_array_equal(
                    nu_new["blocks"][b][sub], plain_state[0].nu["blocks"][b][sub]
                )
            else:  # update exactly 0 (so weight decay is skipped too), state bitwise kept
                np.testing.assert_array_equal(out["blocks"][b][sub], [0.0, 0.0])
                np.testing.assert_array_equal(
                    new_params["blocks"][b][sub], params["blocks"][b][sub]
                )
                np.testing.assert_array_equal(mu_new["blocks"][b][sub], mu_old["blocks"][b][sub])
                np.testing.assert_array_equal(nu_new["blocks"][b][sub], nu_old["blocks"][b][sub])
    # "other" leaves are updated every step (default other_mode="always")
    np.testing.assert_array_equal(out["emb"], plain_out["emb"])
    # Adam's single count advances for everyone (named deviation from torch's per-param step)
    assert int(new.inner[0].count) == int(st.inner[0].count) + 1


def test_nan_gradient_of_unselected_block_does_not_leak():
    adamw, params = adamw_setup(num_b=2)
    tx = adagradselect(labels_for(2), adamw, pct=0.5, steps_per_epoch=10, score="l2")
    st = tx.init(params)
    # exploit branch (t > N) with f = [1000, 0]: pi ~ Dirichlet(1001, 1) picks block 0; block
    # 1's gradient (and so its AdamW update and moments) is NaN
    grads = tree([([5.0, 0.0], [0.0, 0.0]), ([1.0, 0.0], [jnp.nan, 0.0])])
    st = st._replace(count=jnp.int32(20), freq=jnp.asarray([1000, 0], jnp.int32))
    out, new = tx.update(grads, st, params)
    assert selected_units(new) == {0}
    np.testing.assert_array_equal(out["blocks"][1]["b"], [0.0, 0.0])
    np.testing.assert_array_equal(new.inner[0].mu["blocks"][1]["b"], [0.0, 0.0])
    assert np.all(np.isfinite(out["blocks"][0]["a"]))


def test_other_mode_frozen_and_unit():
    adamw, params = adamw_setup(num_b=3)
    grads = random_tree(jax.random.key(5), 3)
    frozen = adagradselect(labels_for(3), adamw, pct=0.3, steps_per_epoch=2, other_mode="frozen")
    st = frozen.init(params)
    out, new = frozen.update(grads, st, params)
    np.testing.assert_array_equal(out["emb"], [0.0, 0.0])
    np.testing.assert_array_equal(new.inner[0].mu["emb"], st.inner[0].mu["emb"])
    assert new.freq.shape == (3,)

    # "unit": U = 4, the "other" unit (index 3) is scored by RMS * sqrt(mean block size).
    # emb = [30, 40]: RMS = sqrt(1250); blocks have 4 coordinates -> score sqrt(1250) * 2
    unit = adagradselect(labels_for(3), adamw, pct=0.25, steps_per_epoch=2, other_mode="unit")
    big_other = tree([([1.0, 0.0], [0.0, 0.0])] * 3, emb=(30.0, 40.0))
    st = unit.init(params)
    assert st.freq.shape == (4,)
    out, new = unit.update(big_other, st, params)
    np.testing.assert_allclose(new.scores, [1.0, 1.0, 1.0, 2 * math.sqrt(1250.0)], rtol=1e-6)
    assert selected_units(new) == {3}  # k = max(1, floor(.25 * 4)) = 1
    assert np.all(np.asarray(out["emb"]) != 0.0)
    for b in range(3):
        np.testing.assert_array_equal(out["blocks"][b]["a"], [0.0, 0.0])
    # score="rms": the "other" unit's score is its plain RMS
    unit_rms = adagradselect(
        labels_for(3), adamw, pct=0.25, steps_per_epoch=2, other_mode="unit", score="rms"
    )
    _, new = unit_rms.update(big_other, unit_rms.init(params), params)
    np.testing.assert_allclose(new.scores, [0.5, 0.5, 0.5, math.sqrt(1250.0)], rtol=1e-6)


def test_moments_advance_masks_only_the_update():
    adamw, params = adamw_setup()
    tx = adagradselect(labels_for(4), adamw, pct=0.25, steps_per_epoch=2, moments="advance")
    st = tx.init(params)
    grads = random_tree(jax.random.key(1), 4)
    out, new = tx.update(grads, st, params)
    plain_out, plain_state = adamw.update(grads, st.inner, params)
    jax.tree.map(np.testing.assert_array_equal, new.inner, plain_state)  # every leaf advanced
    (b,) = selected_units(new)
    for other in set(range(4)) - {b}:
        np.testing.assert_array_equal(out["blocks"][other]["a"], [0.0, 0.0])
    np.testing.assert_array_equal(out["blocks"][b]["a"], plain_out["blocks"][b]["a"])


def run_steps(tx, params, grads_seq, jit=False):
    st = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    outs = []
    for g in grads_seq:
        out, st = update(g, st, params)
        outs.append(out)
    return outs, st


@pytest.mark.slow
def test_jit_scan_and_eager_agree_and_same_seed_same_selection():
    num_b, steps = 3, 4
    adamw, params = adamw_setup(num_b=num_b)
    tx = adagradselect(labels_for(num_b), adamw, pct=0.4, steps_per_epoch=4, seed=11)
    grads_seq = [random_tree(jax.random.key(100 + t), num_b) for t in range(steps)]

    eager_outs, eager_state = run_steps(tx, params, grads_seq)
    jit_outs, st = run_steps(tx, params, grads_seq, jit=True)
    # lax.scan over the stacked gradients
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads_seq)

    def body(state, g):
        out, state = tx.update(g, state, params)
        return state, out

    scan_state, scan_outs = jax.lax.scan(body, tx.init(params), stacked)
    for i in range(steps):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            eager_outs[i],
            jit_outs[i],
        )
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            eager_outs[i],
            jax.tree.map(lambda x, i=i: x[i], scan_outs),
        )
    for a, b in ((eager_state, st), (eager_state, scan_state)):
        np.testing.assert_array_equal(a.freq, b.freq)
        np.testing.assert_array_equal(a.key, b.key)
        np.testing.assert_array_equal(a.selected, b.selected)
    # same seed -> same selections; another seed -> another key
    same_seed = adagradselect(labels_for(num_b), adamw, pct=0.4, steps_per_epoch=4, seed=11)
    _, again = run_steps(same_seed, params, grads_seq, jit=True)
    np.testing.assert_array_equal(again.freq, eager_state.freq)
    np.testing.assert_array_equal(again.selected, eager_state.selected)
    other = adagradselect(labels_for(num_b), adamw, pct=0.4, steps_per_epoch=4, seed=12)
    assert not np.array_equal(other.init(params).key, tx.init(params).key)


def test_explore_rate_over_seeds_is_epsilon_t():
    n, seeds = 10, 2000
    params = norm_grads([3.0, 1.0, 4.0, 2.0])
    tx = adagradselect(labels_for(4), optax.sgd(1.0), pct=0.25, steps_per_epoch=n)
    base = tx.init(params)
    keys = jax.vmap(lambda s: jax.random.key_data(jax.random.key(s, impl="threefry2x32")))(
        jnp.arange(seeds)
    )

    @jax.jit
    def explored_at(count):
        def one(key):
            _, st = tx.update(params, base._replace(count=count, key=key), params)
            return st.explored

        return jax.vmap(one)(keys)

    for t in (1, 2, 4, 6, 9, 10):
        eps = float(adagradselect_epsilon(t, n))
        rate = float(np.mean(explored_at(jnp.int32(t - 1))))
        sigma = math.sqrt(eps * (1 - eps) / seeds)
        assert abs(rate - eps) <= 3 * sigma + 1e-12, (t, rate, eps)


def test_state_dtypes_stats_and_orbax_round_trip(tmp_path):
    adamw, params = adamw_setup(num_b=3)
    tx = adagradselect(labels_for(3), adamw, pct=0.4, steps_per_epoch=5, seed=2)
    st = tx.init(params)
    assert isinstance(st, AdaGradSelectState)
    assert st.key.dtype == jnp.uint32 and st.key.shape == (2,)
    np.testing.assert_array_equal(st.key, jax.random.PRNGKey(2))  # raw PRNGKey(seed)
    assert st.freq.dtype == jnp.int32 and st.selected.dtype == jnp.bool_
    _, st = tx.update(norm_grads([1.0, 3.0, 2.0]), st, params)
    stats = adagradselect_stats(st)
    # t = 1, k = floor(.4 * 3) = 1, top score is block 1
    assert stats == {
        "selected": [1],
        "counts": [0, 1, 0],
        "explored": True,
        "epsilon": 1.0,
        "scores": [1.0, 3.0, 2.0],
    }
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "s", st)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "s", jax.tree.map(ocp.utils.to_shape_dtype_struct, st))
    jax.tree.map(np.testing.assert_array_equal, restored, st)
    # the restored state continues exactly like the original
    g = random_tree(jax.random.key(3), 3)
    a = tx.update(g, st, params)
    b = tx.update(g, restored, params)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pct=0.0), "pct must be in"),
        (dict(pct=1.5), "pct must be in"),
        (dict(steps_per_epoch=1), "steps_per_epoch must be an integer >= 2, got 1"),
        (dict(steps_per_epoch=2.5), "steps_per_epoch must be an integer"),
        (dict(seed=1.0), "seed must be an integer"),
        (dict(epsilon0=0.0), "epsilon0 must be in"),
        (dict(epsilon_decay=0.0), "epsilon_decay must be None or > 0"),
        (dict(dirichlet_alpha=-1.0), "dirichlet_alpha must be > 0"),
        (dict(score="l1"), "score must be one of"),
        (dict(draw="gumbel"), "draw must be one of"),
        (dict(other_mode="sometimes"), "other_mode must be one of"),
        (dict(moments="reset"), "moments must be one of"),
    ],
)
def test_construction_checks(kwargs, message):
    args = dict(pct=0.5, steps_per_epoch=10, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        adagradselect(labels_for(2), optax.sgd(0.1), **args)


def test_inner_must_be_a_transformation_and_unit_mode_needs_other_leaves():
    with pytest.raises(ValueError, match="inner must be an optax.GradientTransformation"):
        adagradselect(labels_for(2), 0.1, pct=0.5, steps_per_epoch=10)
    labels = {"blocks": [{"a": "0/a"}, {"a": "1/a"}]}
    params = {"blocks": [{"a": jnp.zeros(2)}, {"a": jnp.zeros(2)}]}
    tx = adagradselect(labels, optax.sgd(0.1), pct=0.5, steps_per_epoch=10, other_mode="unit")
    with pytest.raises(ValueError, match="other_mode='unit' needs at least one leaf"):
        tx.init(params)


def test_state_from_other_labels_is_rejected():
    params3 = random_tree(jax.random.key(0), 3)
    params2 = random_tree(jax.random.key(0), 2)
    tx3 = adagradselect(labels_for(3), optax.sgd(0.1), pct=0.5, steps_per_epoch=10)
    tx2 = adagradselect(labels_for(2), optax.sgd(0.1), pct=0.5, steps_per_epoch=10)
    with pytest.raises(ValueError, match="state field freq has shape"):
        tx2.update(params2, tx3.init(params3), params2)
