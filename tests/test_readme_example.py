"""Runs the python code block(s) of README.md's `controllers` section as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def controllers_code_blocks():
    text = README.read_text()
    section = re.search(
        r"<!-- section:controllers -->(.*?)<!-- /section:controllers -->", text, re.S
    )
    assert section is not None, "README.md lacks the controllers section markers"
    return re.findall(r"```python\n(.*?)```", section.group(1), re.S)


def test_readme_controllers_example_runs():
    blocks = controllers_code_blocks()
    assert blocks, "the controllers section has no python code block"
    namespace = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
    assert namespace["loss"] < namespace["first_loss"]
