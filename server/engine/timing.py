"""Where a step's time goes, on an injectable clock, and the pass timings calibration fits.

Every duration the engine reports (step phases, the cost policy's samples, calibration) is read
from one clock, ``time.perf_counter`` unless a test hands in its own, so tests that depend on
time can run on a clock they control.
"""

from __future__ import annotations

from typing import Callable

from hedgerow.verify.flatten import flatten
from hedgerow.verify.tree import DraftTree

Clock = Callable[[], float]
GREEDY_TOKENS = 4  # tokens of the greedy run a draft pass is timed in


class PhaseClock:
    """Laps of one step: ``lap("draft")`` books the time since the previous lap to ``draft``."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.start = self._last = clock()
        self.phases: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = self.clock()
        self.phases[phase] = now - self._last
        self._last = now


class PhaseTotals:
    """Seconds per phase summed over steps (bench reads them; the server turns each step's into histograms)."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}

    def add(self, phases: dict[str, float]) -> None:
        for k, v in phases.items():
            self.phases[k] = self.phases.get(k, 0.0) + v


def pass_timer(runners: dict, clock: Clock, repeats: int = 3) -> Callable[[str, int], float]:
    """``measure(name, n)``: the fastest of ``repeats`` forward passes of ``n`` tokens of
    ``runners[name]``, after one warm-up pass (kernels, allocator), in its scratch slot (no
    sequence is touched). The fastest, so a busy machine does not teach a pessimistic model;
    online measurements refine it.

    A draft pass is timed as chains draft: where the runner drafts greedy runs
    (server/engine/greedy_run.py), a run of ``n`` rows and GREEDY_TOKENS tokens, per token; a draft
    pass of one row is worth much less there than alone."""

    def measure(name: str, n: int) -> float:
        runner = runners[name]
        scratch = runner.cache.scratch_slot
        flat = flatten([DraftTree.chain([0] * n)], [0])
        best = float("inf")
        greedy = name == "draft" and runner.greedy_runs
        for rep in range(repeats + 1):
            t = clock()
            if greedy:
                runner.greedy_chains([scratch] * n, [0] * n, [[0]] * n, GREEDY_TOKENS, runner.vocab_size)
            else:
                runner.logits(runner.forward([scratch], flat)[:, -1]).argmax(-1).tolist()
            if rep:
                best = min(best, (clock() - t) / (GREEDY_TOKENS if greedy else 1))
        return best

    return measure
