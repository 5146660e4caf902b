"""generate text for one prompt, streaming to stdout

    hedgerow generate --prompt "def fib(n):" [--target T --draft D] [--max-new-tokens 128] [--json]

The models are checked to exist before the sampling flags are (which imports torch), so a wrong
path is named first; ``--json`` prints one object (text, token ids, finish reason, stats) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from hedgerow.server.cli_args import add_model_args, add_sampling_args, add_spec_args, int_at_least
from hedgerow.server.cli_models import build_engine, resolve_models, sampling_from_args
from hedgerow.server.errors import HedgerowError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_spec_args(p)
    add_sampling_args(p)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", required=True, help="the text to continue (required)")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=128, help="tokens to generate at most")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats) instead")


def run(args) -> int:
    if not args.prompt:
        raise HedgerowError("--prompt is empty")
    resolve_models(args)  # a missing model is named before the sampling checks import torch
    sampling = sampling_from_args(args)

    from hedgerow.server.detokenize import IncrementalDetokenizer
    from hedgerow.server.engine.sequence import Request

    engine, tokenizer = build_engine(args)
    prompt_ids = tokenizer.encode(args.prompt)
    req = Request("cli", tuple(prompt_ids), sampling, args.max_new_tokens, ignore_eos=args.ignore_eos)
    seq = engine.add_request(req)
    detok = IncrementalDetokenizer(tokenizer)
    start = time.perf_counter()
    while engine.has_work():
        for out in engine.step().outputs:
            if out.error:
                raise HedgerowError(f"generation failed: {out.error}")
            delta = detok.push(out.token_ids)
            if not args.json and delta:
                sys.stdout.write(delta)
                sys.stdout.flush()
    elapsed = time.perf_counter() - start
    tail = detok.flush()
    if not args.json:
        sys.stdout.write(tail + "\n")
        return 0
    stats = seq.stats.as_dict()
    stats["tokens_per_second"] = round(seq.num_generated / elapsed, 3) if elapsed > 0 else None
    stats["wall_seconds"] = round(elapsed, 4)
    print(
        json.dumps(
            {
                "text": tokenizer.decode(seq.generated, skip_special_tokens=True),
                "token_ids": seq.generated,
                "finish_reason": seq.finish_reason.value,
                "prompt_tokens": seq.prompt_len,
                "mode": args.mode,
                "stats": stats,
            }
        )
    )
    return 0

