"""Statistics of ``hedgerow bench serve``: one load level's samples as its results entry, and a
speculative mode against ``plain`` at the same concurrency.

Per request: TTFT (send -> first token), end-to-end latency, and inter-token latency: a stream
message carrying k tokens after a gap g counts as k tokens g / k apart (speculative steps commit
several tokens at once, and that is what a client sees). Reported: mean/p50/p90/p99 of each,
output tokens/s and requests/s over the run's wall time (first send to last finish).
"""

from __future__ import annotations

import math

from hedgerow.bench.common import ratio
from hedgerow.bench.serve_clients import Sample


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def latency_summary(values: list[float]) -> dict:
    return {
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "count": len(values),
    }


def summarize(samples: list[Sample], wall: float) -> dict:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    tpot = [(s.e2e - s.ttft) / (s.tokens - 1) for s in ok if s.tokens > 1 and s.ttft is not None]
    errors = sorted({s.error for s in samples if s.error})
    return {
        "requests": len(samples),
        "failed": len(samples) - len(ok),
        "errors": errors[:5],
        "generated_tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second": tokens / wall if wall > 0 else None,
        "requests_per_second": len(ok) / wall if wall > 0 else None,
        "ttft_seconds": latency_summary([s.ttft for s in ok if s.ttft is not None]),
        "itl_seconds": latency_summary([x for s in ok for x in s.itl()]),
        "tpot_seconds": latency_summary(tpot),
        "e2e_seconds": latency_summary([s.e2e for s in ok]),
        # raw values for the latency CDF plots
        "samples": {
            "ttft": [round(s.ttft, 6) for s in ok if s.ttft is not None],
            "e2e": [round(s.e2e, 6) for s in ok],
            "tokens": [s.tokens for s in ok],
        },
    }


def vs_plain(res: dict, plain: dict) -> dict:
    """A speculative mode's summary against plain decoding's: throughput ratios, and latency ratios as
    speedups (plain / speculative: > 1 means speculation is faster)."""
    return {
        "tokens_per_second": ratio(res["tokens_per_second"], plain["tokens_per_second"]),
        "requests_per_second": ratio(res["requests_per_second"], plain["requests_per_second"]),
        "e2e_p50_speedup": ratio(plain["e2e_seconds"]["p50"], res["e2e_seconds"]["p50"]),
        "ttft_p50_speedup": ratio(plain["ttft_seconds"]["p50"], res["ttft_seconds"]["p50"]),
        "itl_p50_speedup": ratio(plain["itl_seconds"]["p50"], res["itl_seconds"]["p50"]),
    }
