"""One line per config key, for ``--help``; a test checks that every schema key has one."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Iterator

from hacbo_jax.trainer.config.build import format_value
from hacbo_jax.trainer.config.schema import Config

__all__ = ["KEY_HELP", "describe_keys", "iter_keys"]

KEY_HELP: dict[str, str] = {
    "output_dir": "run directory (null = runs/<config name>)",
    "seed": "seed of the model's RNG, the data order and the held-out split",
    "method": "name of the run in comparisons (null = controller.kind)",
    "model.path": "Hugging Face model directory (with config.json) or hub id",
    "model.tokenizer": "tokenizer directory or hub id (null = the model's; shipped one for Qwen3)",
    "model.dtype": "compute dtype",
    "model.param_dtype": "dtype of the master weights",
    "model.remat": "layer rematerialisation: none, full or dots (true/false = full/none)",
    "model.scan_layers": "stack the decoder layers' params and run them with lax.scan",
    "model.attention_impl": "einsum (CPU), xla or cudnn (GPU only)",
    "model.logits_chunk": "vocabulary projection + loss this many positions at a time (null = all)",
    "data.task": "question-answer files / hub dataset (gsm8k), or the synthetic task",
    "data.format": "row format: question_answer, prompt_completion or messages (chat template)",
    "data.columns.question": "question column (question_answer)",
    "data.columns.answer": "answer column (question_answer)",
    "data.columns.prompt": "prompt column (prompt_completion)",
    "data.columns.completion": "completion column (prompt_completion)",
    "data.columns.messages": "messages column: a list of {role, content} (messages)",
    "data.train_file": "training rows: .jsonl, .json or .parquet",
    "data.eval_file": "evaluation rows: .jsonl, .json or .parquet",
    "data.hub_name": "datasets hub name used instead of the files",
    "data.hub_config": "the hub data set's configuration (null = its default)",
    "data.train_split": "hub split for training (and the held-out micro-dev pool)",
    "data.eval_split": "hub split for evaluation",
    "data.synthetic.preset": "synthetic task preset (hacbo_jax.data.synthetic.PRESETS)",
    "data.synthetic.n_train": "synthetic training problems",
    "data.synthetic.n_eval": "synthetic evaluation problems",
    "data.synthetic.seed": "seed of the synthetic problem streams",
    "data.max_len": "tokens per training example (longer ones are truncated)",
    "data.heldout_size": "micro-dev pool size when microdev.pool is heldout",
    "data.packing": "pack each step's training examples into max_len rows (no padding compute)",
    "data.packing_shapes": "packing: at most this many row counts per step (1-4 compiled shapes)",
    "optim.lr": "peak learning rate of AdamW",
    "optim.b1": "AdamW beta1",
    "optim.b2": "AdamW beta2",
    "optim.weight_decay": "AdamW decoupled weight decay",
    "optim.clip_norm": "global-norm gradient clipping (null = none)",
    "optim.warmup_steps": "linear warm-up steps before the cosine decay",
    "optim.epochs": "passes over the training examples",
    "optim.batch_size": "examples per optimiser step (global)",
    "optim.micro_batch_size": "examples per accumulation micro-batch (null = batch_size)",
    "optim.max_steps": "cap on the optimiser steps (null = epochs decide)",
    "controller.kind": "controller after AdamW (hacbo, blac) or wrapping it (adagradselect); none = plain AdamW",
    "controller.blac.rho": "EMA factor of the agreement statistics",
    "controller.blac.interval": "K: steps between measurements",
    "controller.blac.freeze_after": "U: step after which negative blocks are frozen",
    "controller.blac.update_norm_budget": "lambda: cap on the update norm (null = none)",
    "controller.hacbo.rho": "EMA factor of the agreement statistics",
    "controller.hacbo.interval": "K: steps between measurements",
    "controller.hacbo.theta_neg": "agreement below which a measurement counts as negative",
    "controller.hacbo.patience": "F: negative measurements before probation",
    "controller.hacbo.gamma": "multiplier of a block in probation",
    "controller.hacbo.eps": "numerical floor of the multipliers",
    "controller.hacbo.curvature_norm": "norm of the curvature estimate",
    "controller.hacbo.debias": "debias the EMAs (named deviation, off in the paper)",
    "controller.hacbo.update_norm_budget": "lambda: cap on the update norm (null = none)",
    "controller.hacbo.curvature_weighting": "weight multipliers by curvature",
    "controller.hacbo.probation": "enable probation of negative blocks",
    "controller.hacbo.curvature_floor": "floor of c relative to the block's mean (0 = the spec)",
    "controller.hacbo.probation_share": "share of a block in probation: weights (spec) or uniform",
    "controller.adagradselect.pct": "fraction of blocks updated per step (k = max(1, floor(pct U)))",
    "controller.adagradselect.epsilon0": "explore (top-k by gradient norm) probability at step 1",
    "controller.adagradselect.epsilon_decay": "decay of epsilon in epoch 1 (null = ln 100 / (N - 1))",
    "controller.adagradselect.dirichlet_alpha": "alpha_0 added to the counts of the Dirichlet",
    "controller.adagradselect.score": "block score: l2 or rms gradient norm",
    "controller.adagradselect.draw": "exploit draw: top_k of the Dirichlet or without_replacement",
    "controller.adagradselect.other_mode": "leaves outside blocks: always, frozen or unit",
    "controller.adagradselect.moments": "unselected blocks' AdamW state: keep or advance",
    "microdev.size": "N_dev: examples in the micro-dev buffer",
    "microdev.pool": "where the buffer is drawn from: held-out train rows or the test split",
    "microdev.refresh_every": "R: steps between refreshes (0 = never)",
    "microdev.refresh_fraction": "r: fraction of the buffer replaced per refresh",
    "microdev.batch_size": "examples per dev gradient",
    "microdev.max_candidates": "pool items scored per refresh (null = all)",
    "eval.limit": "evaluation problems (null = the whole split)",
    "eval.max_new_tokens": "greedy decoding length",
    "eval.metric": "gsm8k (final numbers) or exact (normalised text); null = by data.format",
    "eval.ignore_case": "exact metric: case-insensitive",
    "eval.batch_size": "problems decoded together",
    "eval.every_epoch": "also evaluate at the end of every epoch",
    "eval.every": "also evaluate every N optimiser steps (null = off)",
    "eval.at_start": "also evaluate the base model (step 0)",
    "logging.every": "steps between metrics.jsonl rows",
    "logging.tensorboard": "mirror the metrics to TensorBoard (extra: tensorboard)",
    "logging.wandb": "mirror the metrics to W&B, offline (extra: wandb)",
    "checkpoint.every": "steps between checkpoints (0 = only at the end)",
    "checkpoint.keep": "checkpoints kept",
    "checkpoint.export_hf": "write RUN_DIR/hf_model at the end",
    "divergence.max_consecutive_nonfinite": "stop after this many skipped (non-finite) steps",
    "mesh.data": "data-parallel devices (-1 = all)",
    "mesh.fsdp": "FSDP shards",
    "autolrs.lr_min": "AutoLRS (hacbo-autolrs): lowest learning rate searched",
    "autolrs.lr_max": "AutoLRS: highest learning rate searched",
    "autolrs.tau0": "AutoLRS: steps at the chosen rate in the first stage",
    "autolrs.tau_prime0": "AutoLRS: steps per candidate in the first stage",
    "autolrs.num_candidates": "AutoLRS: candidates per stage (k)",
    "autolrs.tau_max": "AutoLRS: tau' doubles while below tau_max / 10",
    "autolrs.warmup_steps": "AutoLRS: linear warm-up steps before the first stage",
    "autolrs.warmup_lr": "AutoLRS: learning rate reached by the warm-up",
    "autolrs.rewind_data": "AutoLRS: candidates restart from the snapshot's data position",
    "autolrs.bo_seed": "AutoLRS: seed of the Bayesian optimisation",
}


def iter_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """``(dotted key, type, default)`` of every leaf key of the schema, in schema order."""
    hints = typing.get_type_hints(cls)
    defaults = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from iter_keys(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, tp, getattr(defaults, f.name)


def describe_keys() -> str:
    """Every key with its default and description, one per line (the ``--help`` epilog)."""
    rows = [(key, format_value(default)) for key, _, default in iter_keys()]
    width = max(len(k) + len(d) for k, d in rows) + 3
    lines = [
        f"  {f'{key} = {default}':<{width}} {KEY_HELP.get(key, '')}".rstrip()
        for key, default in rows
    ]
    return "config keys (KEY = DEFAULT  description):\n" + "\n".join(lines)
