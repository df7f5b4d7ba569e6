"""The package as a user gets it: the core install needs only jax, optax and numpy; the package
list ships every subpackage; the wheel installs into a fresh virtual environment (no downloads:
the environment sees this interpreter's packages through a .pth file), imports its core with
every optional dependency blocked, and runs ``hacbo-finetune --config tiny_cpu`` for two steps
from an empty directory."""

import json
import re
import tomllib
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CORE = {"jax", "optax", "numpy"}

# Run with `python -c`: every import of a package outside the core install fails, as it would in
# an environment that has only `pip install hacbo-jax`; then the README's optax.chain runs.
CORE_ONLY_SCRIPT = """
import importlib.abc, sys
class Blocker(importlib.abc.MetaPathFinder):
    blocked = {"flax", "transformers", "datasets", "orbax", "matplotlib", "scipy", "tqdm",
               "yaml", "safetensors", "tokenizers", "torch", "optuna", "skopt", "huggingface_hub",
               "tensorboardX", "wandb", "pynvml"}
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            raise ImportError(f"{name} is not a core dependency")
        return None
sys.meta_path.insert(0, Blocker())
import jax, jax.numpy as jnp, optax
import hacbo_jax
from hacbo_jax import adagradselect, blac, hacbo
params = {"emb": jnp.ones(3), "blocks": [{"mlp": jnp.ones(2), "ln": jnp.ones(2)}] * 2}
labels = {"emb": "other", "blocks": [{"mlp": f"{b}/mlp", "ln": f"{b}/ln"} for b in range(2)]}
for tx in (optax.chain(optax.adamw(1e-3), hacbo(labels, interval=1)),
           optax.chain(optax.adamw(1e-3), blac(labels, interval=1)),
           adagradselect(labels, optax.adamw(1e-3), pct=0.5, steps_per_epoch=2)):
    state = tx.init(params)
    updates, state = tx.update(params, state, params, train_grads=params, dev_grads=params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
loaded = sorted({m.partition(".")[0] for m in sys.modules} & Blocker.blocked)
assert not loaded, loaded
print("core ok")
"""


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s\[<>=!~;]", spec, maxsplit=1)[0].lower()


def test_core_dependencies_are_jax_optax_and_numpy():
    assert {_requirement_name(d) for d in PYPROJECT["project"]["dependencies"]} == CORE


def test_core_import_runs_with_every_optional_dependency_blocked():
    done = subprocess.run(
        [sys.executable, "-c", CORE_ONLY_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("core ok")


def test_extras_take_everything_and_build_on_each_other():
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"models", "train", "research", "all", "test"} <= set(extras)
    assert "hacbo-jax[models]" in extras["train"]
    assert "hacbo-jax[train]" in extras["research"]
    everything = {e for e in extras if e not in ("all", "cuda", "test", "bench")}
    (all_spec,) = extras["all"]
    assert set(all_spec.partition("[")[2].rstrip("]").split(",")) >= everything - {"models", "train"}


def test_package_list_ships_every_subpackage():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "hacbo_jax").rglob("__init__.py")
    }
    configs = {"hacbo_jax.configs": "configs", "hacbo_jax.configs.lrs": "configs/lrs"}
    assert listed == on_disk | set(configs)
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == configs


@pytest.mark.slow
def test_wheel_installs_and_runs_the_embedded_default_from_any_directory(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = wheels.glob("hacbo_jax-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requires = [
        line.split(":", 1)[1].strip()
        for line in archive.read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert {_requirement_name(r) for r in requires if "extra ==" not in r} == CORE
    assert "hacbo_jax/configs/tiny_cpu.yaml" in names and "hacbo_jax/configs/lrs/compare_cpu.yaml" in names
    assert "hacbo_jax/assets/tiny-qwen3-gsm/model.safetensors" in names
    assert "hacbo_jax/assets/gsm8k/LICENSE" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith("train/") for n in names)  # the checkout's scripts stay out

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Appended after the venv's own site-packages, so the installed wheel wins over a checkout.
    (Path(purelib) / "host_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: the host environment may hold an (editable) hacbo-jax of its own.
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--ignore-installed",
            "-q",
            str(wheel),
        ],
        check=True,
    )

    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "train.py").write_text("raise SystemExit('the user train.py was imported')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        [
            env_dir / "bin" / "hacbo-finetune",
            "--config",
            "tiny_cpu",
            "optim.max_steps=2",
            "optim.warmup_steps=0",
            "eval.limit=4",
            "eval.at_start=false",
            "eval.max_new_tokens=8",
            "microdev.size=32",
            "data.heldout_size=32",
            "checkpoint.export_hf=false",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((work / "runs" / "tiny_cpu" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["eval_examples"] == 4
    where = subprocess.run(
        [python, "-c", "import hacbo_jax; print(hacbo_jax.__file__)"],
        cwd=work,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(env_dir))  # the installed copy ran, not the checkout
    core = subprocess.run(
        [python, "-c", CORE_ONLY_SCRIPT], cwd=work, env=env, capture_output=True, text=True
    )
    assert core.returncode == 0, core.stderr[-3000:]
