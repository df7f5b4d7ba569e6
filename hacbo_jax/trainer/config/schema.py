"""The schema of a run's configuration: frozen dataclasses, one per section.

Each field states its default once, with its constraint and its one-line help
(:func:`~hacbo_jax.trainer.config_fields.option`): ``--help`` and the docs' key table read them
from here (:mod:`.keys`); comments say only *why*. The controller sections come from
:data:`hacbo_jax.trainer.controller_registry.CONTROLLERS`; their help is their transformation's
docstring.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from hacbo_jax.trainer.config_fields import in_range, mesh_size_check, option

# Seeds feed jax.random.PRNGKey and numpy generators: 32-bit unsigned.
UINT32_MAX = 2**32 - 1
# A static bound on data.max_len (2**20 tokens); the model's max_position_embeddings bounds it
# further, checked against config.json (validate.check_model_limits / check_run_inputs).
MAX_LEN = 1 << 20


def _at_least_at_most(lo: int, hi: int, why: str):
    """Integers ``lo..hi``; the text says the lower bound first (the usual mistake) and why
    there is an upper one."""
    allowed = f">= {lo} and <= {hi} ({why})"

    def check(v):
        return None if v is None or lo <= v <= hi else f"a value {allowed}"

    check.allowed = allowed  # type: ignore[attr-defined]
    return check


SEED_RANGE = _at_least_at_most(0, UINT32_MAX, "a 32-bit unsigned seed")
from hacbo_jax.trainer.controller_registry import (
    CONTROLLERS,
    AdaGradSelectConfig,
    BLACConfig,
    HACBOConfig,
    build_controller,
)
from hacbo_jax.data.synthetic import DEFAULT_PRESET

__all__ = [
    "AdaGradSelectConfig",
    "AutoLRSSection",
    "BLACConfig",
    "CheckpointConfig",
    "ColumnsConfig",
    "Config",
    "ControllerConfig",
    "DataConfig",
    "DivergenceConfig",
    "EvalConfig",
    "HACBOConfig",
    "LoRAConfig",
    "LoggingConfig",
    "MeshConfig",
    "MicroDevConfig",
    "ModelConfig",
    "OptimConfig",
    "SyntheticConfig",
]

# ---------------------------------------------------------------------------------------------
# The schema.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The base model: a local Hugging Face directory (with config.json) or a hub id."""

    path: str = option(
        "assets/tiny-qwen3-gsm", help="Hugging Face model directory (with config.json) or hub id"
    )
    tokenizer: Optional[str] = option(
        None,
        help="tokenizer directory or hub id (null = the model directory's; for a Qwen3 "
        "directory without one, the shipped assets/qwen3-tokenizer)",
    )
    dtype: Literal["float32", "bfloat16"] = option("float32", help="compute dtype")
    param_dtype: Literal["float32", "bfloat16"] = option(
        "float32", help="dtype of the master weights"
    )
    remat: Union[bool, Literal["none", "full", "dots"]] = option(
        "none",
        help="rematerialisation of each decoder layer in the backward pass: none, full "
        "(recompute the layer) or dots (keep the projection matmul outputs); true/false = "
        "full/none",
    )
    scan_layers: bool = option(
        False, help="stack the decoder layers' params and run them with lax.scan"
    )
    attention_impl: Literal["einsum", "xla", "cudnn"] = option(
        "einsum",
        help="einsum (CPU path), xla or cudnn (jax.nn.dot_product_attention; cudnn needs a GPU "
        "backend, checked before the run starts)",
    )
    logits_chunk: Optional[int] = option(
        None,
        in_range(1),
        help="vocabulary projection + loss this many positions at a time, so that the [T, V] "
        "logits never exist at once (null = all positions together)",
    )

    def __post_init__(self):
        # One spelling of the remat mode downstream: the legacy booleans become their mode.
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")


def _lora_targets_check(v: str) -> str | None:
    """``lora.targets``: known module names and groups (:func:`hacbo_jax.models.lora.resolve_targets`)."""
    from hacbo_jax.models.lora import resolve_targets  # jax/flax only once a config names one

    try:
        resolve_targets(v)
    except ValueError as e:
        return f"comma-separated module names or groups: {e}"
    return None


