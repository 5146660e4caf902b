"""The embedded default model pair (see MODEL_CARD.md; trained by ``hedgerow.server.embedded.train``)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def default_pair() -> tuple[str, str]:
    """Absolute paths of the shipped (target, draft) Hugging Face model folders."""
    return str(_HERE / "target"), str(_HERE / "draft")
