"""Every check of a config, in one place, reported through one :class:`ConfigError`.

Static checks (types, ranges, unknown keys: :mod:`.build`), paths (looked up in the current
directory, then in the installed package), cross-field rules (some open the data file), and the
checks that need the loaded data or the devices (:func:`check_mesh`, :func:`check_pool_size`,
:func:`check_warmup`), which the run calls once it knows them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import difflib
import re
from pathlib import Path
from typing import Any

import numpy as np

from hacbo_jax.trainer.config.schema import Config
from hacbo_jax.trainer.config_fields import ConfigError
from hacbo_jax.trainer.run_lock import LOCK_NAME
from hacbo_jax.data.synthetic import PRESETS

# Relative paths in a config are looked up in the current directory, then here: the installed
# package, so that the defaults ("assets/tiny-qwen3-gsm", "assets/gsm8k/...") are package data.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# Paths and cross-field rules (problems are collected, not raised).
# ---------------------------------------------------------------------------------------------


def _resolve_existing(path: str) -> Path | None:
    """The path as given (from the current directory), else under the project root, if it exists."""
    p = Path(path).expanduser()
    for candidate in (p, PACKAGE_ROOT / p) if not p.is_absolute() else (p,):
        if candidate.exists():
            return candidate.resolve()
    return None


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_local_path(path: str) -> bool:
    """``org/name`` is a hub id unless ``org`` is a local directory (e.g. ``assets/...``)."""
    if not _HUB_ID.match(path):
        return True
    first = path.split("/", 1)[0]
    return Path(first).is_dir() or (PACKAGE_ROOT / first).is_dir()


def resolve_paths(cfg: Config, problems: list[str], bad: set[str]) -> Config:
    """``cfg`` with its local paths resolved (current directory, then the package)."""
    model_path = cfg.model.path
    if "model.path" not in bad:
        found = _resolve_existing(model_path)
        if found is not None:
            if not (found / "config.json").is_file():
                problems.append(
                    f"model.path = {model_path!r}: must be a Hugging Face model "
                    f"directory containing config.json (looked in {found}), or a hub id"
                )
            model_path = str(found)
        elif _looks_like_local_path(model_path):
            problems.append(
                f"model.path = {model_path!r}: no such local directory (looked in the "
                f"current directory and {PACKAGE_ROOT}); must be an existing Hugging "
                "Face model directory or a hub id like 'Qwen/Qwen3-0.6B'"
            )
    data = cfg.data
    files = {}
    if data.task == "gsm8k" and data.hub_name is None and not {"data.task", "data.hub_name"} & bad:
        for key in ("train_file", "eval_file"):
            given = getattr(data, key)
            found = _resolve_existing(given)
            if found is None or not found.is_file():
                problems.append(
                    f"data.{key} = {given!r}: file not found (looked in the current "
                    f"directory and {PACKAGE_ROOT}); must be a JSONL file of "
                    "{question, answer} rows, or set data.hub_name"
                )
                bad.add(f"data.{key}")
            else:
                files[key] = str(found)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=model_path),
        data=dataclasses.replace(data, **files),
    )


def resolve_tokenizer(cfg: Config, problems: list[str], bad: set[str]) -> Config:
    """``cfg`` with ``model.tokenizer`` resolved: a given local directory (current directory,
    then the package) must hold tokenizer files; null becomes the model directory's tokenizer,
    or the shipped Qwen3 tokenizer for a Qwen3 directory without one
    (:func:`hacbo_jax.data.tokenizer.default_tokenizer`); a hub id is kept."""
    from hacbo_jax.data.tokenizer import TOKENIZER_FILES, default_tokenizer, has_tokenizer

    if "model.path" in bad or "model.tokenizer" in bad:
        return cfg
    given = cfg.model.tokenizer
    if given is None:
        try:
            resolved = default_tokenizer(cfg.model.path)
        except ValueError as e:
            problems.append(f"model.tokenizer = null: {e}")
            bad.add("model.tokenizer")
            return cfg
    else:
        found = _resolve_existing(given)
        if found is not None:
            if not found.is_dir() or not has_tokenizer(found):
                problems.append(
                    f"model.tokenizer = {given!r}: must be a tokenizer directory holding "
                    f"{' or '.join(TOKENIZER_FILES)} (looked in {found}), or a hub id"
                )
                bad.add("model.tokenizer")
                return cfg
            resolved = str(found)
        elif _looks_like_local_path(given):
            problems.append(
                f"model.tokenizer = {given!r}: no such local directory (looked in the current "
                f"directory and {PACKAGE_ROOT}); must be a tokenizer directory or a hub id"
            )
            bad.add("model.tokenizer")
            return cfg
        else:
            resolved = given
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer=resolved))


def check_data_format(cfg: Config, problems: list[str], bad: set[str]) -> None:
    """The data format fits the task, and local data files have a supported type."""
    from hacbo_jax.data.formats import FILE_SUFFIXES

    d = cfg.data
    if d.task == "synthetic" and d.format != "question_answer" and "data.format" not in bad:
        problems.append(
            f"data.format = {d.format!r}: the synthetic task is in question_answer format; "
            "other formats need data.task: gsm8k (files or hub)"
        )
    if d.task != "gsm8k" or d.hub_name is not None:
        return
    for key in ("train_file", "eval_file"):
        suffix = Path(getattr(d, key)).suffix.lower()
        if f"data.{key}" not in bad and suffix not in FILE_SUFFIXES:
            problems.append(
                f"data.{key} = {getattr(d, key)!r}: unsupported file type {suffix or '(none)'!r}; "
                f"must be one of {', '.join(FILE_SUFFIXES)}"
            )


def _check_synthetic_preset(preset: str) -> str | None:
    """None when ``preset`` is one of :data:`hacbo_jax.data.synthetic.PRESETS`."""
    if preset in PRESETS:
        return None
    close = difflib.get_close_matches(preset, PRESETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (
        f"data.synthetic.preset = {preset!r}: must be one of "
        + ", ".join(map(repr, PRESETS))
        + hint
    )


def cross_checks(cfg: Config, problems: list[str], bad: set[str]) -> None:
    """Rules tying several keys together; a rule is skipped when one of its keys was rejected."""

    def ok(*keys: str) -> bool:
        return not any(
            k == b or k.startswith(b + ".") or b.startswith(k + ".") for k in keys for b in bad
        )

    o, m, d = cfg.optim, cfg.microdev, cfg.data
    if (
        ok("optim.batch_size", "optim.micro_batch_size")
        and o.micro_batch_size is not None
        and o.batch_size % o.micro_batch_size
    ):
        problems.append(
            f"optim.batch_size = {o.batch_size}: must be a multiple of "
            f"optim.micro_batch_size = {o.micro_batch_size} (gradient accumulation)"
        )
    warmup_ok = ok("optim.warmup_steps", "optim.max_steps")
    if warmup_ok and o.max_steps is not None and o.warmup_steps >= o.max_steps:
        problems.append(
            f"optim.warmup_steps = {o.warmup_steps}: must be < optim.max_steps = {o.max_steps}"
        )
        warmup_ok = False
    if (
        ok("microdev.refresh_fraction", "microdev.refresh_every")
        and m.refresh_every > 0
        and m.refresh_fraction == 0
    ):
        problems.append(
            f"microdev.refresh_fraction = {m.refresh_fraction}: must be > 0 when "
            f"microdev.refresh_every = {m.refresh_every} (a refresh would replace nothing); "
            "set microdev.refresh_every=0 to keep the buffer fixed"
        )
    if ok("microdev.batch_size", "microdev.size") and m.batch_size > m.size:
        problems.append(
            f"microdev.batch_size = {m.batch_size}: must be <= microdev.size = {m.size}"
        )
    if (
        ok("microdev.pool", "microdev.size", "data.heldout_size")
        and m.pool == "heldout"
        and d.heldout_size < m.size
    ):
        problems.append(
            f"data.heldout_size = {d.heldout_size}: must be >= microdev.size = "
            f"{m.size} when microdev.pool is 'heldout' (the buffer is drawn from it)"
        )
    if d.task == "synthetic" and ok("data.task", "data.synthetic.preset"):
        why = _check_synthetic_preset(d.synthetic.preset)
        if why:
            problems.append(why)
    if not ok(
        "data.task",
        "data.train_file",
        "data.hub_name",
        "data.heldout_size",
        "data.synthetic.n_train",
        "microdev.pool",
        "optim.epochs",
        "optim.batch_size",
    ):
        return
    n_train = cfg.expected_train_examples()
    if n_train is None:
        return  # unknown until the data is loaded: the training loop calls check_warmup
    if n_train < o.batch_size:
        what = (
            "data.synthetic.n_train"
            if d.task == "synthetic"
            else f"the {n_train + d.heldout_size} rows of data.train_file minus data.heldout_size"
            if m.pool == "heldout"
            else "the rows of data.train_file"
        )
        problems.append(
            f"optim.batch_size = {o.batch_size}: must be <= the {n_train} training "
            f"examples ({what}); an epoch would have no full batch"
        )
    elif warmup_ok:
        total = cfg.total_steps(n_train)
        if o.warmup_steps >= total:
            problems.append(
                f"optim.warmup_steps = {o.warmup_steps}: must be < the run's {total} optimiser "
                f"steps ({o.epochs} epochs x ({n_train} examples // batch {o.batch_size})"
                f"{', capped by max_steps' if o.max_steps else ''})"
            )


# ---------------------------------------------------------------------------------------------
# Checks that need the loaded data or the devices (the run calls them before any work).
# ---------------------------------------------------------------------------------------------


def _raise(problems: list[str]) -> None:
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def check_warmup(cfg: Config, total_steps: int) -> None:
    """ConfigError unless ``optim.warmup_steps < total_steps`` (the run's optimiser steps)."""
    if cfg.optim.warmup_steps >= total_steps:
        _raise(
            [
                f"optim.warmup_steps = {cfg.optim.warmup_steps}: must be < the run's "
                f"{total_steps} optimiser steps (epochs x (train examples // batch_size), capped "
                "by max_steps); the learning rate would never leave warm-up"
            ]
        )


def check_pool_size(cfg: Config, pool_size: int) -> None:
    """ConfigError unless the micro-dev buffer fits in its pool of ``pool_size`` examples."""
    if cfg.microdev.size > pool_size:
        _raise(
            [
                f"microdev.size = {cfg.microdev.size}: must be <= the micro-dev pool's "
                f"{pool_size} examples (microdev.pool = {cfg.microdev.pool!r})"
            ]
        )


def check_backend(cfg: Config) -> None:
    """ConfigError when ``model.attention_impl`` needs a backend jax does not have ("cudnn"
    needs a CUDA GPU). Checked when the run starts, not when the config is read, so that the
    GPU configs can be read, printed and tested on any machine."""
    import jax

    backend = jax.default_backend()
    if cfg.model.attention_impl == "cudnn" and backend != "gpu":
        _raise(
            [
                f"model.attention_impl = 'cudnn': needs a CUDA GPU, but jax's default backend "
                f"is {backend!r}; use 'einsum' (the CPU path) or 'xla' "
                "(override model.attention_impl=einsum)"
            ]
        )


def check_mesh(cfg: Config) -> Any:
    """The ``(data, fsdp)`` mesh of ``cfg.mesh``, checked against the devices and the batch.

    Raises ConfigError when the mesh does not fit the devices present, when
    ``optim.micro_batch_size`` (default: ``optim.batch_size``) cannot be split evenly over its
    ``data * fsdp`` devices, or when the backend cannot run ``model.attention_impl``
    (:func:`check_backend`).
    """
    check_backend(cfg)
    try:
        mesh = cfg.mesh.build()
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  - {e}") from e
    micro = cfg.optim.micro_batch_size or cfg.optim.batch_size
    if micro % mesh.size:
        _raise(
            [
                f"optim.micro_batch_size = {micro}"
                f"{'' if cfg.optim.micro_batch_size else ' (= optim.batch_size)'}: must be "
                f"divisible by the mesh's {mesh.size} devices (mesh.data={mesh.shape['data']} x "
                f"mesh.fsdp={mesh.shape['fsdp']}), which split each micro-batch between them"
            ]
        )
    return mesh


# ---------------------------------------------------------------------------------------------
# Finiteness, labels, data rows (static), the content of the run's inputs (up front),
# the output directory and what a --resume may change.
# ---------------------------------------------------------------------------------------------

# An AdamW step moves each weight by about lr; above this the run is certainly a typo (1e38
# overflows the update norm, inf/1e400 makes every weight non-finite at step 1).
MAX_LR = 1.0


def _float_fields(node: Any, prefix: str = ""):
    """``(dotted key, value)`` of every float-valued field of a config tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _float_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            yield prefix + f.name, value


INT32_LIMIT = 2**31  # step counters and sizes are int32 on the device


def _int_fields(node: Any, prefix: str = ""):
    """``(dotted key, value)`` of every integer-valued field of a config tree."""
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            yield from _int_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, int) and not isinstance(value, bool):
            yield prefix + f.name, value


def check_finite(cfg: Config, problems: list[str], bad: set[str]) -> None:
    """Every float key finite (YAML's ``.inf``, ``nan``, ``1e400`` parse as floats), every
    integer key but ``seed`` (uint32, checked by its own range) below 2**31, and ``optim.lr``
    not absurd (<= :data:`MAX_LR`)."""
    for key, value in _int_fields(cfg):
        if key in bad or key == "seed" or value < INT32_LIMIT:
            continue
        problems.append(
            f"{key} = {value}: must be < 2**31 (step counts and sizes are 32-bit integers)"
        )
        bad.add(key)
    for key, value in _float_fields(cfg):
        if key in bad:
            continue
        if not math.isfinite(value):
            problems.append(f"{key} = {value}: must be a finite number")
            bad.add(key)
    if "optim.lr" not in bad and cfg.optim.lr > MAX_LR:
        problems.append(
            f"optim.lr = {cfg.optim.lr:g}: must be <= {MAX_LR:g} (a learning rate that large "
            "overflows the update; AdamW moves each weight by about lr per step)"
        )
        bad.add("optim.lr")


def check_method_label(cfg: Config, problems: list[str], bad: set[str]) -> None:
    """``method`` may not name another controller than the one that runs (a run with
    ``controller.kind=none`` labelled ``hacbo`` would be compared as HACBO)."""
    from hacbo_jax.trainer.controller_registry import CONTROLLERS

    method, kind = cfg.method, cfg.controller.kind
    if "controller.kind" in bad or method is None or method == kind or method not in CONTROLLERS:
        return
    problems.append(
        f"method = {method!r}: names the controller {method!r} but controller.kind = {kind!r}; "
        "set method=null (the run is then labelled by controller.kind) or a name of your own"
    )
    bad.add("method")


def _count_rows(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def jsonl_is_array(path: str | Path) -> bool:
    """True when a ``.jsonl`` file's first non-blank character opens a JSON array (a ``.json``
    list saved under the wrong name), so that it is reported as such."""
    try:
        with open(path, "rb") as f:
            while chunk := f.read(4096):
                stripped = chunk.lstrip()
                if stripped:
                    return stripped[:1] == b"["
    except OSError:
        return False
    return False


def jsonl_text_problem(path: str | Path) -> str | None:
    """Why a ``.jsonl`` file is not UTF-8 text (naming the first bad line and byte), or None."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None  # reported where the file is read
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return (
            f"line {line} is not UTF-8 text (byte {data[e.start]:#04x}); JSONL files must be "
            "UTF-8 (re-save the file as UTF-8)"
        )
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        return f"line {line} holds a NUL byte: a binary file, not JSON lines"
    return None


def check_data_rows(cfg: Config, problems: list[str], bad: set[str]) -> None:
    """An empty ``data.train_file``, or one with no rows left after ``data.heldout_size``, is
    reported as such (not as a batch larger than a negative number of examples)."""
    d, m = cfg.data, cfg.microdev
    if d.task != "gsm8k" or d.hub_name is not None or {"data.train_file", "data.task"} & bad:
        return
    # Rows are lines only in JSONL; JSON and Parquet files are counted when they are read
    # (hacbo_jax.data.formats), which reports an empty file the same way.
    for key in ("train_file", "eval_file"):
        path = getattr(d, key)
        if f"data.{key}" not in bad and Path(path).suffix == ".jsonl" and jsonl_is_array(path):
            problems.append(
                f"data.{key} = {path!r}: holds a JSON array, not one object per line (JSONL); "
                "write one JSON object per line, or name the file .json"
            )
            bad.add(f"data.{key}")
        elif f"data.{key}" not in bad and Path(path).suffix == ".jsonl":
            why = jsonl_text_problem(path)
            if why:
                problems.append(f"data.{key} = {path!r}: {why}")
                bad.add(f"data.{key}")
    if "data.train_file" in bad:
        return
    if not Path(d.train_file).is_file() or Path(d.train_file).suffix != ".jsonl":
        return
    rows = _count_rows(d.train_file)
    if rows == 0:
        problems.append(
            f"data.train_file = {d.train_file!r}: has no rows; must hold one JSON object "
            "per line"
        )
        bad.add("data.train_file")
    elif m.pool == "heldout" and d.heldout_size >= rows and "data.heldout_size" not in bad:
        problems.append(
            f"data.heldout_size = {d.heldout_size}: must be < the {rows} rows of "
            f"data.train_file ({d.train_file}) when microdev.pool is 'heldout'; nothing would "
            "be left to train on"
        )
        bad.add("data.heldout_size")


# Keys a --resume may change: they do not change the trajectory (params, optimiser state, data
# order). Every other key does (model, data, seed, optimiser and schedule, batch, controller,
# micro-dev buffer). The mesh may change: a checkpoint is re-sharded onto the devices present
# (resuming a pre-empted job on another slice); only the float summation order differs.
RESUME_MAY_CHANGE = (
    "output_dir",
    "method",
    "eval.",
    "logging.",
    "checkpoint.",
    "divergence.",
    "mesh.",
)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def resume_differences(saved: Config, requested: Config) -> tuple[list[str], list[str]]:
    """``(refused, allowed)``: lines ``key: saved -> requested`` for every key that differs.

    Refused: keys that change the trajectory. Allowed: logging, evaluation, checkpointing,
    divergence limit, labels and ``output_dir``; and ``optim.max_steps`` when the run length
    (which the learning-rate schedule is defined over) stays the same.
    """
    old, new = _flat(dataclasses.asdict(saved)), _flat(dataclasses.asdict(requested))
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        line = f"{key}: {a!r} -> {b!r}"
        if key == "optim.max_steps":
            n_train = saved.expected_train_examples()
            same = n_train is not None and saved.total_steps(n_train) == requested.total_steps(
                n_train
            )
            (allowed if same else refused).append(
                line
                + (
                    ""
                    if same
                    else " (changes the run length, over which the learning-rate schedule runs)"
                )
            )
        elif key.startswith(RESUME_MAY_CHANGE) or key in RESUME_MAY_CHANGE:
            allowed.append(line)
        else:
            refused.append(line)
    return refused, allowed


# ---------------------------------------------------------------------------------------------
# The run's inputs, checked before anything is written or any model is built.
# ---------------------------------------------------------------------------------------------


# safetensors dtypes a model's weights may have (an integer or quantised tensor is not a weight
# this port can train), and the bits that mark a non-finite value (all exponent bits set).
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_EXPONENT_BITS = {
    "F64": (np.uint64, 0x7FF0000000000000),
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
}
_DTYPE_NAMES = {"I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64", "BOOL": "bool"}
_CHUNK = 1 << 24  # elements per finiteness check (bounded memory for any tensor size)

# Upper bounds on a config.json's sizes: beyond them the file is certainly not a model this port
# can build (and building even its abstract shape would take unbounded time).
MODEL_LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 19,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 24,
}