_lora_targets_check.allowed = (  # type: ignore[attr-defined]
    "comma-separated q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or the "
    "groups attn, mlp, all"
)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters (:mod:`hacbo_jax.models.lora`): train low-rank adapters of a frozen base
    instead of every weight; off while ``rank`` is null. Checked against the model's
    config.json (rank against each targeted projection, ``adapter`` against the model) before
    the run loads any weights."""

    rank: Optional[int] = option(
        None,
        in_range(1),
        help="LoRA rank r (null = off: full fine-tuning); at most the smaller dimension of "
        "every targeted projection",
    )
    alpha: Optional[float] = option(
        None,
        in_range(0, lo_open=True),
        help="the adapters' update is scaled by alpha / rank (PEFT's lora_alpha; null = rank)",
    )
    dropout: float = option(
        0.0,
        in_range(0, 1, hi_open=True),
        help="dropout rate on the adapter input in training (a new mask per step, micro-batch, "
        "layer and projection; evaluation and the dev gradients without dropout)",
    )
    targets: str = option(
        "all",
        _lora_targets_check,
        help="adapted projections: comma-separated q_proj, k_proj, v_proj, o_proj, gate_proj, "
        "up_proj, down_proj and/or the groups attn, mlp, all",
    )
    base_dtype: Optional[Literal["float32", "bfloat16"]] = option(
        None, help="dtype the frozen base weights are held in (null = model.param_dtype)"
    )
    adapter: Optional[str] = option(
        None,
        help="PEFT adapter directory to start from instead of B = 0 (its r, lora_alpha and "
        "target_modules must equal lora.*)",
    )


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the synthetic GSM8K-format task (presets: hacbo_jax/data/synthetic.py)."""

    preset: str = option(
        DEFAULT_PRESET, help="synthetic task preset (hacbo_jax.data.synthetic.PRESETS)"
    )
    n_train: int = option(4096, in_range(1), help="synthetic training problems")
    n_eval: int = option(256, in_range(1), help="synthetic evaluation problems")
    seed: int = option(0, SEED_RANGE, help="seed of the synthetic problem streams")


@dataclass(frozen=True)
class ColumnsConfig:
    """Column (field) names of the data rows (hacbo_jax/data/formats.py)."""

    question: str = option("question", help="question column (question_answer)")
    answer: str = option("answer", help="answer column (question_answer)")
    prompt: str = option("prompt", help="prompt column (prompt_completion)")
    completion: str = option("completion", help="completion column (prompt_completion)")
    messages: str = option("messages", help="messages column: a list of {role, content} (messages)")


