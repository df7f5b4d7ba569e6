"""Full fine-tuning of the real Qwen3-0.6B architecture on CPU: peak memory and step time.

Random weights (no download), fp32 parameters, batch 1 x 512 tokens, per-layer remat.
- JAX side: one jitted step = loss and gradient, ``optax.chain(optax.adamw, hacbo)`` update,
  params/optimiser state donated. HACBO's measurement steps (every ``interval``-th) also take
  the micro-dev gradient (a second backward, inside ``lax.cond``); both kinds are timed.
- PyTorch side: transformers' Qwen3ForCausalLM with gradient checkpointing and
  ``torch.optim.AdamW`` (PyTorch has no HACBO, so its step is the plain AdamW step).

Each side runs in its own subprocess, which reports its peak RSS (``resource.getrusage``); the
parent prints the table and the ratios. Heavy: run it once.

    python benchmarks/qwen3_full_memory.py [--seq 512] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from hacbo_jax import hacbo
    from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
    from hacbo_jax.training.recipes import qwen3_labels
    from hacbo_jax.training.step import Batch, answer_nll, chunked_answer_nll

    config = Qwen3Config.qwen3_0_6b()
    # Initialised inside one jitted program, so no eager per-op temporaries.
    model = nnx.jit(
        lambda: Qwen3ForCausalLM(
            config, dtype=jnp.float32, param_dtype=jnp.float32, remat=True, rngs=nnx.Rngs(0)
        )
    )()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    labels = qwen3_labels(params)
    tx = optax.chain(optax.adamw(1e-5, weight_decay=0.0), hacbo(labels, interval=args.interval))
    opt_state = tx.init(params)
    rs = np.random.RandomState(0)
    train_ids = jnp.asarray(rs.randint(0, config.vocab_size, (1, args.seq)), jnp.int32)
    dev_ids = jnp.asarray(rs.randint(0, config.vocab_size, (1, args.seq)), jnp.int32)

    def loss_fn(params, ids):
        model = nnx.merge(graphdef, params, rest)
        targets = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
        weights = jnp.ones(ids.shape, jnp.float32).at[:, -1].set(0.0)
        batch = Batch(ids, jnp.ones_like(ids), targets, weights)
        if not args.loss_chunk:
            total, count = answer_nll(model(ids), batch)
        else:
            # Logits of one chunk at a time, recomputed in the backward pass: [T, V] never exists.
            total, count = chunked_answer_nll(
                model.lm_logits, model.hidden_states(ids), batch, args.loss_chunk
            )
        return total / count

    grad_fn = jax.value_and_grad(loss_fn)

    @jax.jit
    def step(params, opt_state, train_ids, dev_ids):
        loss, grads = grad_fn(params, train_ids)
        updates, opt_state = tx.update(
            grads,
            opt_state,
            params,
            train_grads=grads,
            dev_grad_fn=lambda p: jax.grad(loss_fn)(p, dev_ids),
        )
        return optax.apply_updates(params, updates), opt_state, loss

    step = jax.jit(step.__wrapped__, donate_argnums=(0, 1))
    times, kinds = [], []
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, train_ids, dev_ids).compile()
    compile_s = time.perf_counter() - start
    for t in range(1, args.steps + 1):
        start = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, train_ids, dev_ids)
        jax.block_until_ready((params, opt_state))
        times.append(time.perf_counter() - start)
        kinds.append("measure" if t % args.interval == 0 else "plain")
    plain = [s for s, k in zip(times, kinds) if k == "plain"]
    measure = [s for s, k in zip(times, kinds) if k == "measure"]
    return dict(
        side="jax",
        peak_rss_gib=peak_rss_gib(),
        compile_s=compile_s,
        step_s=float(np.median(plain)),
        measure_step_s=float(np.median(measure)) if measure else None,
        times=times,
        kinds=kinds,
        loss=float(loss),
        versions=f"jax {jax.__version__}",
    )


def run_torch(args) -> dict:
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    from hacbo_jax.models.qwen3 import Qwen3Config

    hf_config = transformers.Qwen3Config(**Qwen3Config.qwen3_0_6b().to_hf_dict())
    model = transformers.Qwen3ForCausalLM(hf_config).float().train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.tensor(np.random.RandomState(0).randint(0, hf_config.vocab_size, (1, args.seq)))
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return dict(
        side="torch",
        peak_rss_gib=peak_rss_gib(),
        step_s=float(np.median(times[1:] or times)),
        times=times,
        loss=float(loss.detach()),
        versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument(
        "--steps",
        type=int,
        default=4,
        help="timed steps per side (the first PyTorch step is its warm-up)",
    )
    ap.add_argument("--interval", type=int, default=3, help="HACBO measurement interval K")
    ap.add_argument(
        "--loss-chunk",
        type=int,
        default=128,
        help="JAX side: cross-entropy over chunks of this many tokens (0: full logits)",
    )
    ap.add_argument("--side", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        result = run_jax(args) if args.side == "jax" else run_torch(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    results = {}
    for side in ("jax", "torch"):
        cmd = [
            sys.executable,
            __file__,
            "--side",
            side,
            "--seq",
            str(args.seq),
            "--steps",
            str(args.steps),
            "--interval",
            str(args.interval),
            "--loss-chunk",
            str(args.loss_chunk),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[side] = json.loads(lines[-1][len("RESULT ") :])
    j, t = results["jax"], results["torch"]
    print(
        f"Qwen3-0.6B (596M params, fp32, remat), batch 1 x {args.seq}, AdamW; "
        f"{os.cpu_count()} CPU threads; {j['versions']}; {t['versions']}"
    )
    print(f"{'':34}{'peak RSS GiB':>14}{'s/step':>10}")
    print(f"{'jax: AdamW + HACBO (plain step)':34}{j['peak_rss_gib']:14.2f}{j['step_s']:10.1f}")
    if j["measure_step_s"] is not None:
        print(f"{'jax: AdamW + HACBO (measure step)':34}{'':14}{j['measure_step_s']:10.1f}")
    print(f"{'pytorch: AdamW':34}{t['peak_rss_gib']:14.2f}{t['step_s']:10.1f}")
    print(
        f"ratio jax / pytorch: peak RSS {j['peak_rss_gib'] / t['peak_rss_gib']:.2f}, "
        f"plain step time {j['step_s'] / t['step_s']:.2f}"
    )
    print(
        f"(jax compile {j['compile_s']:.0f} s, not in the step time; step times jax "
        f"{[round(x, 1) for x in j['times']]} {j['kinds']}, pytorch "
        f"{[round(x, 1) for x in t['times']]})"
    )


if __name__ == "__main__":
    main()
