"""The training steps the benchmarks time, built one way for all of them.

Each side is the trainer's own jitted step (``hacbo_jax.trainer.step.make_train_step``: loss in
vocabulary chunks, gradient, global-norm clip 1.0, AdamW, the controller, the non-finite
guard) on packed rows, scanned layers, state donated and advanced step by step:

- ``adamw``: the dense AdamW step, the reference of every ratio;
- ``adagradselect-0.1`` / ``adagradselect-0.3``: AdaGradSelect at pct 0.1 / 0.3, after epoch 1
  (epsilon = 0: every step draws its blocks, so the selection is known before the backward
  pass), skipping idle blocks' weight gradients (``controller.skip_weight_grads``);
  ``adagradselect-0.1-dense``: the same without skipping;
- ``blac-half-frozen``: BLAC with every other block frozen, skipping;
- ``hacbo-gamma0-half-probation``: HACBO gamma = 0 with every other block in probation,
  skipping (the ordinary step; a measurement step never skips).
"""

from __future__ import annotations

import time

SIDES = (
    "adamw",
    "adagradselect-0.1",
    "adagradselect-0.3",
    "adagradselect-0.1-dense",
    "blac-half-frozen",
    "hacbo-gamma0-half-probation",
)
STEPS_PER_EPOCH = 100  # AdaGradSelect's N; the state starts at count N (epsilon 0)


