"""Builds the embedded default base model ``hacbo_jax/assets/tiny-qwen3-gsm/`` from scratch, on CPU.

    python -m train.pretrain_base [--steps N] [--out DIR] ...

1. Trains the tokenizer (:mod:`train.tokenizer`) on the GSM8K train-proper split (the default
   micro-dev holdout excluded) and synthetic "arith-small" train problems.
2. Builds a corpus of full documents ``format_prompt(q) + format_target(a) + EOS``: mostly
   synthetic train-stream problems, plus a small share of GSM8K train-proper examples, packed
   greedily (whole documents only, so every row starts at a document start as an evaluation
   prompt does) into rows of ``seq_len`` tokens.
3. Pretrains a small tied-embedding Qwen3 (``hacbo_jax.models.qwen3``) as a causal LM on every
   token (next-token cross-entropy) with a jitted optax AdamW step and a warm-up + cosine
   schedule.
4. Measures greedy exact match on held-out synthetic "eval" problems and writes the model
   (``save_pretrained``), the tokenizer, ``metadata.json`` and a ``README.md``.

Everything is seeded; the step count (not wall time) fixes the result.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from hacbo_jax.assets import ASSETS_DIR
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.data import gsm8k as data
from hacbo_jax.trainer.evaluate import evaluate_exact_match
from hacbo_jax.trainer.step import Batch, TrainState, make_train_step
from hacbo_jax.data.synthetic import SyntheticTask
from hacbo_jax.data.tokenizer import save_tokenizer, train_tokenizer

DEFAULT_OUT = ASSETS_DIR / "tiny-qwen3-gsm"
DEFAULT_TASK = "arith-small"
MAX_ASSET_BYTES = 25 * 1024 * 1024


def model_config(vocab_size: int, tokenizer, args: argparse.Namespace) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        head_dim=args.head_dim,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def document_texts(examples) -> list[str]:
    return [data.format_prompt(e.question) + data.format_target(e.answer) for e in examples]


def pack_documents(
    token_lists: list[list[int]], seq_len: int, num_rows: int, pad_id: int, eos_id: int
):
    """Greedy packing of whole documents (each + EOS) into ``num_rows`` rows of ``seq_len``.

    Documents longer than ``seq_len`` are cut. Returns (ids int32[R, L], mask int32[R, L],
    documents used). Stops when the rows are full or the documents run out.
    """
    ids = np.full((num_rows, seq_len), pad_id, dtype=np.int32)
    mask = np.zeros((num_rows, seq_len), dtype=np.int32)
    row, fill, used = 0, 0, 0
    for tokens in token_lists:
        document = (tokens + [eos_id])[:seq_len]
        if fill + len(document) > seq_len:
            row, fill = row + 1, 0
            if row == num_rows:
                break
        ids[row, fill : fill + len(document)] = document
        mask[row, fill : fill + len(document)] = 1
        fill += len(document)
        used += 1
    return ids, mask, used


def build_corpus(
    tokenizer,
    *,
    num_rows: int,
    seq_len: int,
    gsm8k_train,
    task: SyntheticTask,
    gsm8k_share: float,
    seed: int,
):
    """Rows for pretraining: synthetic train problems with GSM8K documents mixed in at
    probability ``gsm8k_share`` per document, in a seeded order."""
    rng = np.random.default_rng([seed, 7])
    expected_docs = int(num_rows * seq_len / 60) + 1000  # synthetic documents are ~70 tokens
    num_gsm8k = min(len(gsm8k_train), int(expected_docs * gsm8k_share))
    synthetic = task.examples("train", expected_docs - num_gsm8k)
    chosen_gsm8k = [gsm8k_train[i] for i in rng.choice(len(gsm8k_train), num_gsm8k, replace=False)]
    documents = synthetic + chosen_gsm8k
    order = rng.permutation(len(documents))
    texts = document_texts([documents[i] for i in order])
    tokens = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids, mask, used = pack_documents(
        tokens, seq_len, num_rows, tokenizer.pad_token_id, tokenizer.eos_token_id
    )
    if mask[-1].sum() == 0:
        raise RuntimeError(f"corpus too small: only {used} documents for {num_rows} rows")
    return (
        ids,
        mask,
        {
            "documents": used,
            "gsm8k_documents": int(np.sum(order[:used] >= len(synthetic))),
            "tokens": int(mask.sum()),
            "fill": float(mask.mean()),
        },
    )


def lm_batch(ids: np.ndarray, mask: np.ndarray) -> Batch:
    """Next-token prediction over every real token, as one micro-batch of the training step's
    :class:`~hacbo_jax.trainer.step.Batch` (position t predicts ids[t + 1] where both are real)."""
    targets = np.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    loss_mask = np.zeros(ids.shape, np.float32)
    loss_mask[:, :-1] = mask[:, 1:] * mask[:, :-1]
    return Batch(*(jnp.asarray(x)[None] for x in (ids, mask, targets, loss_mask)))


def greedy_exact_match(
    model,
    tokenizer,
    examples,
    *,
    batch_size: int = 50,
    prompt_len: int = 64,
    max_new_tokens: int = 72,
) -> tuple[float, list[str]]:
    """Greedy exact match of ``examples`` (hacbo_jax.trainer.evaluate with this script's fixed shapes)."""
    result = evaluate_exact_match(
        model,
        tokenizer,
        examples,
        batch_size=batch_size,
        prompt_len=prompt_len,
        max_new_tokens=max_new_tokens,
    )
    return result.exact_match, result.predictions


def directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=768)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--task", default=DEFAULT_TASK)
    p.add_argument(
        "--gsm8k-share",
        type=float,
        default=0.05,
        help="probability that a corpus document is a GSM8K train-proper example",
    )
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument(
        "--eval-every", type=int, default=100, help="also measure EM on 50 problems every N steps"
    )
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run_steps(args, train_step, state, ids, mask, graphdef, rest, tokenizer, eval_examples):
    """``args.steps`` steps over the packed corpus; (state, loss curve, training seconds)."""
    losses, curve = [], []
    train_start = time.time()
    for step in range(args.steps):
        rows = slice(step * args.batch_size, (step + 1) * args.batch_size)
        batch = lm_batch(ids[rows], mask[rows])
        state, metrics = train_step(state, batch, batch)  # no dev buffer: no controller
        losses.append(metrics.loss)
        if (step + 1) % 25 == 0 or step + 1 == args.steps:
            mean_recent = float(np.mean(jax.device_get(losses[-25:])))
            record = {
                "step": step + 1,
                "loss": round(mean_recent, 4),
                "elapsed_s": round(time.time() - train_start, 1),
            }
            if args.eval_every and (step + 1) % args.eval_every == 0:
                model = nnx.merge(graphdef, nnx.State(state.params), rest)
                record["exact_match_50"], _ = greedy_exact_match(
                    model, tokenizer, eval_examples[:50]
                )
            curve.append(record)
            print(f"[pretrain] {record}", flush=True)
    train_time = time.time() - train_start
    return state, curve, train_time


