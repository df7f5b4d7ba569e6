"""Load-independent structure of the Qwen3 training step: HLO op counts, FLOPs, bytes, XLA temps.

Nothing is timed. Two probes, each compiled (never run) with abstract inputs:

* ``small``: one full training step (forward, shifted next-token cross-entropy as in
  ``qwen3_throughput.py``, backward, AdamW) of the throughput config (4 layers, d 256, 4/2 heads
  x 64, intermediate 768, vocab 8192, batch 8 x 256, fp32).
* ``0.6b``: loss + gradient (no optimiser) of Qwen3-0.6B's shapes, fp32, 1 x 512, with abstract
  parameters (``nnx.eval_shape``).

    python benchmarks/qwen3_hlo_probe.py small [--model-kw '{"scan_layers": true}']
    python benchmarks/qwen3_hlo_probe.py 0.6b --model-kw '{"remat": true, "scan_layers": true}'

``--model-kw`` is a JSON dict of extra ``Qwen3ForCausalLM`` constructor arguments.
"""

from __future__ import annotations

import argparse
import collections
import json
import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM

SMALL = Qwen3Config(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=True,
)

_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[^=]*?\s([a-z][\w\-]*)\(")


def loss_fn(model, ids):
    logits = model(ids)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))


def report(name, lowered):
    compiled = lowered.compile()
    text = compiled.as_text()
    ops = collections.Counter()
    for line in text.splitlines():
        m = _OP.match(line)
        if m:
            ops[m.group(1)] += 1
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    keys = ("dot", "fusion", "transpose", "copy", "concatenate", "broadcast", "reduce", "select")
    out = {
        "probe": name,
        "hlo_lines": len(text.splitlines()),
        "hlo_instructions": sum(ops.values()),
        "ops": {k: ops.get(k, 0) for k in keys},
        "gflop": round(cost.get("flops", 0.0) / 1e9, 3),
        "gb_accessed": round(cost.get("bytes accessed", 0.0) / 1e9, 3),
        "temp_gib": round(mem.temp_size_in_bytes / 2**30, 3),
        "args_gib": round(mem.argument_size_in_bytes / 2**30, 3),
        "out_gib": round(mem.output_size_in_bytes / 2**30, 3),
    }
    print(json.dumps(out))
    return out


def small(model_kw):
    model = Qwen3ForCausalLM(SMALL, rngs=nnx.Rngs(0), **model_kw)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.0)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, ids):
        def f(p):
            return loss_fn(nnx.merge(graphdef, p, rest), ids)

        loss, grads = jax.value_and_grad(f)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ids = jax.ShapeDtypeStruct((8, 256), jnp.int32)
    return report(f"small {model_kw}", step.lower(params, opt_state, ids))


def probe_06b(model_kw):
    cfg = Qwen3Config.qwen3_0_6b()
    abstract = nnx.eval_shape(lambda: Qwen3ForCausalLM(cfg, rngs=nnx.Rngs(0), **model_kw))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    @jax.jit
    def grad(params, ids):
        return jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), ids))(params)

    ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
    return report(f"0.6b {model_kw}", grad.lower(params, ids))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("probe", choices=["small", "0.6b"])
    ap.add_argument("--model-kw", default="{}", type=json.loads)
    args = ap.parse_args()
    (small if args.probe == "small" else probe_06b)(args.model_kw)
