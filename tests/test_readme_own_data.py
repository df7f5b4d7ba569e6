"""Runs README.md's "Your own data and model" example as written, from an empty directory:
a `messages` JSONL, a tiny random Qwen2 saved by transformers, two steps, metrics printed."""

import json
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow  # ~1 minute on 2 loaded CPU cores (two evaluations, two steps)
def test_readme_own_data_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    section = re.search(
        r"<!-- section:own-data -->(.*?)<!-- /section:own-data -->", README.read_text(), re.S
    )
    assert section is not None, "README.md lacks the own-data section markers"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert len(blocks) == 1
    namespace = {"__name__": "__readme__"}
    exec(compile(blocks[0], str(README), "exec"), namespace)  # noqa: S102 - the README as written
    summary, run = namespace["summary"], namespace["work"] / "run"
    assert summary["steps"] == 2 and summary["metric"] == "exact"
    assert (
        json.loads((namespace["work"] / "model" / "config.json").read_text())["model_type"]
        == "qwen2"
    )
    printed = capsys.readouterr().out
    assert f"exact match {summary['initial_exact_match']:.2f}" in printed
    assert f"eval loss {summary['initial_eval_loss']:.3f}" in printed
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2] and all(r["metric"] == "exact" for r in rows)
    assert rows[1]["eval_loss"] == summary["final_eval_loss"]
    # The same shapes at both evaluations: the second compiles no generation program.
    assert rows[0]["programs_compiled"] <= 1 and rows[1]["programs_compiled"] == 0
