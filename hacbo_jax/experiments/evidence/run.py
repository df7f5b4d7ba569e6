"""The evidence behind ``results/evidence/``: can the methods be told apart?

    python -m train.evidence tune      [--out runs/evidence]   # learning rate per method
    python -m train.evidence budget    [--out runs/evidence]   # tuned methods x 5 seeds, evaluated along the run
    python -m train.evidence ablations [--out runs/evidence]   # HACBO with one mechanism off x 5 seeds
    python -m train.evidence lora      [--out runs/evidence]   # LoRA rank 8 and 64 x 5 seeds
    python -m train.evidence stability [--out runs/evidence]   # lr grid x methods x 3 seeds x budget on/off
    python -m train.evidence report    [--out runs/evidence] [--report-dir results/evidence]

``--regime conflict`` runs tune, budget, ablations and lora on ``evidence_conflict_cpu`` (half
the training answers wrong) under ``OUT/conflict/``.

Every part runs on the base config ``evidence_cpu`` (``--config`` to change it; ``key=value``
overrides apply to every run), one run after another in this process, each in its own
directory under ``OUT/<part>/``, and is resumable like ``train.compare``: finished runs are
skipped, interrupted ones resume from their checkpoint, a run whose config changed restarts.

- ``tune``: every method in :data:`TUNED_METHODS` at each rate of its grid in :data:`TUNE_GRIDS`
  (three rates factor 2 apart around the best of an earlier five-point common grid), one seed, on *other
  problems* than the evaluation ones (``data.synthetic.seed=1``: other training, pool and
  evaluation problems). The best final exact match wins (ties: the lower final training loss);
  written to ``OUT/lrs.yaml`` in ``train.sweep``'s format. ``hacbo_gamma0`` and
  ``hacbo_share_uniform`` take ``hacbo``'s rate (they change one thing of HACBO only).
- ``budget``: :data:`BUDGET_METHODS` at their tuned rates x ``--seeds`` seeds (default 5),
  evaluated every ``--eval-every`` steps (34: at steps 34, 68 and the end, 100, besides the
  base model's score at step 0) (exact match against optimiser steps and against the
  training clock, which counts the controller's dev passes and micro-dev refreshes and excludes
  evaluation), plus the base model's exact match once.
- ``stability``: :data:`STABILITY_METHODS` x :data:`STABILITY_LRS` x ``--seeds`` seeds (default
  3) x the update-norm budget lambda = 1 and off (AdamW has no controller, so no budget: it runs
  once per rate and seed).
- ``report``: ``summary.json``, ``report.md`` and the figures, from whatever runs have finished
  (:mod:`hacbo_jax.experiments.evidence.report`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from hacbo_jax.trainer.cli_common import (
    ArgumentParser,
    add_overrides_argument,
    cli_main,
    command_line,
)
from hacbo_jax.experiments.compare.run import UTC_TIME_FORMAT, RunSpec, execute_runs
from hacbo_jax.experiments.compare.base import enable_compilation_cache, ensure_base_eval
from hacbo_jax.trainer.config import ConfigError, load_config
from hacbo_jax.experiments.methods import LR_FALLBACK, load_lrs, lr_for, method_overrides
from hacbo_jax.experiments.sweep import write_lrs

__all__ = [
    "BUDGET_METHODS",
    "STABILITY_LRS",
    "STABILITY_METHODS",
    "TUNED_METHODS",
    "TUNE_GRIDS",
    "TUNING_OVERRIDES",
    "budget_specs",
    "main",
    "pick_best",
    "stability_specs",
    "tune_specs",
]

DEFAULT_CONFIG = "evidence_cpu"
# regime name -> its base config. "clean": fine-tuning on clean problems; "conflict": half of the
# training answers wrong while the micro-dev pool and the evaluation stay clean (the regime in
# which HACBO's agreement test is meant to act). The clean regime's runs sit directly under
# OUT (as before regimes existed), another regime's under OUT/<regime>/.
REGIMES: dict[str, str] = {"clean": "evidence_cpu", "conflict": "evidence_conflict_cpu"}
TUNED_METHODS = ("adamw", "blac", "hacbo", "adagradselect", "lora")
BUDGET_METHODS = (
    "adamw",
    "blac",
    "hacbo",
    "hacbo_gamma0",
    "hacbo_share_uniform",
    "adagradselect",
)
# What carries HACBO's effect: each switches one mechanism off (methods.py), at HACBO's rate.
ABLATION_METHODS = ("hacbo_no_curvature", "hacbo_no_refresh", "hacbo_no_probation")
# LoRA (AdamW on the adapters): rank 8, and rank 64, which is to the embedded model's width (256)
# what rank 256 is to Qwen3-0.6B's (1024). Tuned at rank 8; alpha = rank, so both apply the
# adapters' product unscaled, and rank 64 takes rank 8's rate.
LORA_BUDGET_METHODS = ("lora", "lora_r64")
STABILITY_METHODS = ("adamw", "blac", "hacbo", "hacbo_gamma0", "hacbo_share_uniform")
# Three rates per method, factor 2 apart: one seed's exact match on 200 problems has a standard
# error of ~3.5 points, so a finer grid would mostly chase noise, and factor 2 keeps the chosen
# rate within sqrt(2) of the grid's best. Each grid is centred on the method's best of an earlier,
# wider search (results/evidence/README.md): a common grid 3e-4 ... 4.8e-3, factor 2 apart, all
# five rates for every method (20 runs), grown at its top while HACBO's best sat on that edge.
# It put AdamW, BLAC and AdaGradSelect at 6e-4 and HACBO at 2.4e-3 (its multipliers shrink its
# steps 4-5x), each best interior; its two outer rates lost by 4-17 points for every method.
# Three rates per method keep a bracket on both sides of each best for 12 runs instead of 20,
# which the two-hour budget of the whole evidence needs.
TUNE_GRIDS: dict[str, tuple[float, ...]] = {
    "adamw": (3e-4, 6e-4, 1.2e-3),
    "blac": (3e-4, 6e-4, 1.2e-3),
    "hacbo": (1.2e-3, 2.4e-3, 4.8e-3),
    "adagradselect": (3e-4, 6e-4, 1.2e-3),
    # No earlier search for LoRA: three rates factor 4 apart around 8x AdamW's (adapters
    # usually want a larger rate than full fine-tuning).
    "lora": (1.2e-3, 4.8e-3, 1.92e-2),
}
# Five log-spaced rates, factor 4 apart, from below the tuned rates (6e-4 and HACBO's 2.4e-3)
# to where AdamW's loss becomes non-finite. The earlier grid's top, 4e-2, only collapsed exact
# match (no run diverged); 1.6e-1 is the first rate of this grid above it.
STABILITY_LRS = (2.5e-3 / 16, 2.5e-3 / 4, 2.5e-3, 1e-2, 4e-2, 1.6e-1)
# The stability grid's runs are shorter (divergence is an early event, the paper's "early
# divergence"): 20 steps of 16 problems, a measurement every 5 steps, probation after 2
# negative ones and BLAC's freezing from step 10 (so both are reachable: measurements at steps
# 5, 10, 15 and 20), exact match on 100 problems. 20 steps, not 40, for the two hours of the
# whole evidence: 81 runs of 20 steps took 33 minutes on two cores. The micro-dev buffer
# is refreshed at the paper's R = 500 steps, i.e. never within a run: a refresh decodes a batch
# of candidates (a third of a controlled run's CPU time at R = 20) and does not bear on early
# divergence.
STABILITY_OVERRIDES = (
    "optim.batch_size=16",
    "optim.max_steps=20",
    "optim.warmup_steps=2",
    "controller.hacbo.interval=5",
    "controller.hacbo.patience=2",
    "controller.blac.interval=5",
    "controller.blac.freeze_after=10",
    "microdev.refresh_every=500",
    "microdev.batch_size=16",
    "eval.limit=100",
)
# Tuning sees other problems than the evaluation (and other training and pool problems).
TUNING_OVERRIDES = ("data.synthetic.seed=1",)
# The update-norm budget off: no cap on the controlled update's norm.
BUDGET_OFF = ("controller.hacbo.update_norm_budget=null", "controller.blac.update_norm_budget=null")
TUNE_SEED = 0


def _lr_tag(lr: float) -> str:
    return f"lr{lr:.2e}"


def _spec(
    base_config: str | Path, method: str, seed: int, run_dir: Path, extra: Sequence[str]
) -> RunSpec:
    overrides = [*extra, *method_overrides(method), f"seed={seed}", f"output_dir={run_dir}"]
    return RunSpec(method, seed, run_dir, load_config(base_config, overrides))


def tune_specs(
    base_config: str | Path,
    out_dir: Path,
    overrides: Sequence[str] = (),
    methods: Sequence[str] = TUNED_METHODS,
    grids: dict[str, Sequence[float]] = TUNE_GRIDS,
) -> list[RunSpec]:
    """One run per (method, candidate rate), on the tuning problems: every method's first
    candidate, then every method's second, ..., so that ``--shard K/2`` (every other run) gives
    each shard some of every method's runs."""
    missing = [m for m in methods if m not in grids]
    if missing:
        raise ValueError(
            f"tune: no learning-rate grid for {missing}; grids exist for {sorted(grids)}"
        )
    rounds = max(len(grids[m]) for m in methods)
    # An even number of methods is rotated by one per round; an odd number alternates the
    # parity of its positions by itself from round to round.
    turn = (lambda i: i % len(methods)) if len(methods) % 2 == 0 else (lambda i: 0)
    return [
        _spec(
            base_config,
            method,
            TUNE_SEED,
            out_dir / "tune" / method / _lr_tag(grids[method][i]),
            [*overrides, *TUNING_OVERRIDES, f"optim.lr={grids[method][i]!r}"],
        )
        for i in range(rounds)
        for method in (*methods[turn(i) :], *methods[: turn(i)])
        if i < len(grids[method])
    ]


