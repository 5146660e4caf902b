"""One-command GPU check: kernel correctness, CUDA-graph replay, greedy equality end to end, the oracle
sweep on 8B/1B shapes, tree-attention timing and pass times, into one JSON for RESULTS.md.

    hedgerow bench gpu --output bench/results/gpu_h100.json      # then: hedgerow bench report
    python -m hedgerow.bench.gpu --output gpu.json               # the same

Made for a GPU machine with torch, transformers and cuda-python but no package registry and no
model download: every model is built from a config with random weights. Each part has a time
budget; a part whose budget exceeds what is left of ``--budget`` is skipped by name, and a part
that fails is reported with its error while the others still run. Without CUDA every GPU part is
skipped (``skipped <part>: no CUDA device``) and the parts that can be checked on a CPU run a
smaller "dry" variant instead, so the command itself is exercised anywhere (tests/test_bench.py
runs it so). Exit status 1 when a part failed.

The parts are in ``gpu_checks`` (correctness) and ``gpu_speed`` (figures), imported when they run
(parsing the flags of any ``hedgerow bench`` command imports no torch); tables in ``tables``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from hedgerow.bench import tables
from hedgerow.bench.common import csv, new_config, note_start, remember_parser, write_json
from hedgerow.server.errors import HedgerowError

if TYPE_CHECKING:
    from hedgerow.bench.gpu_common import Context, Outcome

DEFAULT_BUDGET = 420.0  # seconds: the whole command, within 8 minutes with the start of Python and CUDA


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    budget: float  # seconds on a GPU (sized for an H100/H200)
    check: str  # "module:function" of hedgerow.bench, a Callable[[Context], Outcome]
    dry_budget: float = 0.0  # seconds of the CPU variant
    dry: str | None = None  # the CPU variant; None: nothing of the part can be checked without CUDA


PARTS = [
    Part("kernels", "CUDA tree-attention kernel against its PyTorch reference (fp32, bf16, fp16; several shapes)",
         45, "gpu_checks:kernels_check", 60, "gpu_checks:kernels_dry"),
    Part("cuda-graphs", "CUDA-graph replay against eager passes (decode and verify buckets; engine output)",
         45, "gpu_checks:graphs_check"),
    Part("greedy-e2e", "greedy output against transformers' generate: tiny Llama and Qwen2 pairs, every mode, "
         "batch 1 and 4, kernel attention and CUDA graphs", 60, "gpu_checks:e2e_check", 90, "gpu_checks:e2e_dry"),
    Part("sweep", "oracle sweep on 8B- and 1B-shaped random Llama models (bf16, native, CUDA graphs)",
         120, "gpu_speed:sweep_check", 60, "gpu_speed:sweep_dry"),
    Part("attention-timing", "tree attention, the CUDA kernel against SDPA with a dense tree mask (8B shapes)",
         45, "gpu_speed:attention_check", 20, "gpu_speed:attention_dry"),
    Part("pass-times", "draft and target pass times, native with CUDA graphs against transformers (8B/1B shapes)",
         90, "gpu_speed:pass_times_check", 30, "gpu_speed:pass_times_dry"),
]
NAMES = [p.name for p in PARTS]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", help="write the results JSON here (for RESULTS.md: bench/results/NAME.json)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                   help=f"seconds for every part together; a part that would exceed it is skipped (default: "
                   f"{DEFAULT_BUDGET:g})")
    p.add_argument("--parts", type=csv(str, "--parts"), default=NAMES,
                   help=f"which parts (they run in this order): {','.join(NAMES)} (default: all)")
    p.add_argument("--seed", type=int, default=0, help="random weights and problems (default: 0)")
    remember_parser(p, "gpu")


def resolve(check: str) -> Callable[[Context], Outcome]:
    """A part's function, imported only when the part runs (its module imports torch)."""
    module, _, name = check.partition(":")
    return getattr(importlib.import_module(f"hedgerow.bench.{module}"), name)


