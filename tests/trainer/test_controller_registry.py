"""hacbo_jax.trainer.controller_registry: one table from controller.kind to config section,
transformation, state and log statistics; the config's defaults are the functions' defaults."""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hacbo_jax import adagradselect, blac, hacbo, hacbo_multipliers
from hacbo_jax.trainer.config import Config, ControllerConfig, config_from_dict
from hacbo_jax.trainer.controller_registry import (
    CONTROLLERS,
    AdaGradSelectConfig,
    BLACConfig,
    HACBOConfig,
    build_controller,
    controller_stats,
    controller_warning,
    find_controller_state,
)
from hacbo_jax.trainer.step import build_optimizer, learning_rate_schedule

# Arguments of the transformations that a config does not set: the label tree, and the
# sub-module list (derived from the labels).
# AdaGradSelect's base optimiser is AdamW of ``optim``; steps_per_epoch and seed come from the run.
NOT_CONFIGURED = {"labels", "submodules", "inner", "steps_per_epoch", "seed"}
# Required arguments of a transformation and the config's default for them.
CONFIG_ONLY_DEFAULTS = {"pct": 0.1}  # the blog's 10% (one block of 16 per step)


@pytest.mark.parametrize(
    "config_type, transform",
    [(HACBOConfig, hacbo), (BLACConfig, blac), (AdaGradSelectConfig, adagradselect)],
)
def test_config_defaults_are_the_transformations_defaults(config_type, transform):
    signature = inspect.signature(transform)
    expected = {
        name: CONFIG_ONLY_DEFAULTS[name] if p.default is inspect.Parameter.empty else p.default
        for name, p in signature.parameters.items()
        if name not in NOT_CONFIGURED
    }
    configured = {f.name: f.default for f in dataclasses.fields(config_type)}
    assert configured == expected


def test_every_registered_kind_is_a_config_section_and_an_allowed_kind():
    # every field but the choice of kind and the skip switch is a controller's section
    sections = {f.name for f in dataclasses.fields(ControllerConfig)} - {
        "kind",
        "skip_weight_grads",
    }
    assert sections == {k for k, e in CONTROLLERS.items() if e.config_type is not None}
    for kind in CONTROLLERS:
        assert config_from_dict({"controller": {"kind": kind}}, check_paths=False)
    assert Config().controller.kind == "hacbo"


def test_build_and_stats_use_the_config_section():
    labels = {"a": "0/mlp", "b": "1/mlp"}
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    assert build_controller("none", labels) is None
    hyper = HACBOConfig(interval=1, rho=0.5)
    tx = build_optimizer(
        schedule=learning_rate_schedule(1e-3, 0, 10),
        b1=0.9,
        b2=0.95,
        weight_decay=0.0,
        clip_norm=None,
        controller=build_controller("hacbo", labels, hyper),
    )
    state = tx.init(params)
    found = find_controller_state(state)
    assert type(found).__name__ == "HACBOState"
    stats = controller_stats("hacbo", hyper, state)
    assert stats["kind"] == "hacbo" and stats["l_active"] == 2
    np.testing.assert_allclose(stats["agreement"], np.asarray(found.agreement))
    assert controller_stats("none", None, state) is None
    with pytest.raises(ValueError, match="'none', 'blac', 'hacbo', 'adagradselect'"):
        build_controller("adam", labels)


def _optimizer(controller):
    return build_optimizer(
        schedule=learning_rate_schedule(1e-2, 0, 10),
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        clip_norm=None,
        controller=controller,
    )


def test_hacbo_stats_log_the_applied_multipliers_and_the_counters():
    # K = 1, patience 1, theta_neg 1: the first measurement puts both blocks in probation and
    # (cos = 1 > 0) takes them out again after the update; the applied multipliers are those of
    # the probation step, while hacbo_multipliers(state) gives the next step's.
    labels = {"a": "0/mlp", "b": "1/mlp"}
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    hyper = HACBOConfig(interval=1, rho=0.5, theta_neg=1.0, patience=1, update_norm_budget=1e-3)
    tx = _optimizer(build_controller("hacbo", labels, hyper))
    state = tx.init(params)
    grads = {"a": jnp.full(3, 1.0), "b": jnp.full(3, 2.0)}
    _, state = tx.update(grads, state, params, train_grads=grads, dev_grads=grads)
    found = find_controller_state(state)
    stats = controller_stats("hacbo", hyper, state)
    # a = 0.5 * max(0, 1) = 0.5 per block; both < theta_neg: probation, L_active = 0.
    np.testing.assert_allclose(stats["multipliers"], np.zeros((2, 1)))
    assert not np.allclose(np.asarray(hacbo_multipliers(found, interval=1, rho=0.5)), 0.0)
    assert stats["missed_measurements"] == 0 and stats["skipped_measurements"] == 0
    assert stats["count"] == 1 and 0.0 < stats["budget_scale"] <= 1.0


