"""LoRA adapters in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

The one place that knows PEFT's names and layouts. For decoder layer i and projection
``<parent>.<name>`` (``self_attn.q_proj``, ``mlp.down_proj``, ...) PEFT stores::

    base_model.model.model.layers.{i}.<parent>.<name>.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.<parent>.<name>.lora_B.weight   [out, r]

(``nn.Linear`` layout, ``weight[out, in]``). Our :class:`~hacbo_jax.models.lora.LoRALinear`
keeps ``lora_a`` [in, r] and ``lora_b`` [r, out] over the kernel's input / output axes
flattened in their stored order, which is exactly how Hugging Face flattens our head-split
kernels (q_proj [D, N, H] -> weight [N*H, D], o_proj [N, H, D] -> weight [D, N*H]; see
:mod:`hacbo_jax.models.qwen3_hf`), so ``lora_A.weight = lora_a^T`` and
``lora_B.weight = lora_b^T`` with no permutation. A stacked (scan_layers) adapter is written
and read one layer slice at a time. Reference: PEFT's ``LoraConfig`` and
``get_peft_model_state_dict``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from hacbo_jax.models.lora import (
    TARGET_MODULES,
    LoRASettings,
    add_lora,
    lora_modules,
    lora_problems,
    lora_settings,
)
from hacbo_jax.models.lora import _PARENTS, _module_dims
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "adapter_config",
    "adapter_problems",
    "load_adapter",
    "peft_name",
    "read_adapter_settings",
    "save_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model.model.layers"


def peft_name(layer: int, module: str, which: str) -> str:
    """PEFT's tensor name of A (``which="A"``) or B of ``module`` in decoder layer ``layer``."""
    return f"{_PREFIX}.{layer}.{_PARENTS[module]}.{module}.lora_{which}.weight"


