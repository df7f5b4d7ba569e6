"""Skipping the weight gradients of idle blocks: the training step's time and memory.

Each side is the trainer's own jitted step (``hacbo_jax.trainer.step.make_train_step``: loss in
vocabulary chunks, gradient, global-norm clip 1.0, AdamW, the controller, the non-finite guard),
fp32, one packed row of ``--seq`` tokens (4 examples), scanned layers, remat full, state
donated and advanced step by step:

- ``adamw``: the dense AdamW step, the reference of every ratio;
- ``adagradselect-0.1`` / ``adagradselect-0.3``: AdaGradSelect at pct 0.1 / 0.3, after epoch 1
  (epsilon = 0: every step draws its blocks, so the selection is known before the backward
  pass) with ``controller.skip_weight_grads``; ``adagradselect-0.1-dense``: the same without
  skipping (what the controller cost before);
- ``blac-half-frozen``: BLAC with every other block frozen, skipping;
- ``hacbo-gamma0-half-probation``: HACBO gamma = 0 with every other block in probation,
  skipping (the ordinary step; measurement steps never skip).

``--shape small`` (a 12-layer, 512-wide Qwen3) runs every side in this process, interleaved by
the protocol (``benchmarks/protocol.py``: load average, alternating order, min and median of
>= 7 steps, per-round contamination with retries). ``--shape 0.6b`` (the Qwen3-0.6B
architecture, random weights) cannot hold two sides at once (10 GiB each), so each side runs in
its own subprocess, every timed step's contamination is measured and a step above 5% of the
cores is repeated (up to 3 times), and each side's peak RSS is its process's. Both report XLA's
temporary buffer size of each compiled step (``memory_analysis``).

XLA's static cost analysis counts both branches of a ``lax.cond`` (the same FLOPs with and
without skipping), so the proof that the work is skipped is the time.

    python benchmarks/skip_weight_grads.py --shape small
    python benchmarks/skip_weight_grads.py --shape 0.6b [--sides adamw,adagradselect-0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import protocol  # noqa: E402  (benchmarks/protocol.py)
from step_sides import (  # noqa: E402  (benchmarks/step_sides.py)
    SIDES,
    build_side,
    peak_rss_gib,
    run_side_in_subprocess,
    time_steps,
)

DEFAULT_06B_SIDES = (
    "adamw",
    "adagradselect-0.1",
    "adagradselect-0.3",
    "blac-half-frozen",
    "hacbo-gamma0-half-probation",
)


def model_config(shape: str):
    from hacbo_jax.models.qwen3 import Qwen3Config

    if shape == "0.6b":
        return Qwen3Config.qwen3_0_6b()
    return Qwen3Config(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=12,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    )


def run_one_side(args) -> dict:
    """Child process of ``--shape 0.6b``: one side, per-step contamination retries."""
    step, info = build_side(args.side, model_config(args.shape), seq=args.seq)
    step()  # warm-up (the compiled program's first run)
    times, worst = time_steps(step, args.steps)
    return {
        "side": args.side,
        "times": times,
        "worst_contamination": worst,
        "peak_rss_gib": peak_rss_gib(),
        "compile_s": info["compile_s"],
        "xla_temp_gib": info["xla_temp_gib"],
        "layers": info["layers"],
        "idle_mean": statistics.mean(info["idle_counts"]) if info["idle_counts"] else 0.0,
    }


def table(rows: list[dict], seq: int) -> list[str]:
    base = next((r for r in rows if r["side"] == "adamw"), None)
    out = [
        (
            "| side | blocks idle (mean) | step s (min / median) | / adamw (min, median) | "
            "tokens/s (median) | peak RSS GiB | XLA temporaries GiB | compile s |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lo, med = min(r["times"]), statistics.median(r["times"])
        ratio = ""
        if base is not None:
            ratio = f"{lo / min(base['times']):.3f}x, {med / statistics.median(base['times']):.3f}x"
        rss = f"{r['peak_rss_gib']:.2f}" if r.get("peak_rss_gib") is not None else "-"
        out.append(
            f"| {r['side']} | {r['idle_mean']:.1f} / {r['layers']} | {lo:.3f} / {med:.3f} | "
            f"{ratio} | {seq / med:,.0f} | {rss} | {r['xla_temp_gib']:.2f} | "
            f"{r['compile_s']:.1f} |"
        )
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=["small", "0.6b"], default="small")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=protocol.MIN_STEPS)
    ap.add_argument("--sides", default=None, help=f"comma-separated, of {SIDES}")
    ap.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.steps < protocol.MIN_STEPS:
        ap.error(f"--steps must be >= {protocol.MIN_STEPS}")
    if args.side:
        print("RESULT " + json.dumps(run_one_side(args)), flush=True)
        return
    default = DEFAULT_06B_SIDES if args.shape == "0.6b" else SIDES
    sides = args.sides.split(",") if args.sides else list(default)
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        ap.error(f"unknown sides {unknown}; allowed: {', '.join(SIDES)}")
    watch = protocol.LoadWatch(f"skip_weight_grads {args.shape}")
    rows = []
    if args.shape == "small":
        built = {s: build_side(s, model_config(args.shape), seq=args.seq) for s in sides}
        result = protocol.interleaved({s: b[0] for s, b in built.items()}, steps=args.steps)
        for line in result.summary_lines():
            print(line)
        clean = result.clean
        for s, (_, info) in built.items():
            counts = info["idle_counts"]
            rows.append(
                {
                    "side": s,
                    "times": result.timings[s].samples,
                    "peak_rss_gib": None,
                    "idle_mean": statistics.mean(counts) if counts else 0.0,
                    "compile_s": info["compile_s"],
                    "xla_temp_gib": info["xla_temp_gib"],
                    "layers": info["layers"],
                }
            )
    else:
        clean = True
        for s in sides:
            argv = ["--shape", args.shape, "--seq", str(args.seq), "--steps", str(args.steps)]
            row = run_side_in_subprocess(__file__, argv, s)
            clean &= row["worst_contamination"] <= protocol.CONTAMINATION_LIMIT
            print(
                f"{s}: min {min(row['times']):.3f} s, median {statistics.median(row['times']):.3f}"
                f" s, peak RSS {row['peak_rss_gib']:.2f} GiB, worst contamination "
                f"{100 * row['worst_contamination']:.1f}%",
                flush=True,
            )
            rows.append(row)
    quiet = watch.finish()
    import jax

    print(f"\njax {jax.__version__}, {os.cpu_count()} cores, {args.shape}, 1 x {args.seq} packed")
    for line in table(rows, args.seq):
        print(line)
    print(f"clean: {'yes' if clean and quiet else 'NO'}")


if __name__ == "__main__":
    main()
