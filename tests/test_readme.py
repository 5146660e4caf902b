"""The README's test command is what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_command(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert m, f"README has no {marker} block"
    return m.group(1).strip()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    steps = [s.strip() for s in readme_command("test-command").split("&&")]
    assert steps[0] == "pip install torch==2.13.0"
    assert "python -m pip install -q torch==2.13.0" in ci
    assert 'python -m pip install -q -e ".[dev,cuda]"' in ci and steps[1] == 'pip install -e ".[dev,cuda]"'
    assert f"\n{steps[2]}\n" in ci


def test_readme_run_command_uses_the_console_script():
    assert "hedgerow " in readme_command("run-command")