@dataclass(frozen=True)
class DataConfig:
    task: Literal["gsm8k", "synthetic"] = option(
        "gsm8k",
        help="gsm8k: question-answer data from files or the hub (any data set, in data.format); "
        "synthetic: the generated GSM8K-format task",
    )
    format: Literal["question_answer", "prompt_completion", "messages"] = option(
        "question_answer",
        help="row format: question_answer, prompt_completion or messages (chat template)",
    )
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    train_file: str = option(
        "assets/gsm8k/train.jsonl", help="training rows: .jsonl, .json or .parquet"
    )
    eval_file: str = option(
        "assets/gsm8k/test.jsonl", help="evaluation rows: .jsonl, .json or .parquet"
    )
    hub_name: Optional[str] = option(None, help="datasets hub name used instead of the files")
    hub_config: Optional[str] = option(
        None, help="the hub data set's configuration (null = its default; openai/gsm8k: main)"
    )
    train_split: str = option(
        "train", help="hub split for training (and the held-out micro-dev pool)"
    )
    eval_split: str = option("test", help="hub split for evaluation")
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    max_len: int = option(
        512,
        _at_least_at_most(8, MAX_LEN, "and at most the model's max_position_embeddings"),
        help="tokens per training example (longer ones are truncated); at most the model's "
        "max_position_embeddings",
    )
    # Packing (segment ids, per-segment positions) gives the same examples and loss as padding
    # with far fewer computed token slots (hacbo_jax.data.packing). Micro-dev and evaluation
    # batches stay padded.
    packing: bool = option(
        False, help="pack each step's training examples into max_len rows (no padding compute)"
    )
    # 1 = one fixed shape that fits the run's fullest step; each compiled shape costs a compile.
    packing_shapes: int = option(
        1,
        in_range(1, 4),
        help="packing: at most this many row counts per micro-batch (compiled shapes); each "
        "step takes the smallest that fits it",
    )
    # gsm8k: train rows held out (never trained on; 7,473 - 1,473 = 6,000 remain); synthetic:
    # problems drawn from the task's separate 'pool' stream (n_train is not reduced).
    heldout_size: int = option(
        1473, in_range(0), help="micro-dev pool size when microdev.pool is heldout"
    )
    # A training set that pulls against the target: the micro-dev pool and the evaluation
    # stay clean (hacbo_jax.data.label_noise).
    wrong_answers: float = option(
        0.0,
        in_range(0, 1),
        help="share of training examples given a wrong final answer (label noise, drawn with "
        "the run's seed; the micro-dev pool and the evaluation stay clean)",
    )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to zero over the run."""

    lr: float = option(1e-4, in_range(0, lo_open=True), help="peak learning rate of AdamW")
    b1: float = option(0.9, in_range(0, 1, hi_open=True), help="AdamW beta1")
    b2: float = option(0.95, in_range(0, 1, hi_open=True), help="AdamW beta2")
    weight_decay: float = option(0.1, in_range(0), help="AdamW decoupled weight decay")
    clip_norm: Optional[float] = option(
        1.0, in_range(0, lo_open=True), help="global-norm gradient clipping (null = none)"
    )
    warmup_steps: int = option(0, in_range(0), help="linear warm-up steps before the cosine decay")
    epochs: int = option(1, in_range(1), help="passes over the training examples")
    batch_size: int = option(64, in_range(1), help="examples per optimiser step (global)")
    micro_batch_size: Optional[int] = option(
        None,
        in_range(1),
        help="examples per accumulation micro-batch (null = batch_size: no accumulation)",
    )
    max_steps: Optional[int] = option(
        None, in_range(1), help="cap on the optimiser steps, for quick runs (null = epochs decide)"
    )

    def build(
        self, total_steps: int, controller: Any = None, *, inject_lr: bool = False
    ) -> tuple[Any, Any]:
        """``(optimiser, schedule)``: :func:`hacbo_jax.trainer.step.build_optimizer` with
        ``controller`` chained after AdamW (or wrapping it: a function ``adamw ->
        transformation``), and the warm-up + cosine schedule over the run with peak 1: the peak
        ``lr`` is a value in the optimiser state (``peak_lr``), so runs that differ only in
        ``lr`` share compiled programs. Read the rate with
        :func:`hacbo_jax.trainer.step.applied_learning_rate`."""
        from hacbo_jax.trainer.step import build_optimizer, learning_rate_schedule

        schedule = learning_rate_schedule(1.0, self.warmup_steps, total_steps)
        if inject_lr:  # a driver (AutoLRS) sets the rate in the state: constant until it does
            schedule = lambda step: self.lr  # noqa: E731 (what the step metrics report)
        tx = build_optimizer(
            schedule=schedule,
            b1=self.b1,
            b2=self.b2,
            weight_decay=self.weight_decay,
            clip_norm=self.clip_norm,
            controller=controller,
            inject_lr=inject_lr,
            peak_lr=None if inject_lr else self.lr,
        )
        return tx, schedule

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimiser step."""
        return self.batch_size // (self.micro_batch_size or self.batch_size)


def _controller_config_type() -> type:
    """``ControllerConfig``: ``kind`` plus one section per registered controller
    (:data:`hacbo_jax.trainer.controller_registry.CONTROLLERS`)."""
    kinds = tuple(CONTROLLERS)
    sections = [
        (kind, entry.config_type, field(default_factory=entry.config_type))
        for kind, entry in CONTROLLERS.items()
        if entry.config_type is not None
    ]

    def interval(self) -> int | None:
        """Measurement interval K of the active controller (None for plain AdamW and for a
        controller that does not measure)."""
        return getattr(self.hyper, "interval", None)

    def hyper(self) -> Any:
        """The active controller's section (None for ``kind: none``)."""
        return getattr(self, self.kind, None)

    def build(self, labels: Any, **run_args: Any) -> Any:
        """The active controller's optax transformation over ``labels`` (None for ``none``; for
        a controller that wraps AdamW a function ``adamw -> transformation``, which needs
        ``run_args``: see :func:`~hacbo_jax.trainer.controller_registry.build_controller`)."""
        return build_controller(self.kind, labels, self.hyper, **run_args)

    after = ", ".join(k for k, e in CONTROLLERS.items() if e.transform is not None and not e.wraps)
    wrapping = ", ".join(k for k, e in CONTROLLERS.items() if e.transform is not None and e.wraps)
    kind_help = f"controller after AdamW ({after}) or wrapping it ({wrapping}); none = plain AdamW"
    return dataclasses.make_dataclass(
        "ControllerConfig",
        [
            ("kind", Literal[kinds], option("hacbo", help=kind_help)),
            (
                "skip_weight_grads",
                bool,
                option(
                    False,
                    help="skip the weight gradients of blocks whose update is known to be zero "
                    "(AdaGradSelect's drawn selection, BLAC's frozen blocks, HACBO probation "
                    "with gamma 0) on steps that do not measure; those blocks' gradients are "
                    "then 0, also in the clip norm (docs/training.md)",
                ),
            ),
            *sections,
        ],
        namespace={
            "interval": property(interval),
            "hyper": property(hyper),
            "build": build,
            "__module__": __name__,
            "__doc__": "Which controller runs (``kind``) and every controller's section.",
        },
        frozen=True,
    )


