"""The README's Python examples run as written (so they stay true)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Using it") : text.index("### Gates")]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_readme_examples_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = _python_blocks()
    assert len(blocks) >= 4
    namespace: dict[str, object] = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the checkpoint example writes run/ckpt.safetensors
    try:
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert (tmp_path / "run" / "ckpt.safetensors").is_file()
    assert namespace["meta"]["step"] == 199  # type: ignore[index]
    assert [tuple(o.shape) for o in namespace["task_outputs"]] == [(4, 128, 64), (4, 128, 64)]  # type: ignore[attr-defined]
