"""The ideal speedup the sweep measures against (the expected-speedup model of docs/algorithms.md),
and the step costs it takes.

    E         = (1 - a^(g+1)) / (1 - a)                     tokens per verify pass, bonus included
    ideal     = E / (g c + 1)                               c = t_draft / t_target
    ideal_vc  = E * t_target / (g t_draft + t_verify(g+1))

a is the realised per-token acceptance (accepted / (accepted + rejections): the estimate of alpha
under independent acceptances), g = --draft-tokens. Step costs are measured on the engine's own
runners at batch 1, median of repeated calls: t_target one target pass of 1 token, t_verify(g+1)
one pass of a g+1-token chain, t_draft one draft pass of 1 token (flatten, forward, logits, argmax,
the host copy included). ``ideal`` takes a verify pass to cost one target step, as the model does;
``ideal_vc`` charges the verify pass its measured cost, so ``measured / ideal_vc`` is what is lost
outside the model passes.
"""

from __future__ import annotations

import statistics
import time


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


# --- step costs ----------------------------------------------------------------------------------
def step_cost(runner, nodes: int, prefix: int, samples: int) -> float:
    """Median seconds of one batch-1 pass over a chain of ``nodes`` tokens after ``prefix`` cached
    rows: flatten, forward, logits, argmax and the host copy, as a step does them."""
    import random

    from hedgerow.verify.flatten import flatten
    from hedgerow.verify.tree import DraftTree

    slot = runner.cache.scratch_slot  # rows no sequence reads
    rng = random.Random(0)

    def once() -> float:
        t0 = time.perf_counter()
        flat = flatten([DraftTree.chain([rng.randrange(2, runner.vocab_size) for _ in range(nodes)])], [prefix])
        runner.logits(runner.forward([slot], flat)).argmax(-1).tolist()
        return time.perf_counter() - t0

    for _ in range(3):
        once()
    return statistics.median(once() for _ in range(samples))


def measure_costs(engine, draft_tokens: int, prefix: int, samples: int) -> dict:
    t_target = step_cost(engine.target, 1, prefix, samples)
    t_verify = step_cost(engine.target, draft_tokens + 1, prefix, samples)
    t_draft = step_cost(engine.draft, 1, prefix, samples)
    return {"context": prefix, "t_target": t_target, "t_verify": t_verify, "t_draft": t_draft,
            "c": t_draft / t_target}
