"""data.packing: packed training steps see the same examples and compute the padded loss and
gradient; the packer's real-token fraction on GSM8K."""

from __future__ import annotations

from hacbo_jax.assets import ASSETS_DIR

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hacbo_jax.data.packing import first_fit_decreasing, pack_examples
from hacbo_jax.data import gsm8k as data_lib
from hacbo_jax.trainer.config import load_config
from hacbo_jax.data.packing import StepPacker, _best_buckets, pack_split
from hacbo_jax.trainer.run_parts import arrays_of, build_run
from hacbo_jax.trainer.step import Batch, PackedRows, _mean_gradient, make_loss_fn
from support.runs import CONFIG, quick_overrides
from support.checkpoints import make_tiny_checkpoint

FIELDS = ("input_ids", "targets", "loss_mask")
ASSETS = ASSETS_DIR


@pytest.fixture(scope="module", autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def packed_parts(tmp_path_factory):
    model_dir = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_model"))
    out = tmp_path_factory.mktemp("run")
    # 256-token rows: the tiny tokenizer makes ~100-token examples, so rows hold two or more
    extra = ("data.packing=true", "model.scan_layers=true", "data.max_len=256")
    overrides = quick_overrides(model_dir, out, *extra)
    return build_run(load_config(CONFIG, overrides))


def _padded(parts, indices) -> Batch:
    accum = parts.cfg.optim.accumulation_steps
    arrays = arrays_of(parts.train_arrays.take(np.asarray(indices)))
    return Batch(*(jnp.asarray(x.reshape(accum, -1, x.shape[-1])) for x in arrays))


def max_rows_needed(parts) -> int:
    """The most packed rows any batch of the run needs (first-fit decreasing), by brute force."""
    sampler = data_lib.EpochSampler(len(parts.task.train), 8, seed=0)
    return max(
        len(pack_examples_of(parts, sampler.next_indices()).rows) for _ in range(parts.total_steps)
    )


def pack_examples_of(parts, indices):
    arrays = parts.train_arrays
    return pack_examples(
        [
            {k: getattr(arrays, k)[i, : arrays.attention_mask[i].sum()] for k in FIELDS}
            for i in indices
        ],
        parts.cfg.data.max_len,
    )


def test_packed_rows_hold_exactly_the_steps_examples(packed_parts):
    parts = packed_parts
    packer = parts.packer
    assert (parts.cfg.optim.accumulation_steps, parts.micro_batch_size) == (2, 4)
    accum = packer.accumulation_steps
    # fewer computed rows than the padded 2 x 4, in micro-batches of at most 4 rows
    assert accum * packer.rows < 8 and packer.rows <= 4
    indices = data_lib.EpochSampler(len(parts.task.train), 8, seed=0).next_indices()
    batch, tokens = parts.device_batch(indices)
    assert isinstance(batch, PackedRows)
    assert batch.input_ids.shape == (accum, packer.rows, parts.cfg.data.max_len)
    arrays = parts.train_arrays
    assert tokens == int(arrays.attention_mask[indices].sum())
    assert float(np.sum(batch.loss_mask)) == float(arrays.loss_mask[indices].sum())
    # every example appears once, whole, as one segment starting at position 0
    seqs = sorted(
        tuple(arrays.input_ids[i, : arrays.attention_mask[i].sum()].tolist()) for i in indices
    )
    found = []
    ids, seg = np.asarray(batch.input_ids), np.asarray(batch.segment_ids)
    pos = np.asarray(batch.positions)
    for a in range(accum):
        for r in range(packer.rows):
            for s in set(seg[a, r].tolist()) - {0}:
                cols = seg[a, r] == s
                assert pos[a, r, cols].tolist() == list(range(int(cols.sum())))
                found.append(tuple(ids[a, r, cols].tolist()))
    assert sorted(found) == seqs
    # the bound holds for every batch of the run, and a step that cannot fit is refused
    sampler = data_lib.EpochSampler(len(parts.task.train), 8, seed=0)
    for _ in range(parts.total_steps):
        packer.pack(sampler.next_indices())
    needed = max_rows_needed(parts)  # no slack beyond the run's fullest batch (rounded)
    assert needed <= accum * packer.rows < needed + accum
    small = StepPacker(arrays, 0, accumulation_steps=1, rows=1)
    with pytest.raises(ValueError, match="packed rows"):
        small.pack(indices)
    assert 0 < packer.real_fraction <= 1


@pytest.mark.slow  # ~45 s each on the loaded 2-core machine (a packed and a padded compile)
@pytest.mark.parametrize("logits_chunk", [None, 16])
def test_packed_loss_and_gradient_equal_padded(packed_parts, logits_chunk):
    parts = packed_parts
    indices = data_lib.EpochSampler(len(parts.task.train), 8, seed=0).next_indices()
    packed, _ = parts.device_batch(indices)
    loss_fn = make_loss_fn(parts.graphdef, parts.rest, logits_chunk=logits_chunk)
    mean_gradient = jax.jit(lambda p, b: _mean_gradient(loss_fn, p, b))
    ref_loss, ref_count, ref_grads = mean_gradient(parts.state.params, _padded(parts, indices))
    loss, count, grads = mean_gradient(parts.state.params, packed)
    assert float(count) == float(ref_count) > 0
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for (path, g), r in zip(
        jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads), strict=True
    ):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # two compilations of the full HACBO step (~1 min on the loaded 2-core machine)
