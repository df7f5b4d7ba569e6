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
import numpy as np
from flax import nnx

from hacbo_jax.models.generation import GENERATION_CONFIG_NAME, GenerationConfig
from hacbo_jax.models.qwen3 import LLAMA3_ROPE_KEYS, Qwen3Config, Qwen3ForCausalLM

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
    "state_to_hf",
]

# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


# model_type -> (architecture class in transformers, fixed architecture options).
_FAMILIES = {
    "qwen3": ("Qwen3ForCausalLM", dict(qk_norm=True)),
    # Qwen2 / Qwen2.5: q/k/v always carry a bias, o_proj never does, no q/k norm.
    "qwen2": (
        "Qwen2ForCausalLM",
        dict(qk_norm=False, attention_bias=True, attention_out_bias=False),
    ),
    "llama": ("LlamaForCausalLM", dict(qk_norm=False)),
}


def config_from_hf(config: Mapping[str, Any] | str | os.PathLike) -> Qwen3Config:
    """Builds a config from a Hugging Face ``config.json`` (a dict, the file, or its directory).

    Accepts the dense families this port implements as options: ``model_type`` ``qwen3``,
    ``qwen2`` (Qwen2 / Qwen2.5: q/k/v biases, no q/k norm) and ``llama`` (Llama 3: no q/k norm,
    ``attention_bias`` on q/k/v/o, plain or ``llama3`` RoPE scaling). ``rope_theta`` and the
    scaling are read from ``rope_parameters`` (transformers >= 5) or from the top level /
    ``rope_scaling`` (older files). Raises ValueError naming every unsupported feature: another
    model_type (MoE families included), mixture-of-experts keys, sliding-window attention, RoPE
    scaling other than ``default``/``llama3``, an MLP bias, or an activation other than ``silu``.
    """
    if not isinstance(config, Mapping):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        with open(path) as f:
            config = json.load(f)
    cfg = dict(config)
    model_type = cfg.get("model_type")
    if model_type not in _FAMILIES:
        raise ValueError(
            f"unsupported model_type={model_type!r} (supported: {', '.join(_FAMILIES)}; "
            "dense models only)"
        )
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu' is implemented)")
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if cfg.get(key):
            problems.append(f"{key}={cfg[key]} (mixture-of-experts is not implemented)")
    if cfg.get("mlp_bias", False):
        problems.append("mlp_bias=True (MLP biases are not implemented)")
    if cfg.get("use_sliding_window", False):
        problems.append("use_sliding_window=True (sliding-window attention is not implemented)")
    layer_types = cfg.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(
            f"layer_types={sorted(set(layer_types))} (only 'full_attention' is implemented)"
        )
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})  # older files keep the scaling here
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    allowed = ("default", "llama3") if model_type == "llama" else ("default",)
    if rope_type not in allowed:
        problems.append(
            f"rope_type={rope_type!r} (implemented for model_type={model_type!r}: "
            f"{', '.join(allowed)})"
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
        raise ValueError(f"unsupported {model_type} config: " + "; ".join(problems))
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    n_heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads")
    # transformers' default head_dim: 128 for Qwen3, hidden_size / heads for Qwen2 and Llama.
    default_head_dim = 128 if model_type == "qwen3" else cfg["hidden_size"] // n_heads
    options = dict(
        model_type=model_type,
        attention_bias=bool(cfg.get("attention_bias", False)),
        rope_scaling=(
            {"rope_type": "llama3", **{k: rope[k] for k in LLAMA3_ROPE_KEYS if k in rope}}
            if rope_type == "llama3"
            else None
        ),
    )
    options.update(_FAMILIES[model_type][1])
    return Qwen3Config(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads if kv_heads is None else kv_heads,
        head_dim=cfg.get("head_dim") or default_head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        **options,
    )


def config_to_hf_dict(config: Qwen3Config, dtype: str = "float32") -> dict[str, Any]:
    """A ``config.json`` dict that transformers' class of ``config.model_type`` loads
    (``Qwen3ForCausalLM``, ``Qwen2ForCausalLM`` or ``LlamaForCausalLM``)."""
    architecture, fixed = _FAMILIES[config.model_type]
    given = {k: getattr(config, k) for k in fixed}
    if given != fixed:
        raise ValueError(
            f"model_type={config.model_type!r} fixes {fixed}, but the config has {given}: "
            "transformers could not load it as that family"
        )
    if config.model_type == "llama" and config.attention_out_bias != config.attention_bias:
        raise ValueError("llama's attention_bias covers q/k/v and o_proj: they must agree")
    d = dataclasses.asdict(config)
    for key in ("rope_theta", "qk_norm", "attention_out_bias", "rope_scaling"):
        d.pop(key)
    rope_parameters = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope_parameters.update(dict(config.rope_scaling), rope_theta=config.rope_theta)
    d.update(
        architectures=[architecture],
        hidden_act="silu",
        rope_parameters=rope_parameters,
        attention_dropout=0.0,
        use_cache=True,
        dtype=dtype,
    )
    if config.model_type in ("qwen3", "qwen2"):
        d.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=config.num_hidden_layers,
            layer_types=["full_attention"] * config.num_hidden_layers,
        )
    else:
        d.update(mlp_bias=False)
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
    return hub_snapshot(path, ["*.json", "*.safetensors"])