def pick_best(trials: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The trial with the highest exact match; ties go to the lower final training loss
    (a non-finite loss counts as +inf), then to the lower rate."""

    def key(t: dict[str, Any]) -> tuple[float, float, float]:
        loss = t.get("final_train_loss")
        loss = loss if loss is not None and math.isfinite(loss) else math.inf
        return (-t["exact_match"], loss, t["lr"])

    if not trials:
        raise ValueError("no finished tuning trial to pick from")
    return min(trials, key=key)


def _summary(spec: RunSpec) -> dict[str, Any] | None:
    import json

    path = spec.run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_tuned_lrs(specs: Sequence[RunSpec], path: Path, command: str) -> dict[str, float]:
    """Best rate per method from the finished tuning runs, into ``path`` (train.sweep format)."""
    results: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(s.method for s in specs):
        trials = []
        for spec in (s for s in specs if s.method == method):
            summary = _summary(spec)
            if summary is None:
                continue
            trials.append(
                {
                    "lr": float(spec.config.optim.lr),
                    "exact_match": float(summary["final_exact_match"]),
                    "final_train_loss": summary["final_train_loss"],
                    "diverged": bool(summary["diverged"]),
                }
            )
        if trials:
            results[method] = {"lr": pick_best(trials)["lr"], "trials": trials}
    header = (
        "Base learning rate per method, written by train.evidence tune (read by the budget part).\n"
        f"Command: {command}\n"
        f"Objective: final exact match of one run (seed {TUNE_SEED}) per candidate on the tuning "
        f"problems ({', '.join(TUNING_OVERRIDES)}); ties: lower final training loss."
    )
    write_lrs(path, results, header=header)
    return {m: r["lr"] for m, r in results.items()}


def budget_specs(
    base_config: str | Path,
    out_dir: Path,
    lrs: dict[str, float],
    seeds: Sequence[int],
    eval_every: int,
    overrides: Sequence[str] = (),
    methods: Sequence[str] = BUDGET_METHODS,
    part: str = "budget",
) -> list[RunSpec]:
    """Every method at its tuned rate, seed by seed, evaluated every ``eval_every`` steps, in
    ``out_dir/<part>/<method>/seed<k>`` (the ablations and the LoRA rows are budget runs of
    other methods, in their own part)."""
    missing = [m for m in methods if lr_for(m, lrs) is None]
    if missing:
        raise ValueError(
            f"no tuned rate for {', '.join(missing)} in the tuning results: run "
            "`train.evidence tune` first (or give --lrs FILE)"
        )
    return [
        _spec(
            base_config,
            method,
            seed,
            out_dir / part / method / f"seed{seed}",
            [
                *overrides,
                f"optim.lr={lr_for(method, lrs)!r}",
                f"eval.every={eval_every}",
            ],
        )
        for seed in seeds
        for method in methods
    ]


def stability_specs(
    base_config: str | Path,
    out_dir: Path,
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    methods: Sequence[str] = STABILITY_METHODS,
    lrs: Sequence[float] = STABILITY_LRS,
) -> list[RunSpec]:
    """(budget on/off) x rate x seed x method; AdamW once per (rate, seed) under 'none'.

    Rates run from the largest down within each budget setting: the large rates, where runs
    diverge, are the grid's point, so a part stopped early has them first.
    """
    specs = []
    for budget, extra in (("on", ()), ("off", BUDGET_OFF)):
        for lr in sorted(lrs, reverse=True):
            for seed in seeds:
                for method in methods:
                    if method == "adamw" and budget == "off":
                        continue  # no controller: the budget does not apply
                    tag = "none" if method == "adamw" else budget
                    specs.append(
                        _spec(
                            base_config,
                            method,
                            seed,
                            out_dir
                            / "stability"
                            / method
                            / f"budget_{tag}"
                            / _lr_tag(lr)
                            / f"seed{seed}",
                            [*STABILITY_OVERRIDES, *overrides, *extra, f"optim.lr={lr!r}"],
                        )
                    )
    return specs


PARTS = ("tune", "budget", "ablations", "lora", "stability", "report")


@dataclasses.dataclass
class Args:
    part: str
    config: str | None
    out: Path
    seeds: int | None
    eval_every: int
    lrs: str | None
    report_dir: Path
    overrides: list[str]
    shard: str = "0/1"
    regime: str = "clean"

    @property
    def base_config(self) -> str:
        """``--config``, else the regime's base config."""
        return self.config or REGIMES[self.regime]

    @property
    def regime_out(self) -> Path:
        """Where the regime's runs go: OUT for the clean regime, OUT/<regime>/ otherwise."""
        return self.out if self.regime == "clean" else self.out / self.regime


def _parse(argv: Sequence[str] | None, prog: str) -> tuple[argparse.ArgumentParser, Args]:
    parser = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("part", choices=PARTS)
    parser.add_argument(
        "--regime",
        choices=tuple(REGIMES),
        default="clean",
        help="clean (evidence_cpu, runs in OUT/) or conflict (evidence_conflict_cpu: half the "
        "training answers wrong, runs in OUT/conflict/); stability runs in the clean regime only",
    )
    parser.add_argument(
        "--config", default=None, help="base config (name or YAML; default: the regime's)"
    )
    parser.add_argument("--out", default="runs/evidence", help="runs go to OUT/<part>/...")
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds 0..n-1 (budget: 5, stability: 3)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=34, help="budget: evaluate every N steps (default 34)"
    )
    parser.add_argument("--lrs", default=None, help="budget: rates file (default OUT/lrs.yaml)")
    parser.add_argument(
        "--report-dir", default="results/evidence", help="report: summary.json, report.md, figures"
    )
    parser.add_argument(
        "--shard",
        default="0/1",
        help="K/N: run every N-th run of the part, from the K-th, then any run of the part that "
        "no other process has started (a lock file beside each run directory); for N processes "
        "side by side, e.g. one per core with XLA_FLAGS=--xla_cpu_multi_thread_eigen=false",
    )
    add_overrides_argument(parser, "dotted overrides applied to every run")
    ns = parser.parse_intermixed_args(argv)  # overrides may follow the options
    owned = _part_keys(ns.part)
    taken = [o for o in ns.overrides if o.partition("=")[0].strip() in owned]
    if taken:
        raise ValueError(
            f"{', '.join(taken)}: set by the {ns.part} part itself for each run (its rate, seed, "
            "method and run directory come after the command line's overrides, so this one "
            "would be ignored); leave it out"
        )
    if ns.part == "stability" and ns.regime != "clean":
        raise ValueError(
            f"--regime {ns.regime}: the stability grid runs in the clean regime only (its runs "
            "are 20 steps, too short for the conflict regime's second epoch); leave --regime out"
        )
    return parser, Args(
        ns.part,
        ns.config,
        Path(ns.out),
        ns.seeds,
        ns.eval_every,
        ns.lrs,
        Path(ns.report_dir),
        list(ns.overrides),
        ns.shard,
        ns.regime,
    )


