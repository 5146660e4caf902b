"""The target's log-probabilities of emitted tokens, read off the verify pass.

Which distribution: the target model's raw log-softmax over its logits, before temperature, top-k,
top-p or a ``min_tokens`` mask (vLLM's default, ``raw_logprobs``). It depends only on the target
and the text before the token, never on the draft, the speculation mode or the sampling settings,
which is what makes it exact under speculation: the verify pass computes the target's logits at
every node of the tree, and a step's emitted tokens come from the nodes of its path.

Worked example: a step over the tree root r -> a -> b accepts a and b and emits a bonus token c,
so ``path = [r, a, b]`` and ``tokens = [a, b, c]``: token a was emitted from node r's row (it is the
token after r), b from a's row, c from b's row. Token j always comes from row ``path[j]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

MAX_TOP_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k most likely tokens at this position, best first


def token_logprobs(logits: torch.Tensor, path: Sequence[int], tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """The log-probability of each emitted token and the top ``k`` alternatives at its position.
    logits: [N, vocab] the target's rows for one tree; token j was emitted from row ``path[j]``."""
    rows = torch.log_softmax(logits[list(path)].float(), dim=-1)  # [len(path), vocab]
    chosen = rows.gather(1, torch.tensor(list(tokens), device=rows.device).unsqueeze(1)).squeeze(1).tolist()
    if k > 0:
        values, ids = rows.topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops)]
