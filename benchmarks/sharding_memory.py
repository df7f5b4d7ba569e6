"""Per-device memory of Qwen3-0.6B params + optimiser state under 1, 2, 4 and 8 FSDP shards.

No training and no devices: the model and ``apply_if_finite(chain(clip, adamw, hacbo))`` (the
training job's optimiser, ``hacbo_jax.trainer.step.build_optimizer``) are initialised abstractly
(``nnx.eval_shape`` / ``jax.eval_shape``), the training job's partition rules
(``hacbo_jax.trainer.step.step_shardings``: ``hacbo_jax.trainer.recipes.QWEN3_RULES`` + FSDP fallback) are applied
on an abstract ``(data=1, fsdp=N)`` mesh, and each leaf counts with its shard shape. The data
axis does not change these figures (params and optimiser state are replicated over it).

    python benchmarks/sharding_memory.py [--param-dtype float32|bfloat16] [--shards 1 2 4 8]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AbstractMesh

from hacbo_jax.trainer import sharding as sharding_lib
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.trainer.controller_registry import build_controller
from hacbo_jax.trainer.step import (
    TrainState,
    build_optimizer,
    learning_rate_schedule,
    step_shardings,
)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def abstract_state(param_dtype) -> TrainState:
    """TrainState of ShapeDtypeStructs: Qwen3-0.6B params, clip + AdamW + HACBO state."""
    model = nnx.eval_shape(
        lambda: Qwen3ForCausalLM(
            Qwen3Config.qwen3_0_6b(), param_dtype=param_dtype, rngs=nnx.Rngs(0)
        )
    )
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    tx = build_optimizer(
        schedule=learning_rate_schedule(1e-5, 10, 1000),
        b1=0.9,
        b2=0.95,
        weight_decay=0.1,
        clip_norm=1.0,
        controller=build_controller("hacbo", qwen3_labels(params)),
    )
    return jax.eval_shape(
        lambda p: TrainState(jnp.int32(0), p, tx.init(p), jnp.zeros(2, jnp.uint32)), params
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--param-dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()

    state = abstract_state(_DTYPES[args.param_dtype])
    mib = 2.0**-20
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    print(
        f"Qwen3-0.6B ({num_params / 1e6:.1f} M params, {args.param_dtype} params), "
        f"optimiser apply_if_finite(chain(clip, adamw, hacbo)); per-device MiB"
    )
    header = (
        f"{'fsdp':>4} | {'params':>9} | {'opt state':>9} | {'total':>9} | "
        f"{'vs 1 shard':>10} | {'ideal total/N':>13} | {'unsharded':>10}"
    )
    print(header)
    print("-" * len(header))
    base = None
    for n in args.shards:
        mesh = AbstractMesh((1, n), (sharding_lib.DATA_AXIS, sharding_lib.FSDP_AXIS))
        shardings = step_shardings(mesh, state, dev_batch_size=n)
        params = sharding_lib.per_device_bytes(state.params, shardings.state.params)
        opt = sharding_lib.per_device_bytes(state.opt_state, shardings.state.opt_state)
        total = params + opt
        full = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, state.opt_state))
        )
        # Bytes in leaves that stay whole on every device (norm weights, controller, counters).
        replicated = sum(
            x.size * x.dtype.itemsize
            for x, s in zip(
                jax.tree.leaves(state),
                jax.tree.leaves(
                    shardings.state, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)
                ),
            )
            if s.is_fully_replicated
        )
        base = base or total
        print(
            f"{n:>4} | {params * mib:>9.1f} | {opt * mib:>9.1f} | {total * mib:>9.1f} | "
            f"{total / base:>10.3f} | {full / n * mib:>13.1f} | {replicated * mib:>10.2f}"
        )


if __name__ == "__main__":
    main()
