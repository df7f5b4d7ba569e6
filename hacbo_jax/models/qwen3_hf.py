"""Hugging Face interop for the Qwen3 port: config, parameter names and layouts, load and save.

The one place that knows Hugging Face's names (``model.layers.3.self_attn.q_proj.weight``) and
layouts (``weight[out, in]``); :mod:`hacbo_jax.models.qwen3` stores kernels input-axes-first with
heads split out (q_proj: [D, N, H], o_proj: [N, H, D]). ``Qwen3ForCausalLM.from_pretrained`` /
``.save_pretrained`` and ``Qwen3Config.from_hf`` / ``.to_hf_dict`` delegate here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "config_from_hf",
    "config_to_hf_dict",
    "from_pretrained",
    "hf_name",
    "hf_to_param",
    "iter_hf_tensors",
    "param_to_hf",
    "param_to_hf_shape",
    "save_pretrained",
]

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def config_from_hf(config: Mapping[str, Any] | str | os.PathLike) -> Qwen3Config:
    """Builds a config from a Hugging Face ``config.json`` (a dict, the file, or its directory).

    ``rope_theta`` is read from ``rope_parameters`` (transformers >= 5) or from the top level
    (older files). Raises ValueError for a model_type other than ``qwen3``, sliding-window
    attention, RoPE scaling other than ``default``, or an activation other than ``silu``.
    """
    if not isinstance(config, Mapping):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            config = json.load(f)
    cfg = dict(config)
    if cfg.get("model_type") != "qwen3":
        raise ValueError(
            f"not a Qwen3 config: model_type={cfg.get('model_type')!r} (expected 'qwen3')"
        )
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu' is implemented)")
    if cfg.get("use_sliding_window", False):
        problems.append("use_sliding_window=True (sliding-window attention is not implemented)")
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(
            f"layer_types={sorted(set(layer_types))} (only 'full_attention' is implemented)"
        )
    rope = cfg.get("rope_parameters") or {}
    rope_scaling = cfg.get("rope_scaling") or {}
    for source, params in (("rope_parameters", rope), ("rope_scaling", rope_scaling)):
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            problems.append(
                f"{source}.rope_type={rope_type!r} (only 'default' RoPE is implemented)"
            )
    missing = [
        k
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        )
        if k not in cfg
    ]
    if missing:
        problems.append(f"missing required keys {missing}")
    if problems:
        raise ValueError("unsupported Qwen3 config: " + "; ".join(problems))
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    n_heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads")
    return Qwen3Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads if kv_heads is None else kv_heads,
        head_dim=cfg.get("head_dim") or 128,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
    )


def config_to_hf_dict(config: Qwen3Config, dtype: str = "float32") -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers.Qwen3ForCausalLM`` loads."""
    d = dataclasses.asdict(config)
    d.pop("rope_theta")
    d.update(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=config.num_hidden_layers,
        layer_types=["full_attention"] * config.num_hidden_layers,
        attention_dropout=0.0,
        use_cache=True,
        dtype=dtype,
    )
    if isinstance(d["eos_token_id"], tuple):
        d["eos_token_id"] = list(d["eos_token_id"])
    return d


# --------------------------------------------------------------------------------------------
# Parameter mapping
# --------------------------------------------------------------------------------------------

# Number of leading kernel axes that are input axes (the rest are output axes).
_KERNEL_INPUT_AXES = {"o_proj": 2}


def _path_str(path: tuple) -> list[str]:
    return [str(p) for p in path]


def hf_name(path: tuple) -> str:
    """Hugging Face tensor name of a parameter path, e.g.
    ``('model', 'layers', 0, 'self_attn', 'q_proj', 'kernel') -> 'model.layers.0.self_attn.q_proj.weight'``."""
    parts = _path_str(path)
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _kernel_split(path: tuple, shape: tuple[int, ...]) -> tuple[int, int]:
    n_in = _KERNEL_INPUT_AXES.get(str(path[-2]), 1)
    return math.prod(shape[:n_in]), math.prod(shape[n_in:])