def hub_snapshot(
    hub_id: str, allow_patterns: list[str], what: str = "hub id", *, local_only: bool = False
) -> str:
    """The local directory of ``hub_id``'s files (the Hugging Face cache; downloaded when the hub
    is reachable). Any failure -- offline and not cached, no network, no such repository, a
    gated one -- is a ValueError of one line naming ``what`` and the id, not the hub client's
    multi-line exception. ``local_only``: the cache only, never the network."""
    from huggingface_hub import constants, snapshot_download

    try:
        return snapshot_download(
            hub_id, allow_patterns=allow_patterns, local_files_only=local_only
        )
    except Exception as e:  # the hub client raises many types (OSError, HTTPError, ValueError)
        if local_only:
            raise ValueError(f"{what} {hub_id!r}: not in the local Hugging Face cache") from None
        if constants.HF_HUB_OFFLINE:
            raise ValueError(
                f"{what} {hub_id!r}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) "
                "and the hub is offline (HF_HUB_OFFLINE=1); download it once while online, or give "
                "a local model directory"
            ) from None
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{what} {hub_id!r}: cannot be fetched from the Hugging Face hub (offline, no network, "
            f"or no such repository: {type(e).__name__}: {first}); check the id and the "
            "network, or give a local model directory"
        ) from None


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


def _stacked(path: tuple) -> bool:
    """True for a scanned-layers leaf ``model/layers/<module path>`` (leading layer axis)."""
    return len(path) > 2 and str(path[1]) == "layers" and not str(path[2]).isdigit()


def _layer_path(path: tuple, i: int) -> tuple:
    """Per-layer path of slice i of a stacked leaf: ``model/layers/i/<module path>``."""
    return (*path[:2], i, *path[2:])


def state_to_hf(state) -> Iterator[tuple[str, jax.Array]]:
    """(Hugging Face name, tensor in HF layout) for every leaf of a parameter ``nnx.State`` (or
    a gradient of one), one at a time; a stacked (scanned-layers) leaf gives one tensor per
    layer slice."""
    for path, var in nnx.to_flat_state(state):
        value = var[...]
        if _stacked(path):
            for i in range(value.shape[0]):
                layer_path = _layer_path(path, i)
                yield hf_name(layer_path), param_to_hf(layer_path, value[i])
        else:
            yield hf_name(path), param_to_hf(path, value)


def iter_hf_tensors(model: Qwen3ForCausalLM) -> Iterator[tuple[str, jax.Array]]:
    """(Hugging Face name, tensor in HF layout) for every parameter, one at a time."""
    yield from state_to_hf(nnx.state(model, nnx.Param))


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
    # HF name -> (our path, layer slice or None, per-tensor shape, dtype); a stacked leaf
    # (scan_layers) is read one layer slice at a time into one host buffer.
    expected = {}
    buffers = {}
    for path, var in flat:
        shape = tuple(var.shape)
        if _stacked(path):
            buffers[path] = np.empty(shape, np.dtype(var.dtype))
            for i in range(shape[0]):
                expected[hf_name(_layer_path(path, i))] = (path, i, shape[1:], var.dtype)
        else:
            expected[hf_name(path)] = (path, None, shape, var.dtype)
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
                path, index, shape, dtype = expected[name]
                hf_shape = tuple(f.get_slice(name).get_shape())
                want = param_to_hf_shape(path, shape)
                if hf_shape != want:
                    mismatched.append(f"{name}: checkpoint {hf_shape}, model expects {want}")
                    continue
                if missing or unexpected or mismatched:
                    continue  # only validating from here on
                value = hf_to_param(path, f.get_tensor(name), shape, dtype)
                if index is None:
                    loaded[path] = value
                else:
                    buffers[path][index] = np.asarray(value)
    if missing or unexpected or mismatched:
        lines = [f"cannot load Qwen3 checkpoint {directory!s}:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise ValueError("\n".join(lines))
    loaded.update({path: jnp.asarray(buffer) for path, buffer in buffers.items()})
    for path, var in flat:
        var.set_value(loaded.pop(path))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    if os.path.exists(os.path.join(directory, GENERATION_CONFIG_NAME)):
        # Decoding defaults and every end token (Qwen3: <|im_end|> and <|endoftext|>);
        # generation.generate reads this attribute.
        model.generation_config = GenerationConfig.from_pretrained(directory)
    return model


def save_pretrained(model: Qwen3ForCausalLM, directory: str | os.PathLike) -> None:
    """Writes ``config.json``, ``generation_config.json`` and ``model.safetensors`` in Hugging
    Face's layout and names.

    Parameters are saved in their storage dtype; a tied model saves only the embedding; stacked
    (scanned) layers are saved as Hugging Face's per-layer tensors. The generation config is the
    model's ``generation_config`` attribute (set when it was loaded from a checkpoint that had
    one), else greedy defaults ending on the config's eos_token_id (what transformers writes for
    a model without one).
    """
    from safetensors.flax import save_file

    os.makedirs(directory, exist_ok=True)
    tensors = dict(iter_hf_tensors(model))
    dtypes = {str(t.dtype) for t in tensors.values()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_to_hf_dict(model.config, dtype=dtype), f, indent=2)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        generation_config = GenerationConfig.from_model_config(model.config)
    generation_config.save_pretrained(directory)
