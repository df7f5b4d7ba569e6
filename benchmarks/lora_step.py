"""LoRA against full fine-tuning: the training step's time, memory and trainable parameters.

Each side is the trainer's own jitted step (``hacbo_jax.trainer.step.make_train_step``: loss in
vocabulary chunks of 128, gradient, global-norm clip 1.0, AdamW, the non-finite guard), fp32
parameters, one packed row of ``--seq`` tokens (4 examples), scanned layers, remat full, the
state donated and advanced step by step (``benchmarks/step_sides.py``, ``build_lora_side``):

- ``full-adamw``: every weight trained with AdamW (the reference of every ratio);
- ``lora-8`` / ``lora-256``: rank 8 / 256 adapters on every projection (q, k, v, o, gate, up,
  down), AdamW on the adapters only, the fp32 base frozen;
- ``lora-8-bf16base``: rank 8 with the frozen base held in bf16 (computing in fp32).

Every side runs in its own subprocess (the 0.6B shape cannot hold two sides at once): each
timed step's contamination is measured and a step above 5% of the cores is repeated (up to 3
times), the peak RSS is the process's, XLA's temporaries come from the compiled step's
``memory_analysis()``, and the load average is watched around the whole run
(``benchmarks/protocol.py``). Only a run that prints ``clean: yes`` goes into a README.

``--shape 0.6b``: the Qwen3-0.6B architecture with random weights (1 x 512 tokens by default).
``--shape tiny``: a two-layer model whose projections all admit rank 256 (a CPU check of the
script in a few seconds a side, 64 tokens by default).

    python benchmarks/lora_step.py --shape 0.6b
    python benchmarks/lora_step.py --shape tiny --steps 7
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import protocol  # benchmarks/protocol.py, on the path above
from step_sides import (
    LORA_SIDES,
    build_lora_side,
    peak_rss_gib,
    run_side_in_subprocess,
    time_steps,
)

DEFAULT_SEQ = {"0.6b": 512, "tiny": 64}


def model_config(shape: str):
    """Qwen3-0.6B's architecture, or a tiny one (every projection's smaller side >= 256)."""
    from hacbo_jax.models.qwen3 import Qwen3Config

    if shape == "0.6b":
        return Qwen3Config.qwen3_0_6b()
    return Qwen3Config(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        tie_word_embeddings=True,
    )


def run_one_side(args) -> dict:
    """Child process: build one side, one warm-up step, ``args.steps`` timed steps."""
    step, info = build_lora_side(args.side, model_config(args.shape), seq=args.seq)
    step()  # warm-up (the compiled program's first run)
    times, worst = time_steps(step, args.steps)
    return {
        "side": args.side,
        "times": times,
        "worst_contamination": worst,
        "peak_rss_gib": peak_rss_gib(),
        "compile_s": info["compile_s"],
        "xla_temp_gib": info["xla_temp_gib"],
        "trainable_params": info["trainable_params"],
        "num_params": info["num_params"],
    }


def table(rows: list[dict], seq: int) -> list[str]:
    """The markdown table; ratios against ``full-adamw`` when it ran."""
    base = next((r for r in rows if r["side"] == "full-adamw"), None)
    out = [
        (
            "| side | trainable params (share) | step s (min / median) | / full-adamw (min, median) | "
            "tokens/s (median) | peak RSS GiB | XLA temporaries GiB | compile s |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lo, med = min(r["times"]), statistics.median(r["times"])
        ratio = ""
        if base is not None:
            ratio = f"{lo / min(base['times']):.3f}x, {med / statistics.median(base['times']):.3f}x"
        share = 100 * r["trainable_params"] / r["num_params"]
        out.append(
            f"| {r['side']} | {r['trainable_params']:,} ({share:.2f}%) | {lo:.3f} / {med:.3f} | "
            f"{ratio} | {seq / med:,.0f} | {r['peak_rss_gib']:.2f} | {r['xla_temp_gib']:.2f} | "
            f"{r['compile_s']:.1f} |"
        )
    return out


def main(argv=None) -> list[dict] | None:
    """Runs the sides (or, with the hidden ``--side``, one side as the child process) and
    returns their rows."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(DEFAULT_SEQ), default="0.6b")
    ap.add_argument("--seq", type=int, default=None, help="tokens (0.6b: 512, tiny: 64)")
    ap.add_argument("--steps", type=int, default=protocol.MIN_STEPS)
    ap.add_argument("--sides", default=None, help=f"comma-separated, of {', '.join(LORA_SIDES)}")
    ap.add_argument("--side", choices=LORA_SIDES, help=argparse.SUPPRESS)  # child process
    args = ap.parse_args(argv)
    if args.steps < protocol.MIN_STEPS:
        ap.error(f"--steps must be >= {protocol.MIN_STEPS} (the protocol's minimum)")
    args.seq = DEFAULT_SEQ[args.shape] if args.seq is None else args.seq
    if args.seq <= 0 or args.seq % 4:
        ap.error(f"--seq must be a positive multiple of 4 (4 packed examples), got {args.seq}")
    if args.side:
        print("RESULT " + json.dumps(run_one_side(args)), flush=True)
        return None
    sides = args.sides.split(",") if args.sides else list(LORA_SIDES)
    unknown = [s for s in sides if s not in LORA_SIDES]
    if unknown:
        ap.error(f"unknown sides {unknown}; allowed: {', '.join(LORA_SIDES)}")

    watch = protocol.LoadWatch(f"lora_step {args.shape}")
    rows, clean = [], True
    for side in sides:
        argv = ["--shape", args.shape, "--seq", str(args.seq), "--steps", str(args.steps)]
        row = run_side_in_subprocess(__file__, argv, side)
        clean &= row["worst_contamination"] <= protocol.CONTAMINATION_LIMIT
        print(
            f"{side}: min {min(row['times']):.3f} s, median {statistics.median(row['times']):.3f}"
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
    return rows


if __name__ == "__main__":
    main()