def _part_keys(part: str) -> set[str]:
    """The keys every run of ``part`` sets after the command line's overrides."""
    from hacbo_jax.experiments.methods import LORA_METHODS, METHODS

    keys = {"optim.lr", "seed", "output_dir", "method"}
    for overrides in (*METHODS.values(), *LORA_METHODS.values()):
        keys.update(o.partition("=")[0] for o in overrides)
    if part == "tune":
        keys.update(o.partition("=")[0] for o in TUNING_OVERRIDES)
    return keys


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` -> (K, N); ValueError unless 0 <= K < N."""
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        k, n = -1, 0
    if not 0 <= k < n:
        raise ValueError(f"--shard {text!r}: must be K/N with integers 0 <= K < N, e.g. 0/2")
    return k, n


def _check_seeds(seeds: int | None, default: int) -> list[int]:
    n = default if seeds is None else seeds
    if n < 1:
        raise ValueError(f"--seeds {n}: must be >= 1")
    return list(range(n))


def plan(args: Args) -> list[RunSpec]:
    """The runs of ``args.part`` (validated configs; ValueError/ConfigError on bad input)."""
    if args.eval_every < 1:
        raise ValueError(f"--eval-every {args.eval_every}: must be >= 1")
    parse_shard(args.shard)
    if args.part == "tune":
        return tune_specs(
            args.base_config,
            args.regime_out,
            args.overrides,
            methods=TUNED_METHODS,
            grids=TUNE_GRIDS,
        )
    if args.part in ("budget", "ablations", "lora"):
        lrs_path = Path(args.lrs) if args.lrs else args.regime_out / "lrs.yaml"
        if not lrs_path.is_file():
            where = "OUT/lrs.yaml" if args.regime == "clean" else f"OUT/{args.regime}/lrs.yaml"
            raise ValueError(
                f"--lrs {str(lrs_path)!r}: no such file; run `train.evidence tune"
                f"{'' if args.regime == 'clean' else ' --regime ' + args.regime}` first "
                f"(it writes {where}) or give --lrs FILE"
            )
        methods = {
            "budget": BUDGET_METHODS,
            "ablations": ABLATION_METHODS,
            "lora": LORA_BUDGET_METHODS,
        }[args.part]
        return budget_specs(
            args.base_config,
            args.regime_out,
            load_lrs(lrs_path),
            _check_seeds(args.seeds, 5),
            args.eval_every,
            args.overrides,
            methods=methods,
            part=args.part,
        )
    if args.part == "stability":
        return stability_specs(
            args.base_config,
            args.out,
            _check_seeds(args.seeds, 3),
            args.overrides,
            methods=STABILITY_METHODS,
            lrs=STABILITY_LRS,
        )
    return []


