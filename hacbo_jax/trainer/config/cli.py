"""The command line of a run: ``--config NAME|FILE [key=value ...] [--resume] [--print-config]``."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import yaml

from hacbo_jax.trainer.cli_common import ArgumentParser, add_overrides_argument, usage_error
from hacbo_jax.trainer.config.keys import describe_keys
from hacbo_jax.trainer.config.load import (
    config_to_dict,
    duplicate_overrides,
    load_config,
    shipped_configs,
)
from hacbo_jax.trainer.config.schema import Config
from hacbo_jax.trainer.config_fields import ConfigError


def derived_counts(cfg: Config) -> dict[str, int | str]:
    """Step counts that follow from the config (the data size when the config alone knows it)."""
    n_train = cfg.expected_train_examples()
    counts: dict[str, int | str] = {
        "accumulation_steps": cfg.optim.accumulation_steps,
        "micro_batch_size": cfg.optim.micro_batch_size or cfg.optim.batch_size,
    }
    if n_train is None:
        counts["train_examples"] = "known once the data is loaded (data.hub_name)"
        return counts
    counts.update(
        train_examples=n_train,
        steps_per_epoch=cfg.steps_per_epoch(n_train),
        total_steps=cfg.total_steps(n_train),
    )
    interval = cfg.controller.interval
    if interval is not None:
        counts["controller_measurements"] = cfg.total_steps(n_train) // interval
    if cfg.controller.kind != "none" and cfg.microdev.refresh_every:
        counts["microdev_refreshes"] = cfg.total_steps(n_train) // cfg.microdev.refresh_every
    return counts


def print_config(cfg: Config, file=None) -> None:
    """The resolved config as YAML, then the derived step counts (``--print-config``)."""
    file = file or sys.stdout
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False).rstrip(), file=file)
    print("# derived:", file=file)
    for key, value in derived_counts(cfg).items():
        print(f"#   {key}: {value}", file=file)


def parse_cli(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m train.finetune",
    description: str | None = None,
) -> tuple[Config, argparse.Namespace]:
    """``--config NAME|FILE [key=value ...] [--resume] [--print-config]`` -> (Config, args).

    On a config problem prints the ConfigError message and exits with status 2 (argparse's
    convention for usage errors), so no work starts. ``--print-config`` prints the resolved
    config and the derived step counts and exits with status 0. ``--help`` lists every key.
    """
    parser = ArgumentParser(
        prog=prog,
        allow_abbrev=False,  # "--resum" must not pass for "--resume"
        description=description,
        epilog=describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        required=True,
        help="YAML file, or the name of a shipped config: " + ", ".join(shipped_configs()),
    )
    add_overrides_argument(
        parser, "dotted overrides, values parsed as YAML (e.g. optim.lr=1e-4); keys below"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint in output_dir"
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and the derived step counts, then exit",
    )
    # Intermixed: overrides may come before, between or after the flags
    # ("--config x --resume optim.lr=1e-4"), not only in one run after --config.
    args = parser.parse_intermixed_args(argv)
    try:
        duplicates = duplicate_overrides(args.overrides)
        if duplicates:
            raise ConfigError(
                "invalid command line:\n" + "\n".join(f"  - {p}" for p in duplicates)
            )
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(usage_error(parser.prog, e)) from None
    if args.print_config:
        print_config(cfg)
        raise SystemExit(_print_config_problems(parser.prog, cfg))
    return cfg, args


def _print_config_problems(prog: str, cfg: Config) -> int:
    """After ``--print-config``: the cheap model checks (config.json, the tensor names, shapes
    and dtypes from the safetensors headers, the tokenizer against the vocabulary, data.max_len
    against the model) of a local directory or a hub id already in the local cache, reported as
    the run would (exit 2). Not a download, not the finiteness scan of every weight (a read of
    all of them), nor the data rows and output directory: the run checks those first."""
    from hacbo_jax.trainer.config.validate import check_model_inputs

    problems, _ = check_model_inputs(cfg, cheap=True)
    if not problems:
        return 0
    sys.stdout.flush()
    return usage_error(
        prog, "the run would not start:\n" + "\n".join(f"  - {p}" for p in problems)
    )
