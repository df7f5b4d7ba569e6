"""Runs the python code block(s) of README.md's `qwen3` section as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_qwen3_example_runs():
    section = re.search(
        r"<!-- section:qwen3 -->(.*?)<!-- /section:qwen3 -->", README.read_text(), re.S
    )
    assert section is not None, "README.md lacks the qwen3 section markers"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert blocks, "the qwen3 section has no python code block"
    namespace = {"__name__": "__readme__"}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    # The example's own asserts ran; also check what it built.
    assert namespace["logits"].shape == (2, 4, 128)
    assert namespace["reloaded"].config == namespace["config"]
