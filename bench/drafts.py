"""``hedgerow bench drafts``: drafts of different shapes against one target, cost against acceptance.

    hedgerow bench drafts --drafts server/embedded/draft,/tmp/rd-L1 --num-prompts 20 --max-new-tokens 128 \\
        --compile on --output bench/results/drafts.json

Per draft folder (trained, or a random-weight shape from ``python -m hedgerow.bench.random_draft``):

- acceptance: greedy chains of ``--draft-tokens`` model tokens (no n-gram, no adaptive size) over the
  prompts, stopping at end of text, as the trainer's evaluation measures it: accepted draft tokens /
  drafted tokens, and tokens per verify step;
- cost: ``pass_times`` of every (target, draft) pair, all interleaved: ``c`` = a draft token as chains
  draft it (greedy runs) / a target pass of one token, after 120 cached rows.

A random-weight draft's acceptance is near zero by construction: it is there for its cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hedgerow.bench.common import acceptance_summary, csv, new_config, note_start, remember_parser, write_json
from hedgerow.bench.prompts import load_prompts
from hedgerow.server.errors import HedgerowError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hedgerow.server.cli import add_model_args, add_spec_args

    add_model_args(p)
    # the engine's speculation flags; the acceptance chains use --draft-tokens, the model proposer, a fixed size
    add_spec_args(p, include_mode=False, title="speculation (--draft-tokens: γ of the acceptance chains and pass times)")
    g = p.add_argument_group("drafts")
    g.add_argument("--drafts", type=csv(str, "--drafts"), required=True,
                   help="draft folders (or Hugging Face ids), comma-separated, each optionally NAME=PATH; each is "
                   "paired with --target (default name: the folder's)")
    g.add_argument("--prompts", default="humaneval", help="prompt set, as bench offline's (default: humaneval)")
    g.add_argument("--num-prompts", type=int, default=20, help="(default: 20)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="per prompt (default: 128)")
    g.add_argument("--pass-samples", type=int, default=20, help="timed passes per median (default: 20)")
    g.add_argument("--output", help="write the results JSON here")
    remember_parser(p, "drafts")


def run(args) -> int:
    from tqdm import tqdm

    from hedgerow.bench.offline_engines import build
    from hedgerow.bench.sweep_model import PASS_CONTEXT, pass_times
    from hedgerow.drafting.spec import ProposerKind, SpecMode, SpecParams
    from hedgerow.server.engine.sequence import Request
    from hedgerow.verify.sampling import SamplingParams

    note_start(args)
    for flag in ("num_prompts", "max_new_tokens", "draft_tokens", "pass_samples"):
        if getattr(args, flag) < 1:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    load_prompts(args.prompts, args.num_prompts)  # a bad --prompts fails before the models load
    spec = SpecParams(mode=SpecMode.CHAIN, draft_tokens=args.draft_tokens, proposer=ProposerKind.MODEL)
    pairs, results = {}, []
    for entry in args.drafts:
        label, _, path = entry.rpartition("=")
        ns = argparse.Namespace(**{**vars(args), "draft": path, "adaptive": "none", "proposer": "model"})
        engine, tokenizer = build(ns, "auto", True)
        prompts = [tokenizer.encode(p) for p in load_prompts(args.prompts, args.num_prompts, tokenizer)]
        stats = []
        for i, ids in enumerate(tqdm(prompts, desc=Path(path).name, file=sys.stderr, leave=False)):
            out = engine.generate([Request(str(i), tuple(ids), SamplingParams(), args.max_new_tokens, spec)])
            stats.append(out[str(i)].stats)
        name = _unique(label or Path(path).name or path, pairs)
        pairs[name] = (engine.target, engine.draft)
        results.append({"name": name, "path": path, "random_weights": _made_by(path), **_shape(engine.draft.model),
                        **{k: v for k, v in acceptance_summary(stats).items() if k != "acceptance_length_histogram"}})
    times = pass_times(pairs, args.draft_tokens, PASS_CONTEXT, args.pass_samples, draft_verify=False)
    for r in results:
        t = times[r["name"]]
        r.update(t_draft=t["t_draft"], t_draft_pass=t["t_draft_pass"], t_target=t["t_target"], c=t["c"])
    data = {"config": new_config("drafts", args, target=results and pairs[results[0]["name"]][0].model.name_or_path,
                                 prompts=args.prompts, num_prompts=args.num_prompts,
                                 max_new_tokens=args.max_new_tokens, draft_tokens=args.draft_tokens,
                                 context=PASS_CONTEXT, compile=args.compile),
            "results": results}
    write_json(args.output, data)
    from hedgerow.bench import tables

    print(tables.drafts(results))
    return 0


def _shape(model) -> dict:
    """The draft's size, read off its native config (or transformers' names for it)."""
    c = model.config

    def size(*names):
        return next((getattr(c, n) for n in names if hasattr(c, n)), None)

    return {"layers": size("num_layers", "num_hidden_layers"), "hidden": size("hidden_size"),
            "intermediate": size("intermediate_size"), "heads": size("num_heads", "num_attention_heads"),
            "kv_heads": size("num_kv_heads", "num_key_value_heads"), "vocab": size("vocab_size"),
            "parameters": sum(p.numel() for p in model.parameters())}


def _made_by(path: str) -> str | None:
    """The command that made a random-weight draft (bench/random_draft.py), None for any other."""
    import json

    from hedgerow.bench.random_draft import MARKER

    marker = Path(path) / MARKER
    return json.loads(marker.read_text())["command"] if marker.is_file() else None


def _unique(name: str, taken) -> str:
    out, i = name, 2
    while out in taken:
        out, i = f"{name}-{i}", i + 1
    return out