def task_and_tokenizer(args):
    """The synthetic task, the GSM8K train-proper split and the tokenizer trained on both."""
    task = SyntheticTask(args.task, seed=args.seed)
    gsm8k = data.load_gsm8k("train")
    train_idx, _ = data.holdout_split(len(gsm8k))
    gsm8k_train = [gsm8k[i] for i in train_idx]
    tokenizer_texts = document_texts(gsm8k_train) + document_texts(task.examples("train", 5000))
    return task, gsm8k_train, train_tokenizer(tokenizer_texts, vocab_size=args.vocab_size)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    task, gsm8k_train, tokenizer = task_and_tokenizer(args)
    vocab_size = len(tokenizer)
    print(f"[pretrain] tokenizer: {vocab_size} tokens ({time.time() - start:.1f}s)", flush=True)

    ids, mask, corpus = build_corpus(
        tokenizer,
        num_rows=args.steps * args.batch_size,
        seq_len=args.seq_len,
        gsm8k_train=gsm8k_train,
        task=task,
        gsm8k_share=args.gsm8k_share,
        seed=args.seed,
    )
    print(f"[pretrain] corpus: {corpus} ({time.time() - start:.1f}s)", flush=True)

    config = model_config(vocab_size, tokenizer, args)
    model = Qwen3ForCausalLM(config, rngs=nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    num_params = int(sum(x.size for x in jax.tree.leaves(params)))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, args.steps, end_value=args.lr * 0.1
    )
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)  # no decay on norm scales
    # The fine-tuning step (hacbo_jax.trainer.step) with this optimiser and no controller.
    tx = optax.apply_if_finite(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask),
        ),
        2**30,
    )
    rng = jax.random.key_data(jax.random.key(args.seed))
    state = TrainState(jnp.int32(0), params, tx.init(params), rng)
    train_step = make_train_step(
        graphdef, rest, tx, schedule, dev_batch_size=1, uses_dev_grads=False, donate=False
    )
    print(f"[pretrain] model: {num_params:,} parameters", flush=True)

    eval_examples = task.examples("eval", args.eval_n)
    state, curve, train_time = run_steps(
        args, train_step, state, ids, mask, graphdef, rest, tokenizer, eval_examples
    )
    model = nnx.merge(graphdef, nnx.State(state.params), rest)

    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    save_tokenizer(
        tokenizer, out
    )  # written before the evaluation, so a failure there loses nothing
    eval_start = time.time()
    exact_match, outputs = greedy_exact_match(model, tokenizer, eval_examples)
    eval_time = time.time() - eval_start
    print(
        f"[pretrain] exact match on {len(eval_examples)} held-out '{args.task}' problems: {exact_match:.3f} "
        f"({eval_time:.1f}s)",
        flush=True,
    )
    for example, output in list(zip(eval_examples, outputs))[:3]:
        print(f"[pretrain] Q: {example.question}\n[pretrain] model:{output!r}", flush=True)

    metadata = build_metadata(
        args, config, num_params, corpus, curve, train_time, start, eval_examples, exact_match
    )
    (out / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out / "README.md").write_text(render_readme(metadata))
    size = directory_bytes(out)
    print(
        f"[pretrain] wrote {out} ({size / 1e6:.2f} MB) in {time.time() - start:.0f}s total",
        flush=True,
    )
    if size > MAX_ASSET_BYTES:
        raise RuntimeError(f"asset is {size} bytes, over the {MAX_ASSET_BYTES}-byte budget")
    return metadata


