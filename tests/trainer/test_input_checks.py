"""Bad input gets one ConfigError before any work: weights, vocabulary, integer ranges, micro-dev
refreshes, overrides, data that trains on nothing, free disk; and a property test that the
config-checking path raises nothing but ConfigError / DataError."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from hacbo_jax.data.formats import DataError, load_examples
from hacbo_jax.trainer.config import ConfigError, load_config
from hacbo_jax.trainer.config import validate
from hacbo_jax.trainer.config.cli import parse_cli
from hacbo_jax.trainer.config.keys import iter_keys
from hacbo_jax.trainer.config.load import config_from_dict
from hacbo_jax.trainer.config.validate import PACKAGE_ROOT, check_model_dir, check_run_inputs

TINY = PACKAGE_ROOT / "assets" / "tiny-qwen3-gsm"
GOOD = '{"question": "1+1?", "answer": "2 #### 2"}\n'


@pytest.fixture
def model_copy(tmp_path):
    return shutil.copytree(TINY, tmp_path / "model")


def _rewrite(model: Path, change) -> None:
    weights = load_file(str(model / "model.safetensors"))
    change(weights)
    save_file(weights, str(model / "model.safetensors"))


def _one_problem(problems: list[str], *needles: str) -> str:
    text = "\n".join(problems)
    for needle in needles:
        assert needle in text, (needle, text)
    return text


# 1. Weights ----------------------------------------------------------------------------------


def test_shipped_model_passes_the_weight_checks():
    assert check_model_dir(str(TINY)) == []


def test_integer_weights_are_refused_naming_tensor_and_dtype(model_copy):
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(model_copy, lambda w: w.__setitem__(name, w[name].astype(np.int8)))
    _one_problem(check_model_dir(str(model_copy)), name, "int8", "floating")


def test_nonfinite_weights_are_refused_naming_the_tensor(model_copy):
    name = "model.layers.1.self_attn.q_proj.weight"

    def poison(w):
        w[name] = w[name].copy()
        w[name][3, 5] = np.nan
        w["model.norm.weight"] = np.full_like(w["model.norm.weight"], np.inf)

    _rewrite(model_copy, poison)
    text = _one_problem(check_model_dir(str(model_copy)), name, "model.norm.weight")
    assert "NaN" in text or "non-finite" in text


def test_bf16_nan_is_found(tmp_path):
    # bfloat16 has no numpy dtype: the check reads its bits.
    bits = np.array([0x3F80, 0x7FC0, 0xFF80, 0x0000], dtype=np.uint16)  # 1, nan, -inf, 0
    header = {"t": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bits.tobytes())
    assert validate._nonfinite_count(path, header["t"], 8 + len(raw)) == 2


def test_fewer_layers_in_config_than_weights_lists_the_extra_tensors(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config.update(num_hidden_layers=3, layer_types=["full_attention"] * 3)
    (model_copy / "config.json").write_text(json.dumps(config))
    _one_problem(check_model_dir(str(model_copy)), "model.layers.3.", "not used", "num_hidden_layers")


def test_missing_tensor_is_named(model_copy):
    _rewrite(model_copy, lambda w: w.pop("model.layers.2.input_layernorm.weight"))
    _one_problem(check_model_dir(str(model_copy)), "model.layers.2.input_layernorm.weight missing")


# 2. Vocabulary -------------------------------------------------------------------------------


def _quick(model: Path, out: Path, *extra: str):
    return load_config(
        "tiny_cpu",
        [f"model.path={model}", f"output_dir={out}", "data.synthetic.n_train=64",
         "optim.warmup_steps=0", *extra],
    )


def test_vocab_smaller_than_tokenizer_is_refused(model_copy, tmp_path):
    config = json.loads((model_copy / "config.json").read_text())
    (model_copy / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    _rewrite(
        model_copy,
        lambda w: w.__setitem__("model.embed_tokens.weight", w["model.embed_tokens.weight"][:512]),
    )
    problems = check_run_inputs(_quick(model_copy, tmp_path / "o"), resume=False)
    _one_problem(problems, "vocab_size = 512", "1023")


# 3. Integer ranges ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [str(2**64), str(2**32), "-1"])
def test_seed_must_fit_uint32(value):
    with pytest.raises(ConfigError, match="seed"):
        load_config("tiny_cpu", [f"seed={value}"])
    assert load_config("tiny_cpu", [f"seed={2**32 - 1}"]).seed == 2**32 - 1


def test_max_len_beyond_the_model_is_refused_before_allocation():
    with pytest.raises(ConfigError, match=r"data.max_len = 1000000000.*1048576"):
        load_config("tiny_cpu", ["data.max_len=1000000000"])
    with pytest.raises(ConfigError, match=r"data.max_len = 2048: must be <= .*1024"):
        load_config("tiny_cpu", ["data.max_len=2048"])
    assert load_config("tiny_cpu", ["data.max_len=1024"]).data.max_len == 1024


@pytest.mark.parametrize(
    "key", ["optim.max_steps", "optim.epochs", "checkpoint.every", "logging.every",
            "data.synthetic.n_train", "controller.hacbo.interval"],
)
def test_integers_beyond_int32_are_refused_naming_the_key(key):
    """Step counters and sizes live in int32 on the device: 10**30 as optim.max_steps once ran
    (epochs decided the length) and would overflow the step counter of a longer run."""
    with pytest.raises(ConfigError, match=rf"{key} = 10{{30}}|{key} = 1000000000000000000000000000000: must be < 2\*\*31"):
        load_config("tiny_cpu", [f"{key}={10**30}"])
    with pytest.raises(ConfigError, match=rf"{key} = 2147483648: must be < 2\*\*31"):
        load_config("tiny_cpu", [f"{key}={2**31}"])


# 4. Micro-dev refreshes ----------------------------------------------------------------------


def test_refresh_fraction_zero_needs_refresh_every_zero():
    with pytest.raises(ConfigError, match="microdev.refresh_fraction = 0.0.*refresh_every"):
        load_config("tiny_cpu", ["microdev.refresh_fraction=0"])
    cfg = load_config("tiny_cpu", ["microdev.refresh_fraction=0", "microdev.refresh_every=0"])
    assert cfg.microdev.refresh_fraction == 0


# 5. Overrides --------------------------------------------------------------------------------


def test_same_override_twice_is_refused_naming_the_key():
    from hacbo_jax.trainer.config.load import duplicate_overrides

    (problem,) = duplicate_overrides(["optim.lr=1e-4", "seed=1", "optim.lr=0.5"])
    assert "'optim.lr' given twice" in problem and "optim.lr=0.5" in problem
    # Programs layering overrides (sweeps, helpers) call load_config: the last one wins.
    assert load_config("tiny_cpu", ["optim.lr=1e-4", "optim.lr=0.5"]).optim.lr == 0.5


def test_override_after_a_flag_is_accepted():
    cfg, args = parse_cli(["--config", "tiny_cpu", "--resume", "optim.lr=0.001", "seed=3"])
    assert args.resume and cfg.optim.lr == 0.001 and cfg.seed == 3
    cfg, args = parse_cli(["--config", "tiny_cpu", "seed=4", "--resume", "optim.lr=0.002"])
    assert args.resume and cfg.optim.lr == 0.002 and cfg.seed == 4


def test_duplicate_override_on_the_cli_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(["--config", "tiny_cpu", "optim.lr=1e-4", "optim.lr=0.5"])
    assert e.value.code == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "no settings"), (b"# only a comment\n", "no settings"),
     (bytes(range(256)), "not UTF-8"), (b"extends: tiny_cpu\n# caf\xe9\n", "not UTF-8")],
)
def test_a_config_file_that_is_empty_or_not_text_is_refused_naming_it(tmp_path, content, needle):
    """An empty file once ran on every default (the GSM8K files and the shipped model): almost
    certainly not what its author meant; bytes that are not UTF-8 gave the codec's message
    without the file's name."""
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_an_empty_config_name_is_refused_as_such(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(["--config", ""])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--config ''" in err and "Is a directory" not in err


# 6. Data that trains on nothing --------------------------------------------------------------


def _gsm(train: Path, test: Path) -> list[str]:
    return ["data.task=gsm8k", f"data.train_file={train}", f"data.eval_file={test}",
            "data.heldout_size=4", "microdev.size=4", "microdev.batch_size=4",
            "optim.batch_size=4", "optim.warmup_steps=0"]


def test_all_answers_empty_is_refused_naming_file_and_count(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"question": "q?", "answer": "  "}\n' * 9 + '{"question": "q", "answer": ""}\n')
    with pytest.raises(DataError, match=rf"{train}.*empty.*all 10 rows"):
        load_examples(train)
    test = tmp_path / "test.jsonl"
    test.write_text(GOOD * 4)
    cfg = load_config("tiny_cpu", _gsm(train, test) + [f"output_dir={tmp_path / 'o'}"])
    _one_problem(check_run_inputs(cfg, resume=False), str(train), "10", "empty")


@pytest.mark.parametrize(
    "content, needle",
    [((GOOD * 20).encode() + b'{"question": "caf\xe9?", "answer": "#### 1"}\n', "line 21"),
     (bytes(range(256)) * 16, "not UTF-8")],
)
def test_jsonl_that_is_not_utf8_text_is_refused_naming_file_and_line(tmp_path, content, needle):
    """Bytes that are not UTF-8 gave the codec's message without the file (or, for a binary
    file, a batch-size complaint counted from its newlines)."""
    train = tmp_path / "train.jsonl"
    train.write_bytes(content)
    test = tmp_path / "test.jsonl"
    test.write_text(GOOD * 4)
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", _gsm(train, test) + [f"output_dir={tmp_path / 'o'}"])
    assert str(train) in str(e.value) and needle in str(e.value) and "UTF-8" in str(e.value)
    assert "optim.batch_size" not in str(e.value)


def test_json_array_in_jsonl_is_named_as_such(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps([json.loads(GOOD)] * 20))
    test = tmp_path / "test.jsonl"
    test.write_text(GOOD * 4)
    with pytest.raises(ConfigError) as e:
        load_config("tiny_cpu", _gsm(train, test))
    assert "a JSON array, not one object per line" in str(e.value) and str(train) in str(e.value)
    assert "heldout_size" not in str(e.value)
    with pytest.raises(DataError, match="a JSON array, not one object per line"):
        load_examples(train)


# 7. Free disk --------------------------------------------------------------------------------


def test_too_little_disk_for_a_checkpoint_is_refused(tmp_path, monkeypatch):
    cfg = _quick(TINY, tmp_path / "o")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    _one_problem(check_run_inputs(cfg, resume=False), "output_dir", "free", "checkpoint")
    monkeypatch.setattr(validate.shutil, "disk_usage", lambda p: usage(10**12, 0, 10**12))
    assert not [p for p in check_run_inputs(cfg, resume=False) if "free" in p]


# 8. Property test: nothing but ConfigError / DataError ---------------------------------------

KEYS = [key for key, _, _ in iter_keys()]
_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", ".inf", "-.inf", "1e400", "1e-400", "null", "~", "true", "[1, 2]",
                     "{a: 1}", "{", "[", "'", '"', "!!python/object:os.system", "&a x", "*a",
                     "- 1\n- 2", "a: b: c", "", " ", "#1", "0x10", "1_000", "2**64"]),
    st.text(max_size=20),
)
_keys = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(KEYS).map(lambda k: k + ".x"),
    st.text(alphabet="abc._=", max_size=12),
)
_overrides = st.lists(st.tuples(_keys, _values).map(lambda kv: f"{kv[0]}={kv[1]}"), max_size=5)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(_overrides)
def test_any_overrides_give_a_config_or_a_config_error(overrides):
    try:
        config_from_dict({"data": {"task": "synthetic"}}, overrides, check_paths=False)
    except ConfigError:
        pass


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_row = st.one_of(
    st.fixed_dictionaries({"question": _json, "answer": _json}),
    _json,
)


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_row, max_size=6), st.booleans())
def test_any_jsonl_rows_give_examples_or_a_data_error(tmp_path_factory, rows, as_array):
    path = tmp_path_factory.mktemp("rows") / "train.jsonl"
    text = json.dumps(rows, allow_nan=True) if as_array else "".join(
        json.dumps(r, allow_nan=True) + "\n" for r in rows
    )
    path.write_text(text)
    problems: list[str] = []
    validate.check_jsonl("data.train_file", str(path))  # never raises
    try:
        load_examples(path)
    except DataError:
        pass
    cfg = config_from_dict({}, check_paths=False)
    import dataclasses

    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_file=str(path)))
    validate.check_data_rows(cfg, problems, set())


