"""The cost model of a step: a draft pass and a verify pass of n tokens, as straight lines.

    step time = verify(tokens verified) + catch_up(first draft pass) + draft(each later draft pass)

``calibrate`` fits the lines to passes measured at start-up (the engine times them; the model
only fits); ``observe`` refines them from every step. A model can be wrong about a machine, so
the cost policy also holds it to the clock (drafting/cost_policy.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

MeasurePass = Callable[[str, int], float]  # (``"target"`` or ``"draft"``, tokens) -> seconds of one pass
# the most one observed pass or step may count for, as a multiple of what was predicted: a step that
# recompiled a graph or was paused took seconds, and unbounded it taught the model a draft phase ~50x
# too dear, so the policy stopped drafting for a hundred steps; a real change of costs still moves
# the model by up to this factor per observation
OUTLIER = 4.0


@dataclass
class LinearCost:
    """t(n) = a + b * n seconds.

    ``fit`` takes the slope and intercept from calibration points spread over n. Online,
    ``observe`` moves only the intercept: serving observes almost only small n (one or a few
    tokens per sequence), from which a slope cannot be told from noise, while the marginal cost
    of a token is a property of the hardware that calibration measured.
    """

    a: float = 0.0
    b: float = 0.0
    decay: float = 0.9  # per observation: rarely observed costs (the draft while not drafting) must still move

    def fit(self, points: Sequence[tuple[float, float]]) -> None:
        n = [p[0] for p in points]
        t = [p[1] for p in points]
        mn, mt = sum(n) / len(n), sum(t) / len(t)
        var = sum((x - mn) ** 2 for x in n)
        self.b = max(sum((x - mn) * (y - mt) for x, y in zip(n, t)) / var, 0.0) if var > 0 else 0.0
        self.a = max(mt - self.b * mn, 0.0)

    def observe(self, n: float, t: float) -> None:
        predicted = self(n)
        if predicted > 0:  # one slow step (a recompile, a pause) counts as at most OUTLIER x the prediction
            t = min(t, OUTLIER * predicted)
        self.a = max(self.decay * self.a + (1 - self.decay) * (t - self.b * n), 0.0)

    def __call__(self, n: float) -> float:
        return self.a + self.b * n


@dataclass
class CostModel:
    verify: LinearCost = field(default_factory=LinearCost)  # one target pass over n tokens
    draft: LinearCost = field(default_factory=LinearCost)  # one draft pass over n tokens (calibrated)
    catch_up: LinearCost = field(default_factory=LinearCost)  # the draft phase's first pass and fixed costs (learned online)

    def calibrate(self, measure: MeasurePass, sizes: Sequence[int] = (1, 4, 16, 32)) -> None:
        self.verify.fit([(n, measure("target", n)) for n in sizes])
        self.draft.fit([(n, measure("draft", n)) for n in sizes])
        self.catch_up.fit([(n, self.draft(n)) for n in sizes])  # until measured online

    def step_time(self, sizes: Sequence[int]) -> float:
        """Predicted seconds of one step of chains of ``sizes`` draft tokens: the draft passes
        (catch-up + the longest chain's size - 1 more) and one verify pass."""
        t = self.verify(sum(g + 1 for g in sizes))
        live = [g for g in sizes if g > 0]
        if live:
            t += self.catch_up(2 * len(live))  # usually 1-2 tokens per sequence
            for i in range(1, max(live)):
                t += self.draft(sum(1 for g in live if g > i))
        return t

    def observe(self, verify_tokens: int, verify_seconds: float, draft_passes: Sequence[int], draft_seconds: float) -> None:
        self.verify.observe(verify_tokens, verify_seconds)
        if draft_passes:
            # the drafting passes after the first cost what calibration measured; the rest of the
            # phase (the catch-up pass and the proposer's own work) is the catch-up cost
            rest = draft_seconds - sum(self.draft(n) for n in draft_passes[1:])
            self.catch_up.observe(draft_passes[0], max(rest, 0.0))


def batch_bucket(n: int) -> int:
    """Batch sizes that share measured step-time scales: round(log2 n), so 1 | 2 | 3-5 | 6-11 | 12-22 | 23-45 ...
    (a server at 16 clients runs 14-16 sequences: one bucket, not two that take turns)."""
    return round(math.log2(max(n, 1)))
