"""Training throughput of the Flax NNX Qwen3 against transformers' PyTorch Qwen3, same run.

One training step = forward, next-token cross-entropy, backward, AdamW update. Both sides use
the same small config, the same weights (ours are loaded from the checkpoint transformers
wrote) and the same batch; ours is the step as the trainer compiles it (the library's loss,
state donated), and the script prints both sides' loss at the shared weights. Timed by the
protocol of ``benchmarks/protocol.py`` (load average before and after, sides interleaved, min
and median of >= 7 steps, contaminated rounds retried).

Prints tokens/s of each side, the ratio (ours / PyTorch), the step's FLOPs (XLA's cost
analysis), the fp32 matmul rate of both libraries on one [tokens, hidden] x [hidden, vocab]
product, and the step's matmul-bound time: every ``dot_general`` of the step's forward and
backward (read from its jaxpr), each run alone in XLA, in PyTorch and in numpy, as three more
interleaved sides. That time is the limit a step can approach with each library's matmul
kernels; the script prints the share of each step it takes and what 1.2x PyTorch's tokens/s
would need.

    python benchmarks/qwen3_throughput.py [--layers 4 --hidden 256 --batch 8 --seq 256 --steps 7]
        [--model-kw '{"scan_layers": true}']
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from hacbo_jax.models.qwen3 import Qwen3ForCausalLM  # noqa: E402
from hacbo_jax.trainer.pretrain_base import lm_batch  # noqa: E402
from hacbo_jax.trainer.step import make_loss_fn  # noqa: E402

import protocol  # noqa: E402  (benchmarks/protocol.py)


def jax_step_fn(model, lr):
    """The step as the trainer compiles it: the library's loss (:func:`make_loss_fn` of an
    :func:`lm_batch`: targets shifted, the last position weighted 0, the mean over the counted
    positions, which is what transformers' ``labels=ids`` loss computes; it shifts the labels,
    not the logits), AdamW, and params and optimiser state donated (PyTorch updates in place)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(lr, weight_decay=0.0)
    opt_state = tx.init(params)
    nll = make_loss_fn(graphdef, rest)

    def loss_fn(params, batch):
        total, count = nll(params, batch)
        return total / count

    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), params, opt_state, loss_fn


def parse_model_kw(ap: argparse.ArgumentParser, text: str) -> dict:
    """``--model-kw`` as a dict of ``Qwen3ForCausalLM.from_pretrained`` keywords, or an
    argparse error (exit 2) naming what is wrong and what is allowed."""
    allowed = sorted(
        name
        for name in inspect.signature(Qwen3ForCausalLM.from_pretrained).parameters
        if name not in ("cls", "path_or_hub_id")
    )
    try:
        kw = json.loads(text)
    except json.JSONDecodeError as err:
        ap.error(
            f"--model-kw {text!r} is not JSON ({err}); give an object such as "
            "'{\"scan_layers\": true}'"
        )
    if not isinstance(kw, dict):
        ap.error(f"--model-kw {text!r} must be a JSON object of keywords, one of {allowed}")
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        ap.error(f"--model-kw has unknown keys {unknown}; allowed: {allowed}")
    return kw


def matmul_rates(m: int, k: int, n: int, steps: int) -> dict[str, float]:
    """GFLOP/s of one [m, k] x [k, n] fp32 matmul on each side (the step's matmul-bound limit)."""
    a = np.random.RandomState(1).standard_normal((m, k)).astype(np.float32)
    b = np.random.RandomState(2).standard_normal((k, n)).astype(np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    jmm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    result = protocol.interleaved(
        {
            "xla matmul": lambda: jax.block_until_ready(jmm(ja, jb)),
            "torch matmul": lambda: torch.matmul(ta, tb),
        },
        steps=steps,
    )
    flops = 2.0 * m * k * n
    return {name: flops / t.min / 1e9 for name, t in result.timings.items()}


def step_matmuls(fn, *args) -> list[tuple[tuple, tuple, tuple, int]]:
    """Every ``dot_general`` of ``fn(*args)`` as ``(lhs shape, rhs shape, dimension_numbers,
    count)``, read from its jaxpr (sub-jaxprs included; a scan's body counts ``length`` times)."""
    counts: dict[tuple, int] = {}

    def walk(jaxpr, times):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                key = (tuple(lhs), tuple(rhs), eqn.params["dimension_numbers"])
                counts[key] = counts.get(key, 0) + times
            inner = times * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else times
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub, inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr, 1)
    return [(*key, n) for key, n in counts.items()]


