"""A failure fails only the requests it comes from.

A batched pass that raises is retried one sequence at a time; the sequences that still fail end
with an error, their batch-mates go on. Retrying is safe because a failed pass never touches a
committed KV row: every pass writes only rows past each sequence's committed length.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger("hedgerow.engine")


def isolate(items: list[T], run: Callable[[list[T]], list[R]], fail: Callable[[T, Exception], R], what: str) -> list[R]:
    """``run(items)``; if it raises, ``run([item])`` for each item alone, and ``fail(item, exc)``
    for those that still raise."""
    try:
        return run(items)
    except Exception:
        log.exception("%s failed for a batch of %d; retrying one by one", what, len(items))
    out: list[R] = []
    for item in items:
        try:
            out += run([item])
        except Exception as exc:
            log.exception("%s failed for one request", what)
            out.append(fail(item, exc))
    return out
