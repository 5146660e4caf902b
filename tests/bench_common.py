"""What the benchmark tests share: ``bench(...)`` runs ``hedgerow bench`` in process, a small prompts
file, and plots where matplotlib is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hedgerow.server.cli import main

ROOT = Path(__file__).resolve().parents[1]
try:
    import matplotlib  # noqa: F401  (plots are checked where it is installed)

    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def plots(folder) -> list[str]:
    return ["--plots", str(folder)] if HAS_MPL else []


def bench(*argv: str) -> int:
    return main(["bench", *argv])


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "def fibonacci(n):"}) + "\n" + json.dumps({"prompt": "import os\n"}) + "\n")
    return path

