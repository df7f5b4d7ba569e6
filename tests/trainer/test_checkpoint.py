"""train.checkpoint: exact orbax round trips, keep-last-N, clear errors for bad checkpoints."""

import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hacbo_jax.trainer.checkpoint import CheckpointError, Checkpointer
from hacbo_jax.trainer.logs import jsonable


def _params(width=4):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "layers": {"0": {"w": jax.random.normal(k1, (3, width), jnp.bfloat16)}},
        "head": jax.random.normal(k2, (width,), jnp.float32),
    }


def _tx():
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, 1e-3, 2, 10), b1=0.9, b2=0.95, weight_decay=0.1
        ),
    )


def _train_state(width=4, steps=3):
    """params + a real optax.chain(adamw) state after a few updates + typed and raw RNG keys."""
    params, tx = _params(width), _tx()
    opt_state = tx.init(params)
    for i in range(steps):
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return {
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key(7),
        "raw_rng": jax.random.PRNGKey(3),
        "skipped": jnp.int32(2),
    }


def test_round_trip_is_exact(tmp_path):
    state = _train_state()
    meta = {
        "data_position": (1, 64),
        "microdev": {"members": np.arange(4), "seed": np.int64(3)},
        "skipped_steps": 2,
    }
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        assert ck.latest_step() is None
        assert ck.save(30, state, meta)
        ck.wait()
        assert ck.latest_step() == 30
        fresh = _train_state(steps=0)  # the target: same structure, other values
        restored, got_meta = ck.restore(abstract_target=jax.eval_shape(lambda: fresh))
    # structure (NamedTuples of optax included), dtypes and values are identical
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    opt = restored["opt_state"]
    assert isinstance(opt[1][0], optax.ScaleByAdamState) and isinstance(opt[0], optax.EmptyState)
    assert int(opt[1][0].count) == 3
    chex.assert_trees_all_equal_dtypes(restored, state)
    chex.assert_trees_all_equal(
        {k: v for k, v in restored.items() if k != "rng"},
        {k: v for k, v in state.items() if k != "rng"},
    )
    np.testing.assert_array_equal(
        jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"])
    )
    assert got_meta == {
        "data_position": [1, 64],
        "microdev": {"members": [0, 1, 2, 3], "seed": 3},
        "skipped_steps": 2,
        "step": 30,
    }


def test_resumed_optimiser_continues_identically(tmp_path):
    state = _train_state(steps=2)
    with Checkpointer(tmp_path, keep=1, async_save=False) as ck:
        ck.save(2, state)
        restored, _ = ck.restore(2, abstract_target=state)
    tx = _tx()
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), state["params"])
    a, _ = tx.update(grads, state["opt_state"], state["params"])
    b, _ = tx.update(grads, restored["opt_state"], restored["params"])
    chex.assert_trees_all_equal(a, b)


def test_keep_last_n_deletes_old_steps(tmp_path):
    state = _train_state(steps=0)
    with Checkpointer(tmp_path, keep=2) as ck:
        for step in (10, 20, 30, 40):
            ck.save(step, state, {"i": step})
        ck.wait()
        assert ck.all_steps() == [30, 40]
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["30", "40"]
        assert ck.restore(30, abstract_target=state)[1] == {"i": 30, "step": 30}
        assert ck.save(40, state) is False  # an existing step is not rewritten
    # a new manager on the same directory sees the same steps (resume after a restart)
    with Checkpointer(tmp_path, keep=2) as again:
        assert again.latest_step() == 40


def test_restore_in_a_fresh_process(tmp_path):
    """Resume: a new Checkpointer that never saved reads an existing directory."""
    state = _train_state()
    with Checkpointer(tmp_path, keep=2) as ck:
        ck.save(5, state, {"data_position": [0, 64]})
    with Checkpointer(tmp_path, keep=2) as fresh:
        restored, meta = fresh.restore(abstract_target=_train_state(steps=0))
    chex.assert_trees_all_equal(restored["params"], state["params"])
    chex.assert_trees_all_equal(restored["opt_state"], state["opt_state"])
    assert meta == {"data_position": [0, 64], "step": 5}


