"""The methods a comparison runs (each = config overrides on a base config) and the learning
rate file written by ``sweep`` and read by ``compare --lrs``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import yaml

__all__ = [
    "ABLATIONS",
    "ALPHA",
    "COMPARED_METHODS",
    "LORA_METHODS",
    "LR_FALLBACK",
    "METHODS",
    "REFERENCE_METHOD",
    "load_lrs",
    "lr_for",
    "method_overrides",
    "parse_methods",
]

# method name -> the config overrides that make a base config run it.
METHODS: dict[str, tuple[str, ...]] = {
    "adamw": ("controller.kind=none",),
    "blac": ("controller.kind=blac",),
    "hacbo": ("controller.kind=hacbo",),
    # AdaGradSelect wraps AdamW over the same labels as HACBO (qwen3_labels: a unit is a block).
    "adagradselect": ("controller.kind=adagradselect",),
    "hacbo_gamma0": ("controller.kind=hacbo", "controller.hacbo.gamma=0"),
    # the controller issue's option: a block in probation gets the uniform share 1/M of the
    # curvature weights instead of its own (near-zero) weight, so gamma has something to scale
    "hacbo_share_uniform": ("controller.kind=hacbo", "controller.hacbo.probation_share=uniform"),
    "hacbo_no_curvature": ("controller.kind=hacbo", "controller.hacbo.curvature_weighting=false"),
    "hacbo_no_refresh": ("controller.kind=hacbo", "microdev.refresh_every=0"),
    "hacbo_no_probation": ("controller.kind=hacbo", "controller.hacbo.probation=false"),
    "hacbo_debias": ("controller.kind=hacbo", "controller.hacbo.debias=true"),
}
# LoRA (rank 8 adapters on every projection, hacbo_jax.models.lora): AdamW, or a controller,
# over the adapters only, grouped by (block, sub-module) as the kernels are in full fine-tuning.
# Kept apart from METHODS so that "all" stays the full-fine-tuning grid; named in --methods
# (and in a learning-rate file) like any other method.
LORA_METHODS: dict[str, tuple[str, ...]] = {
    "lora": ("controller.kind=none", "lora.rank=8"),
    # rank 64 is to the embedded model's width (256) what rank 256 is to Qwen3-0.6B's (1024)
    "lora_r64": ("controller.kind=none", "lora.rank=64"),
    "lora_hacbo": ("controller.kind=hacbo", "lora.rank=8"),
    "lora_adagradselect": ("controller.kind=adagradselect", "lora.rank=8"),
}
COMPARED_METHODS = ("adamw", "blac", "hacbo", "hacbo_gamma0", "adagradselect")
ABLATIONS = ("hacbo_no_curvature", "hacbo_no_refresh", "hacbo_no_probation", "hacbo_debias")
LR_FALLBACK = {
    **{name: "hacbo" for name in ("hacbo_gamma0", "hacbo_share_uniform", *ABLATIONS)},
    "lora_r64": "lora",
}
REFERENCE_METHOD = "hacbo"
ALPHA = 0.05


def method_overrides(method: str) -> tuple[str, ...]:
    """Config overrides of a named method (also sets ``method=<name>`` for the logs)."""
    known = {**METHODS, **LORA_METHODS}
    if method not in known:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(known)}")
    return (*known[method], f"method={method}")


def parse_methods(text: str) -> list[str]:
    """``"adamw,hacbo"`` -> ["adamw", "hacbo"]; ``"all"`` -> every method of :data:`METHODS`
    (the LoRA ones are named explicitly); checks the names."""
    names = (
        list(METHODS)
        if text.strip() == "all"
        else [m.strip() for m in text.split(",") if m.strip()]
    )
    if not names:
        raise ValueError(
            f"--methods {text!r}: give a comma-separated list of "
            f"{', '.join([*METHODS, *LORA_METHODS])}, or 'all'"
        )
    for name in names:
        method_overrides(name)
    if len(set(names)) != len(names):
        raise ValueError(f"--methods {text!r}: a method is listed twice")
    return names


def load_lrs(path: str | Path) -> dict[str, float]:
    """The ``lr`` mapping (method -> base learning rate) of a ``hacbo_jax.experiments.sweep`` output file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ValueError(f"--lrs {str(path)!r}: cannot be read ({e.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"--lrs {str(path)!r}: not a readable YAML file ({first})") from None
    lrs = raw.get("lr") if isinstance(raw, dict) else None
    if not isinstance(lrs, dict) or not lrs:
        raise ValueError(
            f"--lrs {str(path)!r}: must be a YAML mapping with a non-empty 'lr' "
            "section of method: learning rate (as hacbo_jax.experiments.sweep writes it)"
        )
    out = {}
    for method, value in lrs.items():
        method_overrides(str(method))
        try:
            value = float(value)
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"--lrs {str(path)!r}: lr.{method} = {lrs[method]!r}: must be a positive number"
            )
        out[str(method)] = value
    return out


def lr_for(method: str, lrs: Mapping[str, float] | None) -> float | None:
    """The tuned rate of ``method``, else of the method it ablates, else None (base config)."""
    if not lrs:
        return None
    if method in lrs:
        return lrs[method]
    return lrs.get(LR_FALLBACK.get(method, ""))
