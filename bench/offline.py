"""Offline speedup: Hedgerow's modes against plain decoding and transformers, one request at a time.

Every figure is a ratio measured in one run: same machine, same models, same prompts. Modes run
through one Hedgerow engine (batch 1) with a per-request ``SpecParams``; the baselines are
transformers' ``generate`` on the same model objects (switched to SDPA attention for the call):

    ar            Hedgerow, plain decoding (one target pass per token): the reference for speedups
    chain[@G]     Hedgerow, chain drafts of G tokens (default --draft-tokens)
    tree[@B]      Hedgerow, dynamic (EAGLE-2 style) trees of B nodes (default --tree-budget)
    tree-static[@B]  Hedgerow, a static top-k rank tree of B nodes
    hf            transformers ``generate`` on the target
    hf-assisted   transformers ``generate(..., assistant_model=draft)``, its default schedule

After a warm-up, contenders run interleaved: prompt by prompt, each prompt through every contender
(the order rotating from prompt to prompt), so drift on the machine hits all alike.
``tokens_per_second`` is generated tokens over wall time summed over every prompt and repeat.
Acceptance fields are null for the transformers baselines (assisted generation does not expose
them reliably).
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import sys
import time
from dataclasses import dataclass, replace

from hedgerow.bench.common import (
    acceptance_summary,
    add_threads_arg,
    apply_threads,
    csv,
    fmt,
    markdown_table,
    new_config,
    note_start,
    ratio,
    remember_parser,
    write_json,
)
from hedgerow.server.engine.errors import HedgerowError

ENGINE_MODES = ("ar", "chain", "tree", "tree-static")
BASELINES = ("hf", "hf-assisted")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hedgerow.server.cli import add_model_args

    add_model_args(p)
    g = p.add_argument_group("workload")
    g.add_argument("--prompts", default="humaneval", help="humaneval, mtbench or FILE.jsonl (default: humaneval)")
    g.add_argument("--num-prompts", type=int, default=10, help="the first N prompts of the set (default: 10)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default: 128)")
    g.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default: 1)")
    g.add_argument("--warmup", type=int, default=1, help="prompts each contender runs untimed first (default: 1)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0, help="sampling: prompt i of repeat r uses seed + r * N + i")
    add_threads_arg(g)
    g = p.add_argument_group("contenders")
    g.add_argument("--modes", type=csv(str, "--modes"), default=["ar", "chain", "tree"],
                   help="Hedgerow modes: ar, chain[@G], tree[@B], tree-static[@B] (default: ar,chain,tree)")
    g.add_argument("--baselines", type=csv(str, "--baselines"), default=["hf", "hf-assisted"],
                   help="hf, hf-assisted, or none (default: hf,hf-assisted)")
    add_engine_spec_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", help="write the results JSON here")
    g.add_argument("--plots", help="write PNG plots into this folder")
    g.add_argument("--profile", action="store_true",
                   help="after the timed runs, profile the first prompt once per contender (cProfile + torch profiler)")
    remember_parser(p, "offline")


def add_engine_spec_args(p: argparse.ArgumentParser) -> None:
    """``hedgerow generate``'s speculation flags (gamma, tree shape, draft-length policy, overlap...)
    but ``--mode``: here ``--modes`` names the modes, and the other flags apply to every one of them."""
    from hedgerow.server.cli import add_spec_args

    add_spec_args(p, include_mode=False, title="speculation (every mode; @N in --modes overrides gamma or the tree budget)")


# --- contenders ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "engine", "hf" or "hf-assisted"
    spec: object = None  # SpecParams, for engine modes


def parse_contenders(args) -> list[Contender]:
    from hedgerow.server.cli import spec_from_args
    from hedgerow.server.engine.sequence import SpecMode

    try:
        base = spec_from_args(argparse.Namespace(**{**vars(args), "mode": "chain"}))
    except ValueError as exc:
        raise HedgerowError(f"--{str(exc).replace('_', '-')}") from None
    out: list[Contender] = []
    for name in args.modes:
        mode, _, n = name.partition("@")
        if mode not in ENGINE_MODES or (n and (not n.isdigit() or mode == "ar")):
            raise HedgerowError(f"--modes: {name!r} is not one of ar, chain[@G], tree[@B], tree-static[@B]")
        if mode == "ar":
            spec = replace(base, mode=SpecMode.AR)
        elif mode == "chain":
            spec = replace(base, mode=SpecMode.CHAIN, draft_tokens=int(n) if n else base.draft_tokens)
        else:
            spec = replace(base, mode=SpecMode.TREE, tree_static=mode == "tree-static" or base.tree_static,
                           tree_budget=int(n) if n else base.tree_budget)
        out.append(Contender(name, "engine", spec))
    for name in args.baselines:
        if name == "none":
            continue
        if name not in BASELINES:
            raise HedgerowError(f"--baselines: {name!r} is not one of hf, hf-assisted, none")
        out.append(Contender(name, name))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise HedgerowError(f"--modes/--baselines name a contender twice: {','.join(names)}")
    return out


def check_args(args) -> None:
    for flag in ("num_prompts", "max_new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        raise HedgerowError(f"--warmup must be >= 0, got {args.warmup}")


def build(args, needs_draft: bool):
    """One engine (batch 1) with the draft loaded when any contender needs it."""
    from hedgerow.server.cli import build_engine

    ns = argparse.Namespace(**{**vars(args), "mode": "chain" if needs_draft else "ar", "max_batch_size": 1})
    return build_engine(ns)  # validates the speculation flags too


# --- one generation per contender ---------------------------------------------------------------
@dataclass
class Run:
    tokens: list[int]
    seconds: float
    stats: object = None  # SeqStats, engine modes only
    phases: dict = dataclasses.field(default_factory=dict)


class Runner:
    """Runs one prompt through one contender and times it (prefill included, tokenization not)."""

    def __init__(self, engine, tokenizer, sampling, max_new_tokens: int):
        from hedgerow.server.cli import eos_ids

        self.engine = engine
        self.target = engine.target.model
        self.draft = engine.draft.model if engine.draft else None
        self.device = engine.target.device
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.eos = sorted(eos_ids(tokenizer, self.target))
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.counter = 0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, c: Contender, prompt_ids: list[int], seed: int) -> Run:
        if c.kind == "engine":
            return self._engine(c, prompt_ids, seed)
        return self._hf(c, prompt_ids, seed)

    def _engine(self, c: Contender, prompt_ids: list[int], seed: int) -> Run:
        from hedgerow.server.engine.sequence import Request

        self.counter += 1
        sampling = self.sampling if self.sampling.greedy else replace(self.sampling, seed=seed)
        req = Request(f"bench-{self.counter}", tuple(prompt_ids), sampling, self.max_new_tokens, c.spec)
        before = dict(self.engine.times.phases)
        self._sync()
        t0 = time.perf_counter()
        seq = self.engine.generate([req])[req.request_id]
        self._sync()
        seconds = time.perf_counter() - t0
        phases = {k: v - before.get(k, 0.0) for k, v in self.engine.times.phases.items()}
        return Run(list(seq.generated), seconds, seq.stats, phases)

    def _hf(self, c: Contender, prompt_ids: list[int], seed: int) -> Run:
        import torch

        from hedgerow.server.models import attention

        models = [self.target] + ([self.draft] if c.kind == "hf-assisted" else [])
        kwargs = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad)
        if self.sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=self.sampling.temperature, top_k=self.sampling.top_k,
                          top_p=self.sampling.top_p)
        if c.kind == "hf-assisted":
            kwargs["assistant_model"] = self.draft
        ids = torch.tensor([prompt_ids], device=self.device)
        mask = torch.ones_like(ids)
        for m in models:
            m.set_attn_implementation("sdpa")
        try:
            torch.manual_seed(seed)
            self._sync()
            t0 = time.perf_counter()
            out = self.target.generate(ids, attention_mask=mask, **kwargs)
            self._sync()
            seconds = time.perf_counter() - t0
        finally:
            for m in models:
                m.set_attn_implementation(attention.REFERENCE)
        gen = out[0, len(prompt_ids):].tolist()
        for i, tok in enumerate(gen):  # batch 1 stops at EOS; cut defensively all the same
            if tok in self.eos:
                gen = gen[: i + 1]
                break
        return Run(gen, seconds)


# --- the benchmark ------------------------------------------------------------------------------
def run(args) -> int:
    from tqdm import tqdm

    from hedgerow.bench.prompts import load_prompts
    from hedgerow.server.cli import sampling_from_args

    note_start(args)
    check_args(args)
    apply_threads(args)
    contenders = parse_contenders(args)
    if not contenders:
        raise HedgerowError("nothing to run: --modes and --baselines are both empty")
    sampling = sampling_from_args(argparse.Namespace(**{**vars(args), "seed": None}))
    needs_draft = any(c.kind == "hf-assisted" or (c.kind == "engine" and c.spec.mode.value != "ar")
                      for c in contenders)
    if needs_draft and args.target is not None and args.draft is None:
        need = [c.name for c in contenders
                if c.kind == "hf-assisted" or (c.kind == "engine" and c.spec.mode.value != "ar")]
        raise HedgerowError(f"{', '.join(need)} need --draft (or run only --modes ar --baselines hf)")
    load_prompts(args.prompts, args.num_prompts)  # a bad --prompts fails before the models load
    engine, tokenizer = build(args, needs_draft)
    prompts = load_prompts(args.prompts, args.num_prompts, tokenizer)  # now in the chat template, if any
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    for i, ids in enumerate(prompt_ids):
        if len(ids) + args.max_new_tokens > args.max_model_len:
            raise HedgerowError(f"prompt {i} is {len(ids)} tokens: with --max-new-tokens {args.max_new_tokens} "
                                f"it does not fit --max-model-len {args.max_model_len}")
    runner = Runner(engine, tokenizer, sampling, args.max_new_tokens)
    n, names = len(prompt_ids), [c.name for c in contenders]

    for i in tqdm(range(min(args.warmup, n)), desc="warm-up", file=sys.stderr, leave=False):
        for c in contenders:
            runner.run(c, prompt_ids[i], args.seed + i)

    runs: dict[str, list[tuple[int, Run]]] = {name: [] for name in names}  # (r * n + i, run)
    bar = tqdm(total=args.repeats * n * len(contenders), desc="offline", file=sys.stderr, unit="gen")
    for r in range(args.repeats):
        for i, ids in enumerate(prompt_ids):
            k = r * n + i
            for j in range(len(contenders)):
                c = contenders[(k + j) % len(contenders)]  # rotate who goes first
                runs[c.name].append((k, runner.run(c, ids, args.seed + k)))
                bar.update()
    bar.close()
    ordered = {name: [run for _, run in sorted(items, key=lambda x: x[0])] for name, items in runs.items()}

    results = [summarize(c, ordered, args.repeats, n, sampling.greedy) for c in contenders]
    ar = next((res for res in results if res["name"] == "ar"), None)
    for res in results:
        res["speedup_vs_ar"] = ratio(res["tokens_per_second"], ar["tokens_per_second"]) if ar else None
    data = {
        "config": new_config(
            "offline", args,
            embedded_pair=args.target is None and args.draft is None,
            target=engine.target.model.name_or_path, draft=engine.draft.model.name_or_path if engine.draft else None,
            target_device=str(engine.target.device), dtype=str(engine.target.dtype).removeprefix("torch."),
            prompts=args.prompts, num_prompts=n, prompt_tokens=[len(x) for x in prompt_ids],
            max_new_tokens=args.max_new_tokens, repeats=args.repeats, warmup=args.warmup,
            engine={k: v for k, v in vars(engine.config).items() if isinstance(v, (int, float, str, bool))},
            sampling=dataclasses.asdict(sampling), greedy=sampling.greedy,
            contenders=[{"name": c.name, "kind": c.kind,
                         "spec": _spec_dict(c.spec) if c.spec is not None else None} for c in contenders],
        ),
        "results": results,
    }
    if args.profile:
        data["profile"] = profile(runner, contenders, prompt_ids[0], args.seed)
    write_json(args.output, data)
    print(table(data))
    if args.plots:
        from hedgerow.bench.plots import offline_plots

        for path in offline_plots(data, args.plots, stem=_stem(args.output, "offline")):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _spec_dict(spec) -> dict:
    d = dataclasses.asdict(spec)
    d["mode"] = spec.mode.value
    return d


def _stem(output: str | None, default: str) -> str:
    from pathlib import Path

    return Path(output).stem if output else default


def summarize(c: Contender, runs: dict[str, list[Run]], repeats: int, n: int, greedy: bool) -> dict:
    mine = runs[c.name]
    tokens = sum(len(r.tokens) for r in mine)
    wall = sum(r.seconds for r in mine)
    by_repeat = []
    for rep in range(repeats):
        part = mine[rep * n:(rep + 1) * n]
        secs = sum(r.seconds for r in part)
        by_repeat.append(sum(len(r.tokens) for r in part) / secs if secs else None)
    if greedy and "ar" in runs:
        match = all(a.tokens == b.tokens for a, b in zip(mine, runs["ar"]))
    else:
        match = None
    res = {
        "name": c.name,
        "kind": c.kind,
        "tokens_per_second": tokens / wall if wall else None,
        "speedup_vs_ar": None,
        "mean_accepted_length": None,
        "acceptance_rate": None,
        "acceptance_length_histogram": None,
        "outputs_match_ar": match,
        "generated_tokens": tokens,
        "wall_seconds": wall,
        "tokens_per_second_by_repeat": by_repeat,
        "seconds_per_generation": [round(r.seconds, 4) for r in mine],  # prompt by prompt, repeat by repeat
    }
    if c.kind == "engine":
        acc = acceptance_summary(r.stats for r in mine)
        res.update({k: acc[k] for k in ("mean_accepted_length", "acceptance_rate", "acceptance_length_histogram",
                                        "verify_steps", "draft_tokens", "accepted_tokens")})
        # with an adaptive draft-length policy the engine picks gamma / the tree size per step
        res["mean_draft_tokens_per_step"] = acc["draft_tokens"] / acc["verify_steps"] if acc["verify_steps"] else None
        # drafted tokens thrown away (rejected drafts and hedge branches that missed), and the branches
        for key in ("rollback_tokens", "branches", "branch_hits"):
            res[key] = sum(getattr(r.stats, key) for r in mine)
        phases: dict[str, float] = {}
        for r in mine:
            for k, v in r.phases.items():
                phases[k] = phases.get(k, 0.0) + v
        res["phase_seconds"] = phases  # engine.times.phases summed over this contender's runs
    return res


# --- profile ------------------------------------------------------------------------------------
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
        from pathlib import Path

        root = str(Path(__file__).resolve().parents[1]) + "/"
        path = path.removeprefix(root)
    return f"{path}:{line}({name})"


# --- output -------------------------------------------------------------------------------------
def table(data: dict) -> str:
    headers = ["contender", "tokens/s", "× ar", "mean accepted length", "acceptance rate", "same tokens as ar",
               "tokens", "seconds"]
    rows = [[r["name"], fmt(r["tokens_per_second"], 1), fmt(r["speedup_vs_ar"], 2, "×"),
             fmt(r["mean_accepted_length"]), fmt(r["acceptance_rate"]), fmt(r["outputs_match_ar"]),
             r["generated_tokens"], fmt(r["wall_seconds"], 2)] for r in data["results"]]
    return markdown_table(headers, rows)
