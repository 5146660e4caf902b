"""The engines of ``hedgerow bench offline``: one per model implementation its contenders name, what
each records about its fast path, and the implementations' pass times.

Both implementations load the same folders with the same tokenizer; ``auto`` resolves per model
(native for the Llama family), so an engine is named by the code its models actually run.
"""

from __future__ import annotations

import argparse

from hedgerow.bench.sweep_model import PASS_CONTEXT, pass_times


def build(args, impl: str, needs_draft: bool):
    """One engine (batch 1) of model implementation ``impl``, with the draft loaded when any
    contender needs it (then every engine has one: the pass times compare the drafts too).
    ``--compile`` applies to the native engine only: the transformers engine is the path Hedgerow
    had before its own model code, the reference the native path is measured against."""
    from hedgerow.server.cli import build_engine

    ns = argparse.Namespace(**{**vars(args), "mode": "chain" if needs_draft else "plain", "max_batch_size": 1,
                               "model_impl": impl, "compile": args.compile if impl != "transformers" else "off"})
    return build_engine(ns)  # validates the speculation flags too


def implementation(engine) -> str:
    """``native`` or ``transformers``: the code the engine's models run (named per model when the
    target's and the draft's differ, as ``auto`` may resolve them)."""
    target = engine.target.model.impl
    draft = engine.draft.model.impl if engine.draft is not None else target
    return target if draft == target else f"{target} (draft: {draft})"


def fast_path(args, runner) -> dict:
    """What a runner does with repeating passes: the compile setting in force (CPU), CUDA graphs
    (CUDA) and the attention backend."""
    return {"compile": args.compile if runner.compiled is not None else "off",
            "cuda_graphs": "auto" if runner.graphs is not None else "off", "attention_backend": runner.backend}


def build_engines(args, contenders, needs_draft: bool) -> tuple[dict, object]:
    """One engine per implementation the engine contenders ask for (``auto`` first; an explicit
    implementation that ``auto`` resolved to reuses its engine), and the shared tokenizer."""
    named = list(dict.fromkeys(c.impl for c in contenders if c.kind == "engine")) or [args.model_impl]
    wanted = sorted(named, key=lambda impl: impl != "auto")  # stable: otherwise in the contenders' order
    engines, tokenizer = {}, None
    for impl in wanted:
        same = next((e for e in engines.values() if implementation(e) == impl), None)
        if same is None:
            same, tokenizer = build(args, impl, needs_draft)
        engines[impl] = same
    return engines, tokenizer


def engine_info(args, contenders, engines: dict) -> dict[str, dict]:
    """Per contender: the implementation it ran on and its engine's fast-path settings (the
    transformers baselines run transformers' own ``generate``, with no Hedgerow fast path)."""
    none = {"implementation": "transformers", "compile": None, "cuda_graphs": None, "attention_backend": None}
    return {c.name: {"implementation": implementation(engines[c.impl]), **fast_path(args, engines[c.impl].target)}
            if c.kind == "engine" else none for c in contenders}


def measure_pass_times(args, engines: dict) -> dict[str, dict]:
    """``sweep_model.pass_times`` of every implementation's target and draft, the implementations
    interleaved: at 1 and γ+1 tokens after a context of ``PASS_CONTEXT`` rows (less when
    ``--max-model-len`` is shorter)."""
    unique = {implementation(e): e for e in engines.values()}
    context = max(0, min(PASS_CONTEXT, args.max_model_len - args.draft_tokens - 1))
    times = pass_times({impl: (e.target, e.draft) for impl, e in unique.items()}, args.draft_tokens, context,
                       args.pass_samples)
    for impl, e in unique.items():
        times[impl].update(verify_tokens=args.draft_tokens + 1, samples=args.pass_samples, **fast_path(args, e.target))
    return times