def packed_batch(vocab_size: int, rows: int, seq: int):
    """Random ``PackedRows`` [1, rows, seq]: 4 examples of seq / 4 tokens a row (positions
    restarting in each), every token a target except across an example boundary."""
    import jax.numpy as jnp
    import numpy as np

    from hacbo_jax.trainer.step import PackedRows

    rs = np.random.RandomState(0)
    ids = rs.randint(0, vocab_size, (1, rows, seq)).astype(np.int32)
    segments = np.broadcast_to(np.repeat(np.arange(1, 5), seq // 4), ids.shape).astype(np.int32)
    positions = np.broadcast_to(np.tile(np.arange(seq // 4), 4), ids.shape).astype(np.int32)
    loss_mask = np.ones(ids.shape, np.float32)
    loss_mask[..., seq // 4 - 1 :: seq // 4] = 0.0  # no target across a segment boundary
    return PackedRows(
        *(jnp.asarray(x) for x in (ids, segments, positions, np.roll(ids, -1, -1), loss_mask))
    )


def build_side(
    side: str,
    config,
    *,
    seq: int,
    rows: int = 1,
    dtype: str = "float32",
    remat: str = "full",
    attention_impl: str = "einsum",
    logits_chunk: int | None = 128,
):
    """(step(), info) of one side (see :data:`SIDES`): ``step()`` runs one training step of
    ``rows`` packed rows of ``seq`` tokens (4 examples a row) and blocks until it is done;
    ``info`` holds the compile time, XLA's temporary bytes, the layer count, the idle blocks
    counted before each step, the parameter count, and ``params_and_forward`` for logit checks.
    Scanned layers, fp32 master weights, ``dtype`` compute, the state donated and advanced."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
    from hacbo_jax.trainer.controller_registry import (
        AdaGradSelectConfig,
        BLACConfig,
        HACBOConfig,
        build_controller,
        controller_idle_blocks,
        find_controller_state,
    )
    from hacbo_jax.trainer.recipes import qwen3_labels
    from hacbo_jax.trainer.step import (
        TrainState,
        WeightGradSkip,
        build_optimizer,
        learning_rate_schedule,
        make_train_step,
    )

    layers = config.num_hidden_layers
    model = nnx.jit(
        lambda: Qwen3ForCausalLM(
            config,
            dtype=jnp.dtype(dtype),
            remat=remat,
            scan_layers=True,
            attention_impl=attention_impl,
            rngs=nnx.Rngs(0),
        )
    )()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    del model
    labels = qwen3_labels(params)
    every_other = jnp.asarray([i % 2 == 1 for i in range(layers)])
    if side.startswith("adagradselect"):
        kind, hyper = "adagradselect", AdaGradSelectConfig(pct=float(side.split("-")[1]))
    elif side.startswith("blac"):
        kind, hyper = "blac", BLACConfig(interval=10**6)
    elif side.startswith("hacbo"):
        kind, hyper = "hacbo", HACBOConfig(interval=10**6, gamma=0.0)
    else:
        kind, hyper = "none", None
    run_args = {"steps_per_epoch": STEPS_PER_EPOCH, "seed": 0}
    controller = build_controller(kind, labels, hyper, **run_args)
    schedule = learning_rate_schedule(1e-5, 10, 10**6)
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, controller=controller
    )
    opt_state = tx.init(params)
    found = find_controller_state(opt_state)
    if found is not None:
        preset = {
            "adagradselect": lambda s: s._replace(count=jnp.int32(STEPS_PER_EPOCH)),
            "blac": lambda s: s._replace(frozen=every_other),
            "hacbo": lambda s: s._replace(probation=every_other),
        }[kind](found)
        opt_state = jax.tree.map(
            lambda x: preset if x is found else x, opt_state, is_leaf=lambda x: x is found
        )
    skip = None
    if kind != "none" and not side.endswith("-dense"):
        skip = WeightGradSkip(controller_idle_blocks(kind, hyper, layers, **run_args), labels)
    step_fn = make_train_step(
        graphdef,
        rest,
        tx,
        schedule,
        dev_batch_size=1,
        uses_dev_grads=False,
        skip=skip,
        logits_chunk=logits_chunk,
    )
    batch = packed_batch(config.vocab_size, rows, seq)
    dev = jax.tree.map(lambda x: x[0], batch)
    state = TrainState(jnp.int32(0), params, opt_state, jax.random.key_data(jax.random.key(0)))
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch, dev).compile()
    compile_s = time.perf_counter() - start
    holder = [state]
    idle_fn = None if skip is None else jax.jit(skip.idle_blocks)  # ~0.1 ms, inside the timing
    idle_counts = []

    def step():
        if idle_fn is not None:
            idle_counts.append(int(jnp.sum(idle_fn(holder[0].opt_state))))
        # the compiled program's first argument is the frozen state the step is bound to
        holder[0], metrics = compiled(step_fn.frozen, holder[0], batch, dev)
        jax.block_until_ready((holder[0].params, metrics.loss))

    def params_and_forward():
        """(params, forward(params, impl) -> logits of the batch's first row)."""

        def forward(params, impl):
            m = nnx.merge(graphdef, nnx.State(params), rest)
            m.model.layers.self_attn.attention_impl = impl  # the scanned (one) layer
            return m(batch.input_ids[0][:1], segment_ids=batch.segment_ids[0][:1])

        return holder[0].params, forward

    info = {
        "params_and_forward": params_and_forward,
        "num_params": sum(x.size for x in jax.tree.leaves(params)),
        "compile_s": compile_s,
        "xla_temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
        "layers": layers,
        "idle_counts": idle_counts,
    }
    return step, info


LORA_SIDES = ("full-adamw", "lora-8", "lora-256", "lora-8-bf16base")


def lora_side_settings(side: str) -> tuple[int | None, str | None]:
    """(rank or None for full fine-tuning, base dtype or None) of a :data:`LORA_SIDES` side."""
    if side == "full-adamw":
        return None, None
    parts = side.split("-")  # lora-<rank>[-bf16base]
    return int(parts[1]), ("bfloat16" if side.endswith("-bf16base") else None)


def build_lora_side(
    side: str,
    config,
    *,
    seq: int,
    rows: int = 1,
    remat: str = "full",
    logits_chunk: int | None = 128,
):
    """(step(), info) of one side of :data:`LORA_SIDES`, timed like :func:`build_side`:
    ``full-adamw`` is :func:`build_side`'s ``adamw`` (every weight trained, fp32);
    ``lora-<r>`` adds rank-r adapters to every projection (``add_lora``, targets ``all``) of the
    same scanned fp32 model and trains them alone with AdamW (clip 1.0, the trainer's step on
    ``split_lora``'s adapters, the base closed over); ``-bf16base`` holds the frozen base
    (embeddings and norms included) in bf16, computing in fp32. ``info`` adds to
    :func:`build_side`'s the trainable parameter count (``trainable_params``)."""
    rank, base_dtype = lora_side_settings(side)
    if rank is None:
        step, info = build_side("adamw", config, seq=seq, rows=rows, remat=remat,
                                logits_chunk=logits_chunk)  # fmt: skip
        return step, {**info, "trainable_params": info["num_params"]}

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hacbo_jax.models.lora import add_lora, split_lora
    from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
    from hacbo_jax.trainer.step import (
        TrainState,
        build_optimizer,
        learning_rate_schedule,
        make_train_step,
    )

    model = nnx.jit(
        lambda: Qwen3ForCausalLM(config, remat=remat, scan_layers=True, rngs=nnx.Rngs(0))
    )()
    add_lora(model, rank, base_dtype=None if base_dtype is None else jnp.dtype(base_dtype))
    graphdef, params, rest = split_lora(model)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    del model
    schedule = learning_rate_schedule(1e-4, 10, 10**6)
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0, controller=None
    )

    def step_fn(state, batch, dev, base):
        # The frozen base enters as an argument: the trainer's step closes over ``rest``, and
        # The base is an argument of this program (jit would embed a closed-over array as a
        # constant); the trainer's step takes it as an argument the same way (WithFrozen).
        inner = make_train_step(
            graphdef, base, tx, schedule, dev_batch_size=1, uses_dev_grads=False,
            logits_chunk=logits_chunk, donate=False,
        )  # fmt: skip
        return inner(state, batch, dev)

    batch = packed_batch(config.vocab_size, rows, seq)
    dev = jax.tree.map(lambda x: x[0], batch)
    state = TrainState(
        jnp.int32(0), params, tx.init(params), jax.random.key_data(jax.random.key(0))
    )
    start = time.perf_counter()
    compiled = jax.jit(step_fn, donate_argnums=(0,)).lower(state, batch, dev, rest).compile()
    compile_s = time.perf_counter() - start
    holder = [state]

    def step():
        holder[0], metrics = compiled(holder[0], batch, dev, rest)
        jax.block_until_ready((holder[0].params, metrics.loss))

    info = {
        "num_params": num_params,
        "trainable_params": sum(x.size for x in jax.tree.leaves(params)),
        "compile_s": compile_s,
        "xla_temp_gib": compiled.memory_analysis().temp_size_in_bytes / 2**30,
        "layers": config.num_hidden_layers,
        "idle_counts": [],
    }
    return step, info


def time_steps(step, steps: int, *, retries: int = 3) -> tuple[list[float], float]:
    """(seconds of each of ``steps`` timed calls of ``step``, the worst contamination kept):
    each call's contamination (others' CPU time, ``protocol.Contamination``) is measured and a
    call above ``protocol.CONTAMINATION_LIMIT`` is repeated, up to ``retries`` times. For a side
    alone in its process (nothing to interleave with)."""
    import protocol  # benchmarks/protocol.py, beside this file

    times, worst = [], 0.0
    for _ in range(steps):
        for attempt in range(retries + 1):
            with protocol.Contamination() as c:
                start = time.perf_counter()
                step()
                elapsed = time.perf_counter() - start
            if c.fraction <= protocol.CONTAMINATION_LIMIT or attempt == retries:
                break
        worst = max(worst, c.fraction)
        times.append(elapsed)
    return times, worst


def peak_rss_gib() -> float:
    """This process's peak resident set in GiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_side_in_subprocess(script: str, argv: list[str], side: str) -> dict:
    """Runs ``python SCRIPT *argv --side SIDE`` in a fresh interpreter (so the side's peak RSS
    is its own) and returns the JSON of its last ``RESULT `` line; SystemExit with its output
    when it fails."""
    import json
    import os
    import subprocess
    import sys

    cmd = [sys.executable, os.path.abspath(script), *argv, "--side", side]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n")
        raise SystemExit(f"side {side} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])