def test_hacbo_stats_count_a_missed_measurement():
    labels = {"a": "0/mlp", "b": "1/mlp"}
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    hyper = HACBOConfig(interval=1)
    tx = _optimizer(build_controller("hacbo", labels, hyper))
    grads = {"a": jnp.ones(3), "b": jnp.ones(3)}
    _, state = jax.jit(lambda s: tx.update(grads, s, params, train_grads=grads))(tx.init(params))
    assert controller_stats("hacbo", hyper, state)["missed_measurements"] == 1


def test_blac_stats_say_when_every_block_is_frozen():
    labels = {"a": "0/mlp", "b": "1/mlp"}
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    hyper = BLACConfig(interval=1, freeze_after=0, rho=0.5)
    tx = _optimizer(build_controller("blac", labels, hyper))
    state = tx.init(params)
    grads = {"a": jnp.ones(3), "b": -jnp.ones(3)}
    dev = jax.tree.map(jnp.negative, grads)  # cos = -1 everywhere: both blocks freeze
    for _ in range(2):
        _, state = tx.update(grads, state, params, train_grads=grads, dev_grads=dev)
    stats = controller_stats("blac", hyper, state)
    assert stats["frozen"] == [True, True] and stats["all_frozen"] is True
    assert stats["all_frozen_steps"] == 2 and stats["l_active"] == 0
    assert stats["missed_measurements"] == 0


def test_adagradselect_wraps_adamw_and_logs_its_selection():
    labels = {"a": "0/mlp", "b": "1/mlp", "c": "other"}
    params = {"a": jnp.ones(3), "b": jnp.ones(3), "c": jnp.ones(2)}
    hyper = AdaGradSelectConfig(pct=0.5)
    with pytest.raises(ValueError, match="steps_per_epoch, seed"):
        build_controller("adagradselect", labels, hyper)
    wrap = build_controller("adagradselect", labels, hyper, steps_per_epoch=4, seed=0)
    tx = _optimizer(wrap)
    state = tx.init(params)
    grads = {"a": jnp.full(3, 3.0), "b": jnp.full(3, 1.0), "c": jnp.ones(2)}
    updates, state = tx.update(grads, state, params)
    # Step 1 explores (epsilon_1 = 1): the block with the larger gradient norm, block 0.
    assert float(jnp.abs(updates["a"]).sum()) > 0 and float(jnp.abs(updates["b"]).sum()) == 0
    assert float(jnp.abs(updates["c"]).sum()) > 0  # other_mode="always"
    stats = controller_stats("adagradselect", hyper, state)
    assert stats["kind"] == "adagradselect" and stats["selected"] == [0]
    assert stats["counts"] == [1, 0] and stats["explored"] is True and stats["count"] == 1


def test_a_starved_hacbo_state_warns_and_a_healthy_one_does_not():
    labels = {"a": "0/mlp", "b": "0/ln"}
    params = {"a": jnp.ones(3), "b": jnp.ones(3)}
    hyper = HACBOConfig(interval=1, rho=0.1)  # a short EMA: c of "a" falls 10x per step
    tx = _optimizer(build_controller("hacbo", labels, hyper))
    state = tx.init(params)
    grads = {"a": jnp.ones(3), "b": jnp.ones(3)}
    _, state = tx.update(grads, state, params, train_grads=grads, dev_grads=grads)
    assert controller_warning("hacbo", hyper, state) is None  # equal curvature: shares 1/2
    assert controller_stats("hacbo", hyper, state)["min_submodule_share"] == [0.5]
    # Sub-module "a" converged: its curvature EMA is ~0, so 1 / (c + eps) gives it the block.
    starved = {"a": jnp.zeros(3), "b": jnp.ones(3)}
    for _ in range(5):
        _, state = tx.update(starved, state, params, train_grads=starved, dev_grads=grads)
    assert controller_stats("hacbo", hyper, state)["min_submodule_share"][0] < 1e-3
    assert "starvation" in controller_warning("hacbo", hyper, state)


def test_adagradselect_warns_about_blocks_never_selected_after_epoch_one():
    labels = {f"w{b}": f"{b}/mlp" for b in range(4)}
    params = {name: jnp.ones(2) for name in labels}
    hyper = AdaGradSelectConfig(pct=0.25)
    tx = _optimizer(build_controller("adagradselect", labels, hyper, steps_per_epoch=2, seed=0))
    state = tx.init(params)
    grads = {name: jnp.ones(2) for name in labels}
    for _ in range(3):  # steps 1-2 are epoch 1; at step 3 three of the four blocks sat idle
        _, state = tx.update(grads, state, params)
    assert "lock-in" in controller_warning("adagradselect", hyper, state)
    assert controller_warning("blac", BLACConfig(), state) is None  # no BLAC state in it


def test_the_loop_prints_a_controller_warning_once_it_persists(capsys):
    from types import SimpleNamespace

    from hacbo_jax.trainer.loop import WARN_AFTER_LOG_POINTS, TrainingLoop

    loop = SimpleNamespace(warning_streak=0)
    texts = ["starving", None, *["starving"] * (WARN_AFTER_LOG_POINTS + 2)]
    fired = [TrainingLoop.persistent_warning(loop, text) for text in texts]
    assert fired.count("starving") == 1 and fired[WARN_AFTER_LOG_POINTS + 1] == "starving"
    assert capsys.readouterr().err.count("warning: starving") == 1