def test_packed_step_with_controller_and_padded_dev_batch_equals_padded_step(packed_parts):
    """The whole step (HACBO measurement at step 1: the dev batch stays padded)."""
    parts = packed_parts
    indices = data_lib.EpochSampler(len(parts.task.train), 8, seed=0).next_indices()
    packed, _ = parts.device_batch(indices)
    dev = parts.device_dev_buffer()
    fresh = lambda: jax.tree.map(jnp.copy, parts.state)
    ref_state, ref_metrics = parts.train_step(fresh(), _padded(parts, indices), dev)
    state, metrics = parts.train_step(fresh(), packed, dev)
    np.testing.assert_allclose(metrics.loss, ref_metrics.loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # tokenises the 7,473 GSM8K training examples with the Qwen3 tokenizer
def test_gsm8k_real_token_fraction_with_the_qwen3_tokenizer_is_at_least_90_percent():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "qwen3-tokenizer")
    train = data_lib.load_gsm8k_file(ASSETS / "gsm8k" / "train.jsonl")
    arrays = data_lib.tokenize_sft(train, tokenizer, 512)
    packed = pack_split(arrays, 512, pad_id=tokenizer.pad_token_id)
    fraction = float(np.count_nonzero(packed.segment_ids) / packed.segment_ids.size)
    padded = float(arrays.attention_mask.mean())
    # the paper configs' steps: 3 epochs of 64 examples, micro-batches of at most 16 rows
    steps = StepPacker.for_run(arrays, batch_size=64, seed=0, total_steps=348, max_rows=16)
    print(
        f"GSM8K train, Qwen3 tokenizer, max_len 512: real tokens {padded:.1%} of the padded "
        f"slots; packed whole split {fraction:.1%} ({len(packed.rows)} rows); paper-config "
        f"steps {steps.real_fraction:.1%} ({steps.accumulation_steps} x {steps.rows} rows per step)"
    )
    assert fraction >= 0.90
    assert steps.real_fraction > 2 * padded
    # with the paper configs' data.packing_shapes = 4 row buckets, the steps themselves pass 90%
    buckets = StepPacker.for_run(
        arrays, batch_size=64, seed=0, total_steps=348, max_rows=16, max_shapes=4
    )
    print(
        f"paper-config steps with 4 row buckets {buckets.real_fraction:.1%} "
        f"({buckets.accumulation_steps} x {buckets.shapes} rows per step)"
    )
    assert len(buckets.shapes) <= 4 and buckets.shapes[-1] == steps.rows
    assert buckets.real_fraction >= 0.90


@pytest.mark.parametrize(
    ("max_shapes", "buckets"),
    [(1, (8,)), (2, (3, 8)), (3, (2, 5, 8)), (4, (2, 3, 5, 8)), (5, (2, 3, 5, 8))],
)
def test_row_buckets_by_hand(max_shapes, buckets):
    # steps needing 2, 2, 3, 5, 5, 8 rows: one shape costs 6 x 8 = 48 slots; two: {3, 8} and
    # {5, 8} both cost 33 (the tie goes to the smaller tuple); three: {2, 5, 8} and {3, 5, 8}
    # cost 27 ({2, 3, 8}: 31); four: 2 + 2 + 3 + 5 + 5 + 8 = 25, and a fifth adds nothing.
    assert _best_buckets([2, 2, 3, 5, 5, 8], 8, max_shapes) == buckets


