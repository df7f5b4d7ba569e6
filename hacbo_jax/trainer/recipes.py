"""Model-specific recipes of the training stack: which parameters a controller groups together
and how they are laid out on a device mesh.

They live here, with the code that uses them, so that ``hacbo_jax.controllers`` (generic label
trees), ``hacbo_jax.models`` (the modelling) and ``hacbo_jax.trainer.sharding`` (generic partition rules)
do not import one another.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec

from hacbo_jax.controllers import label_by_rules
from hacbo_jax.trainer.sharding import FSDP_AXIS, PartitionRule

__all__ = ["QWEN3_LABEL_RULES", "QWEN3_RULES", "qwen3_labels"]

# Where each controller sub-module lives inside a decoder layer (regex after "layers/<i>/").
_QWEN3_SUBMODULES: tuple[tuple[str, str], ...] = (
    (r"self_attn/(?:q_proj|k_proj|v_proj)/", "attn_qkv"),
    (r"self_attn/o_proj/", "attn_out"),
    (r"mlp/(?:gate_proj|up_proj|down_proj)/", "mlp"),
    (r"(?:input_layernorm|post_attention_layernorm|self_attn/q_norm|self_attn/k_norm)/", "ln"),
)

# (regex searched in the "/"-joined parameter path, label template) pairs for label_by_rules:
# per-layer leaves (``layers/3/mlp/...``) get "3/mlp"; stacked leaves of a scan_layers model
# (``layers/mlp/...``, leading layer axis, no index in the path) get "*/mlp", the controllers'
# stacked-leaf label (slice i along axis 0 is block i).
QWEN3_LABEL_RULES: tuple[tuple[str, str], ...] = tuple(
    (r"(?:^|/)layers/(\d+)/" + where, r"\1/" + name) for where, name in _QWEN3_SUBMODULES
) + tuple((r"(?:^|/)layers/" + where, "*/" + name) for where, name in _QWEN3_SUBMODULES)


def qwen3_labels(params: Any) -> Any:
    """HACBO label tree for Qwen3 parameters: ``"{layer}/{attn_qkv|attn_out|mlp|ln}"``, or
    ``"*/{attn_qkv|attn_out|mlp|ln}"`` for the stacked leaves of a ``scan_layers=True`` model.

    Sub-modules follow the table of docs/algorithm.md: attn_qkv = q/k/v_proj,
    attn_out = o_proj, mlp = gate/up/down_proj, ln = input/post_attention layernorm and q/k_norm.
    Embeddings, the final norm and an untied lm_head are ``"other"`` (not controlled).
    ``params`` may be an ``nnx.State`` (e.g. from ``nnx.split(model, nnx.Param, ...)``) or a
    pure nested dict (``nnx.to_pure_dict``); the result has the same tree structure with a
    string at every leaf.
    """
    return label_by_rules(params, list(QWEN3_LABEL_RULES), default="other")


# Qwen3 (hacbo_jax.models.qwen3 layout): shard the model dimension D of the attention
# projections, the MLP width F of the MLP kernels and the vocabulary of the embeddings; norm
# weights are vectors and stay replicated. Each kernel is all-gathered before its einsum, so the
# choice is about memory layout only; these axes are the large, evenly divisible ones.
# Stacked leaves of a scan_layers model (``layers/<module path>``, leading layer axis L) take
# the same axis shifted by one and are NEVER sharded along L: the scan slices one layer per
# iteration, and a layer split over devices would be gathered whole at every step of the scan.
# A stacked leaf whose preferred axis does not divide falls through to the next fitting
# alternative and, failing all, the catch-all (replicated) instead of the generic fallback,
# which could pick L.
_STACKED = r"(?:^|/)layers/(?!\d)"
QWEN3_RULES: tuple[PartitionRule, ...] = (
    (r"norm/weight$", PartitionSpec()),
    (_STACKED + r"self_attn/[qkv]_proj/kernel$", PartitionSpec(None, FSDP_AXIS, None, None)),
    (_STACKED + r"self_attn/[qkv]_proj/kernel$", PartitionSpec(None, None, FSDP_AXIS, None)),
    (_STACKED + r"self_attn/o_proj/kernel$", PartitionSpec(None, None, None, FSDP_AXIS)),
    (_STACKED + r"self_attn/o_proj/kernel$", PartitionSpec(None, FSDP_AXIS, None, None)),
    (_STACKED + r"mlp/(gate|up)_proj/kernel$", PartitionSpec(None, None, FSDP_AXIS)),
    (_STACKED + r"mlp/(gate|up)_proj/kernel$", PartitionSpec(None, FSDP_AXIS, None)),
    (_STACKED + r"mlp/down_proj/kernel$", PartitionSpec(None, FSDP_AXIS, None)),
    (_STACKED + r"mlp/down_proj/kernel$", PartitionSpec(None, None, FSDP_AXIS)),
    (_STACKED, PartitionSpec()),  # any other stacked leaf (biases, ...): replicated
    (r"embed_tokens/weight$", PartitionSpec(FSDP_AXIS, None)),  # [V, D]
    (r"lm_head/kernel$", PartitionSpec(None, FSDP_AXIS)),  # [D, V]
    (r"self_attn/[qkv]_proj/kernel$", PartitionSpec(FSDP_AXIS, None, None)),  # [D, N|K, H]
    (r"self_attn/o_proj/kernel$", PartitionSpec(None, None, FSDP_AXIS)),  # [N, H, D]
    (r"mlp/(gate|up)_proj/kernel$", PartitionSpec(None, FSDP_AXIS)),  # [D, F]
    (r"mlp/down_proj/kernel$", PartitionSpec(FSDP_AXIS, None)),  # [F, D]
    (r"_proj/bias$", PartitionSpec()),
)
