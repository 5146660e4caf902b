"""Offline speedup: Hedgerow's modes against plain decoding and transformers, one request at a time.

Every figure is a ratio measured in one run: same machine, same models, same prompts.

    plain         Hedgerow, plain decoding (one target pass per token): the reference for speedups
    chain[@G]     Hedgerow, chain drafts of G tokens (default --draft-tokens)
    MODE/PROPOSER a mode whose drafts come from the draft model (model), n-gram lookup (ngram) or both
                  (hybrid); default --proposer, whose default is the engine's (hybrid with a draft model)
    tree[@B]      Hedgerow, dynamic (EAGLE-2 style) trees of B nodes (default --tree-budget)
    tree-static[@B]  Hedgerow, a static top-k rank tree of B nodes
    MODE:IMPL     a mode on the native models or transformers' modules (default: --model-impl)
    hf            transformers ``generate`` on the target
    hf-assisted   transformers ``generate(..., assistant_model=draft)``, its default schedule

One engine is built per model implementation the contenders name, so a single run compares the
native fast path with transformers' modules. After the warm-up, ``pass_times`` records each
implementation's target and draft pass times (``sweep_model.pass_times``), interleaved.

The contenders are in ``offline_contenders``, the interleaved runs in ``offline_interleave``,
``--profile`` in ``offline_profile``.
"""

from __future__ import annotations

import argparse
import dataclasses

from hedgerow.bench import tables
from hedgerow.bench.common import (
    csv,
    new_config,
    note_start,
    remember_parser,
    write_json,
)
from hedgerow.bench.offline_contenders import Runner, describe, parse_contenders
from hedgerow.bench.offline_engines import build_engines, engine_info, fast_path, implementation, measure_pass_times
from hedgerow.bench.offline_interleave import results, run_interleaved, warm_up
from hedgerow.bench.plots import command_plots
from hedgerow.bench.prompts import load_prompts
from hedgerow.server.errors import HedgerowError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hedgerow.server.cli import add_model_args, add_spec_args

    add_model_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--prompts", default="humaneval",
                   help="humaneval, humaneval-edit, humaneval-retry, mtbench or FILE.jsonl (default: humaneval)")
    g.add_argument("--num-prompts", type=int, default=10, help="the first N prompts of the set (default: 10)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default: 128)")
    g.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default: 1)")
    g.add_argument("--warmup", type=int, default=1, help="prompts each contender runs untimed first (default: 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling: prompt i of repeat r uses seed + r * N + i")
    g.add_argument("--background-load", type=int, default=0, metavar="N",
                   help="keep N other processes busy for the whole run, as on a shared machine (default: 0)")
    g = p.add_argument_group("contenders")
    g.add_argument("--modes", type=csv(str, "--modes"), default=["plain", "chain", "tree"],
                   help="Hedgerow modes: plain, chain[@G], tree[@B], tree-static[@B], each optionally /model, /ngram "
                   "or /hybrid (its proposer; default --proposer) and :native or "
                   ":transformers, the model code it runs on (default: plain,chain,tree on --model-impl)")
    g.add_argument("--baselines", type=csv(str, "--baselines"), default=["hf", "hf-assisted"],
                   help="hf, hf-assisted, or none (default: hf,hf-assisted)")
    # `hedgerow generate`'s speculation flags but --mode: --modes names the modes, the flags apply to each
    add_spec_args(p, include_mode=False,
                  title="speculation (every mode; @N in --modes overrides the draft tokens or the tree budget)")
    g = p.add_argument_group("output")
    g.add_argument("--output", help="write the results JSON here")
    g.add_argument("--plots", help="write PNG plots into this folder")
    g.add_argument("--pass-samples", type=int, default=20,
                   help="timed passes per pass-time median, per implementation (default: 20; 0 = no pass times)")
    g.add_argument("--profile", action="store_true",
                   help="after the timed runs, profile the first prompt once per contender (cProfile + torch profiler)")
    remember_parser(p, "offline")


def check_args(args) -> None:
    for flag in ("num_prompts", "max_new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("warmup", "pass_samples", "background_load"):
        if getattr(args, flag) < 0:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")


def run(args) -> int:
    from hedgerow.bench.background import background_load

    note_start(args)
    check_args(args)
    with background_load(args.background_load):
        return _run(args)


def _run(args) -> int:
    from hedgerow.server.cli import sampling_from_args

    contenders = parse_contenders(args)
    if not contenders:
        raise HedgerowError("nothing to run: --modes and --baselines are both empty")
    sampling = sampling_from_args(argparse.Namespace(**{**vars(args), "seed": None}))
    need = [c.name for c in contenders if c.uses_draft]
    if need and args.target is not None and args.draft is None:
        raise HedgerowError(f"{', '.join(need)} need --draft (or run only --modes plain --baselines hf)")
    load_prompts(args.prompts, args.num_prompts)  # a bad --prompts fails before the models load
    engines, tokenizer = build_engines(args, contenders, bool(need))
    engine = next(iter(engines.values()))
    prompts = load_prompts(args.prompts, args.num_prompts, tokenizer)  # now in the chat template, if any
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(prompt_ids):
        if len(ids) + args.max_new_tokens > args.max_model_len:
            raise HedgerowError(f"prompt {i} is {len(ids)} tokens: with --max-new-tokens {args.max_new_tokens} "
                                f"it does not fit --max-model-len {args.max_model_len}")
    runner = Runner(engines, tokenizer, sampling, args.max_new_tokens)
    warm_up(runner, contenders, prompt_ids, args.warmup, args.seed)
    times = measure_pass_times(args, engines) if args.pass_samples else None
    runs = run_interleaved(runner, contenders, prompt_ids, args.repeats, args.seed)
    n = len(prompt_ids)
    data = {
        "config": new_config(
            "offline", args,
            embedded_pair=args.target is None and args.draft is None,
            target=engine.target.model.name_or_path,
            draft=engine.draft.model.name_or_path if engine.draft else None,
            target_device=str(engine.target.device), dtype=str(engine.target.dtype).removeprefix("torch."),
            prompts=args.prompts, num_prompts=n, prompt_tokens=[len(x) for x in prompt_ids],
            max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
            background_load=args.background_load,
            engine={k: v for k, v in vars(engine.config).items() if isinstance(v, (int, float, str, bool))},
            sampling=dataclasses.asdict(sampling), greedy=sampling.greedy,
            contenders=[describe(c) for c in contenders],
            implementations={implementation(e): fast_path(args, e.target) for e in engines.values()},
        ),
        "results": results(contenders, runs, args.repeats, n, sampling.greedy, engine_info(args, contenders, engines)),
        "pass_times": times,
    }
    if args.profile:
        from hedgerow.bench.offline_profile import profile

        data["profile"] = profile(runner, contenders, prompt_ids[0], args.seed)
    write_json(args.output, data)
    print(tables.offline(data["results"]))
    if times:
        print("\n" + tables.pass_times(times))
    command_plots(args, data)
    return 0
