"""The docs as a reader meets them: every Python block of the README and of docs/ runs as
written, the site builds with warnings as errors, and nothing points outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# Pages whose examples train or decode for a while: they run in the slow tier.
SLOW_PAGES = {"own-data.md", "training.md", "scaling.md", "methods.md", "lora.md", "models.md"}


def python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text())


def _page_params():
    for page in PAGES:
        if python_blocks(page):
            marks = [pytest.mark.slow] if page.name in SLOW_PAGES else []
            yield pytest.param(page, id=str(page.relative_to(ROOT)), marks=marks)


@pytest.mark.parametrize("page", list(_page_params()))
def test_every_python_block_runs_as_written(page, tmp_path, monkeypatch):
    """The blocks of one page run in order in one namespace, from an empty directory."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for number, block in enumerate(python_blocks(page), start=1):
        code = compile(block, f"{page.name}, python block {number}", "exec")
        exec(code, namespace)


def test_the_readme_has_an_example_and_stays_short():
    readme = (ROOT / "README.md").read_text()
    assert python_blocks(ROOT / "README.md"), "the README's optax.chain example is missing"
    assert len(readme.splitlines()) <= 220


def _tracked_text_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    suffixes = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".json", ""}
    return [
        ROOT / name
        for name in listed
        if Path(name).suffix in suffixes
        and not name.startswith(("hacbo_jax/assets/", "results/"))
        and (ROOT / name).is_file()
    ]


def test_nothing_points_outside_the_repository_or_to_an_issue():
    outside = re.compile(r"\.\./shared|shared/spec|\bissue[ _#-]?\d+", re.I)
    problems = []
    for path in _tracked_text_files():
        if path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line):
                problems.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not problems, "\n".join(problems)


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        },
    )
    assert done.returncode == 0, done.stderr[-4000:]
