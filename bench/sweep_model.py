"""The ideal speedup the sweep measures against (the expected-speedup model of docs/algorithms.md),
and the step costs it takes.

    E         = (1 - a^(g+1)) / (1 - a)                     tokens per verify pass, bonus included
    ideal     = E / (g c + 1)                               c = t_draft / t_target
    ideal_vc  = E * t_target / (g t_draft + t_verify(g+1))

a is the realised per-token acceptance (accepted / (accepted + rejections): the estimate of alpha
under independent acceptances), g = --draft-tokens. Step costs are measured on the engine's own
runners at batch 1, median of repeated calls, the passes taking turns: t_target one target pass of
1 token, t_verify(g+1) one pass of a g+1-token chain, t_draft one draft token as chains draft it:
a greedy run of g tokens (server/engine/greedy_run.py), per token, tokens and logits copied back. ``ideal`` takes a verify pass to cost one target
step, as the model does; ``ideal_vc`` charges the verify pass its measured cost, so
``measured / ideal_vc`` is what is lost outside the model passes.

``pass_times`` is the one measurement of pass times: the sweep's step costs, the per-implementation
pass times of ``bench offline`` and those of ``bench gpu``.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable


def expected_tokens(alpha: float, draft_tokens: int) -> float:
    """(1 - a^(g+1)) / (1 - a): tokens per verify pass, bonus included (→ g + 1 as a → 1)."""
    return draft_tokens + 1.0 if alpha >= 1.0 else (1 - alpha ** (draft_tokens + 1)) / (1 - alpha)


def realised_alpha(steps: list[tuple[int, int]]) -> float | None:
    """Per-token acceptance under independent acceptances: accepted / (accepted + rejections), a
    rejection being a step that accepted fewer draft tokens than it drafted. (With EOS ignored and
    the draft depth capped at the tokens left, a step is never cut short by the length limit.)"""
    accepted = sum(a for _, a in steps)
    rejections = sum(1 for d, a in steps if a < d)
    return accepted / (accepted + rejections) if accepted + rejections else None


def ideal_speedups(alpha: float | None, draft_tokens: int,
                   costs: dict) -> tuple[float | None, float | None, float | None]:
    """(E, ideal, ideal_vc) at the realised ``alpha``; all None when nothing was drafted."""
    e_tokens = expected_tokens(alpha, draft_tokens) if alpha is not None else None
    ideal = e_tokens / (draft_tokens * costs["c"] + 1) if e_tokens else None
    ideal_vc = (e_tokens * costs["t_target"] / (draft_tokens * costs["t_draft"] + costs["t_verify"])
                if e_tokens else None)
    return e_tokens, ideal, ideal_vc


# --- pass times ----------------------------------------------------------------------------------
PASS_CONTEXT = 120  # cached rows before each timed pass when implementations are compared (offline, gpu)


def pass_clock(runner, nodes: int, prefix: int, burst: int = 1) -> Callable[[], float]:
    """A timer of one batch-1 pass over a chain of ``nodes`` tokens after ``prefix`` cached rows, in
    the scratch slot (rows no sequence reads): flatten, forward, logits, argmax and the host copy,
    as a step does them (the host copy waits for the device, so a GPU pass is timed whole).
    ``burst``: the mean of that many passes in a row, as a drafter runs them one after the other
    (its weights stay in cache; a lone pass after the target's would be timed cold)."""
    from hedgerow.verify.flatten import flatten
    from hedgerow.verify.tree import DraftTree

    slot = runner.cache.scratch_slot
    rng = random.Random(0)

    def once() -> float:
        t0 = time.perf_counter()
        for _ in range(burst):
            flat = flatten([DraftTree.chain([rng.randrange(2, runner.vocab_size) for _ in range(nodes)])], [prefix])
            runner.logits(runner.forward([slot], flat)).argmax(-1).tolist()
        return (time.perf_counter() - t0) / burst

    return once


def greedy_clock(runner, tokens: int, prefix: int) -> Callable[[], float]:
    """A timer of a greedy draft chain of ``tokens`` tokens after ``prefix`` cached rows, per token:
    one token fed, then drafting, tokens and logits copied back, in the scratch slot."""
    slot = runner.cache.scratch_slot
    rng = random.Random(0)

    def once() -> float:
        t0 = time.perf_counter()
        runner.greedy_chains([slot], [prefix], [[rng.randrange(2, runner.vocab_size)]], tokens, runner.vocab_size)
        return (time.perf_counter() - t0) / tokens

    return once


def median_seconds(clocks: dict, samples: int, warmup: int = 3) -> dict:
    """Each clock's median over ``samples`` calls after ``warmup`` calls, the clocks taking turns
    (one call of each, then the next round), so drift on the machine hits all alike."""
    for _ in range(warmup):
        for once in clocks.values():
            once()
    times: dict = {key: [] for key in clocks}
    for _ in range(samples):
        for key, once in clocks.items():
            times[key].append(once())
    return {key: statistics.median(t) for key, t in times.items()}


def pass_times(pairs: dict[str, tuple], draft_tokens: int, prefix: int, samples: int,
               draft_verify: bool = True) -> dict[str, dict]:
    """Median pass times of each (target runner, draft runner or None) pair, all pairs' passes
    interleaved: ``t_target`` one target pass of 1 token, ``t_verify`` of a chain of γ+1 tokens,
    ``t_draft`` the draft's cost per token of a greedy chain of γ tokens as drafting runs it (one
    catch-up token fed, then γ - 1 more passes, server/engine/greedy_run.py; a pass per token where
    the runner drafts so, on CUDA), ``t_draft_pass`` one
    draft pass of 1 token on its own (the mean of γ in a row), ``t_draft_verify`` of γ+1 tokens (with
    ``draft_verify``), ``c = t_draft / t_target``; every pass after ``prefix`` cached rows."""
    clocks = {}
    for name, (target, draft) in pairs.items():
        clocks[name, "t_target"] = pass_clock(target, 1, prefix)
        clocks[name, "t_verify"] = pass_clock(target, draft_tokens + 1, prefix)
        if draft is not None:
            clocks[name, "t_draft_pass"] = pass_clock(draft, 1, prefix, burst=max(1, draft_tokens))
            if draft.greedy_runs:  # else chains draft a pass per token: t_draft is t_draft_pass, timed once
                clocks[name, "t_draft"] = greedy_clock(draft, max(1, draft_tokens), prefix)
            if draft_verify:
                clocks[name, "t_draft_verify"] = pass_clock(draft, draft_tokens + 1, prefix)
    medians = median_seconds(clocks, samples)
    out = {}
    for name in pairs:
        entry = {"context": prefix, **{key: t for (n, key), t in medians.items() if n == name}}
        if "t_draft_pass" in entry:
            entry.setdefault("t_draft", entry["t_draft_pass"])
        entry["c"] = entry["t_draft"] / entry["t_target"] if "t_draft" in entry else None
        out[name] = entry
    return out


def measure_costs(engine, draft_tokens: int, prefix: int, samples: int) -> dict:
    """The sweep's step costs: ``pass_times`` of its one engine, without the draft's γ+1 pass."""
    pair = {"engine": (engine.target, engine.draft)}
    return pass_times(pair, draft_tokens, prefix, samples, draft_verify=False)["engine"]
