"""Real-token training throughput with packed rows against padded rows, same model, same run.

Both sides run the training stack's own step (``hacbo_jax.trainer.step.make_train_step``: loss
over answer tokens, backward, clipping, AdamW; no controller) on the SAME examples: GSM8K
training examples in the project's prompt format, tokenised with the shipped Qwen3 tokenizer,
drawn by the training sampler (``EpochSampler``). The padded side gets them right-padded to
``--max-len`` ([1, batch, L]); the packed side gets them packed by
``hacbo_jax.data.packing.StepPacker`` (fixed [accum, rows, L] for all the measured
steps, micro-batches of at most ``--batch`` rows). Timed by ``benchmarks/protocol.py`` (load
average before and after, sides interleaved, min and median of >= 7 steps, contaminated rounds
retried). Prints real tokens/s of each side (answer and prompt tokens, padding excluded), the
ratio packed / padded, and the real-token fraction of the slots each side computes.

With ``--vocab`` below the tokenizer's 151,669 ids the ids are taken modulo the vocabulary (the
time of a step does not depend on which ids it sees; the lengths are the real ones).

    python benchmarks/packing_throughput.py [--layers 4 --hidden 256 --batch 16 --steps 7]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import protocol
from flax import nnx
from transformers import AutoTokenizer

import hacbo_jax
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.data import gsm8k as data_lib
from hacbo_jax.data.packing import StepPacker
from hacbo_jax.trainer.step import (
    Batch,
    PackedRows,
    TrainState,
    build_optimizer,
    make_train_step,
)

ASSETS = Path(hacbo_jax.__file__).parent / "assets"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=16, help="examples per optimiser step")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--logits-chunk", type=int, default=None)
    ap.add_argument("--scan-layers", action="store_true")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--attention-impl", default="einsum", choices=("einsum", "xla", "cudnn"))
    ap.add_argument("--steps", type=int, default=protocol.MIN_STEPS)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    watch = protocol.LoadWatch("packing_throughput")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "qwen3-tokenizer")
    train = data_lib.load_gsm8k_file(ASSETS / "gsm8k" / "train.jsonl")
    arrays = data_lib.tokenize_sft(train, tokenizer, args.max_len)
    if args.vocab < len(tokenizer):
        arrays = data_lib.SFTArrays(
            arrays.input_ids % args.vocab,
            arrays.attention_mask,
            arrays.targets % args.vocab,
            arrays.loss_mask,
            arrays.num_truncated,
        )
    warmup = 2
    n_batches = warmup + args.steps
    packer = StepPacker.for_run(
        arrays,
        batch_size=args.batch,
        seed=0,
        total_steps=n_batches,
        max_rows=args.batch,
        pad_id=tokenizer.pad_token_id % args.vocab,
    )
    sampler = data_lib.EpochSampler(len(arrays), args.batch, seed=0)
    padded_batches, packed_batches, real_tokens = [], [], []
    for _ in range(n_batches):
        indices = sampler.next_indices()
        rows = arrays.take(indices)
        padded_batches.append(Batch(*(jnp.asarray(rows[k])[None] for k in Batch._fields)))
        packed = packer.pack(indices)
        packed_batches.append(PackedRows(*(jnp.asarray(packed[k]) for k in PackedRows._fields)))
        real_tokens.append(int(rows["attention_mask"].sum()))

    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        tie_word_embeddings=True,
    )
    model = Qwen3ForCausalLM(
        config,
        remat=args.remat,
        scan_layers=args.scan_layers,
        attention_impl=args.attention_impl,
        rngs=nnx.Rngs(0),
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    schedule = lambda step: 1e-4
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0, controller=None
    )
    step = make_train_step(
        graphdef,
        rest,
        tx,
        schedule,
        dev_batch_size=1,
        uses_dev_grads=False,
        donate=False,
        logits_chunk=args.logits_chunk,
    )
    rng = jax.random.key_data(jax.random.key(0))
    dev = padded_batches[0]  # unused without a controller

    def side(batches):
        state = [TrainState(jnp.int32(0), params, tx.init(params), rng), 0]

        def run():
            state[0], metrics = step(state[0], batches[state[1] % len(batches)], dev)
            state[1] += 1
            jax.block_until_ready(metrics.loss)

        return run

    result = protocol.interleaved(
        {"padded": side(padded_batches), "packed": side(packed_batches)},
        steps=args.steps,
        warmup=warmup,
    )
    clean = watch.finish()
    # The timed steps are batches warmup .. warmup + steps - 1 on both sides.
    mean_real = float(np.mean(real_tokens[warmup:]))
    slots = {
        "padded": args.batch * args.max_len,
        "packed": packer.accumulation_steps * packer.rows * args.max_len,
    }
    print(
        f"config: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}"
        f"x{args.head_dim}, intermediate {args.intermediate}, vocab {args.vocab}; scan_layers "
        f"{args.scan_layers}, remat {args.remat}, attention {args.attention_impl}; "
        f"{args.batch} GSM8K examples per step (Qwen3 tokenizer), max_len {args.max_len}; "
        f"padded [1, {args.batch}, {args.max_len}], packed [{packer.accumulation_steps}, "
        f"{packer.rows}, {args.max_len}]; {args.steps} timed steps per side, interleaved; "
        f"{os.cpu_count()} CPU threads; jax {jax.__version__} ({jax.default_backend()})"
    )
    print("\n".join(result.summary_lines()))
    print(f"{'':10}{'real tok/s (min)':>18}{'real tok/s (median)':>21}{'real/computed':>15}")
    for name, t in result.timings.items():
        print(
            f"{name:10}{mean_real / t.min:18.0f}{mean_real / t.median:21.0f}"
            f"{mean_real / slots[name]:15.1%}"
        )
    t_pad, t_pack = result.timings["padded"], result.timings["packed"]
    print(
        f"ratio (packed / padded real tokens/s): {t_pad.min / t_pack.min:.2f}x (min), "
        f"{t_pad.median / t_pack.median:.2f}x (median)"
    )
    print(f"clean (idle machine, contamination <= 5%): {'yes' if clean and result.clean else 'NO'}")


if __name__ == "__main__":
    main()
