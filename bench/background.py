"""A background CPU load for benchmarks: ``--background-load N`` keeps N processes busy for the
whole run, models' loading and the policy's calibration included, as other work on a shared
machine would. Each process spins in plain Python (one core each, no memory traffic to speak of),
so the load is steady and the same from run to run. The processes are stopped when the run ends,
also when it fails."""

from __future__ import annotations

import multiprocessing as mp
from contextlib import contextmanager


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


@contextmanager
def background_load(processes: int):
    """``processes`` busy processes while the block runs (none for 0)."""
    if processes <= 0:
        yield
        return
    ctx = mp.get_context("spawn")  # nothing of this process (torch, threads) is inherited
    stop = ctx.Event()
    workers = [ctx.Process(target=_spin, args=(stop,), daemon=True, name=f"hedgerow-load-{i}") for i in range(processes)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        stop.set()
        for w in workers:
            w.join(5)
            if w.is_alive():
                w.terminate()
