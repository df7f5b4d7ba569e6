"""The model's skippable weight gradients: a decoder layer flagged False gets zero projection
kernel gradients, and everything else (input gradients, the other layers, norms, biases,
embeddings) is the plain model's gradient, for unrolled and scanned layers and every remat
mode; the skip happens at run time inside one compiled program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, einsum_skippable_weight_grad

CONFIG = Qwen3Config(
    vocab_size=61,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    attention_bias=True,
    initializer_range=0.2,
)
KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _model(scan: bool, remat: str) -> Qwen3ForCausalLM:
    return Qwen3ForCausalLM(CONFIG, scan_layers=scan, remat=remat, rngs=nnx.Rngs(3))


def _grads(model: Qwen3ForCausalLM, weight_grads, *, packed: bool = False):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rs = np.random.RandomState(0)
    ids = jnp.asarray(rs.randint(0, CONFIG.vocab_size, (2, 7)), jnp.int32)
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)

    @jax.jit
    def grad_fn(params, flags):
        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            kwargs = {"segment_ids": segments} if packed else {}
            h = m.hidden_states(ids, weight_grads=flags, **kwargs)
            return jnp.sum(jnp.sin(m.lm_logits(h)))

        return jax.grad(loss)(params)

    return nnx.to_pure_dict(grad_fn(params, weight_grads))


def _layer_leaves(grads, scan: bool, layer: int):
    """(path, array) of layer ``layer``'s leaves (a slice of the stacked ones when scanned)."""
    layers = grads["model"]["layers"]
    tree = jax.tree.map(lambda x: x[layer], layers) if scan else layers[layer]
    return jax.tree_util.tree_flatten_with_path(tree)[0]


@pytest.mark.parametrize(
    "scan, remat",
    [
        pytest.param(True, "full", marks=pytest.mark.slow),
        pytest.param(False, "none", marks=pytest.mark.slow),
        pytest.param(False, "dots", marks=pytest.mark.slow),
        pytest.param(True, "none", marks=pytest.mark.slow),
    ],
)
def test_all_true_flags_give_the_plain_gradient_bitwise(scan, remat):
    model = _model(scan, remat)
    plain = _grads(model, None)
    flagged = _grads(model, jnp.ones([CONFIG.num_hidden_layers], bool))
    jax.tree.map(np.testing.assert_array_equal, plain, flagged)


@pytest.mark.parametrize(
    "scan, packed",
    [
        (True, True),
        pytest.param(False, False, marks=pytest.mark.slow),
        pytest.param(False, True, marks=pytest.mark.slow),
        pytest.param(True, False, marks=pytest.mark.slow),
    ],
)
def test_a_false_layer_gets_zero_kernel_gradients_and_nothing_else_changes(scan, packed):
    model = _model(scan, "full")
    plain = _grads(model, None, packed=packed)
    flags = jnp.asarray([True, False, True])
    skipped = _grads(model, flags, packed=packed)
    for layer in range(CONFIG.num_hidden_layers):
        for (path, got), (_, want) in zip(
            _layer_leaves(skipped, scan, layer), _layer_leaves(plain, scan, layer)
        ):
            name = jax.tree_util.keystr(path)
            if layer == 1 and any(k in name for k in KERNELS) and "kernel" in name:
                assert not np.any(np.asarray(want) == 0), name  # the plain gradient is nonzero
                np.testing.assert_array_equal(got, np.zeros_like(want), err_msg=name)
            else:  # other layers, and the skipped layer's norms and biases: the plain gradient
                np.testing.assert_array_equal(got, want, err_msg=name)
    np.testing.assert_array_equal(
        skipped["model"]["embed_tokens"]["weight"], plain["model"]["embed_tokens"]["weight"]
    )


def test_flags_are_data_one_compiled_program_serves_every_selection():
    model = _model(True, "full")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.ones((1, 5), jnp.int32)
    traces = []

    @jax.jit
    def grad_fn(params, flags):
        traces.append(1)
        loss = lambda p: jnp.sum(
            nnx.merge(graphdef, p, rest).hidden_states(ids, weight_grads=flags)
        )
        return jax.grad(loss)(params)

    for flags in ([True, True, True], [False, True, False], [False, False, False]):
        grad_fn(params, jnp.asarray(flags))
    assert len(traces) == 1


def test_kernel_gradient_sits_under_a_conditional_in_the_compiled_backward():
    x = jnp.ones((2, 3, 4))
    w = jnp.ones((4, 5))
    grad = jax.jit(
        jax.grad(lambda w, flag: jnp.sum(einsum_skippable_weight_grad("BTD,DF->BTF", x, w, flag)))
    )
    hlo = grad.lower(w, jnp.asarray(True)).compile().as_text()
    assert "conditional" in hlo
    np.testing.assert_array_equal(grad(w, jnp.asarray(False)), np.zeros((4, 5)))
    np.testing.assert_allclose(grad(w, jnp.asarray(True)), np.full((4, 5), 6.0))


def test_weight_grads_of_the_wrong_length_are_refused():
    model = _model(False, "none")
    with pytest.raises(ValueError, match=r"bool\[3\]"):
        model.hidden_states(jnp.ones((1, 4), jnp.int32), weight_grads=jnp.ones([2], bool))
