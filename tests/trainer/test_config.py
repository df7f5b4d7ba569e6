"""hacbo_jax.trainer.config: YAML + overrides -> validated frozen dataclasses, one message per bad config."""

from hacbo_jax.trainer.config import CONFIGS_DIR
import dataclasses
from pathlib import Path

import pytest
import yaml

from hacbo_jax.trainer import config as C
from hacbo_jax.trainer.config import ConfigError, config_from_dict, load_config, save_config

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((CONFIGS_DIR).glob("*.yaml"))


def _preset() -> str:
    try:
        from hacbo_jax.data.synthetic import PRESETS

        return next(iter(PRESETS))
    except (ImportError, AttributeError):
        return "easy"


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")  # model.tokenizer defaults to the model's
    return d


@pytest.fixture
def base(model_dir):
    """A small valid synthetic-task config as a plain dict."""
    return {
        "model": {"path": str(model_dir)},
        "data": {
            "task": "synthetic",
            "heldout_size": 64,
            "synthetic": {"preset": _preset(), "n_train": 640, "n_eval": 32},
        },
        "optim": {"lr": 1e-3, "batch_size": 32, "warmup_steps": 5, "epochs": 1},
        "microdev": {"size": 64, "batch_size": 16},
    }


def _error(raw, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, overrides)
    return str(e.value)


# -- the shipped configs ------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path, model_dir):
    overrides = []
    if not (C.PACKAGE_ROOT / "assets" / "tiny-qwen3-gsm" / "config.json").is_file():
        overrides = [f"model.path={model_dir}"] if "tiny" in path.name else []
    cfg = load_config(path, overrides)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_shipped_config_set():
    assert {p.stem for p in CONFIGS} >= {
        "tiny_cpu",
        "paper_hacbo",
        "paper_hacbo_fixed",
        "paper_blac",
        "adamw",
    }


def test_paper_configs_carry_the_papers_values():
    h = load_config(C.CONFIGS_DIR / "paper_hacbo.yaml")
    assert (
        h.controller.kind,
        h.controller.hacbo.interval,
        h.controller.hacbo.rho,
        h.controller.hacbo.theta_neg,
        h.controller.hacbo.patience,
        h.controller.hacbo.gamma,
        h.controller.hacbo.update_norm_budget,
    ) == ("hacbo", 30, 0.8623, 0.0412, 6, 0.0, 1.0)
    assert (h.microdev.refresh_every, h.microdev.refresh_fraction, h.microdev.size) == (
        600,
        0.25,
        1024,
    )
    assert (h.optim.lr, h.optim.batch_size, h.optim.epochs, h.data.max_len) == (6.42e-5, 64, 3, 512)
    assert (h.model.dtype, h.model.param_dtype) == ("bfloat16", "float32")
    # 3 epochs x (7473 // 64) = 348 steps (partial batches dropped); warm-up ends inside the run.
    assert h.total_steps(h.expected_train_examples()) == 348
    assert h.optim.warmup_steps < 348
    fixed = load_config(C.CONFIGS_DIR / "paper_hacbo_fixed.yaml")
    assert fixed.controller.hacbo.gamma == 0.1
    # The other reading of the paper: ~12,000 steps over three epochs is a batch of 2; its
    # warm-up, K, F and R are the paper's step counts, and R = 600 now fires 18 times.
    two = load_config(C.CONFIGS_DIR / "paper_hacbo_batch2.yaml")
    steps = two.total_steps(two.expected_train_examples())
    assert (two.optim.batch_size, two.optim.micro_batch_size, steps) == (2, 2, 11208)
    assert two.optim.warmup_steps == 500 < steps
    assert steps // two.microdev.refresh_every == 18
    assert two.controller.hacbo == h.controller.hacbo
    assert dataclasses.replace(fixed.controller.hacbo, gamma=0.0) == h.controller.hacbo
    b = load_config(C.CONFIGS_DIR / "paper_blac.yaml")
    assert (
        b.controller.kind,
        b.controller.blac.interval,
        b.controller.blac.rho,
        b.controller.blac.freeze_after,
        b.controller.blac.update_norm_budget,
        b.optim.lr,
    ) == ("blac", 20, 0.7436, 300, 1.0, 1.96e-4)
    assert load_config(C.CONFIGS_DIR / "adamw.yaml").controller.kind == "none"


