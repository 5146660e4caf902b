"""n samples of one request: n engine requests of the same prompt, one prefill between them.

Sample 0 is the request itself (its id, its seed); sample i > 0 has the id ``f"{id}#{i}"``, the
seed ``sample_seed(seed, i)`` and ``fork_of`` sample 0, so the engine copies sample 0's prompt KV
into its slots instead of prefilling the prompt again (``Engine._prefill``). Each sample is an
ordinary request after that: it decodes, speculates, stops and is aborted on its own.

Seeds (vLLM's rule): sample i of a request with seed s draws with seed ``(s + i) mod 2**63``, so
sample i gives exactly what a single request with that seed gives, and sample 0 what the request
gives with n = 1. Without a seed every sample draws a random seed of its own. Greedy samples are
identical: they are decoded all the same (n identical choices, as OpenAI and vLLM return).
"""

from __future__ import annotations

from dataclasses import replace

from hedgerow.server.engine.sequence import Request

MAX_SAMPLES = 16  # n per request
SEED_MODULUS = 2**63  # seeds are in [0, 2^63), as the protocol's


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index`` of a request seeded with ``seed``."""
    return (seed + index) % SEED_MODULUS


def sample_id(request_id: str, index: int) -> str:
    """The engine's id of sample ``index`` (sample 0 keeps the request's own)."""
    return request_id if index == 0 else f"{request_id}#{index}"


def sample_requests(request: Request, n: int) -> list[Request]:
    """``request``'s n samples, sample 0 first; the rest fork from it."""
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"n must be in [1, {MAX_SAMPLES}], got {n}")
    seed = request.sampling.seed
    return [request] + [
        replace(request, request_id=sample_id(request.request_id, i), fork_of=request.request_id,
                sampling=request.sampling if seed is None else replace(request.sampling, seed=sample_seed(seed, i)))
        for i in range(1, n)
    ]
