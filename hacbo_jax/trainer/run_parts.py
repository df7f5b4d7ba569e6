"""Everything a run is made of, built from its config: :func:`build_run` -> :class:`RunParts`.

The one place where a config becomes objects: the mesh (``cfg.mesh``), the model and tokenizer
(``cfg.model``), the data (``cfg.data``), the optimiser and schedule (``cfg.optim.build``), the
controller (``cfg.controller.build``), the micro-dev buffer (``cfg.microdev.build``), the initial
state and the jitted step (:func:`hacbo_jax.trainer.step.make_train_step`). ``finetune``,
``compare`` and ``sweep`` all run what it builds.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hacbo_jax.controllers import controlled_leaves
from hacbo_jax.models.lora import LoRASettings, add_lora, lora_problems, merge_lora, split_lora
from hacbo_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM
from hacbo_jax.data import gsm8k as data_lib
from hacbo_jax.data.label_noise import with_wrong_answers
from hacbo_jax.trainer import distributed
from hacbo_jax.trainer.config import Config, check_mesh, check_pool_size, check_warmup
from hacbo_jax.trainer.controller_registry import (
    controller_entry,
    controller_idle_blocks,
    measures,
)
from hacbo_jax.trainer.evaluate import (
    EvalResult,
    end_token_ids,
    eval_arrays,
    evaluate_exact_match,
    make_eval_loss,
    prompt_length_for,
)
from hacbo_jax.data.microdev import MicroDevBuffer
from hacbo_jax.data.packing import StepPacker, describe
from hacbo_jax.trainer.recipes import qwen3_labels
from hacbo_jax.trainer.step import (
    Batch,
    PackedRows,
    StepShardings,
    TrainState,
    TrainSteps,
    WeightGradSkip,
    make_loss_fn,
    make_train_steps,
    step_shardings,
)
from hacbo_jax.data.synthetic import SyntheticTask

__all__ = [
    "DTYPES",
    "RunParts",
    "TaskData",
    "build_run",
    "check_lora",
    "load_model",
    "load_task_data",
    "load_tokenizer",
]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class TaskData:
    train: list[data_lib.Example]
    eval: list[data_lib.Example]
    pool: list[data_lib.Example]  # micro-dev pool


def load_task_data(cfg: Config, tokenizer: Any = None) -> TaskData:
    """Train / eval / micro-dev pool examples for the configured task (see the micro-dev pools in docs/algorithm.md).

    ``data.task: gsm8k`` reads ``data.train_file`` / ``data.eval_file`` (or the hub data set's
    ``data.train_split`` / ``data.eval_split``) in ``data.format``
    (:mod:`hacbo_jax.data.formats`; every row is checked first, a bad one raises a
    ConfigError naming file, row and field). ``messages`` rows need ``tokenizer``.
    """
    from hacbo_jax.trainer.config import ConfigError
    from hacbo_jax.data.formats import DataError, load_examples, load_hub_examples

    d = cfg.data
    if d.task == "synthetic":
        task = SyntheticTask(d.synthetic.preset, seed=d.synthetic.seed)
        train = task.examples("train", d.synthetic.n_train)
        eval_ = task.examples("eval", d.synthetic.n_eval)
        pool = task.examples("pool", d.heldout_size) if cfg.microdev.pool == "heldout" else eval_
    else:
        options = {
            "columns": dataclasses.asdict(d.columns),
            "tokenizer": tokenizer,
        }
        try:
            if d.hub_name:
                train_all, eval_ = (
                    load_hub_examples(
                        d.hub_name, split, d.format, hub_config=d.hub_config, **options
                    )
                    for split in (d.train_split, d.eval_split)
                )
            else:
                train_all = load_examples(d.train_file, d.format, **options)
                eval_ = load_examples(d.eval_file, d.format, **options)
        except DataError as e:
            raise ConfigError(f"invalid data:\n  - {e}") from e
        if d.heldout_size >= len(train_all):
            raise ConfigError(
                f"invalid config:\n  - data.heldout_size = {d.heldout_size}: must be < the "
                f"{len(train_all)} training rows"
            )
        train_idx, pool_idx = data_lib.holdout_split(len(train_all), d.heldout_size, cfg.seed)
        train = [train_all[i] for i in train_idx]
        pool = [train_all[i] for i in pool_idx] if cfg.microdev.pool == "heldout" else eval_
    if d.wrong_answers:
        try:
            train, _ = with_wrong_answers(train, d.wrong_answers, seed=cfg.seed)
        except ValueError as e:
            raise ConfigError(
                f"invalid config:\n  - data.wrong_answers = {d.wrong_answers}: {e}"
            ) from e
    if cfg.eval.limit is not None:
        eval_ = eval_[: cfg.eval.limit]
    return TaskData(train, eval_, pool)


def load_tokenizer(cfg: Config) -> Any:
    """The tokenizer of ``cfg.model.tokenizer`` (null: resolved as the config check does,
    :func:`hacbo_jax.data.tokenizer.default_tokenizer`)."""
    from hacbo_jax.data.tokenizer import AutoTokenizer

    from hacbo_jax.data.tokenizer import default_tokenizer

    source = cfg.model.tokenizer or default_tokenizer(cfg.model.path)
    return AutoTokenizer.from_pretrained(source)


def load_model(cfg: Config) -> tuple[Qwen3ForCausalLM, Any]:
    """The model of ``cfg.model`` (dtypes, remat) and its tokenizer (:func:`load_tokenizer`);
    with ``lora.rank`` set, with adapters on ``lora.targets`` (B = 0, or ``lora.adapter``'s)
    and the base held in ``lora.base_dtype``."""
    model = Qwen3ForCausalLM.from_pretrained(
        cfg.model.path,
        dtype=DTYPES[cfg.model.dtype],
        param_dtype=DTYPES[cfg.model.param_dtype],
        remat=cfg.model.remat,
        scan_layers=cfg.model.scan_layers,
        attention_impl=cfg.model.attention_impl,
    )
    if cfg.lora.rank is not None:
        check_lora(cfg, model.config)  # a hub model's config is known only now
        lora = cfg.lora
        add_lora(
            model,
            _lora_settings(cfg),
            base_dtype=None if lora.base_dtype is None else DTYPES[lora.base_dtype],
            rngs=nnx.Rngs(params=cfg.seed),
        )
        if lora.adapter is not None:
            from hacbo_jax.models.lora_peft import load_adapter

            load_adapter(model, lora.adapter)
    return model, load_tokenizer(cfg)


def _lora_settings(cfg: Config) -> LoRASettings:
    lora = cfg.lora
    return LoRASettings(
        rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets
    )


def check_lora(cfg: Config, model_config: Qwen3Config | None = None) -> None:
    """ConfigError listing every reason why ``cfg.lora`` cannot go on the run's model: a rank
    above a targeted projection's smaller dimension (:func:`~hacbo_jax.models.lora.lora_problems`),
    ``lora.adapter`` without ``lora.rank``, or an adapter directory that does not match the
    model or ``lora.*`` (:func:`~hacbo_jax.models.lora_peft.adapter_problems`). Reads
    config.json (a local ``model.path``; pass ``model_config`` for a hub model) and the
    adapter's shapes, never weights, so :func:`build_run` calls it before any work."""
    from hacbo_jax.trainer.config import ConfigError

    lora = cfg.lora
    problems = []
    if lora.rank is None:
        if lora.adapter is not None:
            problems.append(
                f"lora.adapter = {lora.adapter!r}: needs lora.rank (and lora.alpha, "
                "lora.targets) equal to the adapter's r, lora_alpha and target_modules"
            )
    else:
        if model_config is None and os.path.isdir(cfg.model.path):
            model_config = Qwen3Config.from_hf(cfg.model.path)
        if model_config is not None:
            problems += [
                f"lora.rank = {lora.rank}: {p}"
                for p in lora_problems(model_config, lora.rank, lora.targets)
            ]
            if lora.adapter is not None and not problems:
                from hacbo_jax.models.lora_peft import adapter_problems

                found, _ = adapter_problems(
                    os.path.abspath(lora.adapter), model_config, _lora_settings(cfg)
                )
                problems += [f"lora.adapter: {p}" for p in found]
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


@dataclasses.dataclass
class RunParts:
    """A run's parts (see :func:`build_run`); the training loop only steps and calls hooks."""

    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    rest: nnx.State
    tokenizer: Any
    task: TaskData
    train_arrays: data_lib.SFTArrays
    pool_arrays: data_lib.SFTArrays
    prompt_len: int
    total_steps: int
    sampler: data_lib.EpochSampler
    tx: Any
    # the controller's optax transformation (a function adamw -> transformation for one that
    # wraps AdamW), None for plain AdamW
    controller: Any
    buffer: MicroDevBuffer
    state: TrainState  # the initial state (step 0)
    train_steps: TrainSteps  # the ordinary and the measurement step (the same without one)
    shardings: StepShardings | None  # None: one device, JAX's default placement
    local_rows: Any  # this process's rows of every micro-batch
    packer: StepPacker | None = None  # data.packing: the step's examples in packed rows

    @property
    def measures(self) -> bool:
        """Whether the controller takes micro-dev gradients (and the buffer is refreshed)."""
        return self.train_steps.interval is not None

    @property
    def train_step(self) -> Callable[[TrainState, Batch, Batch], tuple[TrainState, Any]]:
        """The step that measures when due (the one step function of earlier versions)."""
        return self.train_steps.measurement

    end_tokens: tuple[int, ...] = ()  # every token that ends a generation
    eval_loss: Callable[[Any], float] | None = None  # teacher-forced loss on the eval split
    # lora.rank set: ``params`` are the adapters (nnx.LoRAParam) and ``rest`` the frozen base
    lora: bool = False

    @property
    def metric(self) -> str:
        """The evaluation metric in use (``eval.metric`` or its default for the format)."""
        return self.cfg.eval.resolved_metric(self.cfg.data.format)

    @property
    def micro_batch_size(self) -> int:
        return self.cfg.optim.micro_batch_size or self.cfg.optim.batch_size

    def device_batch(self, indices: np.ndarray) -> tuple[Batch | PackedRows, int]:
        """The step's batch from the sampler's global indices, and this process's tokens.

        Padded: [accum, micro_batch, L] rows of the examples. Packed (``data.packing``): the
        same examples in [packer.accumulation_steps, packer.rows, L] packed rows; every process
        packs the whole step (deterministic) and keeps its own rows.
        """
        accum, micro = self.cfg.optim.accumulation_steps, self.micro_batch_size
        if self.packer is not None:
            packed = self.packer.pack(indices)
            micro = packed["input_ids"].shape[1]  # one of packer.shapes (row buckets)
            local = self.local_rows
            if self.shardings is not None and micro != self.packer.rows:
                shape = (self.packer.accumulation_steps, micro, self.packer.max_len)
                local = distributed.local_rows(self.shardings.batch, shape, axis=1)
            batch = PackedRows(*(packed[k][:, local] for k in PackedRows._fields))
            tokens = int(np.count_nonzero(batch.segment_ids))
        else:
            rows = np.asarray(indices).reshape(accum, micro)[:, self.local_rows].reshape(-1)
            arrays = self.train_arrays.take(rows)
            batch = Batch(
                *(x.reshape(accum, x.shape[0] // accum, *x.shape[1:]) for x in arrays_of(arrays))
            )
            tokens = int(batch.attention_mask.sum())
        if self.shardings is not None:
            batch = distributed.global_batch(batch, self.shardings.batch, axis=1, global_rows=micro)
        return batch, tokens

    def device_dev_buffer(self) -> Batch:
        """The micro-dev buffer's members as one on-device batch of [N_dev, L] arrays."""
        rows = self.pool_arrays.take(self.buffer.members)
        dev = Batch(*(jnp.asarray(x) for x in arrays_of(rows)))
        return dev if self.shardings is None else jax.device_put(dev, self.shardings.dev_buffer)

    def model_at(self, params: Any) -> Qwen3ForCausalLM:
        """The model with ``params``; a LoRA run's with its adapters merged into the base
        kernels (plain projections: what evaluation decodes with and ``save_pretrained``
        exports; the run's ``rest`` is not changed)."""
        model = self.adapted_model_at(params)
        return merge_lora(model) if self.lora else model

    def adapted_model_at(self, params: Any) -> Qwen3ForCausalLM:
        """The model with ``params``, a LoRA run's with its adapters as adapters."""
        return nnx.merge(self.graphdef, nnx.State(params), self.rest)

    def save_adapter(self, params: Any, directory: Any) -> None:
        """Writes a LoRA run's adapters with ``params`` as a PEFT adapter directory
        (:func:`hacbo_jax.models.lora_peft.save_adapter`)."""
        from hacbo_jax.models.lora_peft import save_adapter

        save_adapter(
            self.adapted_model_at(params),
            directory,
            base_model_name_or_path=self.cfg.model.path,
        )

    def evaluate(self, params: Any, examples: list[data_lib.Example]) -> EvalResult:
        """Greedy answers of the model with ``params`` on ``examples``, scored with the
        configured metric (``cfg.eval``); decoding stops on every end token."""
        return evaluate_exact_match(
            self.model_at(params),
            self.tokenizer,
            examples,
            batch_size=self.cfg.eval.batch_size,
            prompt_len=self.prompt_len,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            metric=self.metric,
            ignore_case=self.cfg.eval.ignore_case,
            end_tokens=self.end_tokens,
        )


def arrays_of(arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """The host arrays of a tokenized batch in :class:`Batch` field order."""
    return tuple(arrays[k] for k in Batch._fields)


def _initial_state(tx, params, rng, shardings: StepShardings | None) -> TrainState:
    if shardings is None:
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params), rng=rng)
    # Params go straight to their shards; the optimiser state is created sharded.
    params = jax.device_put(params, shardings.state.params)
    return TrainState(
        step=jax.device_put(jnp.int32(0), shardings.state.step),
        params=params,
        opt_state=jax.jit(tx.init, out_shardings=shardings.state.opt_state)(params),
        rng=jax.device_put(rng, shardings.state.rng),
    )


def weight_grad_skip(
    cfg: Config, labels: Any, num_layers: int, steps_per_epoch: int
) -> WeightGradSkip | None:
    """The step's :class:`WeightGradSkip` when ``controller.skip_weight_grads`` is on and the
    controller can tell idle blocks in advance (None otherwise: the dense step). The label
    tree's blocks are the decoder layers (``qwen3_labels``)."""
    if not cfg.controller.skip_weight_grads:
        return None
    idle = controller_idle_blocks(
        cfg.controller.kind,
        cfg.controller.hyper,
        num_layers,
        steps_per_epoch=steps_per_epoch,
        seed=cfg.seed,
    )
    if idle is None:
        return None
    when_measuring = controller_entry(cfg.controller.kind).idle_when_measuring
    return WeightGradSkip(idle, labels, when_measuring=when_measuring)


def build_run(cfg: Config, *, inject_lr: bool = False) -> RunParts:
    """Builds every part of the run ``cfg`` describes; ConfigError when the loaded data or the
    devices contradict it (checks in :mod:`hacbo_jax.trainer.config.validate`).

    ``inject_lr``: AdamW's learning rate is an ``inject_hyperparams`` value in the state, set by
    a driver (``hacbo-autolrs``), instead of the warm-up + cosine schedule."""
    mesh = check_mesh(cfg)
    check_lora(cfg)  # before the data and the weights are read
    tokenizer = load_tokenizer(cfg)
    task = load_task_data(cfg, tokenizer)  # bad rows fail here, before the model is loaded
    model, _ = load_model(cfg)
    end_tokens = end_token_ids(model, tokenizer)
    train_arrays = data_lib.tokenize_sft(task.train, tokenizer, cfg.data.max_len)
    pool_arrays = data_lib.tokenize_sft(task.pool, tokenizer, cfg.data.max_len)
    prompt_len = prompt_length_for(task.eval + task.pool, tokenizer)
    total_steps = cfg.total_steps(len(task.train))
    check_warmup(cfg, total_steps)
    sampler = data_lib.EpochSampler(len(task.train), cfg.optim.batch_size, seed=cfg.seed)

    lora = cfg.lora.rank is not None
    if lora:  # trained: the adapters only; ``rest`` is the frozen base, an argument of the steps
        graphdef, params, rest = split_lora(model)
    else:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.to_pure_dict(params)
    num_layers = model.config.num_hidden_layers
    del model
    # LoRA adapters sit under their projection (``layers/3/self_attn/q_proj/lora/lora_a``), so
    # the same rules group them by (block, sub-module) as full fine-tuning groups the kernels.
    labels = qwen3_labels(params)
    controller = cfg.controller.build(
        labels, steps_per_epoch=cfg.steps_per_epoch(len(task.train)), seed=cfg.seed
    )
    tx, schedule = cfg.optim.build(total_steps, controller, inject_lr=inject_lr)
    rng = jax.random.key_data(jax.random.key(cfg.seed))
    check_pool_size(cfg, len(task.pool))
    buffer = cfg.microdev.build(len(task.pool), cfg.seed)
    shardings = None
    if mesh.size > 1:  # one device: JAX's default placement, exactly the single-device program
        abstract = jax.eval_shape(lambda p: TrainState(jnp.int32(0), p, tx.init(p), rng), params)
        shardings = step_shardings(
            mesh, abstract, dev_batch_size=cfg.microdev.batch_size, frozen=rest
        )
        rest = jax.device_put(rest, shardings.frozen)  # LoRA's base: sharded like its kernels
    state = _initial_state(tx, params, rng, shardings)
    interval = cfg.controller.interval if measures(cfg.controller.kind) else None
    train_steps = make_train_steps(
        graphdef,
        rest,
        tx,
        schedule,
        interval=interval,
        dev_batch_size=cfg.microdev.batch_size,  # <= microdev.size, checked by the config
        shardings=shardings,
        logits_chunk=cfg.model.logits_chunk,
        # the dev program back-propagates only to what the controller reads
        controlled=None if interval is None else controlled_leaves(labels, params),
        # the true cosine needs the dev gradient itself, not the separate pass's sign sketch
        separate_dev_pass=not getattr(cfg.controller.hyper, "record_true_cosine", False),
        skip=weight_grad_skip(
            cfg,
            labels,
            num_layers,
            cfg.steps_per_epoch(len(task.train)),
        ),
    )
    eval_loss = make_eval_loss(
        make_loss_fn(graphdef, rest, logits_chunk=cfg.model.logits_chunk),
        eval_arrays(task.eval, tokenizer, cfg.data.max_len),
        batch_size=cfg.eval.batch_size,
        frozen=rest,
    )
    accum, micro = cfg.optim.accumulation_steps, cfg.optim.micro_batch_size or cfg.optim.batch_size
    packer = None
    if cfg.data.packing:
        # The fewest packed rows that fit every batch of the run, in micro-batches of at most
        # micro_batch_size rows split evenly over the mesh (see hacbo_jax.data.packing).
        packer = StepPacker.for_run(
            train_arrays,
            batch_size=cfg.optim.batch_size,
            seed=cfg.seed,
            total_steps=total_steps,
            max_rows=micro,
            row_multiple=mesh.size,
            pad_id=tokenizer.pad_token_id,
            max_shapes=cfg.data.packing_shapes,
        )
        accum, micro = packer.accumulation_steps, packer.rows
        padded = float(train_arrays.attention_mask.mean())
        if jax.process_index() == 0:
            print(describe(packer, padded_fraction=padded), flush=True)
    shape = (accum, micro, train_arrays.input_ids.shape[1])
    local = (
        slice(None) if shardings is None else distributed.local_rows(shardings.batch, shape, axis=1)
    )
    return RunParts(
        cfg=cfg,
        mesh=mesh,
        graphdef=graphdef,
        rest=rest,
        tokenizer=tokenizer,
        task=task,
        train_arrays=train_arrays,
        pool_arrays=pool_arrays,
        prompt_len=prompt_len,
        total_steps=total_steps,
        sampler=sampler,
        tx=tx,
        controller=controller,
        buffer=buffer,
        state=state,
        train_steps=train_steps,
        shardings=shardings,
        local_rows=local,
        packer=packer,
        end_tokens=end_tokens,
        eval_loss=eval_loss,
        lora=lora,
    )