def test_each_step_takes_the_smallest_bucket_that_fits():
    # 16 examples, 8 of 6 tokens and 8 of 2, rows of 10, steps of 4: a step needs 1 to 4 rows
    lengths = np.array([6] * 8 + [2] * 8)
    mask = (np.arange(10)[None] < lengths[:, None]).astype(np.int32)
    ids = mask * np.arange(1, 17)[:, None]
    arrays = data_lib.SFTArrays(ids, mask, ids, mask.astype(np.float32), 0)
    single = StepPacker.for_run(arrays, batch_size=4, seed=0, total_steps=8, max_rows=8)
    packer = StepPacker.for_run(
        arrays, batch_size=4, seed=0, total_steps=8, max_rows=8, max_shapes=2
    )
    assert len(packer.shapes) == 2 and packer.rows == single.rows
    assert packer.real_fraction > single.real_fraction
    sampler = data_lib.EpochSampler(16, 4, seed=0)
    seen = set()
    for _ in range(8):
        indices = sampler.next_indices()
        needed = len(first_fit_decreasing(lengths[indices], 10))
        packed = packer.pack(indices)
        rows = packed["segment_ids"].shape[1]
        assert rows == min(b for b in packer.shapes if b >= needed)
        assert np.count_nonzero(packed["segment_ids"]) == lengths[indices].sum()
        seen.add(rows)
    assert seen == set(packer.shapes)


def _uniform_arrays(n: int, length: int, max_len: int) -> data_lib.SFTArrays:
    mask = np.zeros((n, max_len), np.int32)
    mask[:, :length] = 1
    ids = mask * np.arange(1, n + 1)[:, None]
    return data_lib.SFTArrays(ids, mask, ids, mask.astype(np.float32), 0)


@pytest.mark.parametrize(
    ("length", "max_rows", "multiple", "layout"),
    [
        (6, 8, 1, (1, 8)),  # one example per row: 8 rows needed, one micro-batch holds them
        (6, 3, 1, (4, 2)),  # 3 x 3 = 9 slots vs 4 x 2 = 8 (5 x 2 = 10, 6 x 2 = 12)
        (6, 4, 4, (2, 4)),  # rows a multiple of 4
        (3, 2, 1, (3, 1)),  # three per row: 3 rows needed; 2 x 2 = 4 vs 3 x 1 = 3
        (3, 8, 2, (1, 4)),  # 3 rows rounded up to the 2 devices
    ],
)
def test_step_layout_by_hand(length, max_rows, multiple, layout):
    arrays = _uniform_arrays(16, length, 10)
    packer = StepPacker.for_run(
        arrays, batch_size=8, seed=0, total_steps=2, max_rows=max_rows, row_multiple=multiple
    )
    assert (packer.accumulation_steps, packer.rows) == layout
    assert packer.real_fraction == pytest.approx(8 * length / (layout[0] * layout[1] * 10))
    packed = packer.pack(np.arange(8))
    assert packed["segment_ids"].shape == (*layout, 10)
    assert np.count_nonzero(packed["segment_ids"]) == 8 * length
    with pytest.raises(ValueError, match="max_rows=3, row_multiple=2"):
        StepPacker.for_run(arrays, batch_size=8, seed=0, total_steps=1, max_rows=3, row_multiple=2)


def test_runs_at_two_rates_lower_to_the_same_step_programs(tmp_path):
    """A learning-rate grid's cells (here HACBO's) compile the same training step, so JAX's
    persistent cache serves every cell after the first: the rate lives in the optimiser state
    (``build_optimizer(peak_lr=...)``), not in the program."""
    model_dir = make_tiny_checkpoint(tmp_path / "tiny_model")

    def step_texts(lr):
        overrides = quick_overrides(model_dir, tmp_path / f"run_{lr}", f"optim.lr={lr!r}")
        parts = build_run(load_config(CONFIG, overrides))
        indices = data_lib.EpochSampler(len(parts.task.train), 8, seed=0).next_indices()
        batch, _ = parts.device_batch(indices)
        dev_buffer = parts.device_dev_buffer()
        assert parts.cfg.controller.kind == "hacbo"
        return parts.train_steps.ordinary.lower(parts.state, batch, dev_buffer).as_text()

    assert step_texts(1e-3) == step_texts(3e-3)
