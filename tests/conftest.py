"""Shared pytest configuration and fixtures.

Pure helpers (toy trees, short run configs) live in ``tests/support``; no test module imports
another.
"""

import os
from pathlib import Path

import pytest

# Tests never touch a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root (README.md, docs/, configs/, benchmarks/)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Qwen3 checkpoint with a 320-token BPE, built once per session.

    Tests treat it as read-only; one that changes a checkpoint builds its own with
    ``support.checkpoints.make_tiny_checkpoint``.
    """
    from support.checkpoints import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_model"))