def test_papers_500_step_warmup_is_rejected():
    msg = str(
        pytest.raises(
            ConfigError,
            load_config,
            C.CONFIGS_DIR / "paper_hacbo.yaml",
            ["optim.warmup_steps=500"],
        ).value
    )
    assert "optim.warmup_steps = 500" in msg and "348" in msg
    load_config(C.CONFIGS_DIR / "paper_hacbo.yaml", ["optim.warmup_steps=347"])
    with pytest.raises(ConfigError, match="348"):
        load_config(C.CONFIGS_DIR / "paper_hacbo.yaml", ["optim.warmup_steps=348"])


# -- defaults, overrides, resolution -------------------------------------------------------------


def test_defaults_and_derived_fields(base):
    cfg = config_from_dict(base, name="configs/mine.yaml")
    assert cfg.method == "hacbo" and cfg.output_dir == "runs/mine"
    assert cfg.controller.interval == 30 and cfg.optim.accumulation_steps == 1
    assert config_from_dict(base, ["controller.kind=none"]).controller.interval is None
    assert config_from_dict(base, ["controller.kind=blac"]).method == "blac"
    assert config_from_dict(base, ["method=x"]).method == "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_overrides_are_yaml_scalars(base):
    cfg = config_from_dict(
        base,
        [
            "optim.lr=1e-4",  # YAML 1.1 reads this as a string; we accept it
            "controller.hacbo.update_norm_budget=null",
            "controller.hacbo.debias=true",
            "data.synthetic.n_train=1000",
            "optim.micro_batch_size=8",
            "eval.limit=",  # empty = null
            "method=a=b",  # only the first '=' splits
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.controller.hacbo.update_norm_budget is None and cfg.controller.hacbo.debias is True
    assert cfg.data.synthetic.n_train == 1000 and cfg.optim.accumulation_steps == 4
    assert cfg.eval.limit is None and cfg.method == "a=b"
    assert base["optim"]["lr"] == 1e-3  # the input mapping is not modified


def test_ints_accepted_for_floats(base):
    assert config_from_dict(base, ["optim.weight_decay=0"]).optim.weight_decay == 0.0


def test_paths_are_resolved(base, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(base, ["model.path=model"])
    assert cfg.model.path == str(model_dir.resolve())
    # gsm8k files default to the bundled data/gsm8k and are found from any directory.
    g = config_from_dict(base, ["data.task=gsm8k", "data.heldout_size=1024"])
    assert Path(g.data.train_file).is_file() and Path(g.data.train_file).is_absolute()
    # a hub id is accepted as is (never downloaded here)
    assert config_from_dict(base, ["model.path=Qwen/Qwen3-0.6B"]).model.path == "Qwen/Qwen3-0.6B"


def test_step_arithmetic_and_check_warmup(base):
    cfg = config_from_dict(base)
    # synthetic: the pool is a separate stream, n_train is not reduced
    assert cfg.expected_train_examples() == 640
    assert (
        cfg.steps_per_epoch(640) == 20 and cfg.steps_per_epoch(639) == 19
    )  # partial batch dropped
    assert cfg.total_steps(640) == 20
    assert config_from_dict(base, ["optim.epochs=3"]).total_steps(640) == 60
    assert config_from_dict(base, ["optim.max_steps=7"]).total_steps(640) == 7
    C.check_warmup(cfg, 6)
    with pytest.raises(ConfigError, match=r"optim.warmup_steps = 5: must be < the run's 5"):
        C.check_warmup(cfg, 5)
    # gsm8k: held-out rows are removed from training, unless the pool is the test split
    g = ["data.task=gsm8k", "data.heldout_size=1473"]
    assert config_from_dict(base, g).expected_train_examples() == 6000
    assert config_from_dict(base, g + ["microdev.pool=test"]).expected_train_examples() == 7473
    assert config_from_dict(base, g + ["data.hub_name=gsm8k"]).expected_train_examples() is None


def test_cli(base, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base))
    cfg, args = C.parse_cli(["--config", str(path), "optim.lr=0.5", "--resume"])
    assert cfg.optim.lr == 0.5 and args.resume
    with pytest.raises(SystemExit) as e:
        C.parse_cli(["--config", str(path), "optim.lr=-1"])
    assert e.value.code == 2
    assert "optim.lr = -1: must be a value > 0" in capsys.readouterr().err


# -- rejection -----------------------------------------------------------------------------------

BAD_VALUES = [
    ("seed", "-1", ">= 0"),
    ("output_dir", "3", "a non-empty string or null"),
    ("method", "''", "a non-empty string or null"),
    ("model.dtype", "float16", "'float32', 'bfloat16'"),
    ("model.param_dtype", "int8", "'float32', 'bfloat16'"),
    ("model.remat", "1", "true/false or one of 'none', 'full', 'dots'"),
    ("model.remat", "some", "true/false or one of 'none', 'full', 'dots'"),
    ("model.scan_layers", "1", "true/false"),
    ("model.attention_impl", "flash", "'einsum', 'xla', 'cudnn'"),
    ("data.packing", "yes please", "true/false"),
    ("data.task", "math", "'gsm8k', 'synthetic'"),
    ("data.max_len", "7", ">= 8"),
    ("data.heldout_size", "-1", ">= 0"),
    ("data.synthetic.n_train", "0", ">= 1"),
    ("optim.lr", "0", "> 0"),
    ("optim.lr", "fast", "a number"),
    ("optim.b1", "1", "[0, 1)"),
    ("optim.b2", "-0.1", "[0, 1)"),
    ("optim.weight_decay", "-1", ">= 0"),
    ("optim.clip_norm", "0", "> 0"),
    ("optim.warmup_steps", "-1", ">= 0"),
    ("optim.epochs", "1.5", "an int"),
    ("optim.epochs", "true", "an int"),
    ("optim.batch_size", "0", ">= 1"),
    ("optim.micro_batch_size", "0", ">= 1"),
    ("optim.max_steps", "0", ">= 1"),
    ("controller.kind", "adam", "'none', 'blac', 'hacbo'"),
    ("controller.hacbo.rho", "0", "(0, 1)"),
    ("controller.hacbo.rho", "1", "(0, 1)"),
    ("controller.hacbo.interval", "0", ">= 1"),
    ("controller.hacbo.theta_neg", "-0.01", "[0, 1]"),
    ("controller.hacbo.patience", "0", ">= 1"),
    ("controller.hacbo.gamma", "1.5", "[0, 1]"),
    ("controller.hacbo.eps", "0", "> 0"),
    ("controller.hacbo.curvature_norm", "l1", "'rms', 'l2'"),
    ("controller.hacbo.debias", "yes please", "true/false"),
    ("controller.hacbo.update_norm_budget", "0", "> 0"),
    ("controller.hacbo.curvature_weighting", "0", "true/false"),
    ("controller.hacbo.probation", "null", "true/false"),
    ("controller.blac.rho", "1.2", "(0, 1)"),
    ("controller.blac.interval", "0", ">= 1"),
    ("controller.blac.freeze_after", "-1", ">= 0"),
    ("controller.blac.update_norm_budget", "-1", "> 0"),
    ("microdev.size", "0", ">= 1"),
    ("microdev.pool", "train", "'heldout', 'test'"),
    ("microdev.refresh_every", "-1", ">= 0"),
    ("microdev.refresh_fraction", "1.5", "[0, 1]"),
    ("microdev.batch_size", "0", ">= 1"),
    ("microdev.max_candidates", "0", ">= 1"),
    ("eval.limit", "0", ">= 1"),
    ("eval.limit", "all", "an int or null"),
    ("eval.max_new_tokens", "0", ">= 1"),
    ("eval.batch_size", "0", ">= 1"),
    ("eval.every_epoch", "2", "true/false"),
    ("logging.every", "0", ">= 1"),
    ("logging.tensorboard", "on_", "true/false"),
    ("logging.wandb", "3", "true/false"),
    ("checkpoint.every", "-1", ">= 0"),
    ("checkpoint.keep", "0", ">= 1"),
    ("checkpoint.export_hf", "x", "true/false"),
    ("divergence.max_consecutive_nonfinite", "0", ">= 1"),
    ("mesh.data", "0", "-1 for all devices"),
    ("mesh.data", "-2", "-1 for all devices"),
    ("mesh.fsdp", "0", ">= 1"),
]


@pytest.mark.parametrize(
    "key,value,allowed", BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES]
)
def test_bad_value_names_key_value_and_allowed(base, key, value, allowed):
    msg = _error(base, [f"{key}={value}"])
    line = [ln for ln in msg.splitlines() if ln.strip().startswith(f"- {key} = ")]
    assert len(line) == 1, msg
    assert allowed in line[0], line[0]


def test_unknown_keys(base):
    msg = _error(base, ["optim.lrr=1", "bogus=1", "controller.hacbo.rhoo=0.5"])
    assert "optim.lrr: unknown key (did you mean 'optim.lr'?)" in msg
    assert "bogus: unknown key" in msg and "allowed keys here: output_dir, seed" in msg
    assert "controller.hacbo.rhoo: unknown key (did you mean 'controller.hacbo.rho'?)" in msg


def test_all_problems_in_one_message(base):
    msg = _error(
        base,
        ["optim.lr=-1", "controller.hacbo.gamma=2", "mesh.fsdp=0", "optim.micro_batch_size=10"],
    )
    assert msg.startswith("invalid config")
    for key in ("optim.lr", "controller.hacbo.gamma", "mesh.fsdp", "optim.batch_size = 32"):
        assert key in msg


def test_bad_override_syntax_and_section(base):
    msg = _error(base, ["optim.lr", "optim.lr.x=1", "optim=3"])
    assert "override 'optim.lr': must look like section.key=value" in msg
    assert "override 'optim.lr.x=1': 'lr' is not a section" in msg
    assert "optim = 3: must be a mapping with keys lr," in msg


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (
            ["optim.micro_batch_size=10"],
            "optim.batch_size = 32: must be a multiple of optim.micro_batch_size = 10",
        ),
        (["optim.max_steps=5"], "optim.warmup_steps = 5: must be < optim.max_steps = 5"),
        (
            ["optim.warmup_steps=20"],
            "optim.warmup_steps = 20: must be < the run's 20 optimiser steps",
        ),
        (["microdev.batch_size=65"], "microdev.batch_size = 65: must be <= microdev.size = 64"),
        (["data.heldout_size=63"], "data.heldout_size = 63: must be >= microdev.size = 64"),
        (
            ["data.synthetic.n_train=31"],
            "optim.batch_size = 32: must be <= the 31 training examples",
        ),
        (
            ["data.task=gsm8k", "data.heldout_size=7460"],
            "optim.batch_size = 32: must be <= the 13 training examples (the 7473 rows",
        ),
    ],
)
def test_cross_field_rules(base, overrides, expected):
    assert expected in _error(base, overrides)


