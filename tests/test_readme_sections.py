"""Runs every python example of README.md's data, training, scaling and systems sections as written,
from an empty directory (the controllers and qwen3 sections have their own tests)."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("data", "training", "scaling", "adagradselect", "autolrs", "curvature", "lrwd")


def test_every_python_example_is_in_a_tested_section():
    text = README.read_text()
    tested = ("controllers", "qwen3", "own-data", *SECTIONS)  # own-data: test_readme_own_data
    in_sections = 0
    for name in tested:
        section = re.search(rf"<!-- section:{name} -->(.*?)<!-- /section:{name} -->", text, re.S)
        assert section is not None, f"README.md lacks the {name} section markers"
        in_sections += len(re.findall(r"```python\n", section.group(1)))
    assert in_sections == len(re.findall(r"```python\n", text))


@pytest.mark.parametrize("name", SECTIONS)
def test_readme_section_examples_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # package data must be found from any directory
    text = README.read_text()
    section = re.search(rf"<!-- section:{name} -->(.*?)<!-- /section:{name} -->", text, re.S)
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert blocks, f"the {name} section has no python code block"
    namespace = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
