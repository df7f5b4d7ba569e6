"""Training throughput of the Flax NNX Qwen3 against transformers' PyTorch Qwen3, same run.

One training step = forward, next-token cross-entropy, backward, AdamW update. Both sides use
the same small config, the same weights (ours are loaded from the checkpoint transformers
wrote) and the same batch; steps alternate between the sides (median time of each). Prints tokens/s of each and the ratio (ours / PyTorch).

    python benchmarks/qwen3_throughput.py [--layers 4 --hidden 256 --batch 8 --seq 256 --steps 10]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from hacbo_jax.models.qwen3 import Qwen3ForCausalLM  # noqa: E402


def jax_step_fn(model, lr):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(lr, weight_decay=0.0)
    opt_state = tx.init(params)

    def loss_fn(params, ids):
        logits = nnx.merge(graphdef, params, rest)(ids)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, params, opt_state


def time_interleaved(steps, **run_steps):
    """Median seconds per step of each side, alternating sides so shared-CPU load hits both."""
    for run in run_steps.values():  # compile / warm up
        run()
        run()
    times = {name: [] for name in run_steps}
    for _ in range(steps):
        for name, run in run_steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


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
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
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
        model = Qwen3ForCausalLM.from_pretrained(d)
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

    step, params, opt_state = jax_step_fn(model, 1e-4)
    j_ids = jnp.asarray(ids, jnp.int32)
    state = [params, opt_state]

    def jax_step():
        state[0], state[1], loss = step(state[0], state[1], j_ids)
        jax.block_until_ready(loss)

    times = time_interleaved(args.steps, jax=jax_step, torch=torch_step)
    t_jax, t_torch = times["jax"], times["torch"]
    print(
        f"config: {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}"
        f"x{args.head_dim}, intermediate {args.intermediate}, vocab {args.vocab}; "
        f"batch {args.batch} x {args.seq} tokens; {args.steps} timed steps per side "
        f"(interleaved, median); "
        f"{os.cpu_count()} CPU threads; jax {jax.__version__}, torch {torch.__version__}"
    )
    print(f"{'':14}{'s/step':>10}{'tokens/s':>12}")
    print(f"{'jax (ours)':14}{t_jax:10.3f}{tokens / t_jax:12.0f}")
    print(f"{'pytorch':14}{t_torch:10.3f}{tokens / t_torch:12.0f}")
    print(f"ratio (ours / pytorch tokens/s): {t_torch / t_jax:.2f}x")


if __name__ == "__main__":
    main()
