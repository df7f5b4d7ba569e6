"""Every tool writes only its own output, refuses a non-empty target without ``--overwrite``,
says where it wrote, and turns bad arguments into ``PROG: error: ...`` + exit 2 (no traceback)
through the one helper of :mod:`hacbo_jax.trainer.cli_common`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from hacbo_jax.trainer.config.load import CONFIGS_DIR

SHIPPED_LRS = CONFIGS_DIR / "lrs" / "compare_cpu.yaml"
UNWRITABLE = "/proc/hacbo_no_such_dir/out"  # /proc refuses new entries, even for root


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expect_usage_error(status, capsys, prog, *needles):
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith(f"{prog}: error: "), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# ---- the shared helper ----


def test_cli_errors_helper_is_shared_and_one_line(capsys):
    from hacbo_jax.trainer.cli_common import cli_errors, cli_main

    @cli_main
    def main(argv=None, *, prog="tool"):
        open(argv[0])  # FileNotFoundError
        return 0

    _expect_usage_error(main(["/no/such/file"]), capsys, "tool", "/no/such/file", "No such file")
    _expect_usage_error(main(["/no/such"], prog="other"), capsys, "other")
    with cli_errors("ctx") as errors:
        raise ValueError("bad number")
    assert errors.status == 2
    _expect_usage_error(errors.status, capsys, "ctx", "bad number")
    with pytest.raises(KeyError):  # a bug is not an input error: its traceback stays
        with cli_errors("ctx"):
            raise KeyError("bug")


# ---- 1. the sweep writes its lrs file under its own output, never the shipped one ----


@pytest.fixture
def shipped_lrs_guard():
    """Puts the shipped file back even if a regression rewrites it (the failure still shows)."""
    saved = SHIPPED_LRS.read_bytes()
    yield
    if SHIPPED_LRS.read_bytes() != saved:
        SHIPPED_LRS.write_bytes(saved)


def _fake_run(cfg, *, show_progress=False):
    return {"final_exact_match": 0.5, "final_train_loss": 1.0, "diverged": False}


def test_sweep_default_output_is_not_the_shipped_lrs_file(
    tmp_path, monkeypatch, capsys, shipped_lrs_guard
):
    from hacbo_jax.experiments import sweep
    from hacbo_jax.experiments.compare import base
    from hacbo_jax.experiments.methods import load_lrs

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "_default_run_fn", _fake_run)
    monkeypatch.setattr(base, "enable_compilation_cache", lambda path: None)
    before = _digest(SHIPPED_LRS)
    assert sweep.main(["--config", "compare_cpu", "--methods", "adamw", "--trials", "1"]) == 0
    assert _digest(SHIPPED_LRS) == before
    written = tmp_path / "runs" / "sweep" / "compare_cpu" / "lrs.yaml"
    assert set(load_lrs(written)) == {"adamw"}
    assert f"wrote {Path('runs/sweep/compare_cpu/lrs.yaml')}" in capsys.readouterr().out
    assert "adamw" in load_lrs(SHIPPED_LRS)  # still readable by compare --lrs


def test_sweep_refuses_to_write_into_the_shipped_configs(
    tmp_path, monkeypatch, capsys, shipped_lrs_guard
):
    from hacbo_jax.experiments import sweep

    monkeypatch.setattr(sweep, "_default_run_fn", _fake_run)
    before = _digest(SHIPPED_LRS)
    argv = ["--config", "compare_cpu", "--methods", "adamw", "--trials", "1",
            "--out", str(tmp_path / "o"), "--write", str(SHIPPED_LRS)]  # fmt: skip
    _expect_usage_error(sweep.main(argv), capsys, "python -m train.sweep", "shipped", "--overwrite")
    assert _digest(SHIPPED_LRS) == before


# ---- 2. --overwrite everywhere; a non-empty target is refused before any work ----


def _non_empty(tmp_path: Path) -> Path:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "earlier.txt").write_text("an earlier output")
    return target


def test_export_refuses_a_non_empty_out(tmp_path, monkeypatch, capsys):
    from hacbo_jax.trainer import export

    calls = []
    (tmp_path / "config.yaml").write_text("{}")  # a run directory, as far as main checks
    monkeypatch.setattr(
        export, "export_checkpoint", lambda run, step, out: calls.append(out) or Path(out)
    )
    taken = _non_empty(tmp_path)
    status = export.main([str(tmp_path), "--out", str(taken)])
    _expect_usage_error(status, capsys, "python -m train.export_checkpoint", "not empty", "--overwrite")
    assert calls == []
    assert export.main([str(tmp_path), "--out", str(taken), "--overwrite"]) == 0
    assert f"wrote {taken}" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    status = export.main([str(tmp_path), "--out", str(tmp_path / "file")])
    _expect_usage_error(status, capsys, "python -m train.export_checkpoint", "is a file")


@pytest.fixture
def one_run(tmp_path):
    from tests.experiments.test_report import _make_run  # noqa: F401  (the report tests' layout)

    return _make_run(tmp_path / "runs", "adamw", method="adamw", seed=0)


def test_report_out_rules(one_run, tmp_path, capsys):
    from hacbo_jax.experiments import report as R

    prog = "python -m train.report"
    taken = _non_empty(tmp_path)
    _expect_usage_error(R.main([str(one_run), "--out", str(taken)]), capsys, prog, "not empty")
    assert sorted(p.name for p in taken.iterdir()) == ["earlier.txt"]
    assert R.main([str(one_run), "--out", str(taken), "--overwrite"]) == 0
    assert (taken / "report.md").is_file() and f"wrote {taken / 'report.md'}" in capsys.readouterr().out
    (tmp_path / "file.md").write_text("x")
    _expect_usage_error(R.main([str(one_run), "--out", str(tmp_path / "file.md")]), capsys, prog, "is a file")
    # default target: the run directory itself; a second report there needs --overwrite
    assert R.main([str(one_run)]) == 0
    _expect_usage_error(R.main([str(one_run)]), capsys, prog, "report.md", "--overwrite")
    assert R.main([str(one_run), "--overwrite"]) == 0


def test_curvature_refuses_an_earlier_probe(tmp_path, capsys):
    from hacbo_jax.experiments.curvature import run as script

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "curvature.csv").write_text("earlier")
    status = script.main([str(tmp_path / "model"), "--out", str(out), "--rows", "0"])
    _expect_usage_error(status, capsys, "hacbo-probe-curvature")  # argument checks come first
    status = script.main([str(tmp_path / "model"), "--out", str(out)])
    _expect_usage_error(status, capsys, "hacbo-probe-curvature", "curvature.csv", "--overwrite")
    # another prefix shares the directory
    status = script.main([str(tmp_path / "model"), "--out", str(out), "--prefix", "other",
                          "--hacbo-state", str(tmp_path / "missing.npz")])  # fmt: skip
    _expect_usage_error(status, capsys, "hacbo-probe-curvature", "missing.npz")


def test_lrwd_refuses_a_non_empty_out(tmp_path, capsys):
    from hacbo_jax.experiments.lrwd import run as script

    taken = _non_empty(tmp_path)
    _expect_usage_error(script.main(["--out", str(taken)]), capsys, "hacbo-sweep-lrwd", "not empty")
    (tmp_path / "f").write_text("x")
    _expect_usage_error(script.main(["--out", str(tmp_path / "f")]), capsys, "hacbo-sweep-lrwd", "is a file")


# ---- 3. a text file given to the curvature probe ----


@pytest.mark.parametrize("name", ["state.npz", "state.npy", "state.txt"])
def test_curvature_names_what_a_text_state_file_is(tmp_path, capsys, name):
    from hacbo_jax.experiments.curvature import run as script

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    state = tmp_path / name
    state.write_text("curvature = 1, 2, 3\n")
    argv = [str(tmp_path / "model"), "--out", str(tmp_path / "o"), "--hacbo-state", str(state)]
    err = _expect_usage_error(script.main(argv), capsys, "hacbo-probe-curvature", "text file")
    assert "pickle" not in err and ".npz" in err


def test_curvature_names_a_file_given_as_the_model(tmp_path, capsys):
    from hacbo_jax.experiments.curvature import run as script

    (tmp_path / "model.txt").write_text("hello")
    argv = [str(tmp_path / "model.txt"), "--out", str(tmp_path / "o")]
    _expect_usage_error(script.main(argv), capsys, "hacbo-probe-curvature", "is a file", "config.json")


# ---- 4. every entry point: bad arguments -> PROG: error: ..., exit 2, no traceback ----


def _setup(tmp: Path) -> None:
    (tmp / "a_file").write_text("not a directory")
    (tmp / "model").mkdir()
    (tmp / "model" / "config.json").write_text("{}")


def _cases(tmp: Path):
    model = tmp / "model"
    f, missing = str(tmp / "a_file"), str(tmp / "missing")
    return {
        "export-missing-run": ("trainer.export", [missing, "--out", str(tmp / "e")]),
        "export-run-is-file": ("trainer.export", [f, "--out", str(tmp / "e")]),
        "export-out-unwritable": ("trainer.export", [str(tmp), "--out", UNWRITABLE]),
        "report-missing-run": ("report", [missing]),
        "report-run-is-file": ("report", [f]),
        "report-out-unwritable": ("report", [str(tmp / "runs" / "adamw"), "--out", UNWRITABLE]),
        "curv-missing-model": ("curvature", [missing, "--out", str(tmp / "o")]),
        "curv-out-is-file": ("curvature", [str(model), "--out", f]),
        "curv-out-unwritable": ("curvature", [str(model), "--out", UNWRITABLE]),
        "curv-data-is-text": ("curvature", [str(model), "--out", str(tmp / "o"), "--data", f]),
        "curv-state-is-dir": ("curvature", [str(model), "--out", str(tmp / "o"), "--hacbo-state", str(tmp / "runs")]),
        "lrwd-bad-number": ("lrwd", ["--out", str(tmp / "l"), "--steps", "0"]),
        "lrwd-out-unwritable": ("lrwd", ["--out", UNWRITABLE]),
        "lrwd-tokenizer-is-file": ("lrwd", ["--out", str(tmp / "l"), "--tokenizer", f]),
        "sweep-missing-config": ("sweep", ["--config", missing]),
        "sweep-bad-range": ("sweep", ["--config", "compare_cpu", "--lo", "1", "--hi", "0.1"]),
        "sweep-write-unwritable": ("sweep", ["--config", "compare_cpu", "--out", str(tmp / "s"), "--write", UNWRITABLE + "/lrs.yaml"]),
        "sweep-out-is-file": ("sweep", ["--config", "compare_cpu", "--out", f]),
        "compare-missing-lrs": ("compare", ["--config", "compare_cpu", "--lrs", missing]),
        "compare-lrs-is-dir": ("compare", ["--config", "compare_cpu", "--lrs", str(tmp)]),
        "compare-bad-seeds": ("compare", ["--config", "compare_cpu", "--seeds", "0"]),
        "compare-report-only-out-is-file": ("compare", ["--config", "compare_cpu", "--report-only", "--out", f]),
        "evidence-bad-shard": ("evidence", ["tune", "--out", str(tmp / "ev"), "--shard", "3/2"]),
        "evidence-missing-config": ("evidence", ["tune", "--config", missing, "--out", str(tmp / "ev")]),
        "autolrs-missing-config": ("autolrs", ["--config", missing]),
    }


MODULES = {
    "trainer.export": ("hacbo_jax.trainer.export", "python -m train.export_checkpoint"),
    "report": ("hacbo_jax.experiments.report", "python -m train.report"),
    "curvature": ("hacbo_jax.experiments.curvature.run", "hacbo-probe-curvature"),
    "lrwd": ("hacbo_jax.experiments.lrwd.run", "hacbo-sweep-lrwd"),
    "sweep": ("hacbo_jax.experiments.sweep", "python -m train.sweep"),
    "compare": ("hacbo_jax.experiments.compare.run", "python -m train.compare"),
    "evidence": ("hacbo_jax.experiments.evidence.run", "python -m train.evidence"),
    "autolrs": ("hacbo_jax.experiments.autolrs.run", "hacbo-autolrs"),
}


@pytest.mark.parametrize("case", sorted(_cases(Path("/nonexistent"))))
def test_bad_arguments_exit_2_without_traceback(case, tmp_path, monkeypatch, capsys):
    import importlib

    from tests.experiments.test_report import _make_run

    monkeypatch.chdir(tmp_path)
    _make_run(tmp_path / "runs", "adamw", method="adamw", seed=0)
    _setup(tmp_path)
    tool, argv = _cases(tmp_path)[case]
    module, prog = MODULES[tool]
    main = importlib.import_module(module).main
    try:
        status = main(argv)
    except SystemExit as e:  # argparse-style (parser.error): the same message and status
        status = e.code
    _expect_usage_error(status, capsys, prog)
    assert not Path(UNWRITABLE).exists()


# ---- 5. odd usage found by the hostile-input harness (scripts/hostile_round.py) ----


_REPEATED = {
    "report": ("hacbo_jax.experiments.report", ["RUN", "--out", "a", "--out", "b"]),
    "export": ("hacbo_jax.trainer.export", ["RUN", "--step", "1", "--step", "2", "--out", "e"]),
    "sweep": ("hacbo_jax.experiments.sweep", ["--config", "tiny_cpu", "--trials", "1", "--trials", "2"]),
    "compare": ("hacbo_jax.experiments.compare.run", ["--config", "tiny_cpu", "--config=adamw"]),
    "evidence": ("hacbo_jax.experiments.evidence.run", ["tune", "--seeds", "1", "--seeds", "2"]),
    "curvature": ("hacbo_jax.experiments.curvature.run", ["M", "--out", "o", "--rows", "1", "--rows=2"]),
    "lrwd": ("hacbo_jax.experiments.lrwd.run", ["--out", "o", "--out", "p"]),
    "finetune": ("hacbo_jax.trainer.finetune", ["--config", "tiny_cpu", "--config", "adamw"]),
    "autolrs": ("hacbo_jax.experiments.autolrs.run", ["--config", "tiny_cpu", "--config", "adamw"]),
    "pretrain": ("train.pretrain_base", ["--steps", "1", "--steps", "2"]),
}


@pytest.mark.parametrize("tool", sorted(_REPEATED))
def test_an_option_given_twice_is_refused(tool, tmp_path, monkeypatch, capsys):
    """argparse keeps the last of a repeated option silently (``--out a --out b`` wrote to b);
    like a key given twice in the overrides, it is refused, naming the option."""
    import importlib

    monkeypatch.chdir(tmp_path)
    module, argv = _REPEATED[tool]
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "given twice" in err and "Traceback" not in err, err
    option = next(a for a in argv[::-1] if a.startswith("--")).split("=")[0]
    assert option in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_option_repeated_in_the_parser_helper_counts_equals_forms():
    from hacbo_jax.trainer.cli_common import ArgumentParser

    parser = ArgumentParser(prog="tool")
    parser.add_argument("--out")
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("rest", nargs="*")
    assert parser.parse_args(["--flag", "--flag", "--out", "x", "a=--out"]).out == "x"
    with pytest.raises(SystemExit):
        parser.parse_args(["--out=x", "--out", "y"])


RECORDED_LRS = """# an earlier sweep
lr: {adamw: 0.001, hacbo: 0.002}
trials:
  adamw: [{lr: 0.001, exact_match: 0.5, final_train_loss: 1.0, diverged: false}]
  hacbo: [{lr: 0.002, exact_match: 0.6, final_train_loss: 1.0, diverged: false}]