def _safetensors_header(path: Path, problems: list[str]) -> tuple[dict[str, dict], int]:
    """``(tensor name -> header entry {dtype, shape, data_offsets}, offset of the data)`` of a
    safetensors file (8-byte length + JSON), checking that the file is as long as the header
    says (a truncated download fails here)."""
    import json
    import struct

    where = f"model.path: {path}"
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a {size}-byte file")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        entries, end = {}, 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape = tuple(int(n) for n in info["shape"])
            start, stop = (int(x) for x in info["data_offsets"])
            if not isinstance(info["dtype"], str) or any(n < 0 for n in shape) or stop < start:
                raise ValueError(f"bad header entry for {name!r}")
            entries[name] = {"dtype": info["dtype"], "shape": shape, "data_offsets": (start, stop)}
            end = max(end, stop)
        if 8 + length + end > size:
            raise ValueError(f"truncated: tensors need {8 + length + end} bytes, file has {size}")
        return entries, 8 + length
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        problems.append(f"{where}: not a readable safetensors file ({e}); must be a complete one")
        return {}, 0


def _safetensors_shapes(path: Path, problems: list[str]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header."""
    return {name: e["shape"] for name, e in _safetensors_header(path, problems)[0].items()}


def _nonfinite_count(path: Path, entry: dict, data_start: int) -> int:
    """NaN and inf values of one floating tensor of a safetensors file (read in chunks through a
    memory map; bfloat16, which numpy has no dtype for, by its exponent bits)."""
    uint, mask = _EXPONENT_BITS[entry["dtype"]]
    start, stop = entry["data_offsets"]
    count = (stop - start) // np.dtype(uint).itemsize
    if count == 0:
        return 0
    values = np.memmap(path, dtype=uint, mode="r", offset=data_start + start, shape=(count,))
    bad = 0
    for i in range(0, count, _CHUNK):
        bad += int(np.count_nonzero((values[i : i + _CHUNK] & uint(mask)) == uint(mask)))
    del values
    return bad


def _check_weight_values(
    headers: dict[str, tuple[Path, dict, int]], problems: list[str], path: str
) -> None:
    """Every tensor floating (by its header) and finite (by its values)."""
    not_float, nonfinite = [], []
    for name, (file, entry, data_start) in sorted(headers.items()):
        if entry["dtype"] not in FLOAT_DTYPES:
            kind = entry["dtype"]
            not_float.append(f"{name} ({kind}: {_DTYPE_NAMES.get(kind, kind.lower())})")
            continue
        try:
            bad = _nonfinite_count(file, entry, data_start)
        except (OSError, ValueError) as e:
            problems.append(f"model.path = {path!r}: {name} cannot be read ({e})")
            continue
        if bad:
            n = math.prod(entry["shape"])
            nonfinite.append(f"{name} ({bad} of {n} values NaN or inf)")
    if not_float:
        problems.append(
            f"model.path = {path!r}: {len(not_float)} tensors are not floating point: "
            + _shown(not_float)
            + f"; weights must be one of {', '.join(FLOAT_DTYPES)} (a quantised checkpoint "
            "cannot be fine-tuned here; use the original floating-point weights)"
        )
    if nonfinite:
        problems.append(
            f"model.path = {path!r}: {len(nonfinite)} tensors hold non-finite values: "
            + _shown(nonfinite)
            + "; every weight must be finite (the download or the export that wrote them is "
            "broken)"
        )


def _shown(items: list[str], limit: int = 6) -> str:
    return "; ".join(items[:limit]) + (
        f"; ... {len(items) - limit} more" if len(items) > limit else ""
    )


def _config_limits_problems(raw: Any, where: Path) -> list[str]:
    """Sizes in config.json that are not positive integers within :data:`MODEL_LIMITS`."""
    if not isinstance(raw, dict):
        return [f"model.path: {where}: must be a JSON object, got {type(raw).__name__}"]
    problems = []
    for key, hi in MODEL_LIMITS.items():
        if key not in raw or (raw[key] is None and key in ("head_dim", "num_key_value_heads")):
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
            problems.append(
                f"model.path: {where}: {key} = {value!r}: must be an integer in [1, {hi}]"
            )
    heads = raw.get("num_attention_heads")
    kv = raw.get("num_key_value_heads")
    if not problems and isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        problems.append(
            f"model.path: {where}: num_attention_heads = {heads}: must be a multiple of "
            f"num_key_value_heads = {kv}"
        )
    return problems


def model_limits(path: str) -> dict[str, Any]:
    """``{max_position_embeddings, vocab_size}`` of a local model directory's config.json (the
    values it gives that are positive integers), ``{}`` for a hub id or an unreadable file."""
    import json

    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    out: dict[str, Any] = {}
    for key, default in (("max_position_embeddings", 32768), ("vocab_size", None)):
        value = raw.get(key, default)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = value
    return out


def check_model_limits(cfg: Config, problems: list[str], bad: set[str]) -> None:
    """``data.max_len`` within the model's ``max_position_embeddings`` (a local model's
    config.json; a hub id's is checked when the run starts, :func:`check_run_inputs`)."""
    if {"data.max_len", "model.path"} & bad:
        return
    limit = model_limits(cfg.model.path).get("max_position_embeddings")
    if limit is not None and cfg.data.max_len > limit:
        problems.append(
            f"data.max_len = {cfg.data.max_len}: must be <= the model's "
            f"max_position_embeddings = {limit} ({Path(cfg.model.path) / 'config.json'}); "
            "longer rows have no trained positions"
        )
        bad.add("data.max_len")


