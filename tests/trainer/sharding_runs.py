"""Runs the real training step on several CPU meshes; test_sharding.py checks the output.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 PYTHONPATH=tests python tests/trainer/sharding_runs.py OUT_DIR

Needs 8 host devices, which XLA only creates if the flag is set before jax is imported, hence a
separate process (pytest's own has one CPU device). Writes ``OUT_DIR/arrays.npz`` (params and
controller state after the run on each mesh, the restored checkpoint, ...),
``OUT_DIR/facts.json`` (shardings, per-host rows, error messages) and ``OUT_DIR/finetune/``
(hacbo_jax.trainer.finetune run directories on 1x1 and on 4x2 resumed on 2x4, full fine-tuning and
LoRA); asserts nothing itself.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

if "jax" in sys.modules:
    raise RuntimeError("sharding_runs.py must set XLA_FLAGS before jax is imported")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from hacbo_jax.trainer import sharding as sharding_lib  # noqa: E402
from hacbo_jax.controllers.labels import leaf_path  # noqa: E402
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM  # noqa: E402
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.trainer import distributed  # noqa: E402
from hacbo_jax.trainer.checkpoint import Checkpointer  # noqa: E402
from hacbo_jax.trainer.controller_registry import (  # noqa: E402
    HACBOConfig,
    build_controller,
    find_controller_state,
)
from hacbo_jax.trainer.step import (  # noqa: E402
    Batch,
    TrainState,
    build_optimizer,
    learning_rate_schedule,
    make_train_step,
    step_shardings,
)

MESHES = ((1, 1), (8, 1), (4, 2))
STEPS = 7  # measurements (K = 3) at steps 3 and 6
ACCUM, MICRO, SEQ, N_DEV, DEV_BATCH = 2, 8, 12, 16, 8
VOCAB = 64


def tiny_model():
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=64,
    )
    return Qwen3ForCausalLM(config, rngs=nnx.Rngs(0))


def random_batch(rng: np.random.Generator, shape: tuple[int, ...]) -> Batch:
    """Right-padded counting rows (s, s+1, ... mod VOCAB), so that training and dev gradients
    agree and the controller state moves; the answer is the second half of each row."""
    starts = rng.integers(0, VOCAB, size=shape + (1,))
    ids = (1 + (starts + np.arange(SEQ + 1)) % (VOCAB - 1)).astype(np.int32)
    lengths = rng.integers(SEQ // 2, SEQ + 1, size=shape)
    positions = np.arange(SEQ)
    mask = (positions < lengths[..., None]).astype(np.int32)
    loss = ((positions >= SEQ // 2) & (positions < lengths[..., None] - 1)).astype(np.float32)
    return Batch(ids[..., :-1] * mask, mask, ids[..., 1:] * mask, loss)


def flat(tree, prefix: str) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    return {f"{prefix}/{leaf_path(p)}": np.asarray(x) for p, x in leaves}


def spec_of(x) -> str:
    return str(x.sharding.spec) if hasattr(x.sharding, "spec") else "single-device"


def setup():
    graphdef, params, rest = nnx.split(tiny_model(), nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    schedule = learning_rate_schedule(1e-2, 2, 20)
    controller = build_controller(
        "hacbo",
        qwen3_labels(params),
        HACBOConfig(interval=3, patience=2, update_norm_budget=1.0),
    )
    tx = build_optimizer(
        schedule=schedule, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, controller=controller
    )
    return graphdef, params, rest, schedule, tx


def place(mesh_shape, graphdef, params, rest, schedule, tx):
    """(initial state, jitted step, shardings) on a mesh, as hacbo_jax.trainer.finetune builds them."""
    rng = jax.random.key_data(jax.random.key(0))
    if mesh_shape == (1, 1):
        state = TrainState(jnp.int32(0), params, tx.init(params), rng)
        return (
            state,
            make_train_step(
                graphdef,
                rest,
                tx,
                schedule,
                dev_batch_size=DEV_BATCH,
                uses_dev_grads=True,
                donate=False,
            ),
            None,
        )
    mesh = sharding_lib.make_mesh(*mesh_shape)
    abstract = jax.eval_shape(lambda p: TrainState(jnp.int32(0), p, tx.init(p), rng), params)
    shardings = step_shardings(mesh, abstract, dev_batch_size=DEV_BATCH)
    placed = jax.device_put(params, shardings.state.params)
    state = TrainState(
        jax.device_put(jnp.int32(0), shardings.state.step),
        placed,
        jax.jit(tx.init, out_shardings=shardings.state.opt_state)(placed),
        jax.device_put(rng, shardings.state.rng),
    )
    step = make_train_step(
        graphdef,
        rest,
        tx,
        schedule,
        dev_batch_size=DEV_BATCH,
        uses_dev_grads=True,
        donate=False,
        shardings=shardings,
    )
    return state, step, shardings


def feed(batch: Batch, shardings) -> Batch:
    """The global batch the way hacbo_jax.trainer.finetune builds it (per-process rows + assembly)."""
    if shardings is None:
        return batch
    rows = distributed.local_rows(shardings.batch, batch.input_ids.shape, axis=1)
    local = jax.tree.map(lambda x: x[:, rows], batch)
    return distributed.global_batch(local, shardings.batch, axis=1, global_rows=MICRO)


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    facts: dict = {"device_count": jax.device_count()}
    data_rng = np.random.default_rng(0)
    batches = [random_batch(data_rng, (ACCUM, MICRO)) for _ in range(STEPS + 1)]
    dev_buffer = random_batch(data_rng, (N_DEV,))
    graphdef, params, rest, schedule, tx = setup()

    final_states = {}
    for mesh_shape in MESHES:
        name = "x".join(map(str, mesh_shape))
        state, step_fn, shardings = place(mesh_shape, graphdef, params, rest, schedule, tx)
        dev = dev_buffer if shardings is None else jax.device_put(dev_buffer, shardings.dev_buffer)
        losses = []
        for batch in batches[:STEPS]:
            state, metrics = step_fn(state, feed(batch, shardings), dev)
            losses.append(float(metrics.loss))
        arrays.update(flat(state.params, f"{name}/params"))
        arrays.update(flat(find_controller_state(state.opt_state), f"{name}/controller"))
        arrays[f"{name}/losses"] = np.asarray(losses)
        final_states[mesh_shape] = (state, step_fn, shardings, dev)
        q = state.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
        mu = state.opt_state.inner_state[1][0].mu["model"]["layers"][0]["self_attn"]["q_proj"][
            "kernel"
        ]
        facts[name] = {
            "q_proj_spec": spec_of(q),
            "q_proj_shard_shape": list(q.addressable_shards[0].data.shape),
            "q_proj_mu_spec": spec_of(mu),
            "agreement_spec": spec_of(find_controller_state(state.opt_state).agreement),
            "q_proj_devices": len(q.sharding.device_set),
        }

    # Checkpoint written on 4x2, restored onto 2x4 and 8x1; one more step on each.
    state42, step42, _, dev42 = final_states[(4, 2)]
    ckpt_dir = out_dir / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    with Checkpointer(ckpt_dir, keep=1) as ckpt:
        ckpt.save(STEPS, state42, {"note": "4x2"})
    next42, _ = step42(state42, feed(batches[STEPS], final_states[(4, 2)][2]), dev42)
    arrays.update(flat(next42.params, "next/4x2"))
    for mesh_shape in ((2, 4), (8, 1)):
        name = "x".join(map(str, mesh_shape))
        template, step_fn, shardings = place(mesh_shape, graphdef, params, rest, schedule, tx)
        with Checkpointer(ckpt_dir, keep=1) as ckpt:
            restored, meta = ckpt.restore(STEPS, abstract_target=template)
        arrays.update(flat(restored, f"restored/{name}"))
        q = restored.params["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
        facts[f"restored/{name}"] = {
            "q_proj_spec": spec_of(q),
            "q_proj_mesh": dict(q.sharding.mesh.shape),
            "meta": meta["note"],
            "step": int(restored.step),
        }
        if mesh_shape in final_states:  # continue with that mesh's compiled step (saves a compile)
            _, step_fn, shardings, dev = final_states[mesh_shape]
            nxt, _ = step_fn(restored, feed(batches[STEPS], shardings), dev)
            arrays.update(flat(nxt.params, f"next/{name}"))
    arrays.update(flat(state42, "saved/4x2"))

    # Per-host rows: 4x2 mesh as if devices 0-3 were process 0 and 4-7 process 1.
    _, _, shardings42, _ = final_states[(4, 2)]
    fake_owner = lambda device: device.id // 4
    facts["fake_two_process_rows"] = [
        [r.start, r.stop]
        for r in (
            distributed.local_rows(
                shardings42.batch,
                (ACCUM, MICRO, SEQ),
                axis=1,
                process_index=p,
                process_of=fake_owner,
            )
            for p in (0, 1)
        )
    ]
    facts["single_process_rows"] = str(
        distributed.local_rows(shardings42.batch, (ACCUM, MICRO, SEQ), axis=1)
    )
    facts["mesh_errors"] = {}
    for data, fsdp in ((4, 4), (-1, 3), (0, 2)):
        try:
            sharding_lib.make_mesh(data, fsdp)
            facts["mesh_errors"][f"{data}x{fsdp}"] = None
        except ValueError as e:
            facts["mesh_errors"][f"{data}x{fsdp}"] = str(e)
    np.savez(out_dir / "arrays.npz", **arrays)
    (out_dir / "facts.json").write_text(json.dumps(facts, indent=1))


def finetune_runs(out_dir: Path) -> None:
    """hacbo_jax.trainer.finetune end to end: 6 steps on 1x1, and 3 on 4x2 resumed on 2x4 for 3 more.

    Writes ``OUT_DIR/finetune/{1x1,resumed}/`` run directories.
    """
    from support.checkpoints import make_tiny_checkpoint
    from hacbo_jax.trainer import finetune
    from hacbo_jax.trainer.config import CONFIGS_DIR, load_config

    root = out_dir / "finetune"
    model_dir = make_tiny_checkpoint(root / "model")
    config = CONFIGS_DIR / "tiny_cpu.yaml"

    def cfg(run: str, mesh: tuple[int, int], *extra: str):
        return load_config(
            config,
            [
                f"model.path={model_dir}",
                f"output_dir={root / run}",
                "data.synthetic.n_train=96",
                "data.synthetic.n_eval=8",
                "data.heldout_size=16",
                "data.max_len=96",
                "optim.batch_size=16",
                "optim.micro_batch_size=8",
                "optim.warmup_steps=1",
                "optim.epochs=1",
                "optim.max_steps=6",
                "controller.hacbo.interval=2",
                "controller.hacbo.patience=2",
                "microdev.size=8",
                "microdev.batch_size=8",
                "microdev.refresh_every=0",
                "eval.limit=2",
                "eval.max_new_tokens=2",
                "eval.batch_size=2",
                "eval.every_epoch=false",
                "logging.every=1",
                "checkpoint.every=0",
                f"mesh.data={mesh[0]}",
                f"mesh.fsdp={mesh[1]}",
                *extra,
            ],
        )

    finetune.run(cfg("1x1", (1, 1)), show_progress=False)
    finetune.run(cfg("resumed", (4, 2)), show_progress=False, stop_after=3)
    finetune.run(cfg("resumed", (2, 4)), resume=True, show_progress=False)
    # LoRA: the frozen base is sharded by the same rules as the kernels it holds
    lora = ("lora.rank=2", "lora.alpha=4")
    finetune.run(cfg("lora_1x1", (1, 1), *lora), show_progress=False)
    finetune.run(cfg("lora_resumed", (4, 2), *lora), show_progress=False, stop_after=3)
    finetune.run(cfg("lora_resumed", (2, 4), *lora), resume=True, show_progress=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    finetune_runs(Path(sys.argv[1]))
