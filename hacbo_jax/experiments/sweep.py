"""Learning-rate search per method with Optuna, written as a file ``hacbo_jax.experiments.compare.run --lrs`` reads.

    python -m train.sweep --config configs/compare_cpu.yaml \\
        [--methods adamw,blac,hacbo,hacbo_gamma0] [--trials 4] [--lo 1e-5] [--hi 3e-3] \\
        [--seed 0] [--out runs/sweep/<config>] [--write OUT/lrs.yaml] [--overwrite] [key=value ...]

For each method, a TPE study (``optuna.samplers.TPESampler(seed=...)``, so the search is
reproducible) draws the base learning rate log-uniformly from [lo, hi]
(``trial.suggest_float("lr", lo, hi, log=True)``, as the paper did) and runs one short
fine-tuning run per trial (the base config with any ``key=value`` overrides, e.g.
``optim.max_steps=30`` for a smaller budget), seed ``--seed``. The objective is the run's final
exact match on the held-out evaluation problems, maximised. The best rate per method goes into
``--write`` under ``lr:`` (other methods already in that file are kept), with every trial listed
for the record. A method the file already records (an earlier sweep's rate and trials) is
refused before the first trial unless ``--overwrite`` is given, and so is a file that is not
such an lrs file: recorded trials are never dropped silently. Runs go to ``OUT/<method>/trial<k>/``; ``OUT`` defaults to
``runs/sweep/<config name>`` in the working directory and ``--write`` to ``OUT/lrs.yaml``. The
shipped rates (``configs/lrs/*.yaml`` of the checkout or the installed package) are never
rewritten unless ``--write`` names one and ``--overwrite`` is given.

The default budget is small (4 trials per method): enough to avoid a rate that is off by an
order of magnitude, not a fine optimum. Note that TPE draws its first ``n_startup_trials`` (10)
at random, so with fewer than 11 trials the search is a seeded random log-uniform search, and
with one seed every method is tried at the same candidate rates (a common grid, which keeps the
methods comparable). Objective ties keep the earlier trial. Needs the ``sweep`` extra (``pip install -e .[sweep]``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from hacbo_jax.trainer.cli_common import (
    ArgumentParser,
    add_overrides_argument,
    add_overwrite_argument,
    check_output_target,
    cli_main,
    command_line,
)
from hacbo_jax.trainer.config import Config, load_config
from hacbo_jax.experiments.methods import COMPARED_METHODS, method_overrides, parse_methods

__all__ = ["sweep_method", "sweep", "write_lrs", "main"]

RunFn = Callable[..., Mapping[str, Any]]


def _default_run_fn(cfg: Config, *, show_progress: bool = False) -> Mapping[str, Any]:
    from hacbo_jax.trainer.finetune import run

    return run(cfg, show_progress=show_progress)


def _check_bounds(lo: float, hi: float) -> None:
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise ValueError(
            f"--lo {lo} --hi {hi}: the learning-rate range needs finite 0 < lo < hi "
            "(log-uniform)"
        )


def sweep_method(
    base_config: str | Path,
    method: str,
    *,
    trials: int = 4,
    lo: float = 1e-5,
    hi: float = 3e-3,
    seed: int = 0,
    out_dir: str | Path = "runs/sweep",
    overrides: Sequence[str] = (),
    run_fn: RunFn | None = None,
) -> dict[str, Any]:
    """One TPE study over ``lr`` for ``method``; returns {"lr": best, "exact_match": its value,
    "trials": [{"lr", "exact_match", "final_train_loss", "diverged"}, ...]}."""
    import optuna

    if trials < 1:
        raise ValueError(f"trials = {trials}: must be >= 1")
    _check_bounds(lo, hi)
    method_overrides(method)
    run_fn = run_fn or _default_run_fn
    records: list[dict[str, Any]] = []

    def objective(trial: "optuna.Trial") -> float:
        lr = trial.suggest_float("lr", lo, hi, log=True)
        run_dir = Path(out_dir) / method / f"trial{trial.number}"
        cfg = load_config(
            base_config,
            [
                *overrides,
                *method_overrides(method),
                f"seed={seed}",
                f"optim.lr={lr!r}",
                f"output_dir={run_dir}",
            ],
        )
        summary = run_fn(cfg, show_progress=False)
        em = float(summary["final_exact_match"])
        records.append(
            {
                "lr": lr,
                "exact_match": em,
                "final_train_loss": float(summary["final_train_loss"]),
                "diverged": bool(summary["diverged"]),
            }
        )
        return em

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        study_name=f"lr-{method}",
    )
    study.optimize(objective, n_trials=trials)
    return {
        "lr": float(study.best_params["lr"]),
        "exact_match": float(study.best_value),
        "trials": records,
    }


def read_lrs_file(path: str | Path) -> dict[str, Any]:
    """The content of an existing lrs file (``{}`` if there is none), checked: a YAML mapping
    whose ``lr`` maps methods to positive numbers and whose ``trials`` maps methods to lists of
    mappings. Anything else is a ValueError naming the file: merging into it would drop it."""
    path = Path(path)
    if not path.exists():
        return {}
    where = f"--write {str(path)!r}"
    try:
        loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{where}: not a readable YAML lrs file ({first}); "
                         "fix or move it, or write elsewhere") from None
    if loaded is None:
        return {}
    shape = "a mapping with 'lr: {method: rate}' and 'trials: {method: [...]}' (as train.sweep writes it)"
    if not isinstance(loaded, dict):
        raise ValueError(f"{where}: holds a {type(loaded).__name__}, not {shape}; fix or move "
                         "it, or write elsewhere")
    lrs, trials = loaded.get("lr") or {}, loaded.get("trials") or {}
    problems = []
    if not isinstance(lrs, dict):
        problems.append(f"lr is {lrs!r}")
    else:
        for method, value in lrs.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                problems.append(f"lr.{method} = {value!r} is not a positive number")
    if not isinstance(trials, dict):
        problems.append(f"trials is {trials!r}")
    else:
        for method, value in trials.items():
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                problems.append(f"trials.{method} = {value!r} is not a list of trials")
    if problems:
        raise ValueError(f"{where}: not {shape}: " + "; ".join(problems) + "; fix or move it, "
                         "or write elsewhere")
    return loaded


def write_lrs(
    path: str | Path, results: Mapping[str, Mapping[str, Any]], *, header: str = ""
) -> Path:
    """Write (merge into) a ``--lrs`` file: ``lr: {method: best}`` and ``trials: {method: [...]}``.
    The other methods of an existing file are kept (with their trials); a method swept again
    replaces its entry (``main`` refuses that without ``--overwrite``)."""
    path = Path(path)
    existing = read_lrs_file(path)
    lrs = dict(existing.get("lr") or {})
    trials = dict(existing.get("trials") or {})
    for method, result in results.items():
        lrs[method] = float(result["lr"])
        trials[method] = [dict(t) for t in result["trials"]]
    body = yaml.safe_dump({"lr": lrs, "trials": trials}, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    path.write_text(comment + body)
    return path


def sweep(
    base_config: str | Path,
    methods: Sequence[str] = COMPARED_METHODS,
    *,
    write: str | Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
    **kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """:func:`sweep_method` for every method, then :func:`write_lrs` (``write`` None:
    ``OUT/lrs.yaml`` of the trial runs' directory); returns the results."""
    if write is None:
        write = Path(kwargs.get("out_dir", "runs/sweep")) / "lrs.yaml"
    results = {}
    for method in methods:
        results[method] = sweep_method(base_config, method, **kwargs)
        log(
            f"{method}: best lr {results[method]['lr']:.3g} (exact match "
            f"{100 * results[method]['exact_match']:.1f}%)"
        )
    header = "\n".join(
        [
            "Base learning rate per method, written by hacbo_jax.experiments.sweep (read by hacbo_jax.experiments.compare.run --lrs).",
            f"Command: {command}" if command else f"Base config: {base_config}",
            "Objective: final exact match of one short run per trial (maximised); Optuna TPE, "
            "lr log-uniform.",
        ]
    )
    write_lrs(write, results, header=header)
    log(f"wrote {write}")
    return results


def _shipped_configs_dirs() -> list[Path]:
    """The directories whose files ship with the code: the config tree (the checkout's configs/
    or the installed package's) and the package itself."""
    from hacbo_jax.trainer.config.load import CONFIGS_DIR

    import hacbo_jax

    return [Path(CONFIGS_DIR).resolve(), Path(hacbo_jax.__file__).parent.resolve()]


def _check_write_target(write: Path, overwrite: bool, methods: Sequence[str] = ()) -> None:
    """Before any trial: ``write`` is not a shipped file (without ``overwrite``), not a
    directory, and, if it exists, a readable lrs file that records none of ``methods`` (their
    recorded trials would be replaced; ``overwrite`` allows it). Other methods are merged."""
    target = write.resolve()
    if not overwrite and any(target.is_relative_to(d) for d in _shipped_configs_dirs()):
        raise ValueError(
            f"--write {str(write)!r} is a shipped file of hacbo_jax (under "
            f"{_shipped_configs_dirs()[0]}); write elsewhere, or pass --overwrite to replace it"
        )
    if write.is_dir():
        raise ValueError(f"--write {str(write)!r} is a directory, not a file")
    existing = read_lrs_file(write)
    recorded = set(existing.get("lr") or {}) | set(existing.get("trials") or {})
    again = [m for m in methods if m in recorded]
    if again and not overwrite:
        raise ValueError(
            f"--write {str(write)!r} already records {', '.join(again)} (an earlier sweep's "
            "rate and trials, which this sweep would replace); pass --overwrite to replace "
            "them, or write elsewhere (its other methods are always kept)"
        )
    write.parent.mkdir(parents=True, exist_ok=True)  # an unwritable place fails now, not at the end


@cli_main
def main(argv: Sequence[str] | None = None, *, prog: str = "python -m train.sweep") -> int:
    parser = ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="base config (YAML)")
    parser.add_argument(
        "--methods",
        default=",".join(COMPARED_METHODS),
        help="comma-separated method names (see hacbo_jax.experiments.compare.run), or 'all'",
    )
    parser.add_argument("--trials", type=int, default=4, help="trials per method (default 4)")
    parser.add_argument("--lo", type=float, default=1e-5, help="lowest learning rate")
    parser.add_argument("--hi", type=float, default=3e-3, help="highest learning rate")
    parser.add_argument("--seed", type=int, default=0, help="TPE seed and run seed")
    parser.add_argument(
        "--out",
        default=None,
        help="trial runs go to OUT/<method>/trial<k> (default runs/sweep/<config name>)",
    )
    parser.add_argument(
        "--write", default=None, help="output lrs file (default OUT/lrs.yaml; merged into)"
    )
    add_overwrite_argument(
        parser, "a shipped lrs file named by --write, or the entries of the swept methods in it"
    )
    add_overrides_argument(parser, "dotted overrides for every trial run (e.g. optim.max_steps=30)")
    args = parser.parse_args(argv)
    command = command_line(prog, argv)
    out = Path(args.out) if args.out is not None else Path("runs/sweep") / Path(args.config).stem
    write = Path(args.write) if args.write is not None else out / "lrs.yaml"
    methods = parse_methods(args.methods)
    _check_bounds(args.lo, args.hi)
    if args.trials < 1:
        raise ValueError(f"--trials {args.trials}: must be >= 1")
    check_output_target(out, overwrite=True)  # a file is refused; trial runs are checked below
    for method in methods:  # validate before the first run starts
        load_config(
            args.config, [*args.overrides, *method_overrides(method), f"optim.lr={args.lo!r}"]
        )
        trials_dir = out / method
        if trials_dir.is_dir() and any(trials_dir.iterdir()):
            # finetune never overwrites a run: say so before the first trial, not at it
            raise ValueError(
                f"--out {out}: {trials_dir} already holds trial runs of an earlier "
                "sweep (never overwritten); choose another --out or delete it"
            )
    _check_write_target(write, args.overwrite, methods)
    from hacbo_jax.experiments.compare.base import enable_compilation_cache

    enable_compilation_cache(out / "jax_cache")
    sweep(
        args.config,
        methods,
        write=write,
        command=command,
        trials=args.trials,
        lo=args.lo,
        hi=args.hi,
        seed=args.seed,
        out_dir=out,
        overrides=args.overrides,
    )
    return 0