ControllerConfig = _controller_config_type()


@dataclass(frozen=True)
class MicroDevConfig:
    size: int = option(1024, in_range(1), help="N_dev: examples in the micro-dev buffer")
    pool: Literal["heldout", "test"] = option(
        "heldout",
        help="where the buffer is drawn from: held-out train rows (heldout) or the test split",
    )
    refresh_every: int = option(500, in_range(0), help="R: steps between refreshes (0 = never)")
    refresh_fraction: float = option(
        0.25, in_range(0, 1), help="r: fraction of the buffer replaced per refresh"
    )
    batch_size: int = option(64, in_range(1), help="examples per dev gradient")
    max_candidates: Optional[int] = option(
        256, in_range(1), help="pool items scored per refresh (null = all)"
    )

    def build(self, pool_size: int, seed: int) -> Any:
        """The :class:`~hacbo_jax.data.microdev.MicroDevBuffer` over a pool of ``pool_size``
        examples (``size <= pool_size`` is checked by ``validate.check_pool_size``)."""
        from hacbo_jax.data.microdev import MicroDevBuffer

        return MicroDevBuffer(
            pool_size,
            self.size,
            refresh_interval=max(self.refresh_every, 1),
            replace_fraction=self.refresh_fraction,
            max_candidates=self.max_candidates,
            seed=seed,
        )


@dataclass(frozen=True)
class EvalConfig:
    limit: Optional[int] = option(
        None, in_range(1), help="evaluation problems (null = the whole split)"
    )
    max_new_tokens: int = option(256, in_range(1), help="greedy decoding length")
    metric: Optional[Literal["gsm8k", "exact"]] = option(
        None,
        help="gsm8k: final numeric answers (the spec's); exact: normalised string equality; "
        "null = gsm8k for data.format question_answer, exact otherwise",
    )
    ignore_case: bool = option(False, help="exact metric: compare case-folded")
    batch_size: int = option(64, in_range(1), help="problems decoded together")
    every_epoch: bool = option(True, help="also evaluate at the end of every epoch")
    # Exact match over a run, e.g. against the training clock for equal-budget comparisons.
    every: Optional[int] = option(
        None, in_range(1), help="also evaluate every N optimiser steps (null = off)"
    )
    at_start: bool = option(False, help="also evaluate the base model (step 0)")

    def resolved_metric(self, data_format: str) -> str:
        """The metric in use: ``metric``, or its default for ``data_format``."""
        if self.metric is not None:
            return self.metric
        return "gsm8k" if data_format == "question_answer" else "exact"


@dataclass(frozen=True)
class LoggingConfig:
    every: int = option(10, in_range(1), help="steps between metrics.jsonl rows")
    tensorboard: bool = option(False, help="mirror the metrics to TensorBoard (extra: tensorboard)")
    wandb: bool = option(False, help="mirror the metrics to W&B, always offline (extra: wandb)")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = option(100, in_range(0), help="steps between checkpoints (0 = only at the end)")
    keep: int = option(2, in_range(1), help="checkpoints kept")
    export_hf: bool = option(True, help="write RUN_DIR/hf_model at the end")


