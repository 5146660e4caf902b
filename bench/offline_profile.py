"""``hedgerow bench offline --profile``: where the time of one generation goes, per contender.

The engine's own phases are summed over the timed runs (``phase_seconds`` in the results); this adds,
after the timed runs, one generation of the first prompt per contender under cProfile (Python
functions by own time, and that time by layer of the stack) and one more under the torch profiler
(operators by self CPU time).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path

from hedgerow.bench.offline_contenders import Contender, Runner


def profile(runner: Runner, contenders: list[Contender], prompt_ids: list[int], seed: int, top: int = 12) -> dict:
    """One generation per contender under cProfile (Python functions by own time) and once more under
    the torch profiler (operators by self CPU time)."""
    import torch
    from tqdm import tqdm

    out = {}
    for c in tqdm(contenders, desc="profile", file=sys.stderr, leave=False):
        prof = cProfile.Profile()
        prof.enable()
        run_ = runner.run(c, prompt_ids, seed)
        prof.disable()
        stats = pstats.Stats(prof)
        total = stats.total_tt
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
        functions = [{"function": _where(fn), "calls": cc[1], "own_seconds": cc[2], "cumulative_seconds": cc[3]}
                     for fn, cc in rows]
        layers: dict[str, float] = {}
        for fn, cc in stats.stats.items():
            layer = _layer(_where(fn))
            layers[layer] = layers.get(layer, 0.0) + cc[2]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            runner.run(c, prompt_ids, seed)
        events = sorted(tp.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        op_total = sum(e.self_cpu_time_total for e in tp.key_averages()) / 1e6
        ops = [{"op": e.key, "calls": e.count, "self_seconds": e.self_cpu_time_total / 1e6} for e in events[:top]]
        out[c.name] = {
            "generated_tokens": len(run_.tokens),
            "seconds_profiled": total,
            "own_seconds_by_layer": dict(sorted(layers.items(), key=lambda kv: -kv[1])),
            "python_functions": functions,
            "torch_ops_seconds": op_total,
            "torch_ops": ops,
        }
    return out


LAYERS = (  # (prefix of _where's name, layer), first match wins
    ("<built-in method torch", "torch operators"), ("<method '", "torch operators"),
    ("torch/", "torch Python (module calls, dispatch)"), ("transformers/", "transformers Python"),
    ("server/", "Hedgerow Python"), ("drafting/", "Hedgerow Python"), ("verify/", "Hedgerow Python"),
    ("bench/", "Hedgerow Python"),
)


def _layer(where: str) -> str:
    """Which layer of the stack a profiled function belongs to."""
    if where.startswith("<method '") and "torch._C" not in where:
        return "other Python"
    for prefix, layer in LAYERS:
        if where.startswith(prefix):
            return layer
    return "other Python"


def _where(fn: tuple) -> str:
    """cProfile's (file, line, name) as ``package/module.py:line(name)``."""
    path, line, name = fn
    if path == "~":
        return name
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib"):
                path = path.split("/", 1)[-1]
            break
    else:
        root = str(Path(__file__).resolve().parents[1]) + "/"
        path = path.removeprefix(root)
    return f"{path}:{line}({name})"
