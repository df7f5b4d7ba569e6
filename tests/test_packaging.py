"""The package as a user gets it: build the wheel, install it into a fresh virtual environment
(no downloads: the environment sees this interpreter's packages through a .pth file), and run
``hacbo-finetune --config tiny_cpu`` for two steps from an empty directory."""

import json
import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    names = zipfile.ZipFile(wheel).namelist()
    assert "configs/tiny_cpu.yaml" in names
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
