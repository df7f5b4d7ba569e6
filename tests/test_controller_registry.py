"""hacbo_jax.training.controller_registry: one table from controller.kind to config section,
transformation, state and log statistics; the config's defaults are the functions' defaults."""

import dataclasses
import inspect

import jax.numpy as jnp
import numpy as np
import pytest

from hacbo_jax import blac, hacbo
from hacbo_jax.training.config import Config, ControllerConfig, config_from_dict
from hacbo_jax.training.controller_registry import (
    CONTROLLERS,
    BLACConfig,
    HACBOConfig,
    build_controller,
    controller_stats,
    find_controller_state,
)
from hacbo_jax.training.step import build_optimizer, learning_rate_schedule

# Arguments of the transformations that a config does not set: the label tree, and the
# sub-module list (derived from the labels).
NOT_CONFIGURED = {"labels", "submodules"}


@pytest.mark.parametrize("config_type, transform", [(HACBOConfig, hacbo), (BLACConfig, blac)])
def test_config_defaults_are_the_transformations_defaults(config_type, transform):
    signature = inspect.signature(transform)
    expected = {
        name: p.default for name, p in signature.parameters.items() if name not in NOT_CONFIGURED
    }
    configured = {f.name: f.default for f in dataclasses.fields(config_type)}
    assert configured == expected


def test_every_registered_kind_is_a_config_section_and_an_allowed_kind():
    sections = {f.name for f in dataclasses.fields(ControllerConfig)} - {"kind"}
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
    with pytest.raises(ValueError, match="'none', 'blac', 'hacbo'"):
        build_controller("adam", labels)