def build_metadata(
    args, config, num_params, corpus, curve, train_time, start, eval_examples, exact_match
) -> dict:
    """What ``metadata.json`` records about the build (command, architecture, data, curve)."""
    return {
        "command": "python -m train.pretrain_base "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "parameters": num_params,
        "architecture": {
            k: getattr(config, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "tie_word_embeddings",
            )
        },
        "corpus": corpus,
        "synthetic_task": args.task,
        "steps": args.steps,
        "tokens_per_step": args.batch_size * args.seq_len,
        "final_train_loss": curve[-1]["loss"],
        "loss_curve": curve,
        "train_time_s": round(train_time, 1),
        "total_time_s": round(time.time() - start, 1),
        "eval": {
            "task": args.task,
            "split": "eval",
            "n": len(eval_examples),
            "exact_match": exact_match,
            "decoding": "greedy, prompt_len 64, max_new_tokens 72",
        },
        "jax_version": jax.__version__,
    }


def render_readme(meta: dict) -> str:
    arch = meta["architecture"]
    return f"""# tiny-qwen3-gsm: the embedded default base model of hacbo-jax

A {meta["parameters"]:,}-parameter Qwen3-architecture causal LM ({arch["num_hidden_layers"]} layers, hidden
{arch["hidden_size"]}, {arch["num_attention_heads"]} query / {arch["num_key_value_heads"]} key-value heads of dim
{arch["head_dim"]}, MLP {arch["intermediate_size"]}, tied embeddings, vocabulary {arch["vocab_size"]}) with a
byte-level BPE tokenizer that splits digits individually. Hugging Face format: loads with
`hacbo_jax.models.qwen3.Qwen3ForCausalLM.from_pretrained` and with `transformers`
(`AutoTokenizer`, `Qwen3ForCausalLM`). Made from scratch on CPU; no downloaded weights.

## How it was made

    {meta["command"]}

- Tokenizer trained on GSM8K train-proper text (the default 1,473-example micro-dev holdout
  excluded) and 5,000 synthetic problems.
- Pretraining corpus: {meta["corpus"]["documents"]:,} documents
  ({meta["corpus"]["gsm8k_documents"]:,} from GSM8K train-proper, the rest synthetic "{meta["synthetic_task"]}"
  train-stream problems), each `Question: {{q}}\\nAnswer: {{a}}<|endoftext|>`, packed whole into rows;
  {meta["corpus"]["tokens"]:,} tokens. Causal LM loss on every token.
- {meta["steps"]} AdamW steps of {meta["tokens_per_step"]} token slots, final training loss
  {meta["final_train_loss"]:.3f}; {meta["train_time_s"]:.0f} s of training,
  {meta["total_time_s"]:.0f} s in total on a shared 2-core CPU (JAX {meta["jax_version"]}).

## Measured ability

Greedy exact match on {meta["eval"]["n"]} held-out synthetic "{meta["eval"]["task"]}" problems (eval stream,
disjoint from training; {meta["eval"]["decoding"]}): **{meta["eval"]["exact_match"]:.1%}**.
It is a toy for CPU runs of the fine-tuning stack, not a GSM8K solver. `metadata.json` has the
loss curve (with exact match on the first 50 of those problems at some steps).
"""
