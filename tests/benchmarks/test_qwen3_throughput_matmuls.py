"""The matmul-bound limit that ``benchmarks/qwen3_throughput.py`` prints is only as good as its
list of the step's matmuls and their PyTorch equivalents: check both."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import qwen3_throughput as bench  # noqa: E402

DOT_CASES = [
    # plain projection, a weight gradient (contract the two leading axes), batched attention
    ((8, 16, 32), (32, 12), (((2,), (0,)), ((), ()))),
    ((8, 16, 40), (8, 16, 32), (((0, 1), (0, 1)), ((), ()))),
    ((2, 16, 3, 8), (2, 3, 2, 16, 16), (((1,), (3,)), ((0, 2), (0, 1)))),
]


@pytest.mark.parametrize("lhs, rhs, dims", DOT_CASES)
def test_the_torch_einsum_of_a_dot_general_computes_the_same_product(lhs, rhs, dims):
    rng = np.random.RandomState(0)
    a = rng.standard_normal(lhs).astype(np.float32)
    b = rng.standard_normal(rhs).astype(np.float32)
    want = np.asarray(jax.lax.dot_general(a, b, dims))
    got = torch.einsum(
        bench.torch_einsum_spec(lhs, rhs, dims), torch.from_numpy(a), torch.from_numpy(b)
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("lhs, rhs, dims", DOT_CASES)
def test_dot_flops_is_twice_the_multiply_adds(lhs, rhs, dims):
    # by hand: out elements x contracted length x 2
    out = jax.eval_shape(
        lambda a, b: jax.lax.dot_general(a, b, dims),
        jax.ShapeDtypeStruct(lhs, jnp.float32),
        jax.ShapeDtypeStruct(rhs, jnp.float32),
    ).shape
    contracted = np.prod([lhs[i] for i in dims[0][0]])
    assert bench.dot_flops(lhs, rhs, dims) == 2 * np.prod(out) * contracted


def test_step_matmuls_finds_every_dot_including_those_in_scans_and_gradients():
    w = jnp.ones((4, 6, 6))  # a scan over 4 stacked layers

    def loss(w, x):
        def body(h, wi):
            return jnp.tanh(h @ wi), None

        h, _ = jax.lax.scan(body, x, w)
        return (h @ jnp.ones((6, 3))).sum()

    matmuls = bench.step_matmuls(jax.grad(loss), w, jnp.ones((5, 6)))
    total = sum(n for *_, n in matmuls)
    # forward: 4 layer products + the head; backward: 2 per layer (input and weight) + the head's
    # input gradient (the head's weight is a constant)
    assert total == 4 + 1 + 2 * 4 + 1
    flops = sum(bench.dot_flops(lhs, rhs, dims) * n for lhs, rhs, dims, n in matmuls)
    assert flops == 2 * (3 * 4 * 5 * 6 * 6 + 2 * 5 * 6 * 3)
