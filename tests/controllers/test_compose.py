"""HACBO/BLAC composed with optax: jit, lax.scan, masked, apply_if_finite, base optimisers,
placement after Adam, dev_grad_fn laziness, bf16, label_by_rules on pytrees and Flax NNX."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hacbo_jax import blac, hacbo, hacbo_multipliers, label_by_rules

NUM_BLOCKS, WIDTH = 3, 4
RULES = [(r"blocks/(\d+)/(w|ln)$", r"\1/\2")]


def init_params(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), NUM_BLOCKS + 1)
    return {
        "emb": jax.random.normal(keys[0], (WIDTH,), dtype),
        "blocks": [
            {
                "w": 0.5 * jax.random.normal(k, (WIDTH, WIDTH), dtype),
                "ln": jnp.ones((WIDTH,), dtype),
            }
            for k in keys[1:]
        ],
    }


def loss(params, batch):
    x, y = batch
    h = x + params["emb"]
    for block in params["blocks"]:
        h = h + jnp.tanh(h @ block["w"]) * block["ln"]
    return jnp.mean((h.astype(jnp.float32) - y) ** 2)


def batch(seed, dtype=jnp.float32):
    kx, ky = jax.random.split(jax.random.key(seed))
    return (jax.random.normal(kx, (8, WIDTH), dtype), jax.random.normal(ky, (8, WIDTH)))


def make_step(tx, dev_batch):
    def step(carry, train_batch):
        params, opt_state = carry
        grads = jax.grad(loss)(params, train_batch)
        updates, opt_state = tx.update(
            grads,
            opt_state,
            params,
            train_grads=grads,
            dev_grad_fn=lambda p: jax.grad(loss)(p, dev_batch),
        )
        return (optax.apply_updates(params, updates), opt_state), None

    return step


@pytest.mark.slow
@pytest.mark.parametrize(
    "controller, dtype",
    [
        (
            lambda labels: hacbo(
                labels, interval=3, patience=2, theta_neg=0.3, debias=True, update_norm_budget=1.0
            ),
            jnp.float32,
        ),
        (lambda labels: hacbo(labels, interval=2, patience=1, theta_neg=0.5), jnp.bfloat16),
        (lambda labels: blac(labels, interval=3, freeze_after=6), jnp.float32),
    ],
)
def test_state_invariants_under_jit_and_scan(controller, dtype):
    params = init_params(dtype)
    tx = optax.chain(optax.adamw(1e-2), controller(lambda p: label_by_rules(p, RULES)))
    opt_state = tx.init(params)
    num_steps = 30
    xs, ys = batch(1, dtype)
    train_batches = (
        jnp.broadcast_to(xs, (num_steps,) + xs.shape)
        * jnp.linspace(-1, 1, num_steps, dtype=dtype)[:, None, None],
        jnp.broadcast_to(ys, (num_steps,) + ys.shape),
    )
    run = jax.jit(lambda c, b: jax.lax.scan(make_step(tx, batch(2, dtype)), c, b)[0])
    new_params, new_state = run((params, opt_state), train_batches)
    chex.assert_trees_all_equal_shapes_and_dtypes(opt_state, new_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(params, new_params)
    chex.assert_tree_all_finite((new_params, new_state))
    ctrl = new_state[1]
    assert int(ctrl.count) == num_steps
    assert all(x.dtype in (jnp.float32,) for x in (ctrl.agreement, ctrl.layer_weights, ctrl.cosine))
    np.testing.assert_allclose(ctrl.layer_weights.sum(), 1.0, rtol=1e-5)
    assert np.all(np.asarray(ctrl.agreement) >= 0)
    assert np.all(np.abs(np.asarray(ctrl.cosine)) <= 1 + 1e-6)


def test_dev_grad_fn_runs_only_on_measurement_steps():
    calls = []
    params = init_params()
    tx = optax.chain(optax.adamw(1e-2), hacbo(lambda p: label_by_rules(p, RULES), interval=3))
    dev = batch(2)

    def dev_grad_fn(p):
        jax.debug.callback(lambda: calls.append(1))
        return jax.grad(loss)(p, dev)

    @jax.jit
    def step(params, opt_state, train_batch):
        grads = jax.grad(loss)(params, train_batch)
        updates, opt_state = tx.update(
            grads, opt_state, params, train_grads=grads, dev_grad_fn=dev_grad_fn
        )
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for _ in range(7):
        params, opt_state = step(params, opt_state, batch(1))
    jax.effects_barrier()
    assert len(calls) == 2  # t = 3 and t = 6
    # and a NaN dev gradient cannot leak into ordinary steps
    nan_fn = lambda p: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), p)
    g = jax.grad(loss)(params, batch(1))
    updates, _ = jax.jit(lambda s: tx.update(g, s, params, train_grads=g, dev_grad_fn=nan_fn))(
        opt_state
    )  # t = 8: not a measurement step
    chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize(
    "base",
    [lambda: optax.adamw(1e-2), lambda: optax.sgd(0.1), lambda: optax.lion(1e-3)],
    ids=["adamw", "sgd", "lion"],
)
def test_any_base_optimiser_gets_scaled_after(base):
    params = init_params()
    grads = jax.grad(loss)(params, batch(1))
    labels = label_by_rules(params, RULES)
    tx = optax.chain(base(), hacbo(labels, interval=5))
    updates, _ = jax.jit(lambda s: tx.update(grads, s, params, train_grads=grads, dev_grads=grads))(
        tx.init(params)
    )
    base_updates, _ = base().update(grads, base().init(params), params)
    # first step, no measurement: multiplier 1/M = 1/2 on controlled leaves, emb unchanged
    np.testing.assert_allclose(updates["emb"], base_updates["emb"], rtol=1e-6)  # jit vs eager
    for got, want in zip(updates["blocks"], base_updates["blocks"]):
        np.testing.assert_allclose(got["w"], 0.5 * want["w"], rtol=1e-6)


@pytest.mark.slow
def test_masked_with_compatible_extra_args():
    params = init_params()
    labels = label_by_rules(params, RULES)
    mask = jax.tree.map(lambda label: label != "other", labels)
    masked_tx = optax.chain(
        optax.adamw(1e-2),
        optax.masked(hacbo(labels, interval=2), mask, mask_compatible_extra_args=True),
    )
    plain_tx = optax.chain(optax.adamw(1e-2), hacbo(labels, interval=2))

    def run(tx):
        def step(state, seeds):
            grads = jax.grad(loss)(params, batch(seeds[0]))
            dev = jax.grad(loss)(params, batch(seeds[1]))
            return tx.update(grads, state, params, train_grads=grads, dev_grads=dev)[::-1]

        _, updates = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(8).reshape(4, 2)))(
            tx.init(params)
        )
        return jax.tree.map(lambda u: u[-1], updates)

    chex.assert_trees_all_close(run(masked_tx), run(plain_tx), rtol=1e-6)


def test_apply_if_finite_skips_nonfinite_steps():
    params = init_params()
    labels = label_by_rules(params, RULES)
    tx = optax.apply_if_finite(optax.chain(optax.adamw(1e-2), hacbo(labels, interval=1)), 3)
    grads = jax.grad(loss)(params, batch(1))
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads)
    update = jax.jit(lambda s, g: tx.update(g, s, params, train_grads=g, dev_grads=g))
    state = tx.init(params)
    updates, state = update(state, bad)
    assert int(state.inner_state[1].count) == 0
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, grads))
    updates, state = update(state, grads)
    assert int(state.inner_state[1].count) == 1
    chex.assert_tree_all_finite(updates)


def test_per_group_factor_before_adam_is_cancelled_after_is_not():
    params = init_params()
    labels = label_by_rules(params, RULES)
    controller = hacbo(labels, interval=1000)  # no measurement: fixed multipliers
    weights = jnp.asarray([0.1, 0.3, 0.6])  # non-uniform layer weights -> factors 3 w / 2

    def with_weights(opt_state, index):
        states = list(opt_state)
        states[index] = states[index]._replace(layer_weights=weights)
        return tuple(states)

    def run(tx, index):
        state = with_weights(tx.init(params), index)
        update = jax.jit(lambda g, s: tx.update(g, s, params, train_grads=g, dev_grads=g))
        for seed in range(3):
            updates, state = update(jax.grad(loss)(params, batch(seed)), state)
        return updates, state[index]

    adam = lambda: optax.adam(1e-2, eps=1e-12)
    state, adam_update = adam().init(params), jax.jit(adam().update)
    for seed in range(3):
        adam_alone, state = adam_update(jax.grad(loss)(params, batch(seed)), state)

    before, _ = run(optax.chain(controller, adam()), 0)
    after, ctrl_state = run(optax.chain(adam(), controller), 1)
    factors = np.asarray(hacbo_multipliers(ctrl_state))[:, 0]
    np.testing.assert_allclose(factors, 3 * np.asarray(weights) / 2, rtol=1e-6)
    for b in range(NUM_BLOCKS):
        # before Adam: m / sqrt(v) is invariant to a constant factor -> same as Adam alone
        np.testing.assert_allclose(
            before["blocks"][b]["w"], adam_alone["blocks"][b]["w"], rtol=1e-4, atol=1e-9
        )
        # after Adam: the factor survives
        np.testing.assert_allclose(
            after["blocks"][b]["w"], factors[b] * adam_alone["blocks"][b]["w"], rtol=1e-5, atol=1e-9
        )


def test_label_by_rules_first_match_default_and_errors():
    params = {"embed": 0, "layers": [{"attn": {"q": 1, "o": 2}, "mlp": 3}] * 2}
    labels = label_by_rules(
        params,
        [
            (r"layers/(\d+)/attn/o", r"\1/attn_out"),
            (r"layers/(\d+)/attn/", r"\1/attn_qkv"),
            (r"layers/(\d+)/mlp", r"\1/mlp"),
        ],
        default="none",
    )
    assert labels == {
        "embed": "none",
        "layers": [
            {"attn": {"q": f"{i}/attn_qkv", "o": f"{i}/attn_out"}, "mlp": f"{i}/mlp"}
            for i in range(2)
        ],
    }
    with pytest.raises(ValueError, match="compile"):
        label_by_rules(params, [(r"layers/(\d+", r"\1/x")])
    with pytest.raises(ValueError, match="pair"):
        label_by_rules(params, [r"layers/(\d+)"])


@pytest.mark.slow
def test_flax_nnx_state_params():
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.mlp = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
            self.ln = nnx.LayerNorm(WIDTH, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(5, WIDTH, rngs=rngs)
            self.layers = nnx.List([Block(rngs) for _ in range(2)])

        def __call__(self, ids):
            h = self.embed(ids)
            for layer in self.layers:
                h = h + layer.mlp(layer.ln(h))
            return jnp.mean(h**2)

    graphdef, params = nnx.split(Model(nnx.Rngs(0)), nnx.Param)
    labels = lambda p: label_by_rules(p, [(r"layers/(\d+)/(mlp|ln)/", r"\1/\2")])
    tx = optax.chain(optax.adamw(1e-2), hacbo(labels, interval=1))
    loss_of = lambda p, ids: nnx.merge(graphdef, p)(ids)
    grads = jax.grad(loss_of)(params, jnp.arange(4))
    updates, state = jax.jit(
        lambda s: tx.update(
            grads,
            s,
            params,
            train_grads=grads,
            dev_grad_fn=lambda p: jax.grad(loss_of)(p, jnp.arange(1, 5)),
        )
    )(tx.init(params))
    assert state[1].curvature.shape == (2, 2)
    chex.assert_trees_all_equal_structs(updates, params)
    new_params = optax.apply_updates(params, updates)
    chex.assert_tree_all_finite(new_params)


@pytest.mark.parametrize("controller", [hacbo, blac])
def test_a_dev_gradient_of_the_controlled_leaves_measures_like_the_full_one(controller):
    # controlled_leaves marks what the controller reads; the dev gradient taken with respect to
    # those leaves only (the others constants: None in the gradient, an empty sketch) measures
    # exactly as the full dev gradient does.
    from hacbo_jax import controlled_leaves, dev_sign_sketch
    from hacbo_jax.trainer.step import restrict_to_controlled

    params = init_params()
    labels = label_by_rules(params, RULES)
    controlled = controlled_leaves(labels, params)
    assert controlled["emb"] is False
    assert all(block["w"] and block["ln"] for block in controlled["blocks"])

    tx = controller(labels, interval=1)
    state = tx.init(params)
    grads = jax.grad(loss)(params, batch(0))
    full_dev = jax.grad(loss)(params, batch(1))
    loss_of_part, part = restrict_to_controlled(loss, params, controlled)
    assert part["emb"] is None
    part_dev = jax.grad(loss_of_part)(part, batch(1))
    assert part_dev["emb"] is None
    chex.assert_trees_all_close(part_dev["blocks"], full_dev["blocks"])
    sketch = dev_sign_sketch(part_dev, controlled)
    assert sketch["emb"].shape == (0, 0) and sketch["emb"].dtype == jnp.uint8

    update = jax.jit(lambda d: tx.update(grads, state, params, train_grads=grads, dev_grads=d))
    want_updates, want_state = update(full_dev)
    got_updates, got_state = update(sketch)
    chex.assert_trees_all_equal(got_updates, want_updates)
    chex.assert_trees_all_equal(got_state, want_state)


def test_controlled_leaves_of_a_stacked_label_tree():
    from hacbo_jax import controlled_leaves

    params = {"emb": jnp.zeros(3), "layers": {"w": jnp.zeros((4, 3, 3)), "ln": jnp.zeros((4, 3))}}
    labels = {"emb": "other", "layers": {"w": "*/w", "ln": "*/ln"}}
    assert controlled_leaves(labels, params) == {
        "emb": False,
        "layers": {"w": True, "ln": True},
    }
    with pytest.raises(ValueError, match="nothing to control"):
        controlled_leaves({"emb": "other", "layers": {"w": "x", "ln": "y"}}, params)
