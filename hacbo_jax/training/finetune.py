"""Supervised fine-tuning of a Qwen3 model on GSM8K (or the synthetic task) under a controller.

    python -m train.finetune --config configs/tiny_cpu.yaml [key=value ...] [--resume]

One jitted step per optimiser step (train.step); the host only feeds batches, and reads metrics
back at logging intervals. Per epoch and at the end: exact match by batched greedy decoding.
Checkpoints (orbax) hold params, optimiser + controller state, RNG, data position and the
micro-dev buffer, so ``--resume`` continues the run exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from hacbo_jax import sharding as sharding_lib
from hacbo_jax.models.qwen3 import Qwen3ForCausalLM
from hacbo_jax.training.recipes import qwen3_labels
from hacbo_jax.training import data as data_lib
from hacbo_jax.training import distributed
from hacbo_jax.training.checkpoint import Checkpointer
from hacbo_jax.training.controller_registry import controller_stats
from hacbo_jax.training.config import Config, ConfigError, parse_cli, save_config
from hacbo_jax.training.energy import EnergyMeter
from hacbo_jax.training.evaluate import evaluate_exact_match, prompt_length_for
from hacbo_jax.training.logs import RunLogger
from hacbo_jax.training.microdev import MicroDevBuffer
from hacbo_jax.training.step import (
    Batch,
    TrainState,
    build_optimizer,
    learning_rate_schedule,
    make_train_step,
    step_shardings,
)
from hacbo_jax.training.synthetic import SyntheticTask

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class TaskData:
    train: list[data_lib.Example]
    eval: list[data_lib.Example]
    pool: list[data_lib.Example]  # micro-dev pool


def load_task_data(cfg: Config) -> TaskData:
    """Train / eval / micro-dev pool examples for the configured task (see the spec's pools)."""
    d = cfg.data
    if d.task == "synthetic":
        task = SyntheticTask(d.synthetic.preset, seed=d.synthetic.seed)
        train = task.examples("train", d.synthetic.n_train)
        eval_ = task.examples("eval", d.synthetic.n_eval)
        pool = task.examples("pool", d.heldout_size) if cfg.microdev.pool == "heldout" else eval_
    else:
        if d.hub_name:
            train_all = data_lib.load_gsm8k("train", hub_name=d.hub_name)
            eval_ = data_lib.load_gsm8k("test", hub_name=d.hub_name)
        else:
            train_all = data_lib.load_gsm8k_file(d.train_file)
            eval_ = data_lib.load_gsm8k_file(d.eval_file)
        train_idx, pool_idx = data_lib.holdout_split(len(train_all), d.heldout_size, cfg.seed)
        train = [train_all[i] for i in train_idx]
        pool = [train_all[i] for i in pool_idx] if cfg.microdev.pool == "heldout" else eval_
    if cfg.eval.limit is not None:
        eval_ = eval_[: cfg.eval.limit]
    return TaskData(train, eval_, pool)


def _to_batch(arrays: dict[str, np.ndarray], accum_steps: int) -> Batch:
    """[batch, L] host arrays -> Batch of [accum, micro, L]."""

    def split(x):
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    return Batch(*(split(arrays[k]) for k in Batch._fields))


def _device_dev_buffer(pool_arrays: data_lib.SFTArrays, buffer: MicroDevBuffer) -> Batch:
    rows = pool_arrays.take(buffer.members)
    return Batch(*(jnp.asarray(rows[k]) for k in Batch._fields))


def make_run_mesh(cfg: Config) -> jax.sharding.Mesh:
    """The ``(data, fsdp)`` mesh of ``cfg.mesh``, checked against the devices and the batch.

    Raises ConfigError when the mesh does not fit the devices present, or when
    ``optim.micro_batch_size`` (default: ``optim.batch_size``) cannot be split evenly over its
    ``data * fsdp`` devices.
    """
    try:
        mesh = sharding_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp)
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  - {e}") from e
    micro = cfg.optim.micro_batch_size or cfg.optim.batch_size
    if micro % mesh.size:
        raise ConfigError(
            f"invalid config:\n  - optim.micro_batch_size = {micro}"
            f"{'' if cfg.optim.micro_batch_size else ' (= optim.batch_size)'}: must be divisible "
            f"by the mesh's {mesh.size} devices (mesh.data={mesh.shape['data']} x "
            f"mesh.fsdp={mesh.shape['fsdp']}), which split each micro-batch between them"
        )
    return mesh