def test_warmup_checked_against_epochs(base):
    config_from_dict(base, ["optim.warmup_steps=20", "optim.epochs=2"])  # 40 steps


def test_cross_rules_skip_already_rejected_keys(base):
    msg = _error(base, ["optim.micro_batch_size=0"])
    assert "multiple of" not in msg and msg.count("\n  - ") == 1
    # rules on other keys still run
    msg = _error(base, ["optim.lr=-1", "optim.warmup_steps=20"])
    assert "optim.lr = -1" in msg and "optim.warmup_steps = 20: must be < the run's 20" in msg


def test_model_path_checks(base, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "must be a Hugging Face model directory containing config.json" in _error(
        base, [f"model.path={empty}"]
    )
    assert "no such local directory" in _error(base, [f"model.path={tmp_path / 'nope'}"])
    assert "no such local directory" in _error(base, ["model.path=./nope"])


def test_data_file_checks(base, tmp_path):
    msg = _error(
        base,
        [
            "data.task=gsm8k",
            "data.heldout_size=1024",
            f"data.train_file={tmp_path / 'missing.jsonl'}",
        ],
    )
    assert "data.train_file = " in msg and "file not found" in msg and "hub_name" in msg
    config_from_dict(
        base,
        [
            "data.task=gsm8k",
            "data.hub_name=openai/gsm8k",
            f"data.train_file={tmp_path / 'missing.jsonl'}",
        ],
    )


def test_file_level_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(tmp_path / "list.yaml")
    assert issubclass(ConfigError, ValueError)


def test_save_config_writes_resolved_yaml(base, tmp_path):
    cfg = config_from_dict(base, ["optim.lr=2e-4"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert written == C.config_to_dict(cfg)
    assert written["optim"]["lr"] == 2e-4 and written["method"] == "hacbo"
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_training_page_config_example_prints_what_it_says(monkeypatch, capsys):
    """docs/training.md's config example (run as written by tests/docs too) prints the paper
    config's steps, an overridden warm-up and the refused learning rate."""
    import re

    text = (REPO_ROOT / "docs" / "training.md").read_text()
    blocks = [
        b
        for b in re.findall(r"```python\n(.*?)```", text, re.S)
        if b.startswith("# hacbo_jax.trainer.config example")
    ]
    assert blocks, "docs/training.md lost its hacbo_jax.trainer.config example"
    monkeypatch.chdir(REPO_ROOT)
    for block in blocks:
        exec(compile(block, "docs/training.md", "exec"), {"__name__": "__docs__"})
    out = capsys.readouterr().out
    assert out.startswith("348\n") and "optim.warmup_steps = 500" in out and "optim.lr = -1" in out


def test_default_synthetic_preset_is_a_preset():
    """Was "easy", which is not a preset: the default must be the task's own default."""
    from hacbo_jax.data.synthetic import DEFAULT_PRESET, PRESETS

    assert C.SyntheticConfig().preset == DEFAULT_PRESET and DEFAULT_PRESET in PRESETS
    cfg = config_from_dict(
        {"data": {"task": "synthetic"}, "optim": {"batch_size": 8}}, check_paths=False
    )
    assert cfg.data.synthetic.preset in PRESETS


# -- command line: shipped names, --help, --print-config ----------------------------------------


def test_shipped_config_names_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("tiny_cpu", "tiny_cpu.yaml", "configs/tiny_cpu.yaml"):
        assert C.resolve_config_path(name) == C.CONFIGS_DIR / "tiny_cpu.yaml"
    cfg = load_config("tiny_cpu")
    assert Path(cfg.model.path).is_relative_to(C.PACKAGE_ROOT / "assets")
    with pytest.raises(ConfigError, match="name of a shipped config: adamw, compare_cpu"):
        load_config("no_such_config")


def test_every_key_has_a_description_and_help_lists_it(capsys):
    from hacbo_jax.trainer.config.keys import iter_keys, key_help

    keys = [key for key, _, _ in iter_keys()]
    helps = key_help()
    assert list(helps) == keys and all(helps.values())
    with pytest.raises(SystemExit) as e:
        C.parse_cli(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in keys:
        assert f"  {key} = " in out
    assert "controller.hacbo.gamma = 0.1" in out and helps["controller.hacbo.gamma"] in out


def test_print_config_shows_resolved_config_and_step_counts(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_cli(["--config", "tiny_cpu", "optim.max_steps=20", "--print-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    printed = yaml.safe_load(out)  # the derived counts are YAML comments
    assert printed["optim"]["max_steps"] == 20 and printed["controller"]["kind"] == "hacbo"
    # tiny_cpu: 3200 synthetic problems, batch 32 -> 100 steps per epoch, capped at 20; K = 10
    assert "#   steps_per_epoch: 100" in out and "#   total_steps: 20" in out
    assert "#   controller_measurements: 2" in out


# -- model options and packing ----------------------------------------------------------------


def test_model_options_defaults_and_remat_spellings(base):
    cfg = config_from_dict(base)
    assert (cfg.model.remat, cfg.model.scan_layers, cfg.model.attention_impl) == (
        "none",
        False,
        "einsum",
    )
    assert cfg.data.packing is False
    # the legacy booleans are accepted and stored as the mode they mean
    assert config_from_dict(base, ["model.remat=true"]).model.remat == "full"
    assert config_from_dict(base, ["model.remat=false"]).model.remat == "none"
    assert C.ModelConfig(remat=True).remat == "full"
    opts = ["model.remat=dots", "model.scan_layers=true", "model.attention_impl=xla"]
    cfg = config_from_dict(base, opts + ["data.packing=true"])
    assert (cfg.model.remat, cfg.model.scan_layers, cfg.model.attention_impl) == (
        "dots",
        True,
        "xla",
    )
    assert cfg.data.packing is True


def test_cudnn_attention_is_rejected_before_the_run_without_a_gpu(base):
    import jax

    cfg = config_from_dict(base, ["model.attention_impl=cudnn"])  # readable on any machine
    if jax.default_backend() == "gpu":
        C.check_backend(cfg)
        return
    with pytest.raises(ConfigError, match=r"model.attention_impl = 'cudnn': needs a CUDA GPU"):
        C.check_backend(cfg)
    with pytest.raises(ConfigError, match=r"model.attention_impl = 'cudnn'"):
        C.check_mesh(cfg)  # build_run's first check
    C.check_backend(config_from_dict(base, ["model.attention_impl=xla"]))


def test_paper_configs_use_the_gpu_options():
    for name in ("paper_hacbo", "paper_hacbo_fixed", "paper_hacbo_batch2", "paper_blac", "adamw"):
        cfg = load_config(C.CONFIGS_DIR / f"{name}.yaml")
        m, d = cfg.model, cfg.data
        assert (m.dtype, m.param_dtype, m.scan_layers, m.remat, m.attention_impl) == (
            "bfloat16",
            "float32",
            True,
            "dots",
            "cudnn",
        ), name
        assert d.packing, name
    for name in ("tiny_cpu", "compare_cpu"):
        cfg = load_config(C.CONFIGS_DIR / f"{name}.yaml")
        assert (cfg.model.attention_impl, cfg.data.packing) == ("einsum", False), name