def dot_flops(lhs: tuple, rhs: tuple, dims) -> float:
    """FLOPs of a ``dot_general``: 2 x (lhs elements) x (rhs elements not contracted or batched)."""
    (lhs_contract, _), (lhs_batch, _) = dims
    free_rhs = np.prod(rhs) / np.prod([lhs[i] for i in (*lhs_contract, *lhs_batch)])
    return 2.0 * np.prod(lhs) * free_rhs


def torch_einsum_spec(lhs: tuple, rhs: tuple, dims) -> str:
    """The ``torch.einsum`` equation of a ``dot_general`` (output: batch, lhs free, rhs free)."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dims
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    a, b = [None] * len(lhs), [None] * len(rhs)
    batch = []
    for i, j in zip(lhs_batch, rhs_batch):
        a[i] = b[j] = next(letters)
        batch.append(a[i])
    for i, j in zip(lhs_contract, rhs_contract):
        a[i] = b[j] = next(letters)
    free = []
    for side in (a, b):
        for i, letter in enumerate(side):
            if letter is None:
                side[i] = next(letters)
                free.append(side[i])
    return f"{''.join(a)},{''.join(b)}->{''.join(batch + free)}"


def matmul_sides(matmuls) -> dict:
    """Three benchmark sides that run every matmul of a step once, one after another, each
    alone: in XLA (one jitted ``dot_general`` per shape, waited for), in PyTorch (``einsum``)
    and in numpy (``einsum(optimize=True)``: its bundled OpenBLAS where the contraction maps
    to a matrix product, without batch axes). Their time is the step's matmul-bound time with
    each library's kernels on the step's own shapes."""
    rng = np.random.RandomState(3)
    xla, torch_ops, numpy_ops = [], [], []
    for lhs, rhs, dims, count in matmuls:
        a = rng.standard_normal(lhs).astype(np.float32)
        b = rng.standard_normal(rhs).astype(np.float32)
        dot = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims))
        xla.append((dot, jnp.asarray(a), jnp.asarray(b), count))
        spec = torch_einsum_spec(lhs, rhs, dims)
        torch_ops.append((spec, torch.from_numpy(a), torch.from_numpy(b), count))
        numpy_ops.append((spec, a, b, count))

    def run_xla():
        for dot, a, b, count in xla:
            for _ in range(count):
                jax.block_until_ready(dot(a, b))

    def run_torch():
        for spec, a, b, count in torch_ops:
            for _ in range(count):
                torch.einsum(spec, a, b)

    def run_numpy():
        for spec, a, b, count in numpy_ops:
            for _ in range(count):
                np.einsum(spec, a, b, optimize=True)

    return {"xla matmuls": run_xla, "torch matmuls": run_torch, "numpy matmuls": run_numpy}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=protocol.MIN_STEPS)
    ap.add_argument(
        "--model-kw",
        default="{}",
        help="JSON keyword arguments of our model, e.g. '{\"scan_layers\": true}'",
    )
    args = ap.parse_args()
    model_kw = parse_model_kw(ap, args.model_kw)
    watch = protocol.LoadWatch("qwen3_throughput")
    torch.set_num_threads(os.cpu_count() or 1)

    cfg = transformers.Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(cfg).train()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = Qwen3ForCausalLM.from_pretrained(d, **model_kw)
    ids = np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq))
    tokens = args.batch * args.seq

    # PyTorch: transformers computes the same shifted mean cross-entropy from labels=ids.
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.0)
    t_ids = torch.tensor(ids)

    def torch_step():
        opt.zero_grad(set_to_none=True)
        loss = hf(t_ids, labels=t_ids).loss
        loss.backward()
        opt.step()
        return loss

    step, params, opt_state, loss_fn = jax_step_fn(model, 1e-4)
    # every position counts but the last (no next token): one micro-batch of lm_batch
    j_batch = jax.tree.map(lambda x: x[0], lm_batch(ids.astype(np.int32), np.ones_like(ids)))
    state = [params, opt_state]

    def jax_step():
        state[0], state[1], loss = step(state[0], state[1], j_batch)
        jax.block_until_ready(loss)

    # FLOPs of one step as XLA counts them (forward + backward + AdamW).
    flops = (
        step.lower(state[0], state[1], j_batch).compile().cost_analysis().get("flops", float("nan"))
    )
    # The same loss on both sides before any update (same weights, same batch); the JAX step
    # gets a copy of the state, which it donates.
    jax_loss = float(step(*jax.tree.map(jnp.copy, (state[0], state[1])), j_batch)[2])
    with torch.no_grad():
        torch_loss = float(hf(t_ids, labels=t_ids).loss)
    # The step's own matmuls, each run alone in each library: the matmul-bound step time.
    matmuls = step_matmuls(jax.value_and_grad(loss_fn), state[0], j_batch)
    matmul_flops = sum(dot_flops(lhs, rhs, dims) * n for lhs, rhs, dims, n in matmuls)
    sides = {"jax (ours)": jax_step, "pytorch": torch_step, **matmul_sides(matmuls)}
    result = protocol.interleaved(sides, steps=args.steps)
    rates = matmul_rates(tokens, args.hidden, args.vocab, args.steps)
    clean = watch.finish()
    t_jax, t_torch = result.timings["jax (ours)"], result.timings["pytorch"]
    print(
        f"config: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}"
        f"x{args.head_dim}, intermediate {args.intermediate}, vocab {args.vocab}; "
        f"batch {args.batch} x {args.seq} tokens; {args.steps} timed steps per side, "
        f"interleaved; {os.cpu_count()} CPU threads; jax {jax.__version__}, "
        f"torch {torch.__version__}; our model options {args.model_kw}"
    )
    print(
        f"loss at the shared initial weights: ours {jax_loss:.6f}, pytorch {torch_loss:.6f} "
        f"(|diff| {abs(jax_loss - torch_loss):.1e})"
    )
    print("\n".join(result.summary_lines()))
    print(f"{'':14}{'tokens/s (min)':>16}{'tokens/s (median)':>19}")
    for name, t in result.timings.items():
        print(f"{name:14}{tokens / t.min:16.0f}{tokens / t.median:19.0f}")
    print(
        f"ratio (ours / pytorch tokens/s): {t_torch.min / t_jax.min:.2f}x (min), "
        f"{t_torch.median / t_jax.median:.2f}x (median)"
    )
    print(
        f"matmul rate [{tokens}x{args.hidden}]x[{args.hidden}x{args.vocab}] fp32, best of "
        f"{args.steps}: xla {rates['xla matmul']:.0f} GFLOP/s, torch "
        f"{rates['torch matmul']:.0f} GFLOP/s"
    )
    achieved = flops / t_jax.min / 1e9
    print(
        f"ours: {flops / 1e9:.1f} GFLOP/step (XLA cost analysis) -> {achieved:.0f} GFLOP/s = "
        f"{100 * achieved / rates['xla matmul']:.0f}% of the XLA matmul rate"
    )
    t_xla_mm, t_torch_mm = result.timings["xla matmuls"], result.timings["torch matmuls"]
    t_numpy_mm = result.timings["numpy matmuls"]
    fastest_mm = min(t_xla_mm.min, t_torch_mm.min, t_numpy_mm.min)
    print(
        f"the step's matmuls ({sum(n for *_, n in matmuls)} dot_generals, "
        f"{matmul_flops / 1e9:.1f} GFLOP of the forward and backward), each run alone, min: "
        f"xla {t_xla_mm.min:.3f} s ({matmul_flops / t_xla_mm.min / 1e9:.0f} GFLOP/s), torch "
        f"{t_torch_mm.min:.3f} s ({matmul_flops / t_torch_mm.min / 1e9:.0f} GFLOP/s), numpy "
        f"einsum {t_numpy_mm.min:.3f} s ({matmul_flops / t_numpy_mm.min / 1e9:.0f} GFLOP/s)"
    )
    print(
        f"share of each step that its library's matmuls alone take (min / min): ours "
        f"{100 * t_xla_mm.min / t_jax.min:.0f}%, pytorch {100 * t_torch_mm.min / t_torch.min:.0f}%"
    )
    print(
        f"1.2x pytorch's tokens/s = {t_torch.min / 1.2:.3f} s per step = "
        f"{t_torch.min / 1.2 / fastest_mm:.2f}x the fastest library's matmuls alone "
        f"({fastest_mm:.3f} s)"
    )
    print(f"clean (idle machine, contamination <= 5%): {'yes' if clean and result.clean else 'NO'}")


if __name__ == "__main__":
    main()
