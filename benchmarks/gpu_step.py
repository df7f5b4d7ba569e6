"""The Qwen3-0.6B paper step on one GPU: tokens/s, MFU, peak device memory, logit agreement.

The paper configs' step (``configs/paper_hacbo.yaml``): the Qwen3-0.6B architecture (random
weights: nothing is downloaded), bf16 compute with fp32 master weights, packed 512-token rows
(4 examples a row), cuDNN attention, scanned layers, remat ``dots``, loss in vocabulary chunks
of 128, global-norm clip 1.0, AdamW. Sides (``benchmarks/step_sides.py``): ``adamw``,
``hacbo-gamma0-half-probation`` and ``adagradselect-0.1`` with the weight gradients of idle
blocks skipped, plus the dense ``adagradselect-0.1-dense`` for the skip's own ratio. Each side
is compiled, warmed up and timed (min and median of ``--steps`` >= 7 steps; the device is not
shared, so there is no CPU contamination to measure); the sides are timed one after the other
in one process, each holding its own state.

Printed per side: seconds per step, tokens/s, model FLOPs utilisation (6 N T for the weights,
N without the embedding table, plus the tied head's 6 V D T and the attention scores' 12 L
D_attn S_avg T with S_avg the mean causal keys within a segment; no remat recompute; against
``--peak-tflops``, 989 for an H100 or H200 in dense bf16), XLA's temporaries of the compiled
step and the device's peak memory so far (``memory_stats``; cumulative over the sides, which
run in this order, the dense AdamW first). Last, the logits of one packed row from the cuDNN
path against the XLA attention path and against the CPU path (einsum attention on the host),
same weights and bf16 compute.

    python benchmarks/gpu_step.py                   # on the GPU machine, about 5 minutes
    python benchmarks/gpu_step.py --dry-run         # any machine: a tiny shape, XLA attention

``--dry-run`` runs the same code on a tiny model with XLA attention (cuDNN needs a GPU), two
rows of 64 tokens and 7 steps; a test runs it on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from step_sides import SIDES, build_side  # noqa: E402  (benchmarks/step_sides.py)

GPU_SIDES = (
    "adamw",
    "hacbo-gamma0-half-probation",
    "adagradselect-0.1",
    "adagradselect-0.1-dense",
)
H100_BF16_DENSE_TFLOPS = 989.0


def tiny_config():
    from hacbo_jax.models.qwen3 import Qwen3Config

    return Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    )


def step_flops(config, num_params: int, tokens: int, seq: int) -> float:
    """Model FLOPs of one training step (forward + backward, no remat recompute)."""
    embed = config.vocab_size * config.hidden_size
    weights = 6.0 * (num_params - embed) * tokens
    head = 6.0 * embed * tokens  # the tied output projection
    attn_width = config.num_attention_heads * config.head_dim
    # per token and layer: QK^T and PV (2 x 2 x D_attn FLOPs per key, x3 for the backward) over
    # the causal keys of its segment: a packed row holds 4 segments of seq / 4, half on average
    keys = seq / 4 / 2
    attention = 12.0 * config.num_hidden_layers * attn_width * keys * tokens
    return weights + head + attention


def peak_device_gib() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shape, XLA attention (CPU)")
    ap.add_argument("--rows", type=int, default=16, help="packed rows per step")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sides", default=",".join(GPU_SIDES), help=f"of {SIDES}")
    ap.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.steps < 7:
        ap.error("--steps must be >= 7")
    if args.json and os.path.exists(args.json):
        ap.error(f"--json {args.json} exists; an earlier record is never overwritten")
    import jax
    import numpy as np

    from hacbo_jax.models.qwen3 import Qwen3Config

    if args.dry_run:
        config, rows, seq, impl = tiny_config(), 2, 64, "xla"
    else:
        if jax.default_backend() != "gpu":
            ap.error("the GPU step needs a CUDA backend; use --dry-run elsewhere")
        config, rows, seq, impl = Qwen3Config.qwen3_0_6b(), args.rows, args.seq, "cudnn"
    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        ap.error(f"unknown sides {unknown}; allowed: {', '.join(SIDES)}")
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0]}")
    print(f"shape: {rows} x {seq} packed tokens, attention {impl}, bf16 compute, remat dots")
    results, logits_side = {}, None
    for side in sides:
        step, info = build_side(
            side,
            config,
            seq=seq,
            rows=rows,
            dtype="bfloat16",
            remat="dots",
            attention_impl=impl,
        )
        step()
        step()  # warm-up
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        tokens = rows * seq
        med = statistics.median(times)
        flops = step_flops(config, info["num_params"], tokens, seq)
        results[side] = {
            "min_s": min(times),
            "median_s": med,
            "tokens_per_s": tokens / med,
            "mfu": flops / med / (args.peak_tflops * 1e12),
            "peak_device_gib": peak_device_gib(),
            "compile_s": info["compile_s"],
            "xla_temp_gib": info["xla_temp_gib"],
            "idle_blocks_mean": float(np.mean(info["idle_counts"])) if info["idle_counts"] else 0,
        }
        r = results[side]
        peak = "n/a" if r["peak_device_gib"] is None else f"{r['peak_device_gib']:.2f} GiB"
        print(
            f"{side:<30} min {r['min_s']:.4f} s  median {med:.4f} s  {r['tokens_per_s']:,.0f} "
            f"tokens/s  MFU {100 * r['mfu']:.1f}%  XLA temp {r['xla_temp_gib']:.2f} GiB  "
            f"peak so far {peak}  idle blocks "
            f"{r['idle_blocks_mean']:.1f}/{config.num_hidden_layers}",
            flush=True,
        )
        logits_side = info
        del step
    base = results.get("adamw")
    if base:
        for side, r in results.items():
            print(f"{side:<30} / adamw step (median): {r['median_s'] / base['median_s']:.3f}x")

    # Logits of one packed row: the benchmark's attention path against XLA's, and the CPU path.
    params, forward = logits_side["params_and_forward"]()
    fwd = jax.jit(forward, static_argnums=1)
    ours = np.asarray(fwd(params, impl), np.float32)
    xla = np.asarray(fwd(params, "xla"), np.float32)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        reference = np.asarray(
            jax.jit(forward, static_argnums=1)(jax.device_put(params, cpu), "einsum"), np.float32
        )
    results["logits"] = {
        f"{impl}_vs_xla_max_abs": float(np.max(np.abs(ours - xla))),
        f"{impl}_vs_cpu_einsum_max_abs": float(np.max(np.abs(ours - reference))),
        "logit_scale_max_abs": float(np.max(np.abs(reference))),
    }
    print("logits: " + ", ".join(f"{k} {v:.4g}" for k, v in results["logits"].items()))
    if args.json:
        with open(args.json, "x") as f:  # never overwrite an earlier record
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