def param_to_hf_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the Hugging Face tensor for a parameter of the given shape."""
    if str(path[-1]) == "kernel":
        n_in, n_out = _kernel_split(path, shape)
        return (n_out, n_in)
    if str(path[-1]) == "bias":
        return (math.prod(shape),)
    return shape


def param_to_hf(path: tuple, value: jax.Array) -> jax.Array:
    """Our parameter -> Hugging Face tensor (kernels [in..., out...] -> weight [out, in])."""
    if str(path[-1]) == "kernel":
        n_in, n_out = _kernel_split(path, value.shape)
        return jnp.asarray(value).reshape(n_in, n_out).T
    return jnp.asarray(value).reshape(param_to_hf_shape(path, value.shape))


def hf_to_param(path: tuple, tensor: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """Hugging Face tensor -> our parameter of ``shape`` and ``dtype`` (inverse of param_to_hf)."""
    tensor = jnp.asarray(tensor)
    if str(path[-1]) == "kernel":
        tensor = tensor.T
    return tensor.reshape(shape).astype(dtype)


def _resolve_checkpoint_dir(path_or_hub_id) -> str:
    path = os.fspath(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.startswith((".", "/")) or path.count("/") != 1:
        raise ValueError(f"{path!r} is neither a checkpoint directory nor a hub id 'org/name'")
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors"])


def _checkpoint_files(directory: str) -> dict[str, str]:
    """Tensor name -> safetensors file name, for a single or sharded checkpoint."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    single = os.path.join(directory, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {directory!r}")
    from safetensors import safe_open

    with safe_open(single, framework="flax") as f:
        return {name: "model.safetensors" for name in f.keys()}


def iter_hf_tensors(model: Qwen3ForCausalLM) -> Iterator[tuple[str, jax.Array]]:
    """(Hugging Face name, tensor in HF layout) for every parameter, one at a time."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        yield hf_name(path), param_to_hf(path, var[...])


# --------------------------------------------------------------------------------------------
# Load and save
# --------------------------------------------------------------------------------------------


def from_pretrained(
    path_or_hub_id: str | os.PathLike, *, model_cls: type | None = None, **model_kwargs
) -> Qwen3ForCausalLM:
    """Loads a Hugging Face Qwen3 checkpoint (local directory, or a hub id when online).

    The model ``model_cls(config, **model_kwargs)`` (default :class:`Qwen3ForCausalLM`) is built
    abstractly (``nnx.eval_shape``) and each parameter is read tensor by tensor with
    ``safetensors.safe_open`` and cast to the parameter's storage dtype, so the weights are held
    in memory once. Missing tensors, unexpected tensors and shape mismatches are reported
    together in one ValueError. A tied checkpoint may also contain ``lm_head.weight``; it is
    ignored.
    """
    if model_cls is None:
        model_cls = Qwen3ForCausalLM
    directory = _resolve_checkpoint_dir(path_or_hub_id)
    config = config_from_hf(directory)
    abstract = nnx.eval_shape(lambda: model_cls(config, **model_kwargs, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    files = _checkpoint_files(directory)
    expected = {hf_name(path): (path, var) for path, var in flat}
    present = set(files)
    missing = sorted(set(expected) - present)
    unexpected = sorted(
        present - set(expected) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    )
    mismatched = []
    from safetensors import safe_open

    loaded = {}
    by_file: dict[str, list[str]] = {}
    for name in expected:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for filename, names in by_file.items():
        with safe_open(os.path.join(directory, filename), framework="flax") as f:
            for name in names:
                path, var = expected[name]
                hf_shape = tuple(f.get_slice(name).get_shape())
                want = param_to_hf_shape(path, tuple(var.shape))
                if hf_shape != want:
                    mismatched.append(f"{name}: checkpoint {hf_shape}, model expects {want}")
                    continue
                if missing or unexpected or mismatched:
                    continue  # only validating from here on
                loaded[path] = hf_to_param(path, f.get_tensor(name), tuple(var.shape), var.dtype)
    if missing or unexpected or mismatched:
        lines = [f"cannot load Qwen3 checkpoint {directory!s}:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise ValueError("\n".join(lines))
    for path, var in flat:
        var.set_value(loaded.pop(path))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_pretrained(model: Qwen3ForCausalLM, directory: str | os.PathLike) -> None:
    """Writes ``config.json`` and ``model.safetensors`` in Hugging Face's layout and names.

    Parameters are saved in their storage dtype; a tied model saves only the embedding.
    """
    from safetensors.flax import save_file

    os.makedirs(directory, exist_ok=True)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    tensors = {hf_name(path): param_to_hf(path, var[...]) for path, var in flat}
    dtypes = {str(t.dtype) for t in tensors.values()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf_dict(model.config, dtype=dtype), f, indent=2)