"""


def _sweep_argv(tmp_path, write, *methods):
    return ["--config", "tiny_cpu", "--methods", ",".join(methods), "--trials", "1",
            "--out", str(tmp_path / "o"), "--write", str(write)]  # fmt: skip


def test_sweep_never_drops_the_trials_recorded_in_an_existing_lrs_file(
    tmp_path, monkeypatch, capsys
):
    """--write into an lrs.yaml outside the package: other methods' entries are merged (kept);
    a method the file already records is refused before any trial (its recorded trials would
    be replaced) unless --overwrite is given."""
    import yaml

    from hacbo_jax.experiments import sweep
    from hacbo_jax.experiments.compare import base

    monkeypatch.setattr(sweep, "_default_run_fn", _fake_run)
    monkeypatch.setattr(base, "enable_compilation_cache", lambda path: None)
    write = tmp_path / "mine" / "lrs.yaml"
    write.parent.mkdir()
    write.write_text(RECORDED_LRS)
    before = _digest(write)
    status = sweep.main(_sweep_argv(tmp_path, write, "adamw"))
    _expect_usage_error(status, capsys, "python -m train.sweep", "adamw", str(write), "--overwrite")
    assert _digest(write) == before and not (tmp_path / "o" / "adamw").exists()
    assert sweep.main(_sweep_argv(tmp_path, write, "blac")) == 0
    data = yaml.safe_load(write.read_text())
    assert data["lr"]["adamw"] == 0.001 and data["lr"]["hacbo"] == 0.002 and "blac" in data["lr"]
    assert len(data["trials"]["adamw"]) == 1 and len(data["trials"]["hacbo"]) == 1
    assert sweep.main([*_sweep_argv(tmp_path / "again", write, "adamw"), "--overwrite"]) == 0
    assert yaml.safe_load(write.read_text())["lr"]["hacbo"] == 0.002


@pytest.mark.parametrize(
    "text", ["lr: [", "- 1\n- 2\n", "lr: 5\n", "lr: {adamw: fast}\n", "trials: {adamw: 3}\n"]
)
def test_sweep_refuses_an_unreadable_lrs_file_before_any_trial(text, tmp_path, monkeypatch, capsys):
    from hacbo_jax.experiments import sweep

    calls = []
    monkeypatch.setattr(sweep, "_default_run_fn", lambda cfg, **kw: calls.append(cfg))
    write = tmp_path / "lrs.yaml"
    write.write_text(text)
    status = sweep.main(_sweep_argv(tmp_path, write, "blac"))
    _expect_usage_error(status, capsys, "python -m train.sweep", str(write))
    assert calls == [] and write.read_text() == text


def test_report_names_a_run_file_that_is_not_utf8_or_not_an_object(one_run, tmp_path, capsys):
    from hacbo_jax.experiments import report as R

    prog = "python -m train.report"
    metrics = one_run / "metrics.jsonl"
    saved = metrics.read_bytes()
    metrics.write_bytes(saved + b"\x80\xff\n")
    _expect_usage_error(R.main([str(one_run), "--out", str(tmp_path / "a")]), capsys, prog, "metrics.jsonl")
    metrics.write_bytes(saved)
    (one_run / "summary.json").write_text("[1, 2]")
    _expect_usage_error(R.main([str(one_run), "--out", str(tmp_path / "b")]), capsys, prog, "summary.json")
    (one_run / "summary.json").write_bytes(b"{\"steps\": \"\xe9\"}")
    _expect_usage_error(R.main([str(one_run), "--out", str(tmp_path / "c")]), capsys, prog, "summary.json")


def test_evidence_report_of_no_runs_is_refused_writing_nothing(tmp_path, capsys):
    from hacbo_jax.experiments.evidence import run as E

    (tmp_path / "ev").mkdir()
    status = E.main(["report", "--out", str(tmp_path / "ev"), "--report-dir", str(tmp_path / "rep")])
    _expect_usage_error(status, capsys, "python -m train.evidence", str(tmp_path / "ev"))
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--steps", "0"], "--steps"),
        (["--vocab-size", "0"], "--vocab-size"),
        (["--num-heads", "3"], "--num-kv-heads"),
        (["--gsm8k-share", "2"], "--gsm8k-share"),
        (["--lr", "nan"], "--lr"),
        (["--task", "zzz"], "zzz"),
    ],
)
def test_pretrain_base_checks_its_arguments_before_any_work(argv, needle, tmp_path, monkeypatch, capsys):
    from hacbo_jax.trainer import pretrain_base
    from train.pretrain_base import main

    monkeypatch.setattr(pretrain_base, "main", lambda argv: pytest.fail("work started"))
    status = main(["--out", str(tmp_path / "base"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and needle in err and "Traceback" not in err, err


def test_pretrain_base_never_replaces_a_non_empty_out_without_overwrite(tmp_path, monkeypatch, capsys):
    """The builder removes its output directory before saving: a directory holding anything
    else is refused before the training, unless --overwrite is given."""
    from hacbo_jax.trainer import pretrain_base
    from train.pretrain_base import main

    calls = []
    monkeypatch.setattr(pretrain_base, "main", lambda argv: calls.append(argv))
    taken = _non_empty(tmp_path)
    _expect_usage_error(main(["--out", str(taken)]), capsys, "python -m train.pretrain_base", "not empty", "--overwrite")
    (tmp_path / "f").write_text("x")
    _expect_usage_error(main(["--out", str(tmp_path / "f")]), capsys, "python -m train.pretrain_base", "is a file")
    assert calls == [] and (taken / "earlier.txt").is_file()
    assert main(["--out", str(taken), "--overwrite"]) == 0 and calls == [["--out", str(taken)]]
    assert main([]) == 0  # the default: the embedded model's own directory, rebuilt


@pytest.mark.parametrize("option", ["--data", "--hacbo-state"])
def test_curvature_names_a_damaged_npz(option, tmp_path, capsys):
    """A file that starts like a zip (an .npz) but is not one raised zipfile.BadZipFile (a
    traceback)."""
    from hacbo_jax.experiments.curvature import run as script

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"PK\x03\x04junk")
    argv = [str(tmp_path / "model"), "--out", str(tmp_path / "o"), option, str(bad)]
    _expect_usage_error(script.main(argv), capsys, "hacbo-probe-curvature", option, "x.npz")


@pytest.mark.parametrize("option", ["--tol", "--trace-tol"])
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_curvature_names_a_tolerance_that_is_not_a_finite_positive_number(option, value, tmp_path, capsys):
    from hacbo_jax.experiments.curvature import run as script

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    argv = [str(tmp_path / "model"), "--out", str(tmp_path / "o"), option, value]
    _expect_usage_error(script.main(argv), capsys, "hacbo-probe-curvature", option)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("lo, hi", [("1e-2", "1e-4"), ("-1", "1e-3"), ("1e-5", "nan")])
def test_sweep_names_the_options_of_a_bad_rate_range(lo, hi, tmp_path, capsys):
    from hacbo_jax.experiments import sweep

    argv = ["--config", "tiny_cpu", "--out", str(tmp_path / "o"), "--lo", lo, "--hi", hi]
    _expect_usage_error(sweep.main(argv), capsys, "python -m train.sweep", "--lo", "--hi")


@pytest.mark.parametrize(
    "argv, needle",
    [(["--span", "-1"], "--span"), (["--noise-seeds", "0"], "--noise-seeds"),
     (["--wd", "inf"], "--wd"), (["--seq-len", "0"], "--seq-len"), (["--num-heads", "3", "--num-kv-heads", "2"], "--num-kv-heads"),
     (["--task", "zzz"], "zzz"), (["--warmup", "50"], "--warmup"),
     (["--noise-factor", "0"], "--noise-factor"), (["--num-layers", "0"], "--num-layers")],
)
def test_lrwd_names_every_bad_argument_before_any_work(argv, needle, tmp_path, capsys):
    """Every problem in one message, each naming its option (a negative --span and an infinite
    --wd were not checked; the first problem hid the others)."""
    from hacbo_jax.experiments.lrwd import run as script

    status = script.main(["--out", str(tmp_path / "o"), "--steps", "10", "--log-every", "2",
                          "--lr", "0", *argv])  # fmt: skip
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    assert needle in err and "--lr" in err, err  # both problems named
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("override", ["optim.lr=-1", "seed=3", "controller.kind=none", "output_dir=x"])
def test_evidence_refuses_an_override_its_parts_set_themselves(override, tmp_path, capsys):
    """Each run of a part sets its own rate, seed, method and directory after the command
    line's overrides: optim.lr=-1 was silently replaced and the part started its runs."""
    from hacbo_jax.experiments.evidence import run as E

    status = E.main(["stability", "--out", str(tmp_path / "ev"), override])
    _expect_usage_error(status, capsys, "python -m train.evidence", override.split("=")[0])
    assert not (tmp_path / "ev").exists()
