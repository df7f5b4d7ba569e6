"""Micro-dev buffer refresh rules (docs/algorithm.md, "Micro-dev buffer") with a fake solve_fn."""

import json

import numpy as np
import pytest

from hacbo_jax.data.microdev import MicroDevBuffer


class FakeSolver:
    """Solves exactly the pool indices in ``solved``; records every call."""

    def __init__(self, solved):
        self.solved = set(int(i) for i in solved)
        self.calls = []

    def __call__(self, indices):
        self.calls.append(np.array(indices))
        return np.array([int(i) in self.solved for i in indices])


def make_buffer(**kwargs):
    defaults = dict(
        pool_size=100,
        buffer_size=20,
        refresh_interval=10,
        replace_fraction=0.25,
        max_candidates=None,
        score_chunk=1000,
        seed=3,
    )
    defaults.update(kwargs)
    return MicroDevBuffer(**defaults)


def test_initial_fill_is_distinct_pool_items_and_seeded():
    buffer = make_buffer()
    members = buffer.members
    assert members.shape == (20,) and np.unique(members).size == 20
    assert members.min() >= 0 and members.max() < 100
    np.testing.assert_array_equal(members, make_buffer().members)
    assert not np.array_equal(members, make_buffer(seed=4).members)


def test_refresh_drops_floor_r_solved_and_fills_with_current_failures():
    buffer = make_buffer()
    before = buffer.members
    solved_in_buffer = before[:9]  # 9 solved -> floor(0.25 * 9) = 2 dropped
    outside = np.setdiff1d(np.arange(100), before)
    solver = FakeSolver(list(solved_in_buffer) + list(outside[:40]))  # 40 of 80 outside are solved
    stats = buffer.refresh(10, solver)
    after = buffer.members
    assert (stats.num_solved, stats.num_to_drop, stats.num_replaced) == (9, 2, 2)
    removed = np.setdiff1d(before, after)
    added = np.setdiff1d(after, before)
    assert removed.size == 2 and added.size == 2
    assert set(removed) <= set(solved_in_buffer)  # only solved items are dropped
    assert not (set(added) & solver.solved)  # replacements are currently wrong
    assert not (set(added) & set(before))  # ... and were not in the buffer
    assert np.unique(after).size == 20
    # replacements take the dropped items' places; every other position is unchanged
    changed = np.flatnonzero(before != after)
    assert set(before[changed]) == set(removed) and set(after[changed]) == set(added)
    assert buffer.num_refreshes == 1 and buffer.num_replaced == 2


def test_refresh_only_on_positive_multiples_of_r():
    buffer = make_buffer()
    solver = FakeSolver(range(100))
    assert buffer.refresh(0, solver) is None and buffer.refresh(7, solver) is None
    assert solver.calls == []
    assert buffer.refresh(20, solver) is not None


def test_fewer_wrong_than_needed_keeps_the_other_dropped_items():
    buffer = make_buffer(replace_fraction=1.0)
    before = buffer.members
    outside = np.setdiff1d(np.arange(100), before)
    wrong_outside = outside[:3]
    solver = FakeSolver(set(range(100)) - set(wrong_outside))  # whole buffer solved
    stats = buffer.refresh_now(solver)
    assert (stats.num_solved, stats.num_to_drop, stats.num_wrong, stats.num_replaced) == (
        20,
        20,
        3,
        3,
    )
    after = buffer.members
    assert set(np.setdiff1d(after, before)) == set(wrong_outside)
    assert np.setdiff1d(before, after).size == 3  # 17 of the 20 picked items stay


def test_nothing_solved_scores_no_candidates():
    buffer = make_buffer()
    solver = FakeSolver([])
    stats = buffer.refresh_now(solver)
    assert stats.num_to_drop == 0 and stats.num_scored == 0 and len(solver.calls) == 1


def test_candidate_scoring_is_bounded_and_stops_early():
    buffer = make_buffer(max_candidates=30, score_chunk=7, replace_fraction=1.0)
    before = buffer.members
    solver = FakeSolver(before)  # every outside item is wrong
    stats = buffer.refresh_now(solver)
    assert stats.num_to_drop == 20
    # chunks of 7 until 20 wrong were found: 7 + 7 + 7 = 21 scored
    assert stats.num_scored == 21 and [c.size for c in solver.calls[1:]] == [7, 7, 7]
    buffer = make_buffer(max_candidates=10, score_chunk=4, replace_fraction=1.0)
    before = buffer.members
    solver = FakeSolver(before)
    stats = buffer.refresh_now(solver)
    assert stats.num_scored == 10 and stats.num_replaced == 10  # capped at max_candidates
    assert [c.size for c in solver.calls[1:]] == [4, 4, 2]
    for call in solver.calls[1:]:
        assert np.intersect1d(call, before).size == 0  # candidates are never buffer members


def test_refresh_and_batches_are_deterministic():
    def run():
        buffer = make_buffer()
        solver = FakeSolver(range(0, 100, 2))
        history = []
        for step in range(1, 51):
            buffer.refresh(step, solver)
            history.append(buffer.sample(5))
        return buffer.members, history

    (members_a, hist_a), (members_b, hist_b) = run(), run()
    np.testing.assert_array_equal(members_a, members_b)
    for a, b in zip(hist_a, hist_b):
        np.testing.assert_array_equal(a, b)


def test_sample_draws_distinct_buffer_members():
    buffer = make_buffer()
    batch = buffer.sample(8)
    assert np.unique(batch).size == 8 and set(batch) <= set(buffer.members)
    assert not np.array_equal(batch, buffer.sample(8))
    with pytest.raises(ValueError, match="batch_size"):
        buffer.sample(21)


def test_state_round_trip_through_json_continues_identically():
    solver = FakeSolver(range(0, 100, 3))
    original = make_buffer()
    for step in range(1, 26):
        original.refresh(step, solver)
        original.sample(4)
    state = json.loads(
        json.dumps(
            {
                k: v.tolist() if isinstance(v, np.ndarray) else v
                for k, v in original.state_dict().items()
            }
        )
    )
    restored = make_buffer()
    restored.load_state_dict(state)
    np.testing.assert_array_equal(restored.members, original.members)
    for step in range(26, 61):
        a, b = original.refresh(step, solver), restored.refresh(step, solver)
        assert a == b
        np.testing.assert_array_equal(original.sample(4), restored.sample(4))
    np.testing.assert_array_equal(restored.members, original.members)


def test_bad_arguments_and_state_are_rejected():
    with pytest.raises(ValueError, match="buffer_size"):
        MicroDevBuffer(10, 11)
    with pytest.raises(ValueError, match="replace_fraction"):
        MicroDevBuffer(10, 5, replace_fraction=1.5)
    with pytest.raises(ValueError, match="refresh_interval"):
        MicroDevBuffer(10, 5, refresh_interval=0)
    buffer = make_buffer()
    with pytest.raises(ValueError, match="solve_fn returned shape"):
        buffer.refresh_now(lambda idx: np.ones(3, bool))
    state = buffer.state_dict()
    with pytest.raises(ValueError, match="distinct"):
        buffer.load_state_dict({**state, "members": [0] * 20})
    with pytest.raises(ValueError, match="pool_size"):
        make_buffer(pool_size=99).load_state_dict(state)
