"""Oracle-acceptance sweep: a systems benchmark of how much of the theoretical gain Hedgerow keeps.

Models of real shapes with random weights (no download, ``sweep_shapes``); the drafter is
``bench/oracle.py``: it runs the draft model, so drafting costs what it really costs, but proposes
the target's known greedy continuation corrupted at rate 1 - alpha per token. This measures the
system (scheduling, KV bookkeeping, verify cost, overheads), not a draft model's quality.

For each alpha, against plain decoding (``plain``) on the same engine, prompts interleaved
(``sweep_runs``): measured = tokens/s(chain, oracle alpha) / tokens/s(plain), against the ideal of the
expected-speedup model (``sweep_model``, docs/algorithms.md), kept = measured / ideal. Step costs
are measured at a context of prompt + max_new_tokens / 2. The models run through transformers'
modules, or Hedgerow's own with ``--model-impl native`` (CUDA graphs on a GPU unless
``--cuda-graphs off``), as ``bench gpu`` runs it on 8B- and 1B-shaped models.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

from hedgerow.bench import tables
from hedgerow.bench.common import (
    csv,
    new_config,
    note_start,
    remember_parser,
    write_json,
)
from hedgerow.bench.plots import command_plots
from hedgerow.bench.sweep_model import measure_costs
from hedgerow.bench.sweep_runs import OracleBench, random_prompts, results
from hedgerow.bench.sweep_shapes import parse_shape
from hedgerow.server.cli import add_cpu_threads_arg, apply_cpu_threads
from hedgerow.server.errors import HedgerowError


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--oracle-acceptance", type=csv(float, "--oracle-acceptance"), default=[0.5, 0.7, 0.9],
                   help="alphas, per-token acceptance of the oracle drafter (default: 0.5,0.7,0.9)")
    g.add_argument("--target-shape", default="llama-100m", help="preset or key=value list (default: llama-100m)")
    g.add_argument("--draft-shape", default="llama-10m", help="preset or key=value list (default: llama-10m)")
    g.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per step of the chain (default: 4)")
    g.add_argument("--num-prompts", type=int, default=4, help="random prompts (default: 4)")
    g.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (default: 64)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="per prompt, EOS ignored (default: 64)")
    g.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default: 1)")
    g.add_argument("--cost-samples", type=int, default=30, help="timed calls per step-cost measurement (default: 30)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    g.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--model-impl", default="transformers", choices=["transformers", "native"],
                   help="the models' code: transformers' modules or Hedgerow's own (default: transformers)")
    g.add_argument("--cuda-graphs", default="auto", choices=["auto", "off"],
                   help="CUDA: replay captured passes, one graph per shape bucket (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="weights, prompts and corruption (default: 0)")
    add_cpu_threads_arg(g)
    g = p.add_argument_group("output")
    g.add_argument("--output", help="write the results JSON here")
    g.add_argument("--plots", help="write PNG plots into this folder")
    remember_parser(p, "sweep")


def run(args) -> int:
    data = measure(args)
    write_json(args.output, data)
    print(tables.sweep(data["results"]) + "\n\n" + tables.step_costs(data))
    command_plots(args, data)
    return 0


def measure(args) -> dict:
    """The sweep's results JSON (``bench gpu`` runs it too, on 8B- and 1B-shaped models)."""
    from hedgerow.server.models.loader import parse_device, resolve_dtype

    target_shape = parse_shape(args.target_shape, "--target-shape")
    draft_shape = parse_shape(args.draft_shape, "--draft-shape")
    if target_shape.vocab != draft_shape.vocab:
        raise HedgerowError(f"target and draft shapes need one vocabulary ({target_shape.vocab} vs {draft_shape.vocab})")
    alphas = args.oracle_acceptance
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise HedgerowError(f"--oracle-acceptance values must be in [0, 1], got {alphas}")
    for flag in ("num_prompts", "prompt_len", "max_new_tokens", "repeats", "cost_samples", "draft_tokens"):
        if getattr(args, flag) < 1:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    note_start(args)
    apply_cpu_threads(args.cpu_threads, {args.device})
    device = parse_device(args.device, "--device")
    dtype = resolve_dtype(args.dtype, device)
    draft_tokens = args.draft_tokens

    bench = OracleBench(target_shape, draft_shape, args, device, dtype)
    prompts = random_prompts(target_shape.vocab, args.num_prompts, args.prompt_len, args.seed)
    bench.warm_up(prompts, alphas[0], args.seed)
    costs = measure_costs(bench.engine, draft_tokens, args.prompt_len + args.max_new_tokens // 2, args.cost_samples)
    runs = bench.interleaved(prompts, alphas, args.repeats, args.seed)
    return {
        "config": new_config(
            "sweep", args, label="systems benchmark: random-weight models of real shapes, oracle drafter",
            target_shape={"name": args.target_shape, **asdict(target_shape), "params": target_shape.params()},
            draft_shape={"name": args.draft_shape, **asdict(draft_shape), "params": draft_shape.params()},
            device=str(device), dtype=str(dtype).removeprefix("torch."), draft_tokens=draft_tokens,
            num_prompts=args.num_prompts, prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
            repeats=args.repeats, oracle_acceptance=alphas,
        ),
        "step_costs": costs,
        "results": results(runs, alphas, draft_tokens, costs),
    }