def check_model_dir(
    path: str, info: dict[str, Any] | None = None, *, scan_values: bool = True
) -> list[str]:
    """Problems of a local model directory: config.json (valid JSON, sizes in range, a supported
    model_type), the safetensors files (complete headers), exactly the tensors the config implies
    (none missing, none extra, each with its shape), every tensor floating point and finite.

    The model is only built abstractly (``nnx.eval_shape``); the weights' values are read once,
    through a memory map, for the finiteness check. ``info`` (when given) receives the model's
    ``config`` (Qwen3Config) and ``n_params`` (the parameters' element count).
    """
    import json

    directory = Path(path)
    if not directory.is_dir():
        return []  # a hub id: checked when downloaded
    problems: list[str] = []
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        return [f"model.path: {directory / 'config.json'}: not valid JSON ({e})"]
    limits = _config_limits_problems(raw, directory / "config.json")
    if limits:
        return limits
    from flax import nnx

    from hacbo_jax.models import qwen3_hf
    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM

    try:
        config = qwen3_hf.config_from_hf(raw)
        abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0)))
    except (ValueError, TypeError, KeyError, ZeroDivisionError, AttributeError) as e:
        return [f"model.path: {directory / 'config.json'}: {e}"]
    index = directory / "model.safetensors.index.json"
    files: dict[str, str] = {}
    if index.is_file():
        try:
            files = dict(json.loads(index.read_text())["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return [f"model.path: {index}: not a valid tensor index ({e})"]
    elif not (directory / "model.safetensors").is_file():
        return [f"model.path = {path!r}: no model.safetensors or model.safetensors.index.json"]
    headers: dict[str, tuple[Path, dict, int]] = {}
    for name in sorted(set(files.values()) or {"model.safetensors"}):
        entries, data_start = _safetensors_header(directory / name, problems)
        for tensor, entry in entries.items():
            headers[tensor] = (directory / name, entry, data_start)
    if problems:
        return problems
    shapes = {name: entry["shape"] for name, (_, entry, _) in headers.items()}
    wrong, expected, n_params = [], set(), 0
    for var_path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = qwen3_hf.hf_name(var_path)
        want = qwen3_hf.param_to_hf_shape(var_path, tuple(var.shape))
        expected.add(name)
        n_params += math.prod(var.shape)
        if name not in shapes:
            wrong.append(f"{name} missing")
        elif shapes[name] != want:
            wrong.append(f"{name}: stored {shapes[name]}, config.json implies {want}")
    # A tied checkpoint may still store lm_head.weight (from_pretrained ignores it).
    tolerated = {"lm_head.weight"} if config.tie_word_embeddings else set()
    extra = sorted(set(shapes) - expected - tolerated)
    if wrong:
        problems.append(
            f"model.path = {path!r}: the weights do not match config.json ({len(wrong)} "
            f"tensors): {_shown(wrong)}"
        )
    if extra:
        problems.append(
            f"model.path = {path!r}: {len(extra)} stored tensors are not used by the model "
            f"config.json describes (num_hidden_layers = {config.num_hidden_layers}, "
            f"tie_word_embeddings = {config.tie_word_embeddings}): {_shown(extra)}; the "
            "config.json must describe the weights exactly"
        )
    if scan_values:
        _check_weight_values(
            {k: v for k, v in headers.items() if k in expected or k in tolerated}, problems, path
        )
    if info is not None:
        info.update(config=config, n_params=n_params)
    return problems


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def load_checked_tokenizer(path: str, problems: list[str], key: str = "model.path") -> Any:
    """The tokenizer of a local directory (``key`` names where it came from), or None with the
    problem appended."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        problems.append(
            f"{key} = {path!r}: no tokenizer files (one of {', '.join(_TOKENIZER_FILES)}); "
            "the model directory must hold the tokenizer it was trained with, or set "
            "model.tokenizer"
        )
        return None
    from hacbo_jax.data.tokenizer import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types for a broken tokenizer
        problems.append(f"{key} = {path!r}: the tokenizer cannot be loaded ({e})")
        return None
    if len(tokenizer) == 0:
        problems.append(f"{key} = {path!r}: the tokenizer has an empty vocabulary")
        return None
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        problems.append(f"{key} = {path!r}: the tokenizer needs an eos and a pad token")
        return None
    return tokenizer


def check_jsonl(key: str, path: str, max_shown: int = 5) -> list[str]:
    """Every non-empty line of a GSM8K file a JSON object with string question and answer."""
    import json

    bad: list[str] = []
    rows = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            rows += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append(f"line {number}: not UTF-8 text (byte {raw[e.start]:#04x})")
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                bad.append(f"line {number}: malformed JSON ({e.msg})")
                continue
            if not isinstance(record, dict) or not all(
                isinstance(record.get(k), str) for k in ("question", "answer")
            ):
                bad.append(f'line {number}: needs string fields "question" and "answer"')
    if not bad:
        return []
    more = f"; ... {len(bad) - max_shown} more" if len(bad) > max_shown else ""
    return [
        f"{key} = {path!r}: {len(bad)} of {rows} rows unusable: "
        + "; ".join(bad[:max_shown])
        + more
    ]


def check_vocab(vocab_size: int, tokenizer: Any, model_path: str) -> list[str]:
    """The model's embedding has a row for every id the tokenizer can produce."""
    ids = [len(tokenizer) - 1]
    try:
        ids += list(tokenizer.get_vocab().values())
    except (AttributeError, TypeError, NotImplementedError):
        pass
    largest = max(ids)
    if vocab_size > largest:
        return []
    return [
        f"model.path = {model_path!r}: config.json's vocab_size = {vocab_size}: must be > the "
        f"tokenizer's largest token id {largest} ({len(tokenizer)} tokens); ids beyond the "
        "embedding give NaN losses. Use the tokenizer the model was trained with (model.tokenizer)"
    ]


# Bytes one checkpoint needs per parameter, in units of the parameter's own size: the weights
# and AdamW's two moments (mu, nu), as orbax writes them (uncompressed).
CHECKPOINT_COPIES = 3


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_disk(cfg: Config, n_params: int) -> list[str]:
    """Free space where ``output_dir`` lives for at least one checkpoint: params + AdamW state
    (:data:`CHECKPOINT_COPIES` x ``n_params`` x the bytes of ``model.param_dtype``). Skipped
    when checkpoints are not written or the free space cannot be known."""
    if cfg.output_dir is None:
        return []
    itemsize = 2 if cfg.model.param_dtype == "bfloat16" else 4
    need = CHECKPOINT_COPIES * n_params * itemsize
    where = _existing_parent(Path(cfg.output_dir))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return []
    if free >= need:
        return []
    return [
        f"output_dir = {cfg.output_dir!r}: {free / 2**20:,.1f} MiB free on {where}, but one "
        f"checkpoint needs about {need / 2**20:,.1f} MiB ({CHECKPOINT_COPIES} x {n_params:,} "
        f"parameters x {itemsize} bytes: weights and the AdamW moments); free space or choose "
        "another output_dir"
    ]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The finished checkpoint steps in ``run_dir/checkpoints`` (orbax writes a step into
    ``<step>.orbax-checkpoint-tmp-*`` and renames it to ``<step>`` only once it is complete)."""
    ckpt = Path(run_dir) / "checkpoints"
    return [p for p in ckpt.iterdir() if p.name.isdigit()] if ckpt.is_dir() else []


def stopped_before_first_checkpoint(run_dir: Path) -> bool:
    """``run_dir`` holds a run's files (its ``config.yaml``) but no complete checkpoint: the run
    was killed before, or during, its first checkpoint save. ``--resume`` starts it again."""
    return (Path(run_dir) / "config.yaml").is_file() and not complete_checkpoints(run_dir)


def check_output_dir(cfg: Config, *, resume: bool) -> list[str]:
    """An existing run is never overwritten; the directory can be created; --resume needs a
    checkpoint, or a run stopped before its first one (which then starts again from step 0).
    The run lock file alone (:data:`~hacbo_jax.trainer.run_lock.LOCK_NAME`) is no run."""
    out = Path(cfg.output_dir)
    if resume:
        if complete_checkpoints(out) or stopped_before_first_checkpoint(out):
            return []
        return [
            f"--resume: no checkpoint in {out / 'checkpoints'} and no run's config.yaml "
            f"(output_dir = {cfg.output_dir!r}); drop --resume to start the run, or give the "
            "output_dir of the run to continue"
        ]
    if out.exists() and not out.is_dir():
        return [f"output_dir = {cfg.output_dir!r}: exists and is not a directory"]
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        return [
            f"output_dir = {cfg.output_dir!r}: already holds a run (never overwritten); "
            "continue it with --resume (a run stopped before its first checkpoint starts "
            "again from step 0), or choose another output_dir"
        ]
    for link in (out, *out.parents):
        if link.is_symlink() and not link.exists():
            return [
                f"output_dir = {cfg.output_dir!r}: {link} is a symlink to {os.readlink(link)!r}, "
                "which does not exist; create that directory, or remove the link"
            ]
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return [f"output_dir = {cfg.output_dir!r}: cannot be created ({parent} is a file)"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"output_dir = {cfg.output_dir!r}: cannot be created ({parent} is not writable)"]
    return []


def _local_dir(
    path: str, key: str, patterns: list[str], problems: list[str], fetch: bool = True
) -> str | None:
    """``path`` itself when it is a local directory, else (a hub id) its snapshot in the Hugging
    Face cache, downloaded when online; None with the problem (one line naming the id: offline
    and not cached, no network, no such repository) appended. ``fetch`` False: the cache only,
    and a hub id not in it is no problem (None: not checked)."""
    if Path(path).is_dir():
        return path
    from hacbo_jax.models.qwen3_hf import hub_snapshot

    try:
        return hub_snapshot(path, patterns, what=f"{key} =", local_only=not fetch)
    except ValueError as e:
        if fetch:
            problems.append(str(e))
        return None


_TOKENIZER_PATTERNS = ["*.json", "*.model", "*.txt", "*.tiktoken"]


def check_model_inputs(
    cfg: Config, info: dict[str, Any] | None = None, *, cheap: bool = False
) -> tuple[list[str], Any]:
    """``(problems, tokenizer or None)`` of the model and its tokenizer: config.json, the tensors,
    every weight's finiteness, the tokenizer files, the vocabulary against the tokenizer and
    ``data.max_len`` against the model. A hub id is resolved through the local Hugging Face
    cache (downloaded when online) first. ``cheap`` (``--print-config``): no download (a hub id
    not in the cache is not checked) and no finiteness scan (a read of every weight)."""
    problems: list[str] = []
    info = {} if info is None else info
    fetch, scan_values = not cheap, not cheap
    model_dir = _local_dir(
        cfg.model.path, "model.path", ["*.json", "*.safetensors"], problems, fetch
    )
    if model_dir is not None:
        problems += check_model_dir(model_dir, info, scan_values=scan_values)
    if cfg.model.tokenizer is not None and cfg.model.tokenizer == cfg.model.path:
        tokenizer = model_dir and load_checked_tokenizer(model_dir, problems)  # said once
    elif cfg.model.tokenizer is not None:  # resolved at load (resolve_tokenizer)
        found = _local_dir(
            cfg.model.tokenizer, "model.tokenizer", _TOKENIZER_PATTERNS, problems, fetch
        )
        tokenizer = found and load_checked_tokenizer(found, problems, "model.tokenizer")
    else:
        tokenizer = model_dir and load_checked_tokenizer(model_dir, problems)
    model_config = info.get("config")
    if model_config is not None:
        if cfg.data.max_len > model_config.max_position_embeddings:
            problems.append(
                f"data.max_len = {cfg.data.max_len}: must be <= the model's "
                f"max_position_embeddings = {model_config.max_position_embeddings} "
                f"(model.path = {cfg.model.path!r})"
            )
            info["max_len_ok"] = False
        if tokenizer is not None:
            problems += check_vocab(model_config.vocab_size, tokenizer, cfg.model.path)
    return problems, tokenizer or None


def check_run_inputs(cfg: Config, *, resume: bool) -> list[str]:
    """Every problem of the run's inputs that needs their content (model directory, tokenizer,
    data rows, at least one answer token within ``data.max_len``, output directory), found
    without building the model or writing anything."""
    problems = check_output_dir(cfg, resume=resume)
    info: dict[str, Any] = {}
    model_problems, tokenizer = check_model_inputs(cfg, info)
    problems += model_problems
    d = cfg.data
    max_len_ok = info.get("max_len_ok", True)
    if info.get("config") is not None and not problems:
        problems += check_free_disk(cfg, info["n_params"])
    files_ok = True
    # Other formats and file types are checked row by row when they are read (formats.py).
    if (
        d.task == "gsm8k"
        and d.hub_name is None
        and d.format == "question_answer"
        and (d.columns.question, d.columns.answer) == ("question", "answer")
    ):
        for key in ("train_file", "eval_file"):
            path = getattr(d, key)
            if not Path(path).is_file() or Path(path).suffix != ".jsonl":
                continue
            found = check_jsonl(f"data.{key}", path)
            files_ok &= not found
            problems += found
            if not found and _count_rows(path) == 0 and key == "eval_file":
                problems.append(f"data.eval_file = {path!r}: has no rows")
                files_ok = False
    if tokenizer is not None and files_ok and max_len_ok:
        from hacbo_jax.data import gsm8k as data_lib
        from hacbo_jax.trainer.run_parts import load_task_data

        try:
            task = load_task_data(cfg, tokenizer)
        except (ValueError, OSError) as e:
            problems.append(f"data: {e}")
            return problems
        if not task.train:
            problems.append("data: no training examples")
        else:
            arrays = data_lib.tokenize_sft(task.train, tokenizer, d.max_len)
            if float(arrays.loss_mask.sum()) == 0:
                problems.append(
                    f"data.max_len = {d.max_len}: not one answer token of the "
                    f"{len(task.train)} training examples survives truncation (every prompt "
                    "is at least that long); raise data.max_len"
                )
    return problems
