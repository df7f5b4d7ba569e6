"""hacbo_jax.experiments.evidence.run (the plans of its three parts, the tuned-rate pick, the CLI's
errors, resumability) and evidence_report (summary.json from run directories, hand-checked),
plus the statistics it adds to hacbo_jax.experiments.stats."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from hacbo_jax.experiments.evidence import run as evidence
from hacbo_jax.trainer.config import save_config
from hacbo_jax.experiments.evidence.report import (
    build_summary,
    evidence_span,
    write_evidence_report,
)
from hacbo_jax.experiments.stats import (
    adjust_p_values,
    mean_ci,
    paired_effect_size,
    paired_power,
    paired_ttest,
    seeds_for_power,
)
from support.checkpoints import make_tiny_checkpoint

# ---- statistics -----------------------------------------------------------------------------


def test_benjamini_hochberg_by_hand_and_nan_kept():
    # sorted 0.01, 0.03, 0.04 (m = 3): 0.03, 0.045 -> min(0.045, 0.04) = 0.04, 0.04
    adjusted = adjust_p_values([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.04, 0.04])
    assert math.isnan(adjusted[3])


def test_paired_interval_is_scipys_and_the_textbook_formula():
    a, b = [57.0, 55.5, 60.0, 58.5, 54.0], [55.0, 55.5, 56.0, 57.0, 52.5]
    test = paired_ttest(a, b)
    by_hand = mean_ci(np.subtract(a, b))
    assert (test.ci_low, test.ci_high) == pytest.approx((by_hand.low, by_hand.high), rel=1e-12)


def test_effect_size_by_hand_and_its_interval_inverts_the_noncentral_t():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]
    effect = paired_effect_size(a, b)
    assert effect.d == pytest.approx(2.5 / np.std([1, 2, 3, 4], ddof=1))  # 1.9365
    t_obs, df = effect.d * 2.0, 3
    assert sps.nct.cdf(t_obs, df, effect.low * 2.0) == pytest.approx(0.975, abs=1e-9)
    assert sps.nct.cdf(t_obs, df, effect.high * 2.0) == pytest.approx(0.025, abs=1e-9)
    assert effect.low < effect.d < effect.high
    # large n: close to the normal approximation d +- 1.96 sqrt(1/n + d^2 / 2n)
    rng = np.random.default_rng(0)
    diffs = rng.normal(0.5, 1.0, 400)
    big = paired_effect_size(diffs, np.zeros(400))
    half = 1.96 * math.sqrt(1 / 400 + big.d**2 / 800)
    assert big.low == pytest.approx(big.d - half, abs=0.01)
    assert big.high == pytest.approx(big.d + half, abs=0.01)
    assert math.isnan(paired_effect_size([1.0, 2.0], [0.0, 1.0]).d)  # equal differences


def test_seeds_for_power_matches_textbook_sample_sizes():
    # G*Power, one-sample / paired t, two-sided alpha 0.05, power 0.8
    assert seeds_for_power(0.5) == 34
    assert seeds_for_power(0.8) == 15
    assert seeds_for_power(-0.8) == 15
    assert paired_power(0.5, 34) >= 0.8 > paired_power(0.5, 33)
    assert seeds_for_power(0.0) is None and seeds_for_power(math.nan) is None


# ---- plans ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def test_tuning_runs_on_other_problems_at_each_methods_grid(model_dir, tmp_path):
    specs = evidence.tune_specs(evidence.DEFAULT_CONFIG, tmp_path, [f"model.path={model_dir}"])
    assert len(specs) == sum(len(evidence.TUNE_GRIDS[m]) for m in evidence.TUNED_METHODS)
    for spec in specs:
        assert spec.config.data.synthetic.seed == 1  # not the evaluation problems (seed 0)
    grids = {
        m: sorted(s.config.optim.lr for s in specs if s.method == m) for m in evidence.TUNED_METHODS
    }
    assert grids == {m: sorted(evidence.TUNE_GRIDS[m]) for m in evidence.TUNED_METHODS}
    # each shard of two gets every method: the plan goes candidate by candidate
    for k in (0, 1):
        assert {s.method for s in specs[k::2]} == set(evidence.TUNED_METHODS)
    with pytest.raises(ValueError, match="no learning-rate grid for \\['adamw'\\]"):
        evidence.tune_specs(
            evidence.DEFAULT_CONFIG, tmp_path, methods=("adamw", "blac"), grids={"blac": (1e-3,)}
        )


def test_pick_best_breaks_ties_by_loss_then_rate():
    trials = [
        {"lr": 1e-3, "exact_match": 0.6, "final_train_loss": 0.3},
        {"lr": 2e-3, "exact_match": 0.6, "final_train_loss": 0.2},
        {"lr": 5e-4, "exact_match": 0.5, "final_train_loss": 0.1},
        {"lr": 4e-3, "exact_match": 0.6, "final_train_loss": math.nan},
    ]
    assert evidence.pick_best(trials)["lr"] == 2e-3
    trials[1]["final_train_loss"] = 0.3
    assert evidence.pick_best(trials)["lr"] == 1e-3
    with pytest.raises(ValueError):
        evidence.pick_best([])


def test_budget_plan_uses_tuned_rates_and_evaluates_along_the_run(model_dir, tmp_path):
    lrs = {"adamw": 1e-3, "blac": 2e-3, "hacbo": 5e-4, "adagradselect": 4e-3}
    specs = evidence.budget_specs(
        evidence.DEFAULT_CONFIG, tmp_path, lrs, [0, 1], 25, [f"model.path={model_dir}"]
    )
    assert len(specs) == 2 * len(evidence.BUDGET_METHODS)
    rate = {s.method: s.config.optim.lr for s in specs}
    assert rate["hacbo_gamma0"] == 5e-4 == rate["hacbo"]
    assert rate["blac"] == 2e-3
    assert all(s.config.eval.every == 25 and not s.config.eval.at_start for s in specs)
    with pytest.raises(ValueError, match="blac"):
        evidence.budget_specs(
            evidence.DEFAULT_CONFIG, tmp_path, {"adamw": 1e-3, "hacbo": 1e-3}, [0], 25
        )


def _write_lrs(path: Path, lrs: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"lr": lrs}))  # JSON is YAML


def test_the_conflict_regime_runs_apart_with_wrong_answers_and_its_own_rates(model_dir, tmp_path):
    """--regime conflict: the conflict config (half the answers wrong, two epochs), runs and
    tuned rates under OUT/conflict/; the ablations and LoRA parts are budget runs of their
    methods at the tuned (or fallback) rate; the stability grid refuses the conflict regime."""
    common = ["--out", str(tmp_path), f"model.path={model_dir}"]
    tune = evidence.plan(evidence._parse(["tune", "--regime", "conflict", *common], "p")[1])
    assert {s.method for s in tune} == set(evidence.TUNED_METHODS)
    assert all(s.run_dir.is_relative_to(tmp_path / "conflict" / "tune") for s in tune)
    assert all(s.config.data.wrong_answers == 0.5 and s.config.optim.epochs == 2 for s in tune)
    with pytest.raises(ValueError, match="conflict/lrs.yaml"):
        evidence.plan(evidence._parse(["ablations", "--regime", "conflict", *common], "p")[1])
    _write_lrs(tmp_path / "conflict" / "lrs.yaml", {"hacbo": 2e-3, "lora": 5e-3})
    ablations = evidence.plan(
        evidence._parse(["ablations", "--regime", "conflict", "--seeds", "2", *common], "p")[1]
    )
    assert sorted({s.method for s in ablations}) == sorted(evidence.ABLATION_METHODS)
    assert len(ablations) == 2 * len(evidence.ABLATION_METHODS)
    assert all(s.config.optim.lr == 2e-3 for s in ablations)
    assert all(s.run_dir.parent.parent == tmp_path / "conflict" / "ablations" for s in ablations)
    no_refresh = [s for s in ablations if s.method == "hacbo_no_refresh"]
    assert all(s.config.microdev.refresh_every == 0 for s in no_refresh)
    lora = evidence.plan(evidence._parse(["lora", "--regime", "conflict", *common], "p")[1])
    ranks = {s.method: (s.config.lora.rank, s.config.optim.lr) for s in lora}
    assert ranks == {"lora": (8, 5e-3), "lora_r64": (64, 5e-3)}
    assert len(lora) == 5 * 2
    # the clean regime keeps its runs directly under OUT
    _write_lrs(
        tmp_path / "lrs.yaml", {m: 1e-3 for m in ("adamw", "blac", "hacbo", "adagradselect")}
    )
    clean = evidence.plan(evidence._parse(["budget", "--seeds", "1", *common], "p")[1])
    assert all(s.run_dir.parent.parent == tmp_path / "budget" for s in clean)
    assert all(s.config.data.wrong_answers == 0 for s in clean)
    with pytest.raises(ValueError, match="clean regime only"):
        evidence._parse(["stability", "--regime", "conflict", *common], "p")


def test_stability_plan_budget_on_off_and_adamw_once(model_dir, tmp_path):
    specs = evidence.stability_specs(
        evidence.DEFAULT_CONFIG, tmp_path, [0, 1, 2], [f"model.path={model_dir}"]
    )
    n_lr, n_ctrl = len(evidence.STABILITY_LRS), len(evidence.STABILITY_METHODS) - 1
    assert len(specs) == n_lr * 3 * (1 + 2 * n_ctrl)
    for spec in specs:
        budget = spec.run_dir.parent.parent.name
        hacbo_budget = spec.config.controller.hacbo.update_norm_budget
        blac_budget = spec.config.controller.blac.update_norm_budget
        if spec.method == "adamw":
            assert budget == "budget_none"
        elif budget == "budget_on":
            assert hacbo_budget == blac_budget == 1.0
        else:
            assert budget == "budget_off" and hacbo_budget is None and blac_budget is None
    uniform = [s for s in specs if s.method == "hacbo_share_uniform"]
    assert all(s.config.controller.hacbo.probation_share == "uniform" for s in uniform)
    # budget on before off; within each, the largest rate first (a stopped part has them)
    order = [(s.run_dir.parent.parent.name != "budget_off", s.config.optim.lr) for s in specs]
    assert order == sorted(order, reverse=True)


def test_cli_bad_input_exits_2_before_any_run(tmp_path, capsys):
    def never(*a, **k):
        raise AssertionError("no run may start")

    assert evidence.main(["budget", "--out", str(tmp_path)], run_fn=never) == 2
    assert "lrs.yaml" in capsys.readouterr().err
    assert evidence.main(["stability", "--out", str(tmp_path), "--seeds", "0"], run_fn=never) == 2
    assert "--seeds 0" in capsys.readouterr().err
    assert evidence.main(["tune", "--out", str(tmp_path), "optim.batch_size=0"], run_fn=never) == 2
    assert "optim.batch_size" in capsys.readouterr().err
    assert evidence.main(["stability", "--out", str(tmp_path), "--shard", "2/2"], run_fn=never) == 2
    assert "--shard '2/2'" in capsys.readouterr().err


# ---- a whole (fake) evidence: resumable parts, summary.json by hand ---------------------------

FAKE_EM = {"adamw": [0.70, 0.72, 0.68], "hacbo": [0.71, 0.75, 0.69], "blac": [0.60, 0.62, 0.61]}


class FakeRun:
    """Writes the files finetune.run writes, with fixed numbers; records its calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, cfg, *, resume, show_progress):
        self.calls.append((cfg.method, cfg.seed, float(cfg.optim.lr)))
        run_dir = Path(cfg.output_dir)
        save_config(cfg, run_dir / "config.yaml")
        in_stability = "stability" in run_dir.parts
        diverged = in_stability and cfg.optim.lr > 1e-2 and cfg.method == "adamw"
        em = FAKE_EM.get(cfg.method, [0.5] * 3)[cfg.seed % 3]
        if "tune" in run_dir.parts:  # the best rate: the middle of each method's grid
            em = 0.8 if cfg.optim.lr == evidence.TUNE_GRIDS[cfg.method][1] else 0.4
        probation = [cfg.seed == 0, False]  # the tiny checkpoint has 2 layers

        def controller(step):
            if cfg.controller.kind == "none":
                return None
            if cfg.controller.kind != "hacbo":
                return {"kind": cfg.controller.kind, "frozen": probation}
            return {
                "kind": "hacbo",
                "probation": probation,
                "count": step,
                # block 0 in probation for every update at seed 0
                "probation_steps": [step * (cfg.seed == 0), 0],
                # at steps 5 and 10 (interval 5 of the stability runs): two measurements
                **({"true_cosine": [0.1, 0.3], "cosine": [0.05, 0.2]} if step == 5 else {}),
                **({"true_cosine": [0.2, -0.1], "cosine": [0.1, -0.08]} if step == 10 else {}),
            }

        rows = [
            {
                "step": s,
                "loss": (math.nan if diverged and s == 10 else 2.0 / s),
                "controller": controller(s),
            }
            for s in (5, 10)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        evals = [
            {
                "step": 5,
                "exact_match": em - 0.05,
                "n": 200,
                "train_time_s": 5.0 + (cfg.method == "hacbo"),
                "train_cpu_s": 5.0 + (cfg.method == "hacbo"),
            },
            {
                "step": 10,
                "exact_match": em,
                "n": 200,
                "train_time_s": 10.0 + 2 * (cfg.method == "hacbo"),
                "train_cpu_s": 10.0 + 2 * (cfg.method == "hacbo"),
            },
        ]
        (run_dir / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
        summary = {
            "method": cfg.method,
            "seed": cfg.seed,
            "steps": 10,
            "final_exact_match": em,
            "final_train_loss": math.nan if diverged else 0.2,
            "diverged": diverged,
            "wall_time_s": 20.0,
            "train_time_s": evals[-1]["train_time_s"],
            "train_cpu_s": evals[-1]["train_cpu_s"],
            "microdev_refreshes": 0 if cfg.microdev.refresh_every == 0 else 2,
            "microdev_replaced": 0 if cfg.microdev.refresh_every == 0 else 7,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return summary


@pytest.mark.slow
def test_parts_resume_and_summary_by_hand(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "ev"
    common = ["--out", str(out), f"model.path={model_dir}", "eval.limit=4", "eval.max_new_tokens=2"]
    fake = FakeRun()
    assert evidence.main(["tune", *common], run_fn=fake) == 0
    assert len(fake.calls) == sum(len(evidence.TUNE_GRIDS[m]) for m in evidence.TUNED_METHODS)
    lrs = evidence.load_lrs(out / "lrs.yaml")
    assert lrs == {m: evidence.TUNE_GRIDS[m][1] for m in evidence.TUNED_METHODS}
    fake.calls.clear()
    assert evidence.main(["tune", *common], run_fn=fake) == 0
    assert fake.calls == []  # finished runs are not run again

    monkeypatch.setattr(evidence, "BUDGET_METHODS", ("adamw", "blac", "hacbo"))
    monkeypatch.setattr(evidence, "STABILITY_METHODS", ("adamw", "hacbo"))
    monkeypatch.setattr(evidence, "STABILITY_LRS", (1e-3, 6.4e-2))
    assert evidence.main(["budget", "--seeds", "3", *common], run_fn=fake) == 0
    assert evidence.main(["ablations", "--seeds", "3", *common], run_fn=fake) == 0
    for shard in ("0/2", "1/2"):  # two processes side by side split the part between them
        assert (
            evidence.main(["stability", "--seeds", "2", "--shard", shard, *common], run_fn=fake)
            == 0
        )
    fake.calls.clear()
    assert evidence.main(["stability", "--seeds", "2", *common], run_fn=fake) == 0
    assert fake.calls == []  # the two shards covered every run
    assert (out / "budget" / "base_model_eval.json").is_file()

    summary = build_summary(out)
    base = 100 * json.loads((out / "budget" / "base_model_eval.json").read_text())["exact_match"]
    assert summary["base_exact_match"] == pytest.approx(base)
    hacbo = summary["methods"]["hacbo"]
    assert hacbo["final_exact_match"] == pytest.approx([71.0, 75.0, 69.0])
    ci = mean_ci([71.0, 75.0, 69.0])
    assert hacbo["mean"] == pytest.approx(ci.mean) and hacbo["ci95"] == pytest.approx(
        [ci.low, ci.high]
    )
    assert hacbo["tuned_lr"] == evidence.TUNE_GRIDS["hacbo"][1]
    pairs = {(c["a"], c["b"]): c for c in summary["comparisons"]}
    assert set(pairs) == {("adamw", "blac"), ("adamw", "hacbo"), ("blac", "hacbo")}
    c = pairs["adamw", "hacbo"]
    test = sps.ttest_rel([70.0, 72.0, 68.0], [71.0, 75.0, 69.0])
    assert c["p"] == pytest.approx(test.pvalue) and c["diff"] == pytest.approx(-5 / 3)
    ps = [pairs[k]["p"] for k in sorted(pairs)]
    assert [pairs[k]["p_adjusted"] for k in sorted(pairs)] == pytest.approx(
        list(sps.false_discovery_control(ps))
    )
    # equal training time: AdamW's median run time is 10 s; hacbo's 5-step eval is at 6 s and
    # its final one at 12 s, so hacbo is read at step 5 (em - 0.05)
    eq = summary["equal_time"]
    assert eq["budget_s"] == 10.0
    assert eq["methods"]["hacbo"]["exact_match"] == pytest.approx([66.0, 70.0, 64.0])
    assert eq["methods"]["adamw"]["exact_match"] == pytest.approx([70.0, 72.0, 68.0])
    cells = {(s["method"], s["lr"], s["budget_label"]): s for s in summary["stability"]}
    assert set(cells) == {
        ("adamw", 1e-3, "none"),
        ("adamw", 6.4e-2, "none"),
        ("hacbo", 1e-3, "on"),
        ("hacbo", 6.4e-2, "on"),
        ("hacbo", 1e-3, "off"),
        ("hacbo", 6.4e-2, "off"),
    }
    assert (
        cells["adamw", 6.4e-2, "none"]["diverged"] == 2
        and cells["adamw", 1e-3, "none"]["diverged"] == 0
    )
    assert (
        cells["adamw", 1e-3, "none"]["budget"] is None
        and cells["hacbo", 1e-3, "on"]["budget"] == 1.0
    )
    # block 0 of 2 (equal sizes) in probation all the time at seed 0 of 2: 1/2 x 1/2
    assert cells["hacbo", 1e-3, "on"]["controlled_fraction"] == pytest.approx(0.25)

    # the regimes: only the clean one ran; its methods are the top level's, with the fraction
    assert set(summary["regimes"]) == {"clean"}
    assert summary["regimes"]["clean"]["methods"] == summary["methods"]
    assert hacbo["controlled_fraction"] == pytest.approx(1 / 3 * 0.5)  # seed 0 of 3, block 0
    assert summary["methods"]["adamw"]["controlled_fraction"] is None
    ablations = summary["ablations"]
    assert set(ablations) == set(evidence.ABLATION_METHODS)
    assert ablations["hacbo_no_refresh"]["clean"]["microdev_refreshes"] == 0
    assert ablations["hacbo_no_curvature"]["clean"]["microdev_replaced"] == 7
    assert ablations["hacbo_no_probation"]["clean"]["final_exact_match"] == [50.0] * 3
    # sign-cosine pairs, each measurement once: the tuning (3) and budget (3) HACBO runs measure
    # at count 10 only (interval 10), the ablations' 9 too, the 8 stability runs at 5 and 10
    sign = summary["sign_cosine"]
    assert sign["n"] == 2 * (3 + 3 + 9 + 8 * 2)
    assert sorted(map(tuple, sign["pairs"]))[:1] == [(-0.1, -0.08)]

    report = write_evidence_report(
        out, tmp_path / "results", command="python -m train.evidence report"
    )
    written = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert set(written) >= {"base_exact_match", "methods", "comparisons", "stability"}
    text = report.read_text()
    for name in (
        "final_exact_match.png",
        "exact_match_over_budget.png",
        "training_loss.png",
        "stability.png",
    ):
        assert (tmp_path / "results" / name).is_file() and f"({name})" in text
    assert "| adamw | none |" in text and "no controller" in text


def test_a_shard_runs_its_own_runs_first_then_takes_the_others_not_started(model_dir, tmp_path):
    out = tmp_path / "ev"
    common = ["--out", str(out), f"model.path={model_dir}", "eval.limit=4", "eval.max_new_tokens=2"]
    specs = evidence.tune_specs(evidence.DEFAULT_CONFIG, out, [f"model.path={model_dir}"])
    fake = FakeRun()
    assert evidence.main(["tune", "--shard", "1/3", *common], run_fn=fake) == 0
    order = [*specs[1::3], *(s for i, s in enumerate(specs) if i % 3 != 1)]
    assert fake.calls == [(s.method, s.seed, float(s.config.optim.lr)) for s in order]
    fake.calls.clear()
    assert evidence.main(["tune", "--shard", "0/3", *common], run_fn=fake) == 0
    assert fake.calls == []  # nothing left: the first shard took every run


def test_evidence_span_runs_from_the_first_start_to_the_last_finish():
    # two shards side by side, then one part later: start = finish - elapsed
    timing = [
        {"part": "tune", "elapsed_s": 600.0, "finished_utc": "2026-11-29 09:10:00"},
        {"part": "tune", "elapsed_s": 500.0, "finished_utc": "2026-11-29 09:09:00"},
        {"part": "budget", "elapsed_s": 1200.0, "finished_utc": "2026-11-29 09:30:30"},
    ]
    span = evidence_span(timing)
    assert span["start_utc"] == "2026-11-29 09:00:00"
    assert span["end_utc"] == "2026-11-29 09:30:30"
    assert span["elapsed_s"] == 1830.0
    assert span["parts"] == {"tune": 600.0, "budget": 1200.0}  # a part: its slowest shard
    assert evidence_span([]) is None


def test_sign_cosine_summary_by_hand():
    """Pairs on sign = 0.01 + 0.5 * true exactly: the line is found, theta_neg = 0.04 maps to
    the true cosine (0.04 - 0.01) / 0.5 = 0.06, and the Gaussian counterpart is
    sin(pi/2 * 0.04)."""
    from hacbo_jax.experiments.evidence.report import gaussian_sign_cosine, sign_cosine_summary

    true = [-0.2, 0.0, 0.1, 0.3, 0.5]
    pairs = [[t, 0.01 + 0.5 * t] for t in true]
    found = sign_cosine_summary(pairs, 0.04)
    assert found["linear_fit"]["slope"] == pytest.approx(0.5)
    assert found["linear_fit"]["intercept"] == pytest.approx(0.01)
    assert found["theta_neg_true"] == pytest.approx(0.06)
    assert found["theta_neg_true_gaussian"] == pytest.approx(math.sin(math.pi * 0.02))
    assert gaussian_sign_cosine(1.0) == pytest.approx(1.0)
    assert gaussian_sign_cosine(0.5) == pytest.approx(1 / 3)  # (2/pi) * pi/6
    # on the Gaussian relation itself the scale k is 1
    on_curve = [[t, float(gaussian_sign_cosine(t))] for t in true]
    assert sign_cosine_summary(on_curve, 0.04)["gaussian_fit_k"] == pytest.approx(1.0)
    assert sign_cosine_summary(pairs[:2], 0.04) is None


def test_a_part_run_with_given_rates_records_them_for_its_regime(model_dir, tmp_path, capsys):
    """--lrs FILE: the rates are copied to OUT/<regime>/lrs.yaml (where the report reads them);
    a later part with other rates for the same regime is refused before any run."""
    given = tmp_path / "rates.yaml"
    _write_lrs(given, {"adamw": 1e-3, "blac": 1e-3, "hacbo": 2e-3, "adagradselect": 1e-3})
    out = tmp_path / "ev"
    common = ["--out", str(out), f"model.path={model_dir}", "--regime", "conflict", "--seeds", "1"]
    common += ["eval.limit=4", "eval.max_new_tokens=2"]
    fake = FakeRun()
    assert evidence.main(["budget", "--lrs", str(given), *common], run_fn=fake) == 0
    assert evidence.load_lrs(out / "conflict" / "lrs.yaml") == evidence.load_lrs(given)
    assert {rate for _, _, rate in fake.calls} == {1e-3, 2e-3}
    # a report of the conflict regime alone: its table, comparisons and figures, no clean ones
    report = write_evidence_report(out, tmp_path / "results", command="report")
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["methods"] == {} and set(summary["regimes"]) == {"conflict"}
    conflict = summary["regimes"]["conflict"]
    assert set(conflict["methods"]) == set(evidence.BUDGET_METHODS)
    assert conflict["methods"]["hacbo"]["tuned_lr"] == 2e-3
    assert summary["base_exact_match"] is not None
    text = report.read_text()
    assert "## Regime `conflict`" in text and "## Final exact match" not in text
    assert (tmp_path / "results" / "exact_match_over_budget_conflict.png").is_file()
    assert (tmp_path / "results" / "controlled_fraction_conflict.png").is_file()
    other = tmp_path / "other.yaml"
    _write_lrs(other, {"adamw": 5e-4, "blac": 1e-3, "hacbo": 2e-3, "adagradselect": 1e-3})

    def never(*a, **k):
        raise AssertionError("no run may start")

    assert evidence.main(["ablations", "--lrs", str(other), *common], run_fn=never) == 2
    assert "already holds other rates" in capsys.readouterr().err
