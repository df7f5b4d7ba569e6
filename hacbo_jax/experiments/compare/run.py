"""Multi-seed comparison of fine-tuning methods, resumable, with a statistical report.

    python -m train.compare --config configs/compare_cpu.yaml --seeds 5 \\
        --methods adamw,blac,hacbo,hacbo_gamma0 [--lrs configs/lrs/compare_cpu.yaml] \\
        [--out runs/compare] [--report-dir DIR] [key=value ...]

Runs every (method, seed) of the grid one after another in this process (``hacbo_jax.trainer.finetune.run``;
on a small CPU parallel processes would only contend), each in ``OUT/runs/<method>/seed<k>/``,
then writes ``report.md`` and its figures into ``--report-dir`` (default ``OUT``).

Resumable: a run whose ``summary.json`` exists and whose resolved ``config.yaml`` equals the
config it would get now is not run again; an interrupted run (checkpoint, no summary) continues
with ``run(cfg, resume=True)``; a run directory whose config differs (base config, overrides or
learning rate changed) is deleted and run afresh. JAX's persistent compilation cache
(``--jax-cache``, default ``OUT/jax_cache``) lets later seeds of a method skip XLA compilation.

Methods (:data:`METHODS`, each a list of config overrides): the five compared methods ``adamw``
(no controller), ``blac``, ``hacbo``, ``hacbo_gamma0`` (probation blocks get no update),
``adagradselect`` (AdamW wrapped by AdaGradSelect, ``controller.adagradselect``),
``hacbo_share_uniform`` (HACBO with ``controller.hacbo.probation_share=uniform``), and the
paper's ablations of HACBO: ``hacbo_no_curvature`` (v uniform 1/M), ``hacbo_no_refresh``
(micro-dev buffer never refreshed), ``hacbo_no_probation`` (no block ever enters probation),
``hacbo_debias`` (bias-corrected EMAs). ``--methods all`` runs all ten.

Learning rates: ``--lrs FILE`` (written by ``hacbo_jax.experiments.sweep``) maps method -> base learning rate;
a method missing from it uses the rate of the method it ablates (:data:`LR_FALLBACK`, e.g. every
``hacbo_*`` ablation uses ``hacbo``'s rate so the ablation changes one thing only), else the base
config's ``optim.lr``.

The report (per method over seeds): exact match mean with a 95% t confidence interval, final
training loss, divergences, wall time, energy when measured, the fraction of controlled
parameters in probation (HACBO) or frozen (BLAC) over time; paired t-tests of ``hacbo`` against
every other method over the seeds both completed (``scipy.stats.ttest_rel``, alpha = 0.05).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import yaml

from hacbo_jax.trainer.cli_common import (
    ArgumentParser,
    add_overrides_argument,
    cli_main,
    command_line,
)
from hacbo_jax.experiments.compare.base import (
    comparable_config,
    enable_compilation_cache,
    ensure_base_eval,
)
from hacbo_jax.experiments.compare.report import (
    FAILED_FILE,
    incomplete_runs,
    write_comparison_report,
)
from hacbo_jax.trainer.run_lock import try_lock
from hacbo_jax.trainer.config import Config, ConfigError, config_to_dict, load_config
from hacbo_jax.experiments.methods import (
    ABLATIONS,
    COMPARED_METHODS,
    LR_FALLBACK,
    METHODS,
    load_lrs,
    lr_for,
    method_overrides,
    parse_methods,
)

__all__ = [
    "ABLATIONS",
    "COMPARED_METHODS",
    "LR_FALLBACK",
    "METHODS",
    "UTC_TIME_FORMAT",
    "RunSpec",
    "enable_compilation_cache",
    "execute_runs",
    "load_lrs",
    "lr_for",
    "main",
    "method_overrides",
    "parse_methods",
    "plan_runs",
    "run_comparison",
    "run_state",
    "write_comparison_report",
]


@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int
    run_dir: Path
    config: Config


def plan_runs(
    base_config: str | Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    overrides: Sequence[str] = (),
    lrs: Mapping[str, float] | None = None,
) -> list[RunSpec]:
    """The grid: one validated Config per (method, seed), ordered seed by seed (every method
    at seed 0, then at seed 1, ...) so that a comparison cut short still has paired seeds."""
    runs = []
    for seed in seeds:
        for method in methods:
            lr = lr_for(method, lrs)
            run_dir = Path(out_dir) / "runs" / method / f"seed{seed}"
            extra = [*overrides, *method_overrides(method), f"seed={seed}", f"output_dir={run_dir}"]
            if lr is not None:
                extra.append(f"optim.lr={lr!r}")
            runs.append(RunSpec(method, seed, run_dir, load_config(base_config, extra)))
    return runs


def run_state(spec: RunSpec) -> str:
    """``done`` (summary + same config), ``resume`` (checkpoint, same config, no summary),
    ``stale`` (a directory from a different config) or ``new``."""
    config_path = spec.run_dir / "config.yaml"
    if not config_path.is_file():
        return "stale" if spec.run_dir.exists() and any(spec.run_dir.iterdir()) else "new"
    try:
        saved = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError:
        return "stale"
    if not isinstance(saved, dict) or comparable_config(saved) != comparable_config(
        config_to_dict(spec.config)
    ):
        return "stale"
    if (spec.run_dir / "summary.json").is_file():
        return "done"
    checkpoints = spec.run_dir / "checkpoints"
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
        return "resume"
    return "stale"  # started but never checkpointed: nothing worth keeping


# ---------------------------------------------------------------------------------------------
# Running the grid.
# ---------------------------------------------------------------------------------------------


def _default_run_fn(cfg: Config, *, resume: bool, show_progress: bool) -> dict:
    from hacbo_jax.trainer.finetune import run

    return run(cfg, resume=resume, show_progress=show_progress)


# How the timing files (OUT/timing.json here, train.evidence's OUT/timing.yaml) write
# ``finished_utc``, and how the evidence report reads it back.
UTC_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def _record_timing(
    out_dir: Path, specs: Sequence[RunSpec], command, elapsed: float, executed: int, skipped: int
) -> dict[str, str]:
    """Appends this invocation to ``OUT/timing.json``; the report's wall-time lines."""
    timing_path = out_dir / "timing.json"
    history = json.loads(timing_path.read_text()) if timing_path.is_file() else []
    history.append(
        {
            "command": command,
            "runs": len(specs),
            "executed": executed,
            "skipped": skipped,
            "elapsed_s": round(elapsed, 1),
            "finished_utc": time.strftime(UTC_TIME_FORMAT, time.gmtime()),
        }
    )
    timing_path.parent.mkdir(parents=True, exist_ok=True)
    timing_path.write_text(json.dumps(history, indent=1) + "\n")
    run_walls = [
        json.loads((s.run_dir / "summary.json").read_text()).get("wall_time_s") or 0.0
        for s in specs
        if (s.run_dir / "summary.json").is_file()
    ]
    timing = {
        "this invocation": f"{elapsed:.0f} s ({executed} runs executed, {skipped} skipped as "
        "finished), on this machine",
        "sum of the runs' own wall times (compilation and evaluation included)": f"{sum(run_walls):.0f} s over {len(run_walls)} runs",
    }
    if len(history) > 1:
        timing["all invocations so far"] = (
            f"{sum(h['elapsed_s'] for h in history):.0f} s in "
            f"{len(history)} invocations (see {timing_path.name})"
        )
    return timing