def attempt(check: str, ctx: Context) -> tuple[Outcome, float]:
    """Run one part: its outcome (an exception is a failure, with its traceback), and its seconds."""
    from hedgerow.bench.gpu_common import Outcome, free_memory

    t0 = time.monotonic()
    try:
        outcome = resolve(check)(ctx)
    except Exception as exc:  # a failed part is reported, the next one still runs
        first = (str(exc).strip().splitlines() or [""])[0]
        traceback.print_exc(file=sys.stderr)  # the whole story for whoever is at the GPU machine
        outcome = Outcome("failed", f"{type(exc).__name__}: {first}", {"traceback": traceback.format_exc()[-4000:]})
    finally:
        free_memory(ctx.device)
    return outcome, round(time.monotonic() - t0, 2)


def run_part(check: str, budget: float, started: float, total: float, device, seed: int, label: str) -> dict:
    """One part (or its dry variant) within the total budget, printed as one line."""
    from hedgerow.bench.gpu_common import Context, skipped

    left = total - (time.monotonic() - started)
    if budget > left:
        outcome, seconds = skipped(f"its budget of {budget:g} s exceeds the {max(left, 0):.0f} s left of --budget "
                                   f"{total:g}"), 0.0
    else:
        outcome, seconds = attempt(check, Context(device, time.monotonic() + budget, seed))
    print(f"{outcome.status} {label}: {outcome.summary}", flush=True)
    return {"status": outcome.status, "summary": outcome.summary, "seconds": seconds, "budget_seconds": budget,
            "figures": outcome.figures}


def run(args) -> int:
    import torch

    started = time.monotonic()
    note_start(args)
    unknown = [name for name in args.parts if name not in NAMES]
    if unknown:
        raise HedgerowError(f"--parts: {', '.join(unknown)} not among {', '.join(NAMES)}")
    if args.budget <= 0:
        raise HedgerowError(f"--budget must be > 0, got {args.budget:g}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    threads = torch.get_num_threads()
    if not cuda:  # the dry variants run tiny models, all per-op overhead: one thread beats an OpenMP team
        torch.set_num_threads(1)
    try:
        results = run_parts(args, cuda, device, started)
    finally:
        torch.set_num_threads(threads)
    from hedgerow.server.models import kernels

    data = {
        "config": new_config("gpu", args, device=str(device), cuda=cuda, torch_cuda=torch.version.cuda,
                             kernels_available=kernels.is_available(),
                             torch_threads_in_parts=1 if not cuda else threads,
                             budget_seconds=args.budget, parts=list(args.parts),
                             seconds=round(time.monotonic() - started, 1)),
        "results": results,
    }
    write_json(args.output, data)
    print("\n" + tables.gpu(results))
    failed = [r for r in results if r["status"] == "failed" or (r["dry"] or {}).get("status") == "failed"]
    return 1 if failed else 0


def run_parts(args, cuda: bool, device, started: float) -> list[dict]:
    """Every selected part in order: on CUDA the part itself, else its skip and its dry variant."""
    results = []
    for part in (p for p in PARTS if p.name in args.parts):
        entry = {"part": part.name, "title": part.title}
        if cuda:
            entry.update(run_part(part.check, part.budget, started, args.budget, device, args.seed, part.name))
            entry["dry"] = None
        else:
            print(f"skipped {part.name}: no CUDA device", flush=True)
            entry.update(status="skipped", summary="no CUDA device", seconds=0.0, budget_seconds=part.budget,
                         figures={})
            entry["dry"] = (run_part(part.dry, part.dry_budget, started, args.budget, device, args.seed,
                                     f"{part.name} (dry, CPU)") if part.dry else None)
        results.append(entry)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hedgerow.bench.gpu", description=__doc__.splitlines()[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except HedgerowError as exc:
        print(f"hedgerow: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