_hf_keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
            "tie_word_embeddings", "rope_theta", "rms_norm_eps", "model_type", "layer_types"]
_hf_value = st.one_of(
    st.integers(min_value=-3, max_value=2**40), st.floats(), st.none(), st.text(max_size=6),
    st.booleans(), st.sampled_from(["qwen3", "qwen2", "llama", "gpt2"]), st.lists(st.integers(), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(_hf_keys), _hf_value, max_size=8), st.booleans())
def test_any_model_config_gives_problems_not_exceptions(tmp_path_factory, changes, start_from_real):
    model = tmp_path_factory.mktemp("m")
    base = json.loads((TINY / "config.json").read_text()) if start_from_real else {}
    (model / "config.json").write_text(json.dumps({**base, **changes}, allow_nan=True))
    (model / "model.safetensors").symlink_to(TINY / "model.safetensors")
    problems = check_model_dir(str(model))
    assert isinstance(problems, list)
    assert isinstance(validate.model_limits(str(model)), dict)


# 8. Hugging Face hub ids while offline ------------------------------------------------------


def _offline_cli(tmp_path, *argv: str):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "PYTHONPATH": str(PACKAGE_ROOT.parent)}  # fmt: skip
    env.pop("HACBO_TRACEBACK", None)
    return subprocess.run([sys.executable, *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


@pytest.mark.parametrize(
    "override, hub_id",
    [("model.path=no-such-org/no-such-model", "no-such-org/no-such-model"),
     ("model.tokenizer=no-such-org/no-such-tokenizer", "no-such-org/no-such-tokenizer")],
)
def test_hub_id_offline_is_a_one_line_refusal_naming_the_id(tmp_path, override, hub_id):
    """(--print-config prints a config naming a hub id not in the cache, and exits 0: it
    checks only what is already on disk; test_config_extends prints a paper config so.)"""
    argv = ["-m", "train.finetune", "--config", "tiny_cpu", f"output_dir={tmp_path / 'run'}",
            override]  # fmt: skip
    done = _offline_cli(tmp_path, *argv)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and hub_id in done.stderr and "offline" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def test_from_pretrained_of_a_hub_id_offline_raises_one_line_naming_the_id(tmp_path):
    script = ("from hacbo_jax.models.qwen3_hf import from_pretrained\n"
              "try:\n    from_pretrained('no-such-org/no-such-model')\n"
              "except ValueError as e:\n    print('VALUEERROR', e)\n")  # fmt: skip
    done = _offline_cli(tmp_path, "-c", script)
    assert done.returncode == 0, done.stderr
    (line,) = done.stdout.strip().splitlines()
    assert line.startswith("VALUEERROR") and "no-such-org/no-such-model" in line and "offline" in line


def test_print_config_reports_weight_and_vocabulary_problems(model_copy, capsys):
    """--print-config runs the cheap model checks (config.json, the tensor set and shapes from
    the safetensors headers, the tokenizer against the vocabulary) after printing the config;
    not the finiteness scan of every weight nor the data, which the run itself checks."""
    _rewrite(model_copy, lambda w: w.pop("model.norm.weight"))
    with pytest.raises(SystemExit) as e:
        parse_cli(["--config", "tiny_cpu", f"model.path={model_copy}", "--print-config"])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert "optim:" in captured.out  # the config is still printed
    assert "model.norm.weight missing" in captured.err and "Traceback" not in captured.err
    with pytest.raises(SystemExit) as e:
        parse_cli(["--config", "tiny_cpu", "--print-config"])
    assert e.value.code == 0


# 9. Output directories -----------------------------------------------------------------------


def test_output_dir_that_is_a_dangling_symlink_is_refused_before_any_work(tmp_path):
    """It passed the checks (it does not 'exist') and failed with 'File exists' at mkdir, after
    the model was loaded."""
    from hacbo_jax.trainer.config.validate import check_output_dir

    (tmp_path / "run").symlink_to(tmp_path / "gone")
    cfg = load_config("tiny_cpu", [f"output_dir={tmp_path / 'run'}"])
    _one_problem(check_output_dir(cfg, resume=False), "symlink", str(tmp_path / "gone"))
    (tmp_path / "gone").mkdir()
    assert check_output_dir(cfg, resume=False) == []