def run_lock_path(run_dir: Path) -> Path:
    """The lock file of a run: beside its directory, not in it (a stale run's directory is
    deleted and made again while the lock is held)."""
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[bool]:
    """Holds an exclusive ``flock`` on the run's lock file while the run executes; yields
    False if another live process holds it. The kernel drops a lock when its holder exits, so
    an interrupted run leaves no lock behind to clean up."""
    path = run_lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    held = try_lock(path)
    if held is None:
        yield False
        return
    with held:  # closing the file releases the lock
        yield True


def execute_runs(
    specs: Sequence[RunSpec],
    *,
    run_fn: Callable[..., dict] | None = None,
    show_progress: bool = False,
    log: Callable[[str], None] = print,
    lock: bool = False,
) -> tuple[int, int, int]:
    """Runs every spec not finished before (see :func:`run_state`), one after another;
    returns (executed, skipped, failed). A run that raises is recorded in its directory's
    ``FAILED_FILE`` and the others go on. With ``lock``, a run is taken only under an
    exclusive lock (:func:`run_lock_path`), and one that another process holds is skipped:
    several processes can then walk the same grid side by side, each taking the runs no other
    has started."""
    run_fn = run_fn or _default_run_fn
    executed = skipped = failed = 0
    for i, spec in enumerate(specs, 1):
        tag = f"[{i}/{len(specs)}] {spec.method} seed {spec.seed}"
        with _run_lock(spec.run_dir) if lock else contextlib.nullcontext(True) as mine:
            if not mine:
                skipped += 1
                log(f"{tag}: running in another process, skipped")
                continue
            outcome = _execute_one(spec, tag, run_fn, show_progress, log)
        executed += outcome == "executed"
        skipped += outcome == "skipped"
        failed += outcome == "failed"
    return executed, skipped, failed


def _execute_one(
    spec: RunSpec,
    tag: str,
    run_fn: Callable[..., dict],
    show_progress: bool,
    log: Callable[[str], None],
) -> str:
    """One run of :func:`execute_runs`: ``executed``, ``skipped`` (finished before) or
    ``failed``."""
    state = run_state(spec)
    if state == "done":
        log(f"{tag}: finished before, skipped")
        return "skipped"
    if state == "stale":
        log(f"{tag}: {spec.run_dir} holds a run of another config; starting it afresh")
        shutil.rmtree(spec.run_dir)
    log(f"{tag}: {'resuming' if state == 'resume' else 'running'}")
    t0 = time.perf_counter()
    failed_path = spec.run_dir / FAILED_FILE
    failed_path.unlink(missing_ok=True)
    try:
        summary = run_fn(spec.config, resume=state == "resume", show_progress=show_progress)
    except Exception as e:  # one broken run must not stop the grid: record it, go on
        error = f"{type(e).__name__}: {e}"
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        failed_path.write_text(json.dumps({"error": error}) + "\n")
        log(f"{tag}: FAILED ({error}); recorded in {failed_path}, the grid goes on")
        return "failed"
    log(
        f"{tag}: exact match {100 * summary['final_exact_match']:.1f}%, final loss "
        f"{summary['final_train_loss']:.4f}{', DIVERGED' if summary['diverged'] else ''} "
        f"({time.perf_counter() - t0:.0f} s)"
    )
    return "executed"


