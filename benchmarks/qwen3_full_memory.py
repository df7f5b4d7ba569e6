"""Full fine-tuning of the real Qwen3-0.6B architecture on CPU: peak memory and step time.

Random weights (no download), fp32 parameters, batch 1 x 512 tokens. Four sides, each in its
own subprocess (its peak RSS, ``resource.getrusage``, is the figure):

- ``jax-adamw``: one jitted step = loss and gradient (chunked vocabulary cross-entropy), AdamW,
  params and optimiser state donated.
- ``jax-hacbo``: ``optax.chain(optax.adamw, hacbo)`` as the trainer runs it: the ordinary step
  passes no dev source (the controller then traces no measurement, so the program reserves
  nothing for a second backward); a measurement is two programs, the dev gradient's
  ``dev_sign_sketch`` (one more forward/backward of the dev batch, two bits per coordinate out)
  and then the step with the signs as ``dev_grads`` (``--dev-pass in-step``: one program, the
  dev gradient inside the controller's ``lax.cond`` via ``dev_grad_fn``). The dev program
  back-propagates to the controlled leaves only, as the trainer does (``--dev-grad all``: to
  every parameter, the tied embedding too). With K = 2 the ordinary and measurement steps
  alternate, so every measurement call is due.
- ``jax-adagradselect``: AdaGradSelect (10% of blocks per step) wrapping AdamW: the dense JAX
  form, which computes every block's gradient and masks the update.
- ``torch``: transformers' Qwen3ForCausalLM with gradient checkpointing and
  ``torch.optim.AdamW`` (PyTorch has no HACBO, so its step is the plain AdamW step).

The machine cannot hold two sides at once (23 GiB), so the sides cannot be interleaved; instead
every timed step's contamination (others' CPU time, ``benchmarks/protocol.py``) is measured and
a step above 5% of the cores is repeated (up to 3 times). Each side reports min and median of
``--steps`` (>= 7) timed steps; the parent prints the load average before and after.

    python benchmarks/qwen3_full_memory.py [--scan] [--remat full|dots|none] [--steps 7] [--memory-only]
        [--dev-pass separate|in-step] [--dev-grad controlled|all]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import protocol  # noqa: E402  (benchmarks/protocol.py)

SIDES = ("jax-adamw", "jax-hacbo", "jax-adagradselect", "torch")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


MEMORY_ONLY = "--memory-only" in sys.argv  # peak RSS only: 2 steps per kind, no retries


def timed_steps(step, steps: int) -> tuple[list[float], float]:
    """Times ``steps`` calls of ``step()``; a call above the contamination limit is repeated."""
    times, worst = [], 0.0
    attempts = 1 if MEMORY_ONLY else 4
    for _ in range(steps):
        for attempt in range(attempts):
            with protocol.Contamination() as c:
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
            if c.fraction <= protocol.CONTAMINATION_LIMIT or attempt == attempts - 1:
                break
        worst = max(worst, c.fraction)
        times.append(elapsed)
    return times, worst


def run_jax(args, side: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from hacbo_jax import adagradselect, controlled_leaves, dev_sign_sketch, hacbo
    from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
    from hacbo_jax.trainer.recipes import qwen3_labels
    from hacbo_jax.trainer.step import (
        Batch,
        answer_nll,
        chunked_answer_nll,
        restrict_to_controlled,
    )

    config = Qwen3Config.qwen3_0_6b()
    # Initialised inside one jitted program, so no eager per-op temporaries.
    model = nnx.jit(
        lambda: Qwen3ForCausalLM(
            config,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            remat=args.remat,
            scan_layers=args.scan,
            rngs=nnx.Rngs(0),
        )
    )()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    with_hacbo = side == "jax-hacbo"
    adamw = optax.adamw(1e-5, weight_decay=0.0)
    labels = qwen3_labels(params)
    if with_hacbo:
        tx = optax.chain(adamw, hacbo(labels, interval=2))
    elif side == "jax-adagradselect":  # the paper's 10% of blocks per step, wrapping AdamW
        tx = adagradselect(labels, adamw, pct=0.1, steps_per_epoch=100, seed=0)
    else:
        tx = adamw
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
            total, count = chunked_answer_nll(
                model.lm_logits, model.hidden_states(ids), batch, args.loss_chunk
            )
        return total / count

    separate = args.dev_pass == "separate"

    def make_step(measure: bool):
        def step(params, opt_state, train_ids, dev):
            loss, grads = jax.value_and_grad(loss_fn)(params, train_ids)
            extra = {}
            if with_hacbo:
                extra["train_grads"] = grads
                if measure and separate:
                    extra["dev_grads"] = dev  # the signs from the dev program
                elif measure:
                    extra["dev_grad_fn"] = lambda p: jax.grad(loss_fn)(p, dev)
            updates, opt_state = tx.update(grads, opt_state, params, **extra)
            return optax.apply_updates(params, updates), opt_state, loss

        return jax.jit(step, donate_argnums=(0, 1))

    def dev_signs(params, dev_ids):
        if args.dev_grad == "all":
            return dev_sign_sketch(jax.grad(loss_fn)(params, dev_ids))
        # as the trainer: back-propagate to the leaves the controller reads (no embedding grad)
        controlled = controlled_leaves(labels, params)
        loss_of_part, part = restrict_to_controlled(loss_fn, params, controlled)
        return dev_sign_sketch(jax.grad(loss_of_part)(part, dev_ids), controlled)

    kinds = ["ordinary", "measurement"] if with_hacbo else ["ordinary"]
    compiled, compile_s, temp_gib = {}, {}, {}
    for kind in kinds:
        start = time.perf_counter()
        dev_arg = dev_ids
        if kind == "measurement" and separate:  # only jax-hacbo has a measurement step
            dev_arg = jax.eval_shape(dev_signs, params, dev_ids)
        compiled[kind] = (
            make_step(kind == "measurement").lower(params, opt_state, train_ids, dev_arg).compile()
        )
        compile_s[kind] = time.perf_counter() - start
        temp_gib[kind] = compiled[kind].memory_analysis().temp_size_in_bytes / 2**30
    if with_hacbo and separate:
        start = time.perf_counter()
        compiled["dev_signs"] = jax.jit(dev_signs).lower(params, dev_ids).compile()
        compile_s["dev_signs"] = time.perf_counter() - start
        temp_gib["dev_signs"] = compiled["dev_signs"].memory_analysis().temp_size_in_bytes / 2**30
    state = [params, opt_state]
    del params, opt_state
    cycle = iter(kinds * (2 * args.steps + 4))
    samples = {k: [] for k in kinds}

    def one_step():
        kind = next(cycle)
        start = time.perf_counter()
        dev = dev_ids
        if kind == "measurement" and separate:  # timed with the step: it is the step's cost
            dev = compiled["dev_signs"](state[0], dev_ids)
        state[0], state[1], loss = compiled[kind](state[0], state[1], train_ids, dev)
        jax.block_until_ready((state[0], loss))
        samples[kind].append(time.perf_counter() - start)

    for _ in range(len(kinds)):  # warm-up: one step of each kind
        one_step()
    samples = {k: [] for k in kinds}
    _, worst = timed_steps(one_step, args.steps * len(kinds))
    return dict(
        side=side,
        peak_rss_gib=peak_rss_gib(),
        compile_s=compile_s,
        xla_temp_gib=temp_gib,
        times=samples,
        worst_contamination=worst,
        versions=f"jax {jax.__version__}",
    )


def run_torch(args) -> dict:
    import numpy as np
    import torch
    import transformers

    from hacbo_jax.models.qwen3 import Qwen3Config

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    hf_config = transformers.Qwen3Config(**Qwen3Config.qwen3_0_6b().to_hf_dict())
    model = transformers.Qwen3ForCausalLM(hf_config).float().train()
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    ids = torch.tensor(np.random.RandomState(0).randint(0, hf_config.vocab_size, (1, args.seq)))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()

    step()  # warm-up
    times, worst = timed_steps(step, args.steps)
    return dict(
        side="torch",
        peak_rss_gib=peak_rss_gib(),
        times={"ordinary": times},
        worst_contamination=worst,
        versions=f"torch {torch.__version__}, transformers {transformers.__version__}",
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=protocol.MIN_STEPS, help="timed steps per kind")
    ap.add_argument("--scan", action="store_true", help="JAX: scan over stacked layers")
    ap.add_argument("--remat", default="full", choices=["none", "full", "dots"])
    ap.add_argument("--loss-chunk", type=int, default=128, help="JAX: 0 = full logits")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of {SIDES}")
    ap.add_argument(
        "--dev-pass",
        default="separate",
        choices=["separate", "in-step"],
        help="jax-hacbo: the dev gradient's signs in their own program (as the trainer), or the "
        "dev gradient inside the step's lax.cond",
    )
    ap.add_argument(
        "--dev-grad",
        default="controlled",
        choices=["controlled", "all"],
        help="jax-hacbo, separate dev pass: back-propagate the dev batch to the controlled "
        "leaves only (as the trainer), or to every parameter (the embedding too)",
    )
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument(
        "--memory-only",
        action="store_true",
        help="peak RSS only (load-independent): 2 steps per kind, step times not for a README",
    )
    args = ap.parse_args()
    if args.memory_only:
        args.steps = 2
    elif args.steps < protocol.MIN_STEPS:
        ap.error(f"--steps must be >= {protocol.MIN_STEPS}")
    if args.side:
        result = run_torch(args) if args.side == "torch" else run_jax(args, args.side)
        print("RESULT " + json.dumps(result), flush=True)
        return

    watch = protocol.LoadWatch("qwen3_full_memory")
    results, failed = {}, []
    for side in args.sides.split(","):
        cmd = [sys.executable, __file__, "--side", side, "--seq", str(args.seq)]
        cmd += ["--steps", str(args.steps), "--remat", args.remat]
        cmd += ["--loss-chunk", str(args.loss_chunk)] + (["--scan"] if args.scan else [])
        cmd += ["--memory-only"] if args.memory_only else []
        cmd += ["--dev-pass", args.dev_pass, "--dev-grad", args.dev_grad]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            # one broken side must not throw away the others' (long) measurements
            print(
                f"{side} side failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True
            )
            failed.append(side)
            continue
        results[side] = json.loads(lines[-1][len("RESULT ") :])
        print(f"[{side}] {lines[-1]}", flush=True)  # each side's figures as soon as they exist
    clean = watch.finish() and not failed
    if not results:
        sys.exit("every side failed")
    print(
        f"Qwen3-0.6B (596M params, fp32), batch 1 x {args.seq}, AdamW; JAX: remat={args.remat}, "
        f"scan_layers={args.scan}, loss chunk {args.loss_chunk}; HACBO dev pass {args.dev_pass} "
        f"(dev gradient of {args.dev_grad} leaves); "
        f"{os.cpu_count()} CPU threads"
    )
    print(f"{'side / step kind':34}{'peak RSS GiB':>13}{'min s':>8}{'median s':>9}{'n':>4}")
    for side, r in results.items():
        for kind, times in r["times"].items():
            rss = f"{r['peak_rss_gib']:13.2f}" if kind == "ordinary" else " " * 13
            print(
                f"{side + ' ' + kind:34}{rss}{min(times):8.2f}{statistics.median(times):9.2f}"
                f"{len(times):4d}"
            )
        extra = {k: r[k] for k in ("compile_s", "xla_temp_gib") if k in r}
        print(
            f"  {r['versions']}; worst contamination {100 * r['worst_contamination']:.1f}% {extra}"
        )
    if "torch" in results:
        ref = results["torch"]
        for side in ("jax-adamw", "jax-hacbo", "jax-adagradselect"):
            if side in results:
                r = results[side]
                print(
                    f"{side} / torch: peak RSS {r['peak_rss_gib'] / ref['peak_rss_gib']:.2f}x, "
                    f"ordinary step (median) "
                    f"{statistics.median(r['times']['ordinary']) / statistics.median(ref['times']['ordinary']):.2f}x"
                )
    worst = max(r["worst_contamination"] for r in results.values())
    if args.memory_only:
        print(
            "memory only: peak RSS and XLA temporaries do not depend on load; the step times "
            "above are 2 unprotected steps, not for a README"
        )
        return
    ok = clean and worst <= protocol.CONTAMINATION_LIMIT
    print(f"clean (idle machine, contamination <= 5%): {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
