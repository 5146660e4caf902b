"""The README's test command is what CI runs."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1).strip()


CPU_TORCH = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [s.strip() for s in readme_command("test-command").split("&&")]
    assert steps[0] == CPU_TORCH  # PyPI's torch==2.13.0 is the CUDA build
    assert steps[1] == 'pip install -e ".[dev,cuda,ray]"'
    lines = [line.strip() for line in ci.splitlines()]
    for step in steps[:2]:
        assert f"python -m pip install -q {step.removeprefix('pip install ')}" in lines, step
    assert steps[2] in lines


def test_readme_run_command_uses_the_console_script():
    steps = [s.strip() for s in readme_command("run-command").split("&&")]
    assert steps[0] == CPU_TORCH and steps[1] == "pip install -e ."
    assert steps[2].startswith("hedgerow ")
