"""Every ``[project.scripts]`` entry resolves to a function of ``hacbo_jax.cli``, and the tools'
checkout entries (``python -m train.probe_curvature`` / ``train.sweep_lrwd``) still run."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_console_script_resolves():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"hacbo-probe-curvature", "hacbo-sweep-lrwd"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


@pytest.mark.parametrize(
    "module, prog",
    [
        ("train.probe_curvature", "python -m train.probe_curvature"),
        ("train.sweep_lrwd", "python -m train.sweep_lrwd"),
    ],
)
def test_checkout_entry_scripts_keep_working(module, prog):
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: {prog}")


def test_console_functions_pass_their_name(monkeypatch, capsys):
    from hacbo_jax import cli

    monkeypatch.setattr(sys, "argv", ["hacbo-sweep-lrwd", "--out", "x", "--wd", "0"])
    assert cli.sweep_lrwd() == 2
    assert capsys.readouterr().err.startswith("hacbo-sweep-lrwd: error: --lr and --wd")