def test_different_model_shape_is_a_clear_error(tmp_path):
    with Checkpointer(tmp_path, keep=1) as ck:
        ck.save(1, _train_state(width=4))
        with pytest.raises(CheckpointError) as e:
            ck.restore(abstract_target=_train_state(width=6, steps=0))
    msg = str(e.value)
    assert "does not match the restore target" in msg
    assert "params/layers/0/w: stored (3, 4) bfloat16, expected (3, 6) bfloat16" in msg
    assert "opt_state/1/0/mu/head: stored (4,) float32, expected (6,) float32" in msg


def test_dtype_and_structure_mismatch_are_errors(tmp_path):
    state = _train_state()
    with Checkpointer(tmp_path, keep=1) as ck:
        ck.save(1, state)
        as_f32 = jax.tree.map(
            lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, state
        )
        with pytest.raises(
            CheckpointError,
            match=r"params/layers/0/w: stored \(3, 4\) bfloat16, "
            r"expected \(3, 4\) float32",
        ):
            ck.restore(abstract_target=as_f32)
        plain_adam = dict(state, opt_state=optax.adam(1e-3).init(state["params"]))
        with pytest.raises(CheckpointError, match="not in restore target: opt_state/1/0/count"):
            ck.restore(abstract_target=plain_adam)
        extra = dict(state, ema=jnp.zeros(3))
        with pytest.raises(CheckpointError, match="missing in checkpoint: ema"):
            ck.restore(abstract_target=extra)


# orbax may report "Event loop is closed" from a background thread after a failed read
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_missing_and_corrupt_checkpoints(tmp_path):
    state = _train_state(steps=0)
    with Checkpointer(tmp_path / "empty", keep=1) as ck:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            ck.restore(abstract_target=state)
    with Checkpointer(tmp_path / "ck", keep=3) as ck:
        ck.save(1, state)
        ck.save(2, state)
        ck.wait()
        with pytest.raises(CheckpointError, match=r"no checkpoint step 5 .* available: \[1, 2\]"):
            ck.restore(5, abstract_target=state)
        # array data gone (e.g. a partial copy): clear error naming the step
        for d in (tmp_path / "ck" / "2" / "state").rglob("d"):
            shutil.rmtree(d)
        with pytest.raises(CheckpointError, match="step 2 .* incomplete or corrupt"):
            ck.restore(2, abstract_target=state)
        # tree metadata gone
        (tmp_path / "ck" / "1" / "state" / "_METADATA").unlink()
        with pytest.raises(CheckpointError, match="step 1 .* incomplete or corrupt"):
            ck.restore(1, abstract_target=state)
    # an empty step directory (not written by orbax, which renames complete steps into place)
    (tmp_path / "ck" / "7").mkdir()
    with Checkpointer(tmp_path / "ck", keep=3) as ck:
        assert ck.latest_step() == 7
        with pytest.raises(
            CheckpointError,
            match=r"step 7 .* incomplete or corrupt.*delete .*7 "
            r"or restore another step \(available: \[1, 2, 7\]\)",
        ):
            ck.restore(abstract_target=state)


def test_unfinished_temporary_directories_are_ignored(tmp_path):
    state = _train_state(steps=0)
    with Checkpointer(tmp_path, keep=3) as ck:
        ck.save(1, state)
    partial = tmp_path / "5.orbax-checkpoint-tmp-1234"  # a save interrupted before its rename
    partial.mkdir()
    (partial / "junk").write_text("x")
    with Checkpointer(tmp_path, keep=3) as ck:
        assert ck.latest_step() == 1 and ck.all_steps() == [1]


def test_jsonable():
    assert jsonable({"a": (np.int32(1), jnp.float32(0.5)), 2: np.zeros((2,), bool)}) == {
        "a": [1, 0.5],
        "2": [False, False],
    }
