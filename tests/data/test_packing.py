"""Packing: the first-fit-decreasing packer, and packed rows computing exactly what padding does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, positions_from_segments
from hacbo_jax.data.packing import first_fit_decreasing, pack_examples, real_token_fraction

CFG = Qwen3Config(
    vocab_size=61,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    initializer_range=0.2,
)


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def _examples(lengths, seed=0):
    rs = np.random.RandomState(seed)
    out = []
    for n in lengths:
        ids = rs.randint(1, CFG.vocab_size, n + 1)
        mask = np.zeros(n, np.float32)
        mask[n // 2 :] = 1.0  # the "answer" is the second half
        out.append({"input_ids": ids[:-1], "targets": ids[1:], "loss_mask": mask})
    return out


def test_first_fit_decreasing_by_hand():
    # sorted: 6 (i1), 5 (i3), 4 (i0), 3 (i4), 2 (i2), 2 (i5); max_len 8
    # 6 -> bin0 (room 2); 5 -> bin1 (3); 4 -> bin2 (4); 3 -> bin1 (0); 2 -> bin0 (0); 2 -> bin2 (2)
    assert first_fit_decreasing([4, 6, 2, 5, 3, 2], 8) == [[1, 2], [3, 4], [0, 5]]
    assert first_fit_decreasing([3, 3, 3], 3) == [[0], [1], [2]]
    with pytest.raises(ValueError, match="example 1 has length 9"):
        first_fit_decreasing([2, 9], 8)


def test_pack_examples_layout_by_hand():
    ex = _examples([3, 2, 4])
    packed = pack_examples(ex, 6, pad_id=0)
    # FFD: 4 (i2) -> row0 (room 2); 3 (i0) -> row1 (3); 2 (i1) -> row0 (0)
    assert packed.rows == ((1, 2), (0,))
    np.testing.assert_array_equal(packed.segment_ids, [[1, 1, 2, 2, 2, 2], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(packed.positions, [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0]])
    np.testing.assert_array_equal(
        packed.input_ids[0], np.r_[ex[1]["input_ids"], ex[2]["input_ids"]]
    )
    np.testing.assert_array_equal(packed.targets[1, :3], ex[0]["targets"])
    np.testing.assert_array_equal(packed.loss_mask[1], [0, 1, 1, 0, 0, 0])
    assert real_token_fraction(packed.segment_ids) == 9 / 12
    again = pack_examples(ex, 6, pad_id=0)
    for a, b in zip(packed[:5], again[:5], strict=True):
        np.testing.assert_array_equal(a, b)  # deterministic
    assert packed[5:] == again[5:]


def test_pack_examples_too_long():
    ex = _examples([3, 7, 2])
    with pytest.raises(ValueError, match="example 1 has 7 tokens > max_len=6"):
        pack_examples(ex, 6)
    packed = pack_examples(ex, 6, too_long="drop")
    assert packed.dropped == (1,) and packed.rows == ((0, 2),)


def test_positions_from_segments_restart_per_segment():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def _padded(examples, max_len):
    n = len(examples)
    batch = {k: np.zeros((n, max_len), np.int32) for k in ("input_ids", "targets", "mask")}
    loss_mask = np.zeros((n, max_len), np.float32)
    for i, ex in enumerate(examples):
        m = len(ex["input_ids"])
        batch["input_ids"][i, :m] = ex["input_ids"]
        batch["targets"][i, :m] = ex["targets"]
        batch["mask"][i, :m] = 1
        loss_mask[i, :m] = ex["loss_mask"]
    return batch, loss_mask


def _nll_loss(logits, targets, loss_mask):
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * loss_mask) / jnp.sum(loss_mask)


@pytest.mark.slow
@pytest.mark.parametrize(("scan_layers", "attention_impl"), [(True, "einsum"), (False, "xla")])
def test_packed_loss_and_grad_equal_padded(scan_layers, attention_impl):
    examples = _examples([5, 9, 3, 7, 4, 6], seed=1)
    model = Qwen3ForCausalLM(
        CFG, scan_layers=scan_layers, attention_impl=attention_impl, rngs=nnx.Rngs(3)
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    padded, padded_loss_mask = _padded(examples, 9)
    packed = pack_examples(examples, 12)
    assert len(packed.rows) < len(examples)  # something was actually packed together

    def padded_loss(p):
        m = nnx.merge(graphdef, p, rest)
        logits = m(jnp.asarray(padded["input_ids"]), jnp.asarray(padded["mask"]))
        return _nll_loss(logits, jnp.asarray(padded["targets"]), jnp.asarray(padded_loss_mask))

    def packed_loss(p):
        m = nnx.merge(graphdef, p, rest)
        logits = m(
            jnp.asarray(packed.input_ids),
            segment_ids=jnp.asarray(packed.segment_ids),
            positions=jnp.asarray(packed.positions),
        )
        return _nll_loss(logits, jnp.asarray(packed.targets), jnp.asarray(packed.loss_mask))

    ref_loss, ref_grad = jax.jit(jax.value_and_grad(padded_loss))(params)
    loss, grad = jax.jit(jax.value_and_grad(packed_loss))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for g, r in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("attention_impl", ["einsum", "xla"])
def test_no_attention_across_segments(attention_impl):
    model = Qwen3ForCausalLM(CFG, attention_impl=attention_impl, rngs=nnx.Rngs(4))
    ids = jnp.asarray(np.random.RandomState(2).randint(1, CFG.vocab_size, (1, 12)))
    seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 0, 0]])
    base = model(ids, segment_ids=seg)
    changed = model(ids.at[0, 4:7].set((ids[0, 4:7] + 1) % CFG.vocab_size), segment_ids=seg)
    others = np.asarray(seg[0] != 2) & np.asarray(seg[0] != 0)
    np.testing.assert_array_equal(np.asarray(base)[0, others], np.asarray(changed)[0, others])
    assert np.abs(np.asarray(base - changed)[0, 4:7]).max() > 1e-3  # segment 2 itself changed
    # positions default to per-segment restarts: segment 3 alone equals a fresh 3-token row
    alone = model(ids[:, 7:10])
    np.testing.assert_allclose(np.asarray(base)[0, 7:10], np.asarray(alone)[0], atol=1e-5)