def adapter_config(
    settings: LoRASettings, *, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields (``adapter_config.json``) of adapters with ``settings``."""
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": settings.rank,
        "lora_alpha": alpha,
        "lora_dropout": settings.dropout,
        "target_modules": list(settings.targets),
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def save_adapter(
    model: Qwen3ForCausalLM,
    directory: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> None:
    """Writes the model's adapters as a PEFT adapter directory (float32 tensors), loadable with
    ``peft.PeftModel.from_pretrained(base, directory)`` and :func:`load_adapter`.

    Raises:
      ValueError: when the model has no adapters.
    """
    from safetensors.numpy import save_file

    settings = lora_settings(model)
    if settings is None:
        raise ValueError("the model has no LoRA adapters to save (add_lora first)")
    tensors = {}
    for layer, name, module in lora_modules(model):
        a = np.asarray(module.lora.lora_a[...], np.float32)
        b = np.asarray(module.lora.lora_b[...], np.float32)
        slices = [(layer, a, b)] if layer is not None else list(zip(range(a.shape[0]), a, b))
        for i, a_i, b_i in slices:
            tensors[peft_name(i, name, "A")] = np.ascontiguousarray(a_i.T)
            tensors[peft_name(i, name, "B")] = np.ascontiguousarray(b_i.T)
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, ADAPTER_CONFIG_NAME), "w") as f:
        json.dump(
            adapter_config(settings, base_model_name_or_path=base_model_name_or_path), f, indent=2
        )


def read_adapter_settings(
    directory: str | os.PathLike, problems: list[str]
) -> LoRASettings | None:
    """The :class:`LoRASettings` an adapter directory's ``adapter_config.json`` describes; every
    field this port cannot honour is appended to ``problems`` (None then, or when unreadable)."""
    path = os.path.join(directory, ADAPTER_CONFIG_NAME)
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        problems.append(f"{path}: cannot be read as a PEFT adapter config ({e})")
        return None
    if not isinstance(raw, dict):
        problems.append(f"{path}: must hold a JSON object")
        return None
    found = []
    if raw.get("peft_type") != "LORA":
        found.append(f"peft_type = {raw.get('peft_type')!r} (only 'LORA')")
    targets = raw.get("target_modules")
    if isinstance(targets, str) or not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        found.append(
            f"target_modules = {targets!r}: must be a list of module names (regular "
            "expressions are not supported)"
        )
        targets = None
    else:
        unknown = sorted(set(targets) - set(TARGET_MODULES))
        if unknown:
            found.append(
                f"target_modules {unknown}: unknown (this port adapts {', '.join(TARGET_MODULES)})"
            )
    for key, want in (
        ("bias", "none"),
        ("fan_in_fan_out", False),
        ("use_rslora", False),
        ("use_dora", False),
    ):
        if raw.get(key, want) != want:
            found.append(f"{key} = {raw.get(key)!r} (only {want!r} is supported)")
    for key in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
        if raw.get(key):
            found.append(f"{key} = {raw.get(key)!r} (not supported)")
    settings = None
    if not found:
        try:
            settings = LoRASettings(
                rank=raw.get("r"),
                alpha=raw.get("lora_alpha", 8),
                dropout=float(raw.get("lora_dropout", 0.0) or 0.0),
                targets=tuple(targets),
            )
        except (TypeError, ValueError) as e:
            found.append(str(e))
    problems += [f"{path}: {p}" for p in found]
    return settings


def _tensor_shapes(path: str, problems: list[str]) -> dict[str, tuple[int, ...]] | None:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except Exception as e:  # noqa: BLE001 -- any unreadable file is the same input problem
        problems.append(f"{path}: cannot be read as safetensors ({e})")
        return None


def adapter_problems(
    directory: str | os.PathLike,
    config: Qwen3Config,
    expected: LoRASettings | None = None,
) -> tuple[list[str], LoRASettings | None]:
    """Every reason why the PEFT adapter in ``directory`` cannot go on a model of ``config``
    (and, when given, must match the adapters ``expected``), and the adapter's settings.

    Checks the config's fields (:func:`read_adapter_settings`), the rank against the targeted
    projections (:func:`~hacbo_jax.models.lora.lora_problems`), rank / alpha / targets against
    ``expected``, and the tensors: one A [r, in] and B [out, r] per layer and target, none
    missing, none extra (e.g. an adapter for more layers), every shape as ``config`` implies.
    Reads shapes only, never the weights.
    """
    directory = os.fspath(directory)
    problems: list[str] = []
    if not os.path.isdir(directory):
        return [f"{directory!r} is not a directory (a PEFT adapter directory)"], None
    settings = read_adapter_settings(directory, problems)
    if settings is None:
        return problems, None
    problems += [f"{directory}: {p}" for p in lora_problems(config, settings.rank, settings.targets)]
    if expected is not None:
        for field in ("rank", "alpha", "targets"):
            have, want = getattr(settings, field), getattr(expected, field)
            if have != want:
                problems.append(
                    f"{directory}: LoRA {field} = {have!r}, but the model's adapters have {want!r}"
                )
    weights = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
    shapes = _tensor_shapes(weights, problems)
    if shapes is None:
        return problems, settings
    want = {}
    for i in range(config.num_hidden_layers):
        for name in settings.targets:
            n_in, n_out = _module_dims(config, name)
            want[peft_name(i, name, "A")] = (settings.rank, n_in)
            want[peft_name(i, name, "B")] = (n_out, settings.rank)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    if missing:
        problems.append(f"{weights}: missing tensors ({len(missing)}): {', '.join(missing)}")
    if extra:
        problems.append(f"{weights}: unexpected tensors ({len(extra)}): {', '.join(extra)}")
    layers = {int(n.split(".")[4]) for n in shapes if n.startswith(_PREFIX + ".")}
    layers = {i for i in layers if i >= config.num_hidden_layers}
    if layers:
        problems.append(
            f"{weights}: has tensors for layer(s) {sorted(layers)}, but the model has "
            f"{config.num_hidden_layers} layers"
        )
    wrong = [
        f"{n}: {shapes[n]}, model expects {want[n]}"
        for n in sorted(set(want) & set(shapes))
        if shapes[n] != want[n]
    ]
    if wrong:
        problems.append(f"{weights}: shape mismatches ({len(wrong)}): " + "; ".join(wrong))
    return problems, settings


def load_adapter(model: Qwen3ForCausalLM, directory: str | os.PathLike) -> Qwen3ForCausalLM:
    """Loads a PEFT LoRA adapter into ``model`` (in place; returns it).

    A model without adapters gets them first (:func:`~hacbo_jax.models.lora.add_lora` with the
    adapter's r, lora_alpha, lora_dropout and target_modules; a ``scan_layers`` model without
    the dropout, which only matters for training); a model with adapters must have
    the same rank, alpha and targets. Everything is checked first (:func:`adapter_problems`):
    one ValueError lists every problem and the model is left unchanged.
    """
    from safetensors import safe_open

    directory = os.fspath(directory)
    expected = lora_settings(model)
    problems, settings = adapter_problems(directory, model.config, expected)
    if problems or settings is None:
        raise ValueError(
            f"cannot load the LoRA adapter {directory}:\n  - " + "\n  - ".join(problems)
        )
    if expected is None:
        if model.scan_layers and settings.dropout:
            # add_lora refuses dropout on stacked layers; an adapter's dropout only matters
            # for training, so the scanned model gets the adapter without it.
            settings = dataclasses.replace(settings, dropout=0.0)
        add_lora(model, settings)
    with safe_open(os.path.join(directory, ADAPTER_WEIGHTS_NAME), framework="numpy") as f:
        for layer, name, module in lora_modules(model):
            layers = [layer] if layer is not None else range(model.config.num_hidden_layers)
            a = np.stack([f.get_tensor(peft_name(i, name, "A")).T for i in layers])
            b = np.stack([f.get_tensor(peft_name(i, name, "B")).T for i in layers])
            if layer is not None:
                a, b = a[0], b[0]
            for var, value in ((module.lora.lora_a, a), (module.lora.lora_b, b)):
                var.set_value(jnp.asarray(value, var.dtype).reshape(var.shape))
    return model
