"""lr x wd trajectory-invariance sweep on the embedded model's pre-training task
(console script ``hacbo-sweep-lrwd``).

    hacbo-sweep-lrwd --out DIR --lr 2e-3 --wd 0.5 --steps 3000 [--full] [--overwrite] [model sizes]

Trains a small tied-embedding Qwen3 from scratch (sizes set by the flags; the defaults are a
micro model that runs end to end on CPU) as a causal LM on packed synthetic-task documents
tokenised with the embedded model's tokenizer, with plain AdamW (beta = (0.9, 0.95), clip 1.0,
no decay on norm scales, constant LR after ``--warmup``) for every run of the grid of
:mod:`hacbo_jax.experiments.lrwd.sweep`, logs step, eta, lambda, gamma, train_loss, val_loss and grad_norm (global,
before clipping) every ``--log-every`` steps to ``DIR/runs/{run}.jsonl``, and writes
``lrwd.csv``, ``lrwd.json`` and ``lrwd.png``. Prints T x gamma and warns below 1. A non-empty
``--out`` (an earlier sweep) is refused unless ``--overwrite``.

The model/data glue is ``make_train_fn`` below and nothing else.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hacbo_jax.assets import ASSETS_DIR
from hacbo_jax.trainer.cli_common import (
    ArgumentParser,
    add_overwrite_argument,
    check_output_target,
    cli_main,
)

DEFAULT_TOKENIZER = ASSETS_DIR / "tiny-qwen3-gsm"


def make_train_fn(args: argparse.Namespace):
    """``train_fn(lr, wd, seed) -> curve`` for :func:`hacbo_jax.experiments.lrwd.sweep.run_sweep`."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
    from hacbo_jax.trainer.pretrain_base import document_texts, pack_documents
    from hacbo_jax.data.synthetic import SyntheticTask
    from hacbo_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    rows = args.steps * args.batch_size + args.val_rows
    examples = SyntheticTask(args.task, seed=0).examples("train", rows * args.seq_len // 40 + 100)
    tokens = tokenizer(document_texts(examples), add_special_tokens=False)["input_ids"]
    ids, mask, _ = pack_documents(
        tokens, args.seq_len, rows, tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    if mask[-1].sum() == 0:
        raise ValueError(f"corpus too small for {rows} rows of {args.seq_len} tokens")
    val_ids, val_mask = jnp.asarray(ids[: args.val_rows]), jnp.asarray(mask[: args.val_rows])
    train_ids, train_mask = ids[args.val_rows :], mask[args.val_rows :]
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        tie_word_embeddings=True,
        max_position_embeddings=max(1024, args.seq_len),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    # One compiled step for every run: eta and lambda live in the optimiser state
    # (optax.inject_hyperparams), so a new (lr, wd, seed) only changes arrays.
    graphdef, abstract_params, rest = nnx.split(
        nnx.eval_shape(lambda: Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))), nnx.Param, ...
    )
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, abstract_params)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adamw)(
            learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.0, mask=decay_mask
        ),
    )

    def loss_fn(params, ids, mask):
        logits = nnx.merge(graphdef, params, rest)(ids, mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
        weight = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
        return jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)

    @jax.jit
    def step(params, opt_state, ids, mask, lr, wd):
        adamw_state = opt_state[1]
        hyperparams = {**adamw_state.hyperparams, "learning_rate": lr, "weight_decay": wd}
        opt_state = (opt_state[0], adamw_state._replace(hyperparams=hyperparams))
        loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    val_loss = jax.jit(loss_fn)

    def train_fn(lr: float, wd: float, seed: int):
        params = nnx.state(Qwen3ForCausalLM(config, rngs=nnx.Rngs(seed)), nnx.Param)
        opt_state = tx.init(params)
        order = np.random.default_rng(seed).permutation(len(train_ids))
        curve = []
        for t in range(1, args.steps + 1):
            rows = order[(t - 1) * args.batch_size : t * args.batch_size]
            lr_t = lr * min(1.0, t / args.warmup) if args.warmup else lr  # linear warm-up
            params, opt_state, loss, grad_norm = step(
                params,
                opt_state,
                jnp.asarray(train_ids[rows]),
                jnp.asarray(train_mask[rows]),
                jnp.float32(lr_t),
                jnp.float32(wd),
            )
            if t % args.log_every == 0 or t == args.steps:
                curve.append(
                    {
                        "step": t,
                        "train_loss": float(loss),
                        "val_loss": float(val_loss(params, val_ids, val_mask)),
                        "grad_norm": float(grad_norm),
                    }
                )
        return curve

    return train_fn