@dataclass(frozen=True)
class DivergenceConfig:
    max_consecutive_nonfinite: int = option(
        5, in_range(1), help="stop after this many consecutive skipped (non-finite) steps"
    )


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp"): data-parallel size (-1 = all devices) x FSDP shards.

    Checked against the devices present by :func:`hacbo_jax.trainer.config.validate.check_mesh`.
    """

    data: int = option(1, mesh_size_check, help="data-parallel devices (-1 = all)")
    fsdp: int = option(1, in_range(1), help="FSDP shards")

    def build(self) -> Any:
        """The ``jax.sharding.Mesh`` (:func:`hacbo_jax.trainer.sharding.make_mesh`; ValueError when it
        does not fit the devices: ``validate.check_mesh`` turns that into a ConfigError)."""
        from hacbo_jax.trainer.sharding import make_mesh

        return make_mesh(self.data, self.fsdp)


@dataclass(frozen=True)
class AutoLRSSection:
    """AutoLRS of ``hacbo-autolrs`` (:mod:`hacbo_jax.experiments.autolrs.run`): the
    :class:`~hacbo_jax.experiments.autolrs.AutoLRSConfig` of the run. The stage lengths are the code's scaled down
    10x so that a stage (k tau' + tau steps) fits the embedded model's runs."""

    lr_min: float = option(
        1e-5,
        in_range(0, lo_open=True),
        help="AutoLRS (hacbo-autolrs): lowest learning rate searched",
    )
    lr_max: float = option(
        1e-2, in_range(0, lo_open=True), help="AutoLRS: highest learning rate searched"
    )
    tau0: int = option(
        100, in_range(1), help="AutoLRS: steps at the chosen rate in the first stage"
    )
    tau_prime0: int = option(
        10, in_range(4), help="AutoLRS: steps per candidate in the first stage"
    )
    num_candidates: int = option(10, in_range(1), help="AutoLRS: candidates per stage (k)")
    tau_max: int = option(800, in_range(1), help="AutoLRS: tau' doubles while below tau_max / 10")
    warmup_steps: int = option(
        0, in_range(0), help="AutoLRS: linear warm-up steps before the first stage"
    )
    warmup_lr: float = option(
        0.0, in_range(0), help="AutoLRS: learning rate reached by the warm-up"
    )
    rewind_data: bool = option(
        False, help="AutoLRS: candidates restart from the snapshot's data position"
    )
    bo_seed: int = option(0, SEED_RANGE, help="AutoLRS: seed of the Bayesian optimisation")

    def build(self) -> Any:
        """The :class:`~hacbo_jax.experiments.autolrs.AutoLRSConfig` (ValueError on an inconsistent combination)."""
        from hacbo_jax.experiments.autolrs.algorithm import AutoLRSConfig

        return AutoLRSConfig(**dataclasses.asdict(self))


@dataclass(frozen=True)
class Config:
    output_dir: Optional[str] = option(None, help="run directory (null = runs/<config file stem>)")
    seed: int = option(
        0,
        SEED_RANGE,
        help="seed of the model's RNG, the data order and the held-out split",
    )
    method: Optional[str] = option(
        None, help="name of the run in comparisons (null = controller.kind)"
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    controller: ControllerConfig = field(default_factory=ControllerConfig)  # type: ignore[valid-type]
    microdev: MicroDevConfig = field(default_factory=MicroDevConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    divergence: DivergenceConfig = field(default_factory=DivergenceConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    autolrs: AutoLRSSection = field(default_factory=AutoLRSSection)  # hacbo-autolrs only

    # -- step arithmetic ------------------------------------------------------------------
    def steps_per_epoch(self, n_train: int) -> int:
        """Optimiser steps per epoch over ``n_train`` examples: ``n_train // batch_size``.

        The incomplete last batch is dropped (fixed shapes), as ``hacbo_jax.data.gsm8k``'s sampler does.
        """
        return n_train // self.optim.batch_size

    def total_steps(self, n_train: int) -> int:
        """Optimiser steps of the whole run: epochs x steps per epoch, capped by max_steps."""
        steps = self.optim.epochs * self.steps_per_epoch(n_train)
        return min(steps, self.optim.max_steps) if self.optim.max_steps else steps

    def expected_train_examples(self) -> int | None:
        """Training examples the run will see, when knowable from the config alone.

        synthetic: ``n_train`` (its micro-dev pool is a separate generated stream).
        gsm8k: rows of a ``.jsonl`` ``data.train_file`` minus ``data.heldout_size`` when the
        micro-dev pool is the held-out slice; None with ``hub_name`` or another file type (size
        unknown until loaded).
        """
        if self.data.task == "synthetic":
            return self.data.synthetic.n_train
        train_file = Path(self.data.train_file)
        if self.data.hub_name is None and train_file.suffix == ".jsonl" and train_file.is_file():
            with open(self.data.train_file, "rb") as f:
                rows = sum(1 for line in f if line.strip())
        else:
            return None
        return rows - (self.data.heldout_size if self.microdev.pool == "heldout" else 0)