def run_comparison(
    base_config: str | Path,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    overrides: Sequence[str] = (),
    lrs: Mapping[str, float] | None = None,
    report_dir: str | Path | None = None,
    run_fn: Callable[..., dict] | None = None,
    show_progress: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
    base_eval: bool = True,
) -> Path:
    """Runs the missing (method, seed) runs, then writes the report; returns report.md.

    ``base_eval``: also measure the base model's exact match before fine-tuning (once; kept in
    ``OUT/base_model_eval.json``) as the report's reference line.

    ``run_fn(cfg, resume=bool, show_progress=bool) -> summary`` defaults to
    ``hacbo_jax.trainer.finetune.run``.
    """
    out_dir = Path(out_dir)
    specs = plan_runs(base_config, methods, seeds, out_dir, overrides, lrs)
    started = time.perf_counter()
    if base_eval and specs:
        ensure_base_eval(specs[0].config, out_dir, log)
    executed, skipped, failed = execute_runs(
        specs, run_fn=run_fn, show_progress=show_progress, log=log
    )
    elapsed = time.perf_counter() - started
    timing = _record_timing(out_dir, specs, command, elapsed, executed, skipped)
    report = write_comparison_report(
        out_dir, methods, seeds, report_dir, command=command, timing=timing
    )
    log(
        f"comparison: {executed} runs executed, {skipped} skipped, {failed} failed, "
        f"{elapsed:.0f} s; "
        f"report: {report}"
    )
    return report


def _parse_seeds(args: argparse.Namespace) -> list[int]:
    if args.seed_list:
        try:
            seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError:
            raise ValueError(
                f"--seed-list {args.seed_list!r}: must be comma-separated non-negative integers"
            ) from None
        if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
            raise ValueError(
                f"--seed-list {args.seed_list!r}: must be distinct non-negative integers"
            )
        return seeds
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: must be >= 1")
    if args.first_seed < 0:
        raise ValueError(f"--first-seed {args.first_seed}: must be >= 0")
    return list(range(args.first_seed, args.first_seed + args.seeds))


@cli_main
def main(argv: Sequence[str] | None = None, *, prog: str = "python -m train.compare") -> int:
    parser = ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--config", required=True, help="base config (YAML)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds (default 5)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds are first..first+n-1")
    parser.add_argument("--seed-list", default=None, help="explicit seeds, e.g. 0,3,7")
    parser.add_argument(
        "--methods",
        default=",".join(COMPARED_METHODS),
        help=f"comma-separated, from {', '.join(METHODS)}; or 'all'",
    )
    parser.add_argument("--lrs", default=None, help="method -> lr file written by train.sweep")
    parser.add_argument(
        "--out", default="runs/compare", help="runs go to OUT/runs/<method>/seed<k>"
    )
    parser.add_argument("--report-dir", default=None, help="report.md and figures (default OUT)")
    parser.add_argument(
        "--jax-cache", default=None, help="persistent compilation cache (default OUT/jax_cache)"
    )
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from the finished runs"
    )
    parser.add_argument("--progress", action="store_true", help="show each run's progress bar")
    add_overrides_argument(parser, "dotted overrides applied to the base config for every run")
    args = parser.parse_args(argv)
    command = command_line(prog, argv)
    seeds = _parse_seeds(args)
    methods = parse_methods(args.methods)
    lrs = load_lrs(args.lrs) if args.lrs else None
    if args.report_only:
        report = write_comparison_report(
            args.out,
            methods,
            seeds,
            args.report_dir,
            command=command,
            command_label="Report rebuilt from existing runs with:",
        )
        print(f"wrote {report}")
        incomplete = incomplete_runs(Path(args.out), methods, seeds)
        if incomplete:
            print(
                f"warning: the report covers {len(methods) * len(seeds) - len(incomplete)} of "
                f"{len(methods) * len(seeds)} runs; not finished:\n"
                + "\n".join(f"  {m} seed {s}: {why}" for m, s, why in incomplete),
                file=sys.stderr,
            )
        return 0
    # validate every run's config before the first one starts
    plan_runs(args.config, methods, seeds, args.out, args.overrides, lrs)
    enable_compilation_cache(args.jax_cache or Path(args.out) / "jax_cache")
    run_comparison(
        args.config,
        methods,
        seeds,
        args.out,
        overrides=args.overrides,
        lrs=lrs,
        report_dir=args.report_dir,
        show_progress=args.progress,
        command=command,
    )
    return 0
