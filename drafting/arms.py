"""Measured arms: speculate or decode plainly, whichever has *measured* more tokens per second.

Used for trees, whose cost is measured rather than modelled. Each step runs one of two arms
(speculating, or plain decoding) and reports the tokens it emitted and the seconds it took: draft
+ verify + commit, and the time the caller spent between two busy steps (a server streams every
step's tokens: a cost per step that favours fewer, longer steps); prefill is no property of
either arm. The arm with the higher rate runs; the other is probed for ``probe_steps`` steps
after a gap of ``probe_every`` steps, a gap that doubles (up to ``max_gap``) while probes confirm
the choice, so a losing arm costs a few steps in hundreds. Each arm's rate is the ratio of its
tokens to its seconds, both summed with weights that fade every step, so a fresh probe outweighs
what an arm measured long ago.

The first step after a switch is no sample of either arm: it pays for the switch (the draft
catching up on the tokens it did not draft), and charging it to the arm switched to would make
every probe look like a loss.

This only chooses *whether* to draft, before anything is drawn, so it keeps every mode lossless.
"""

from __future__ import annotations

INF = float("inf")


class MeasuredArms:
    def __init__(self, probe_every: int = 32, probe_steps: int = 3, max_gap: int = 512, keep: float = 0.97):
        self.probe_every = probe_every
        self.probe_steps = probe_steps
        self.max_gap = max_gap
        # every step, both arms' sums fade by ``keep``: a window of ~1/(1-keep) steps, long enough
        # to average over a speculating step's 1..gamma+1 tokens, short enough to follow the load,
        # and an arm not run for a while weighs little against a fresh probe
        self.keep = keep
        self.rate = {True: INF, False: INF}  # tokens/s per arm; unmeasured arms first (speculation first)
        self.steps = 0
        self.gap = probe_every
        self.next_probe = probe_every
        self._probe_left = 0
        self._probing: bool | None = None  # the arm a probe left
        self._last: bool | None = None
        self._sums = {True: [0.0, 0.0], False: [0.0, 0.0]}  # faded tokens, seconds per arm

    def choose(self) -> bool:
        """The arm of the next step: True = speculate."""
        self.steps += 1
        for sums in self._sums.values():
            sums[0] *= self.keep
            sums[1] *= self.keep
        on = self.rate[True] >= self.rate[False]
        if self._probe_left == 0 and self.steps >= self.next_probe and INF not in self.rate.values():
            self._probing, self._probe_left = on, self.probe_steps
        if self._probe_left:
            on = not self._probing
        return on

    def observe(self, speculated: bool, tokens: int, seconds: float) -> None:
        """A whole step: whether it drafted anything, the tokens it emitted, its seconds."""
        switched = self._last is not None and speculated != self._last
        self._last = speculated
        if not switched:
            # tokens/s as a ratio of sums: the mean of per-step ratios would overrate cheap steps
            sums = self._sums[speculated]
            sums[0] += tokens
            sums[1] += seconds
            self.rate[speculated] = sums[0] / max(sums[1], 1e-12)
        if self._probe_left:
            self._probe_left -= 1
            if self._probe_left == 0:
                kept = (self.rate[True] >= self.rate[False]) == self._probing
                self.gap = min(self.max_gap, self.gap * 2) if kept else self.probe_every
                self.next_probe = self.steps + self.gap
