"""Cost of HACBO on top of AdamW: one jitted train step, chain(adamw, hacbo) vs adamw alone.

Same model (a residual stack of MLP blocks), same batch, same run; timed by the protocol of
``benchmarks/protocol.py`` (load average, interleaved sides, min and median of >= 7 steps,
contaminated rounds retried). Prints:
- ordinary steps (t mod K != 0): time ratio hacbo / adamw (no block in probation, and one);
- measurement steps (t mod K == 0): ratio, and the micro-dev backward pass timed on its own;
- ``chain(adamw, hacbo).update`` alone against ``adamw.update`` alone on a 28-block tree;
- the controller state's bytes against AdamW's.

    python benchmarks/controller_overhead.py [--width 512 --depth 8 --batch 256 --steps 7]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

from hacbo_jax import hacbo, label_by_rules

import protocol  # benchmarks/protocol.py


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


def update_only_cases(depth: int, width: int, interval: int) -> dict:
    """``adamw.update`` vs ``chain(adamw, hacbo).update`` alone on a Qwen3-like tree of ``depth``
    blocks x 9 leaves (q, k, v, o, gate, up, down kernels; two norms), no forward/backward."""
    keys = iter(jax.random.split(jax.random.key(3), depth * 9))
    shapes = {
        ("attn_qkv", "q"): (width, width),
        ("attn_qkv", "k"): (width, width // 2),
        ("attn_qkv", "v"): (width, width // 2),
        ("attn_out", "o"): (width, width),
        ("mlp", "gate"): (width, 3 * width),
        ("mlp", "up"): (width, 3 * width),
        ("mlp", "down"): (3 * width, width),
        ("ln", "input"): (width,),
        ("ln", "post"): (width,),
    }
    params = {
        "layers": [
            {
                f"{sub}.{name}": jax.random.normal(next(keys), shape)
                for (sub, name), shape in shapes.items()
            }
            for _ in range(depth)
        ]
    }
    grads = jax.tree.map(lambda x: 0.01 * x, params)
    labels = label_by_rules(params, [(r"layers/(\d+)/(\w+)\.", r"\1/\2")])
    adamw = optax.adamw(1e-3)
    controlled = optax.chain(optax.adamw(1e-3), hacbo(labels, interval=interval))
    adamw_update = jax.jit(lambda g, s, p: adamw.update(g, s, p))
    hacbo_update = jax.jit(lambda g, s, p: controlled.update(g, s, p, train_grads=g, dev_grads=g))
    adamw_state, hacbo_state = adamw.init(params), controlled.init(params)
    return {
        "adamw.update alone": lambda: jax.block_until_ready(
            adamw_update(grads, adamw_state, params)
        ),
        "chain(adamw,hacbo).update": lambda: jax.block_until_ready(
            hacbo_update(grads, hacbo_state, params)
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dev-batch", type=int, default=64)
    parser.add_argument("--interval", type=int, default=30)
    parser.add_argument("--steps", type=int, default=protocol.MIN_STEPS)
    parser.add_argument("--update-depth", type=int, default=28)
    parser.add_argument("--update-width", type=int, default=128)
    args = parser.parse_args()
    watch = protocol.LoadWatch("controller_overhead")

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

    def run(fn, fn_args):
        return lambda: jax.block_until_ready(fn(*fn_args))

    sides = {
        "adamw step": run(adamw_step, (params, adamw_state)),
        "adamw+hacbo ordinary": run(hacbo_step, (params, ordinary_state)),
        "ordinary, 1 in probation": run(hacbo_step, (params, probation_state)),
        "adamw+hacbo measurement": run(hacbo_step, (params, measuring_state)),
        "dev backward alone": run(dev_backward, (params,)),
    }
    sides.update(update_only_cases(args.update_depth, args.update_width, args.interval))
    result = protocol.interleaved(sides, steps=args.steps)
    clean = watch.finish()
    num_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"model: {args.depth} MLP blocks, width {args.width}, {num_params / 1e6:.1f}M params; "
        f"train batch {args.batch}, dev batch {args.dev_batch}, K = {args.interval}; "
        f"update-only tree: {args.update_depth} blocks x 9 leaves, d {args.update_width}"
    )
    print("\n".join(result.summary_lines()))
    t = {name: timing for name, timing in result.timings.items()}

    def ratio(a, b):
        return f"{t[a].min / t[b].min:.3f} (min) {t[a].median / t[b].median:.3f} (median)"

    for name in ("adamw+hacbo ordinary", "ordinary, 1 in probation", "adamw+hacbo measurement"):
        print(f"{name} / adamw step: {ratio(name, 'adamw step')}")
    amortised = (
        (args.interval - 1) * t["adamw+hacbo ordinary"].median + t["adamw+hacbo measurement"].median
    ) / args.interval
    print(f"amortised over K steps / adamw step (median): {amortised / t['adamw step'].median:.3f}")
    print(
        "chain(adamw,hacbo).update / adamw.update alone: "
        f"{ratio('chain(adamw,hacbo).update', 'adamw.update alone')}"
    )
    hacbo_bytes, adamw_bytes = nbytes(ordinary_state[1]), nbytes(adamw_state)
    print(
        f"state bytes: hacbo {hacbo_bytes} vs adamw {adamw_bytes} "
        f"({hacbo_bytes / adamw_bytes:.2e} of AdamW's)"
    )
    print(f"clean (idle machine, contamination <= 5%): {'yes' if clean and result.clean else 'NO'}")


if __name__ == "__main__":
    main()
