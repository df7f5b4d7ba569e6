"""Cost of HACBO on top of AdamW: one jitted train step, chain(adamw, hacbo) vs adamw alone.

Same model (a residual stack of MLP blocks), same batch, same run; timings are interleaved
(A, B, C, ... per round, several rounds, median) because the CPU is shared. Prints:
- ordinary steps (t mod K != 0): time ratio hacbo / adamw (no block in probation, and one);
- measurement steps (t mod K == 0): ratio, and the micro-dev backward pass timed on its own;
- the controller state's bytes against AdamW's.

    python benchmarks/controller_overhead.py [--width 512 --depth 8 --batch 256 --rounds 15 --iters 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from hacbo_jax import hacbo, label_by_rules


def init_params(key, width, depth):
    keys = jax.random.split(key, 2 * depth + 1)
    scale = width**-0.5
    return {
        "embed": scale * jax.random.normal(keys[0], (width, width)),
        "blocks": [
            {
                "mlp": {
                    "w_in": scale * jax.random.normal(keys[2 * i + 1], (width, 4 * width)),
                    "w_out": 0.5 * scale * jax.random.normal(keys[2 * i + 2], (4 * width, width)),
                },
                "ln": {"scale": jnp.ones(width)},
            }
            for i in range(depth)
        ],
    }


def loss_fn(params, batch):
    x, y = batch
    h = x @ params["embed"]
    for block in params["blocks"]:
        z = h * jax.lax.rsqrt(jnp.mean(h**2, -1, keepdims=True) + 1e-6) * block["ln"]["scale"]
        h = h + jax.nn.gelu(z @ block["mlp"]["w_in"]) @ block["mlp"]["w_out"]
    return jnp.mean((h - y) ** 2)


def make_batch(key, n, width):
    x = jax.random.normal(key, (n, width))
    return x, jnp.tanh(x)


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def time_call(fn, args, iters):
    """Mean wall-clock and process CPU seconds per call (CPU time is less sensitive to waiting
    for cores that other processes hold)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        jax.block_until_ready(fn(*args))
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dev-batch", type=int, default=64)
    parser.add_argument("--interval", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=2)
    args = parser.parse_args()

    params = init_params(jax.random.key(0), args.width, args.depth)
    train_batch = make_batch(jax.random.key(1), args.batch, args.width)
    dev_batch = make_batch(jax.random.key(2), args.dev_batch, args.width)
    labels = label_by_rules(params, [(r"blocks/(\d+)/(mlp|ln)/", r"\1/\2")])
    adamw = optax.adamw(1e-3)
    controlled = optax.chain(optax.adamw(1e-3), hacbo(labels, interval=args.interval))

    @jax.jit
    def adamw_step(params, opt_state):
        grads = jax.grad(loss_fn)(params, train_batch)
        updates, opt_state = adamw.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def hacbo_step(params, opt_state):
        grads = jax.grad(loss_fn)(params, train_batch)
        updates, opt_state = controlled.update(
            grads,
            opt_state,
            params,
            train_grads=grads,
            dev_grad_fn=lambda p: jax.grad(loss_fn)(p, dev_batch),
        )
        return optax.apply_updates(params, updates), opt_state

    dev_backward = jax.jit(lambda p: jax.grad(loss_fn)(p, dev_batch))

    adamw_state = adamw.init(params)
    ordinary_state = controlled.init(params)  # count 0: t = 1 is not a measurement step
    measuring_state = (
        ordinary_state[0],
        ordinary_state[1]._replace(count=jnp.int32(args.interval - 1)),
    )
    probation_state = (
        ordinary_state[0],
        ordinary_state[1]._replace(probation=ordinary_state[1].probation.at[0].set(True)),
    )  # one block quantised
    cases = {
        "adamw": (adamw_step, (params, adamw_state)),
        "hacbo_ordinary": (hacbo_step, (params, ordinary_state)),
        "hacbo_probation": (hacbo_step, (params, probation_state)),
        "hacbo_measurement": (hacbo_step, (params, measuring_state)),
        "dev_backward": (dev_backward, (params,)),
    }
    for fn, fn_args in cases.values():  # compile and warm up
        time_call(fn, fn_args, 2)
    samples = {name: [] for name in cases}
    order = list(cases)
    for round_index in range(args.rounds):
        # alternate the order so a slow phase of the shared CPU does not always hit the same case
        for name in order if round_index % 2 == 0 else order[::-1]:
            fn, fn_args = cases[name]
            samples[name].append(time_call(fn, fn_args, args.iters))

    def summary(clock):  # clock 0: wall, 1: CPU
        times = {name: [x[clock] for x in values] for name, values in samples.items()}
        median = {name: statistics.median(values) for name, values in times.items()}
        # paired within a round: robust to the load of other processes drifting between rounds
        paired = {
            name: statistics.median(t / a for t, a in zip(times[name], times["adamw"]))
            for name in cases
        }
        return median, paired

    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"model: {args.depth} MLP blocks, width {args.width}, {num_params / 1e6:.1f}M params; "
        f"train batch {args.batch}, dev batch {args.dev_batch}, K = {args.interval}; "
        f"{args.rounds} interleaved rounds x {args.iters} steps, medians"
    )
    for clock, clock_name in ((0, "wall-clock"), (1, "process CPU time")):
        median, paired = summary(clock)
        print(f"-- {clock_name} (median ms; ratio of medians; median of per-round ratios)")
        print(f"adamw step                 {median['adamw'] * 1e3:8.1f}")
        for name, text in (
            ("hacbo_ordinary", "adamw+hacbo ordinary step "),
            ("hacbo_probation", "  ordinary, 1 in probation "),
            ("hacbo_measurement", "adamw+hacbo measurement   "),
        ):
            print(
                f"{text} {median[name] * 1e3:8.1f}   {median[name] / median['adamw']:.3f}   "
                f"{paired[name]:.3f}"
            )
        print(
            f"  dev backward alone       {median['dev_backward'] * 1e3:8.1f}   measurement "
            f"minus it: {(median['hacbo_measurement'] - median['dev_backward']) / median['adamw']:.3f}"
        )
        amortised = (
            (args.interval - 1) * median["hacbo_ordinary"] + median["hacbo_measurement"]
        ) / args.interval
        print(
            f"  amortised over K steps   {amortised * 1e3:8.1f}   {amortised / median['adamw']:.3f}"
        )
    hacbo_bytes, adamw_bytes = nbytes(ordinary_state[1]), nbytes(adamw_state)
    print(
        f"state bytes: hacbo {hacbo_bytes} vs adamw {adamw_bytes} "
        f"({hacbo_bytes / adamw_bytes:.2e} of AdamW's)"
    )


if __name__ == "__main__":
    main()
