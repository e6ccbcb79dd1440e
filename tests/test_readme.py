"""The README's Python examples run as pasted, each on its own (so they stay true).

Every ```python block of README.md runs in a fresh namespace and a fresh working folder, as a user
who copies only that block would run it. A block that cannot run here (it needs data or hours) must
say so in its first line with ``# not run by the README test: <reason>``; none does today. A line
ending in ``# prints <value>`` states what that ``print`` shows, and the test holds the README to it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP_MARK = "# not run by the README test:"


def _python_blocks() -> list[tuple[int, str]]:
    """``(line number, code)`` of every ```python block in the README."""
    text = README.read_text()
    return [
        (text.count("\n", 0, match.start()) + 2, match[1])
        for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    ]


BLOCKS = _python_blocks()


def test_the_readme_has_its_examples() -> None:
    # The usage section's five: a layer, a training loop, multi-task, local search, THOR.
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs_on_its_own(
    line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if code.startswith(SKIP_MARK):
        pytest.skip(code.splitlines()[0][len(SKIP_MARK) :].strip())
    monkeypatch.chdir(tmp_path)  # the checkpoint example writes run/ckpt.safetensors
    rng = torch.get_rng_state()
    namespace: dict[str, object] = {"__name__": "__readme__"}  # fresh: no import leaks from another block
    try:
        exec(compile(code, f"{README}:{line}", "exec"), namespace)
    finally:
        torch.set_rng_state(rng)
    printed = capsys.readouterr().out.splitlines()
    expected = re.findall(r"^\s*print\(.*# prints (\S+)\s*$", code, flags=re.MULTILINE)
    # Each stated value is what the corresponding print wrote (prints without a statement may come between).
    stated = [out for out in printed if out in expected]
    assert stated == expected, f"README.md:{line} says its print(s) show {expected}, they showed {printed}"
    if "save_checkpoint" in code:
        assert (tmp_path / "run" / "ckpt.safetensors").is_file()
        assert namespace["meta"]["step"] == 199  # type: ignore[index]
    if "MultiTaskMoE(" in code:
        assert [tuple(o.shape) for o in namespace["task_outputs"]] == [(4, 128, 64), (4, 128, 64)]  # type: ignore[attr-defined]
    if "thor_inference" in code:
        assert tuple(namespace["logits"].shape) == (4, 6, 100)  # type: ignore[attr-defined]


def test_readme_states_the_value_of_the_training_loop() -> None:
    # The training-loop example's print is pinned by a "# prints" comment, so the prose cannot drift from it.
    loop = [code for _, code in BLOCKS if "for step in range(200)" in code]
    assert len(loop) == 1 and re.search(r"# prints \S+", loop[0])
    value = re.search(r"# prints (\S+)", loop[0])[1]  # type: ignore[index]
    assert f"It prints `{value}`" in README.read_text()


def test_moebert_help_takes_its_budget_from_the_options() -> None:
    # The help once said 400/200 steps and ~3.5 h while the options defaulted to 2000/400: the
    # description now names the options (whose defaults argparse prints) instead of repeating them.
    from sparsemoe.cli import module_docstring
    from sparsemoe.experiments.moebert_sst2 import Config

    doc = module_docstring("sparsemoe.experiments.moebert_sst2")
    assert not re.search(r"\d[\d,.]*\s*(k\s+)?(fine-tuning|distillation)?\s*steps|hours", doc), doc
    for option in ("--teacher-steps", "--student-steps", "--seeds"):
        assert option in doc and hasattr(Config(), option[2:].replace("-", "_"))