def parse_args(argv=None, prog: str = "hacbo-sweep-lrwd") -> argparse.Namespace:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--lr", type=float, default=2.0**-9, help="anchor eta_0")
    p.add_argument("--wd", type=float, default=0.5, help="anchor lambda_0")
    p.add_argument("--span", type=int, default=2)
    p.add_argument("--full", action="store_true", help="all (2 span + 1)^2 grid points")
    p.add_argument("--noise-seeds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="train_loss", choices=("train_loss", "val_loss"))
    p.add_argument("--noise-factor", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--val-rows", type=int, default=16)
    p.add_argument("--task", default="arith-small")
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--intermediate-size", type=int, default=192)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=2)
    p.add_argument("--num-kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=32)
    add_overwrite_argument(p, "an earlier sweep in --out")
    return p.parse_args(argv)


def argument_problems(args: argparse.Namespace) -> list[str]:
    """Every out-of-range argument (one phrase each, naming its option)."""
    import math

    from hacbo_jax.data.synthetic import PRESETS

    problems = []
    positive = ("steps", "log_every", "batch_size", "seq_len", "val_rows", "hidden_size",
                "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "noise_seeds", "span")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not all(math.isfinite(v) and v > 0 for v in (args.lr, args.wd)):
        problems.append(f"--lr and --wd must be > 0 (and finite), got {args.lr} and {args.wd}")
    if not (math.isfinite(args.noise_factor) and args.noise_factor > 0):
        problems.append(f"--noise-factor must be a finite number > 0, got {args.noise_factor}")
    if not 0 <= args.warmup < max(args.steps, 1):
        problems.append(f"--warmup must be in [0, --steps = {args.steps}), got {args.warmup}")
    if args.num_heads >= 1 and args.num_kv_heads >= 1 and args.num_heads % args.num_kv_heads:
        problems.append(
            f"--num-heads {args.num_heads} must be a multiple of --num-kv-heads {args.num_kv_heads}"
        )
    if args.task not in PRESETS:
        problems.append(f"--task {args.task!r} is not a synthetic task ({', '.join(PRESETS)})")
    if args.steps >= 1 and args.log_every >= 1 and args.steps // args.log_every < 5:
        problems.append("--steps / --log-every must give at least 5 logged points to smooth")
    if not (args.tokenizer / "tokenizer.json").is_file():
        problems.append(f"--tokenizer {str(args.tokenizer)!r} has no tokenizer.json")
    try:
        check_output_target(args.out, overwrite=getattr(args, "overwrite", False))
    except ValueError as e:
        problems.append(str(e))
    return problems


def run(args: argparse.Namespace):
    from hacbo_jax.experiments.lrwd.sweep import run_sweep, write_results

    problems = argument_problems(args)
    if problems:
        raise ValueError("; ".join(problems))
    check_output_target(args.out, overwrite=getattr(args, "overwrite", False))
    args.out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails before training
    result = run_sweep(
        make_train_fn(args),
        anchor=(args.lr, args.wd),
        total_steps=args.steps,
        span=args.span,
        seed=args.seed,
        noise_seeds=args.noise_seeds,
        full=args.full,
        metric=args.metric,
        final_metric="val_loss",
        noise_factor=args.noise_factor,
        log_dir=args.out / "runs",
    )
    paths = write_results(result, args.out)
    ratios = ", ".join(f"{f} {r:.2f}" for f, r in result.ratios.items())
    print(f"[lrwd] S_F / S_0: {ratios}")
    if result.angle is not None:
        print(f"[lrwd] salient direction: {result.angle:.1f} deg from (1, -1)")
    print(f"[lrwd] verdict: {result.verdict}; wrote {', '.join(str(p) for p in paths.values())}")
    return result


@cli_main
def main(argv=None, *, prog: str = "hacbo-sweep-lrwd") -> int:
    """Runs the tool; exit status 2 with a one-line message (no traceback) on bad input."""
    run(parse_args(argv, prog))
    return 0
