"""``extends: NAME`` in a config file: the file is deep-merged over a shipped config or a file
relative to it; chains, cycles, unknown names, the checks on the merged result, and the shipped
overlays (each differs from its base only in the keys it sets)."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from hacbo_jax.trainer import config as C
from hacbo_jax.trainer.config import (
    ConfigError,
    config_to_dict,
    load_config,
    read_config_file,
    save_config,
    shipped_configs,
)

CONFIGS = sorted(C.CONFIGS_DIR.glob("*.yaml"))
# Keys stored resolved (absolute) in the Config, not as written.
RESOLVED_PATHS = {"model.path", "model.tokenizer", "data.train_file", "data.eval_file"}


def _own_keys(path: Path) -> dict:
    """The mapping a config file itself writes (no ``extends`` merged in)."""
    return yaml.safe_load(path.read_text()) or {}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# -- the shipped overlays -----------------------------------------------------------------------


OVERLAYS = [p for p in CONFIGS if "extends" in _own_keys(p)]


def test_the_shipped_overlays_and_their_bases():
    bases = {p.stem: _own_keys(p)["extends"] for p in OVERLAYS}
    assert bases == {
        "paper_hacbo_fixed": "paper_hacbo",
        "paper_hacbo_batch2": "paper_hacbo",
        "paper_blac": "paper_hacbo",
        "adamw": "paper_hacbo",
        "compare_cpu": "tiny_cpu",
        "evidence_cpu": "tiny_cpu",
        "evidence_conflict_cpu": "evidence_cpu",
    }


@pytest.mark.parametrize("path", OVERLAYS, ids=lambda p: p.name)
def test_an_overlay_differs_from_its_base_only_in_the_keys_it_sets(path):
    own = _own_keys(path)
    base = load_config(own.pop("extends"))
    cfg = load_config(path)
    set_keys = _flat(own)
    # A section set to null (``hacbo: null``: the schema's defaults) covers all its keys.
    covered = [k for k, v in set_keys.items() if v is None or v == {}]

    def is_set(key):
        return key in set_keys or any(key.startswith(c + ".") for c in covered)

    merged, before = _flat(config_to_dict(cfg)), _flat(config_to_dict(base))
    assert merged.keys() == before.keys()
    changed = {k for k in merged if merged[k] != before[k]}
    assert {k for k in changed if not is_set(k)} == set(), path.name
    # ... and what it sets is what it gets.
    for key, value in set_keys.items():
        if key in merged and value is not None and key not in RESOLVED_PATHS:
            assert merged[key] == value, key


def test_paper_overlays_keep_the_paper_setting():
    hacbo = load_config("paper_hacbo")
    for name in ("paper_hacbo_fixed", "paper_blac", "adamw", "paper_hacbo_batch2"):
        cfg = load_config(name)
        if name == "paper_hacbo_batch2":  # checkpoints every 500 of its 11,208 steps
            cfg = dataclasses.replace(cfg, checkpoint=hacbo.checkpoint)
        assert (cfg.model, cfg.eval, cfg.checkpoint, cfg.mesh) == (
            hacbo.model,
            hacbo.eval,
            hacbo.checkpoint,
            hacbo.mesh,
        ), name
        assert cfg.output_dir == f"runs/{name}"
    assert load_config("paper_blac").controller.hacbo == C.HACBOConfig()  # hacbo: null
    assert load_config("adamw").controller.hacbo == C.HACBOConfig()


# -- merging ------------------------------------------------------------------------------------


def test_extends_a_file_relative_to_the_extending_file(tmp_path):
    _write(
        tmp_path / "bases" / "base.yaml",
        "extends: tiny_cpu\noptim: {lr: 1.0e-3, epochs: 2}\ncontroller: {kind: blac}\n",
    )
    mine = _write(
        tmp_path / "runs" / "mine.yaml",
        "extends: ../bases/base.yaml\noptim: {epochs: 3}\ncontroller:\n  hacbo: {interval: 5}\n",
    )
    cfg = load_config(mine)
    tiny = load_config("tiny_cpu")
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (
        1e-3,
        3,
        tiny.optim.batch_size,
    )
    assert cfg.controller.kind == "blac"
    assert cfg.controller.hacbo.interval == 5
    assert cfg.controller.hacbo.patience == tiny.controller.hacbo.patience  # merged, not replaced
    assert cfg.data == tiny.data
    raw = read_config_file(mine)
    assert "extends" not in raw
    assert (raw["optim"]["lr"], raw["optim"]["epochs"], raw["optim"]["b2"]) == (1e-3, 3, 0.95)


def test_values_lists_and_null_replace_the_bases(tmp_path):
    _write(tmp_path / "base.yaml", "extends: tiny_cpu\noptim: {max_steps: 50}\n")
    mine = _write(
        tmp_path / "mine.yaml",
        "extends: base.yaml\noptim: {max_steps: null}\ncontroller: {hacbo: null}\n",
    )
    cfg = load_config(mine)
    assert cfg.optim.max_steps is None
    assert cfg.controller.hacbo == C.HACBOConfig()  # a null section: the schema's defaults
    assert load_config(tmp_path / "base.yaml").optim.max_steps == 50


def test_a_shipped_name_works_from_anywhere_and_overrides_apply_last(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = _write(tmp_path / "elsewhere" / "mine.yaml", "extends: tiny_cpu\noptim: {lr: 1.0e-3}\n")
    cfg = load_config(mine, ["optim.lr=2e-3", "optim.epochs=2"])
    assert (cfg.optim.lr, cfg.optim.epochs) == (2e-3, 2)


def test_output_dir_is_the_extending_files_own(tmp_path):
    mine = _write(tmp_path / "mine.yaml", "extends: tiny_cpu\n")
    assert load_config("tiny_cpu").output_dir == "runs/tiny_cpu"
    assert load_config(mine).output_dir == "runs/mine"  # not the base's runs/tiny_cpu
    named = _write(tmp_path / "named.yaml", "extends: tiny_cpu\noutput_dir: runs/x\n")
    assert load_config(named).output_dir == "runs/x"


def test_a_chain_of_overlays(tmp_path):
    _write(tmp_path / "a.yaml", "extends: paper_hacbo_fixed\nseed: 3\n")
    b = _write(tmp_path / "b.yaml", "extends: a.yaml\noptim: {lr: 1.0e-5}\n")
    cfg = load_config(b)
    fixed = load_config("paper_hacbo_fixed")
    assert (cfg.seed, cfg.optim.lr, cfg.controller.hacbo.gamma) == (3, 1e-5, 0.1)
    assert cfg.controller.hacbo.rho == fixed.controller.hacbo.rho == 0.8623  # paper_hacbo's


# -- refusals -----------------------------------------------------------------------------------


def test_a_cycle_is_refused_naming_the_chain(tmp_path):
    _write(tmp_path / "a.yaml", "extends: b.yaml\n")
    _write(tmp_path / "b.yaml", "extends: c.yaml\n")
    _write(tmp_path / "c.yaml", "extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle") as e:
        load_config(tmp_path / "a.yaml")
    msg = str(e.value)
    chain = msg.split("cycle: ", 1)[1]
    assert [Path(p).name for p in chain.split(" -> ")] == ["a.yaml", "b.yaml", "c.yaml", "a.yaml"]
    _write(tmp_path / "self.yaml", "extends: ./self.yaml\n")
    with pytest.raises(ConfigError, match=r"self.yaml -> .*self.yaml"):
        load_config(tmp_path / "self.yaml")


def test_an_unknown_name_is_one_error_listing_the_shipped_configs(tmp_path):
    mine = _write(tmp_path / "mine.yaml", "extends: paper_hacb\n")
    with pytest.raises(ConfigError) as e:
        load_config(mine)
    msg = str(e.value)
    assert "mine.yaml" in msg and "'paper_hacb'" in msg and "not a shipped config" in msg
    assert ", ".join(shipped_configs()) in msg
    assert msg.count("\n") == 0  # one problem, one line


@pytest.mark.parametrize(
    "value, expected",
    [
        ("missing.yaml", "no such file"),
        ("../nowhere/base", "no such file"),
        ("null", "must be the name of a shipped config"),
        ("[tiny_cpu]", "must be the name of a shipped config"),
        ("''", "must be the name of a shipped config"),
    ],
)
def test_bad_extends_values(tmp_path, value, expected):
    mine = _write(tmp_path / "mine.yaml", f"extends: {value}\n")
    with pytest.raises(ConfigError, match=expected):
        load_config(mine)


def test_duplicate_keys_are_refused_in_the_overlay_and_in_its_base(tmp_path):
    dup = "extends: tiny_cpu\noptim: {lr: 1.0e-3}\noptim: {lr: 2.0e-3}\n"
    with pytest.raises(ConfigError, match="duplicate key 'optim'"):
        load_config(_write(tmp_path / "dup.yaml", dup))
    _write(tmp_path / "base.yaml", "seed: 1\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"base.yaml.*duplicate key 'seed'"):
        load_config(_write(tmp_path / "mine.yaml", "extends: base.yaml\n"))
    with pytest.raises(ConfigError, match="duplicate key 'extends'"):
        load_config(_write(tmp_path / "two.yaml", "extends: tiny_cpu\nextends: adamw\n"))


def test_unknown_keys_and_bad_values_are_checked_on_the_merged_result(tmp_path):
    _write(tmp_path / "base.yaml", "extends: tiny_cpu\noptim: {lrate: 1.0}\n")
    mine = _write(tmp_path / "mine.yaml", "extends: base.yaml\ncontroller: {hacbo: {rho: 2}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(mine)
    msg = str(e.value)
    assert "optim.lrate: unknown key" in msg
    assert "controller.hacbo.rho = 2: must be" in msg
    # a value the overlay fixes is fine: only the merged result counts
    _write(tmp_path / "bad_base.yaml", "extends: tiny_cpu\noptim: {warmup_steps: 1000}\n")
    fixed = _write(tmp_path / "fixed.yaml", "extends: bad_base.yaml\noptim: {warmup_steps: 5}\n")
    assert load_config(fixed).optim.warmup_steps == 5


# -- what is shown and saved --------------------------------------------------------------------


def test_print_config_and_the_saved_config_are_merged_without_extends(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_cli(["--config", "paper_hacbo_fixed", "--print-config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "extends" not in printed
    assert printed == yaml.safe_load(
        yaml.safe_dump(config_to_dict(load_config("paper_hacbo_fixed")))
    )
    assert printed["controller"]["hacbo"]["rho"] == 0.8623  # from paper_hacbo.yaml
    assert printed["controller"]["hacbo"]["gamma"] == 0.1  # the overlay's
    cfg = load_config("compare_cpu")
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "extends" not in saved and saved["data"]["synthetic"]["preset"] == "arith-small"
    assert load_config(tmp_path / "config.yaml") == cfg