def run(
    cfg: Config, *, resume: bool = False, show_progress: bool = True, stop_after: int | None = None
) -> dict:
    """Runs (or resumes) one fine-tuning run; returns the summary also written to summary.json.

    ``stop_after``: checkpoint and return right after that step, as a pre-empted job would (the
    returned dict then only says where it stopped; ``resume=True`` continues the run).
    """
    distributed.maybe_initialize()  # before anything touches a device
    wall_start = time.perf_counter()
    mesh = make_run_mesh(cfg)
    # One device: JAX's default placement, exactly the single-device program.
    on_mesh = mesh.size > 1
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    # ---- model, tokenizer, data
    model = Qwen3ForCausalLM.from_pretrained(
        cfg.model.path,
        dtype=_DTYPES[cfg.model.dtype],
        param_dtype=_DTYPES[cfg.model.param_dtype],
        remat=cfg.model.remat,
    )
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    task = load_task_data(cfg)
    train_arrays = data_lib.tokenize_sft(task.train, tokenizer, cfg.data.max_len)
    pool_arrays = data_lib.tokenize_sft(task.pool, tokenizer, cfg.data.max_len)
    prompt_len = prompt_length_for([e.question for e in task.eval + task.pool], tokenizer)

    batch_size = cfg.optim.batch_size
    micro = cfg.optim.micro_batch_size or batch_size
    accum_steps = batch_size // micro
    total_steps = cfg.total_steps(len(task.train))
    cfg.check_warmup(total_steps)
    sampler = data_lib.EpochSampler(len(task.train), batch_size, seed=cfg.seed)

    # ---- optimiser and state
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(params)
    del model
    labels = qwen3_labels(params)
    schedule = learning_rate_schedule(cfg.optim.lr, cfg.optim.warmup_steps, total_steps)
    controller = cfg.controller.build(labels)
    tx = build_optimizer(
        schedule=schedule,
        b1=cfg.optim.b1,
        b2=cfg.optim.b2,
        weight_decay=cfg.optim.weight_decay,
        clip_norm=cfg.optim.clip_norm,
        controller=controller,
    )
    rng = jax.random.key_data(jax.random.key(cfg.seed))
    uses_dev = controller is not None
    if cfg.microdev.size > len(task.pool):
        raise ConfigError(
            f"invalid config:\n  - microdev.size = {cfg.microdev.size}: must be <= the "
            f"micro-dev pool's {len(task.pool)} examples (microdev.pool = {cfg.microdev.pool!r})"
        )
    buffer = MicroDevBuffer(
        len(task.pool),
        cfg.microdev.size,
        refresh_interval=max(cfg.microdev.refresh_every, 1),
        replace_fraction=cfg.microdev.refresh_fraction,
        max_candidates=cfg.microdev.max_candidates,
        seed=cfg.seed,
    )
    dev_batch_size = cfg.microdev.batch_size  # <= microdev.size, checked by the config
    shardings = None
    if on_mesh:
        abstract = jax.eval_shape(lambda p: TrainState(jnp.int32(0), p, tx.init(p), rng), params)
        shardings = step_shardings(mesh, abstract, dev_batch_size=dev_batch_size)
        # Params go straight to their shards; the optimiser state is created sharded.
        params = jax.device_put(params, shardings.state.params)
        state = TrainState(
            step=jax.device_put(jnp.int32(0), shardings.state.step),
            params=params,
            opt_state=jax.jit(tx.init, out_shardings=shardings.state.opt_state)(params),
            rng=jax.device_put(rng, shardings.state.rng),
        )
    else:
        state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng)
    train_step = make_train_step(
        graphdef,
        rest,
        tx,
        schedule,
        dev_batch_size=dev_batch_size,
        uses_dev_grads=uses_dev,
        shardings=shardings,
        logits_chunk=cfg.model.logits_chunk,
    )
    seq_len = train_arrays.input_ids.shape[1]
    # This process's rows of every micro-batch (all of them with one process).
    local = (
        distributed.local_rows(shardings.batch, (accum_steps, micro, seq_len), axis=1)
        if on_mesh
        else slice(None)
    )

    def device_batch(indices: np.ndarray) -> tuple[Batch, int]:
        """The step's batch from the sampler's global indices, and this process's tokens."""
        rows = np.asarray(indices).reshape(accum_steps, micro)[:, local].reshape(-1)
        batch = _to_batch(train_arrays.take(rows), accum_steps)
        tokens = int(batch.attention_mask.sum())
        if on_mesh:
            batch = distributed.global_batch(batch, shardings.batch, axis=1, global_rows=micro)
        return batch, tokens

    def device_dev_buffer() -> Batch:
        dev = _device_dev_buffer(pool_arrays, buffer)
        return jax.device_put(dev, shardings.dev_buffer) if on_mesh else dev

    def current_model(params_) -> Qwen3ForCausalLM:
        return nnx.merge(graphdef, nnx.State(params_), rest)

    def run_eval(params_, examples):
        return evaluate_exact_match(
            current_model(params_),
            tokenizer,
            examples,
            batch_size=cfg.eval.batch_size,
            prompt_len=prompt_len,
            max_new_tokens=cfg.eval.max_new_tokens,
        )

    # ---- checkpoints and resume
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.checkpoint.keep)
    counters = {"wall_time_s": 0.0, "energy_kwh": 0.0, "refreshes": [], "initial_exact_match": None}
    start_step = 0
    if resume:
        latest = ckpt.latest_step()
        if latest is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        state, meta = ckpt.restore(latest, abstract_target=state)
        sampler.position = data_lib.DataPosition(*meta["data_position"])
        buffer.load_state_dict(meta["microdev"])
        counters = meta["counters"]
        start_step = latest
    logger = RunLogger(
        run_dir,
        tensorboard=cfg.logging.tensorboard,
        wandb=cfg.logging.wandb,
        resume_step=start_step if resume else None,
        config=dataclasses.asdict(cfg),
    )
    if cfg.eval.at_start and not resume:
        initial = run_eval(state.params, task.eval)
        logger.log_eval(0, exact_match=initial.exact_match, n=initial.num_examples, epoch=0.0)
        counters["initial_exact_match"] = initial.exact_match
    dev_buffer = device_dev_buffer()
    energy = EnergyMeter()
    energy.start()

    def save_checkpoint(step: int) -> None:
        kwh, _, _ = energy.read()
        meta = {
            "data_position": list(sampler.position),
            "microdev": {
                k: (v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in buffer.state_dict().items()
            },
            "counters": {
                **counters,
                "wall_time_s": counters["wall_time_s"] + time.perf_counter() - wall_start,
                "energy_kwh": counters["energy_kwh"] + (kwh or 0.0),
            },
        }
        ckpt.save(step, state, meta)

    # ---- the loop
    tokens_seen = 0
    interval_start = time.perf_counter()
    pending: list[Any] = []
    last_loss = math.nan
    diverged = False
    check_every = min(cfg.logging.every, cfg.divergence.max_consecutive_nonfinite)
    progress = tqdm(
        total=total_steps,
        initial=start_step,
        disable=not show_progress,
        desc=f"{cfg.method or cfg.controller.kind}",
        dynamic_ncols=True,
    )
    skipped_total = int(jax.device_get(state.opt_state.total_notfinite))
    for step in range(start_step + 1, total_steps + 1):
        batch, tokens = device_batch(sampler.next_indices())
        tokens_seen += tokens
        state, metrics = train_step(state, batch, dev_buffer)
        pending.append(metrics)
        progress.update(1)

        if step % check_every == 0 or step == total_steps:
            if int(metrics.consecutive_nonfinite) >= cfg.divergence.max_consecutive_nonfinite:
                diverged = True
        if step % cfg.logging.every == 0 or step == total_steps or diverged:
            fetched = jax.device_get(pending)
            pending = []
            elapsed = time.perf_counter() - interval_start
            interval_start = time.perf_counter()
            finite_losses = [float(m.loss) for m in fetched if bool(m.finite)]
            last_loss = float(np.mean(finite_losses)) if finite_losses else math.nan
            kwh, _, _ = energy.read()
            record = {
                "step": step,
                "epoch": sampler.epoch_fraction,
                "loss": last_loss,
                "lr": float(fetched[-1].learning_rate),
                "grad_norm": float(fetched[-1].grad_norm),
                "update_norm": float(fetched[-1].update_norm),
                "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                "skipped_steps": int(fetched[-1].total_nonfinite),
                "energy_kwh": None if kwh is None else counters["energy_kwh"] + kwh,
                "controller": controller_stats(
                    cfg.controller.kind, cfg.controller.hyper, state.opt_state
                ),
            }
            tokens_seen = 0
            skipped_total = record["skipped_steps"]
            logger.log_metrics(step, record)
            progress.set_postfix(loss=f"{last_loss:.4f}", skipped=record["skipped_steps"])
        if diverged:
            save_checkpoint(step)
            progress.close()
            break

        if uses_dev and cfg.microdev.refresh_every and buffer.due(step):

            def solve_fn(pool_indices, params_=state.params):
                examples = [task.pool[i] for i in pool_indices]
                return run_eval(params_, examples).correct

            stats = buffer.refresh(step, solve_fn)
            counters["refreshes"].append(stats._asdict())
            dev_buffer = device_dev_buffer()

        epoch_done = step % sampler.batches_per_epoch == 0
        if cfg.eval.every_epoch and epoch_done and step != total_steps:
            result = run_eval(state.params, task.eval)
            logger.log_eval(
                step,
                exact_match=result.exact_match,
                n=result.num_examples,
                epoch=sampler.epoch_fraction,
            )
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            save_checkpoint(step)
        if stop_after is not None and step >= stop_after:
            save_checkpoint(step)
            progress.close()
            energy.stop()
            ckpt.close()
            logger.close()
            return {"stopped_at": step}
    progress.close()

    final_step = int(state.step)
    if diverged:
        message = (
            f"run stopped at step {final_step}: {cfg.divergence.max_consecutive_nonfinite} or more "
            f"consecutive non-finite losses/gradients (skipped, params untouched); the last good "
            f"state is checkpointed in {run_dir / 'checkpoints'}"
        )
        print(message, file=sys.stderr)
    else:
        save_checkpoint(final_step)
    result = run_eval(state.params, task.eval)
    logger.log_eval(
        final_step,
        exact_match=result.exact_match,
        n=result.num_examples,
        epoch=sampler.epoch_fraction,
    )
    (run_dir / "predictions.jsonl").write_text(
        "".join(
            json.dumps(
                {"question": e.question, "reference": e.answer, "prediction": p, "correct": bool(c)}
            )
            + "\n"
            for e, p, c in zip(task.eval, result.predictions, result.correct)
        )
    )
    if cfg.checkpoint.export_hf:
        export_dir = run_dir / "hf_model"
        current_model(state.params).save_pretrained(export_dir)
        tokenizer.save_pretrained(export_dir)

    kwh, source, mean_watts = energy.read()
    energy.stop()
    summary = {
        "method": cfg.method or cfg.controller.kind,
        "seed": cfg.seed,
        "steps": final_step,
        "total_steps": total_steps,
        "initial_exact_match": counters["initial_exact_match"],
        "final_exact_match": result.exact_match,
        "eval_examples": result.num_examples,
        "final_train_loss": last_loss,
        "diverged": diverged,
        "skipped_steps": skipped_total,
        "train_examples": len(task.train),
        "train_truncated": train_arrays.num_truncated,
        "microdev_refreshes": len(counters["refreshes"]),
        "wall_time_s": counters["wall_time_s"] + time.perf_counter() - wall_start,
        "energy_kwh": None if kwh is None else counters["energy_kwh"] + kwh,
        "energy_source": source,
        "mean_power_w": mean_watts,
    }
    ckpt.close()
    logger.write_summary(summary)
    logger.close()
    return summary


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m train.finetune") -> int:
    cfg, args = parse_cli(argv, prog=prog)
    try:
        summary = run(cfg, resume=args.resume)
    except ConfigError as e:  # found once the data is known (e.g. the micro-dev pool's size)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    before = summary["initial_exact_match"]
    before = "" if before is None else f"{100 * before:.1f}% (base model) -> "
    print(
        f"[{summary['method']}] exact match {before}{100 * summary['final_exact_match']:.1f}% on "
        f"{summary['eval_examples']} held-out problems after {summary['steps']} steps "
        f"({summary['wall_time_s']:.0f} s); run directory: {cfg.output_dir}"
    )
    return 3 if summary["diverged"] else 0