def _record_part_time(out_dir: Path, part: str, command: str, elapsed: float, counts) -> None:
    """Appends this invocation's wall time to ``OUT/timing.yaml`` (the report's wall times)."""
    path = out_dir / "timing.yaml"
    history = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    executed, skipped, failed = counts
    history.append(
        {
            "part": part,
            "command": command,
            "elapsed_s": round(elapsed, 1),
            "executed": executed,
            "skipped": skipped,
            "failed": failed,
            "finished_utc": time.strftime(UTC_TIME_FORMAT, time.gmtime()),
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(history, sort_keys=False))


def _record_given_rates(given: Path, recorded: Path) -> None:
    """A part run with ``--lrs FILE``: the file is copied to the regime's ``lrs.yaml`` (which the
    report reads the rates from) unless that already exists; one with other rates is refused, so
    that a regime's runs never mix two sets of rates."""
    if recorded.is_file():
        if load_lrs(recorded) != load_lrs(given):
            raise ValueError(
                f"--lrs {str(given)!r}: {str(recorded)!r} already holds other rates for this "
                "regime's runs; use that file, or another --out"
            )
        return
    recorded.parent.mkdir(parents=True, exist_ok=True)
    recorded.write_bytes(given.read_bytes())


@cli_main
def main(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "python -m train.evidence",
    run_fn: Callable[..., dict] | None = None,
) -> int:
    parser, args = _parse(argv, prog)
    command = command_line(prog, argv)
    specs = plan(args)  # every run's config is validated before the first one starts
    if args.part == "report":
        from hacbo_jax.experiments.evidence.report import write_evidence_report

        path = write_evidence_report(args.out, args.report_dir, command=command)
        print(f"wrote {path}")
        return 0
    if args.lrs and args.part in ("budget", "ablations", "lora"):
        _record_given_rates(Path(args.lrs), args.regime_out / "lrs.yaml")
    enable_compilation_cache(args.out / "jax_cache")
    started = time.perf_counter()
    k, n = parse_shard(args.shard)
    if args.part == "budget" and k == 0:
        ensure_base_eval(specs[0].config, args.regime_out / "budget")
    # This shard's own runs first (every N-th), then any other shard's run that no process has
    # started: shards that run out of work early help the others instead of waiting for them.
    order = [*specs[k::n], *(spec for i, spec in enumerate(specs) if i % n != k)]
    counts = execute_runs(order, run_fn=run_fn, lock=n > 1)
    elapsed = time.perf_counter() - started
    part_name = args.part if args.regime == "clean" else f"{args.regime}/{args.part}"
    _record_part_time(args.out, part_name, command, elapsed, counts)
    if args.part == "tune" and all((s.run_dir / "summary.json").is_file() for s in specs):
        lrs = write_tuned_lrs(specs, args.regime_out / "lrs.yaml", command)
        evidence_methods = (*BUDGET_METHODS, *ABLATION_METHODS, *LORA_BUDGET_METHODS)
        fallback = {m: lrs[b] for m, b in LR_FALLBACK.items() if b in lrs and m in evidence_methods}
        print(
            f"tuned rates: {lrs} (and {fallback} by fallback); written to "
            f"{args.regime_out / 'lrs.yaml'}"
        )
    executed, skipped, failed = counts
    print(
        f"{args.part}: {executed} runs executed, {skipped} skipped, {failed} failed, "
        f"{elapsed:.0f} s",
        file=sys.stderr if failed else sys.stdout,
    )
    return 1 if failed else 0
