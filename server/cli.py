"""``hedgerow`` command line: generate, serve, proxy, train-pair, bench.

Every user error ends with one line ``hedgerow: error: ...`` and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time

from hedgerow.server.engine.errors import HedgerowError


# Subcommands living in their own modules: each has ``add_arguments(parser)`` and ``run(args)``,
# and its docstring's first line is the subcommand's help.
SUBCOMMANDS = {
    "serve": "hedgerow.server.service.serve",
    "proxy": "hedgerow.server.proxy.cli",
    "train-pair": "hedgerow.server.embedded.train.cli",
    "bench": "hedgerow.bench.cli",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise HedgerowError(f"{self.prog.split()[-1]}: {message}")


def add_model_args(p: argparse.ArgumentParser, compile_default: str = "off") -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", help="target model: Hugging Face id or local folder (default: the embedded pair)")
    g.add_argument("--draft", help="draft model, same tokenizer as the target (default: the embedded pair)")
    g.add_argument("--target-device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    g.add_argument("--draft-device", default=None, help="default: the target's device")
    g.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--max-model-len", type=int, default=2048, help="context per sequence, prompt included")
    g.add_argument(
        "--cpu-threads", type=int, default=None,
        help="torch threads for CPU inference (default: torch's, one per core; `hedgerow serve`: one core "
        "fewer, left to the gRPC threads); on a shared machine fewer threads avoid OpenMP oversubscription",
    )
    g.add_argument(
        "--attention-backend", default="auto", choices=["auto", "reference", "cuda"],
        help="auto = reference (SDPA) until the CUDA kernels are validated on a GPU; cuda = cuda/ kernels (experimental)",
    )
    g.add_argument(
        "--model-impl", default="auto", choices=["auto", "native", "transformers"],
        help="auto = Hedgerow's own model code for the Llama family (Llama, Mistral, Qwen2/3), transformers' "
        "modules for every other architecture; a log line says which",
    )
    g.add_argument(
        "--compile", default=compile_default, choices=["auto", "on", "off"],
        help="CPU: torch.compile each kind of pass; on = before serving (tens of seconds per model the first "
        f"time), auto = in the background, kept where it times faster (default: {compile_default})",
    )
    g.add_argument(
        "--cuda-graphs", default="auto", choices=["auto", "off"],
        help="CUDA: capture decode and verify passes as CUDA graphs, one per shape bucket (default: auto)",
    )


def add_spec_args(p: argparse.ArgumentParser, include_mode: bool = True, title: str = "speculation") -> None:
    g = p.add_argument_group(title)
    if include_mode:
        g.add_argument("--mode", default="chain", choices=["plain", "chain", "tree"],
                       help="plain = plain decoding, one target pass per token (no draft)")
    g.add_argument("--draft-tokens", type=int, default=4, help="draft tokens per step (chain)")
    g.add_argument("--tree-budget", type=int, default=16, help="draft nodes per step below the root (tree)")
    g.add_argument("--tree-depth", type=int, default=6, help="levels below the root (tree)")
    g.add_argument("--tree-topk", type=int, default=4, help="children per expanded node (tree)")
    g.add_argument("--tree-static", action="store_true", help="a fixed top-k rank shape instead of a dynamic tree")
    g.add_argument(
        "--adaptive", default="cost", choices=["none", "heuristic", "confidence", "cost"],
        help="draft-size policy (default cost: the draft budget that maximises measured tokens/s, 0 when speculation "
        "does not pay)",
    )
    g.add_argument(
        "--overlap", default="none", choices=["none", "pearl", "branch"],
        help="draft while the target verifies: pearl = the continuation, branch = also alternatives to the last draft token",
    )


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="in (0, 1]; 1 = off")
    g.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hedgerow", description="Speculative-decoding inference server")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate text for one prompt, streaming to stdout")
    add_model_args(gen)
    add_spec_args(gen)
    add_sampling_args(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats) instead")
    gen.set_defaults(func=cmd_generate)

    for name, module in SUBCOMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


# --- shared construction ----------------------------------------------------------------------
def resolve_models(args) -> tuple[str, str | None]:
    target, draft = args.target, args.draft
    if target is None:
        try:
            from hedgerow.server.embedded import default_pair
        except ImportError:
            raise HedgerowError("no --target given and the embedded model pair is not installed") from None
        embedded_target, embedded_draft = default_pair()
        target = embedded_target
        draft = draft or embedded_draft
    if getattr(args, "mode", "chain") == "plain":
        draft = None
    elif draft is None:
        raise HedgerowError(f"--mode {args.mode} needs --draft (or --mode plain)")
    return target, draft


def build_engine(args):
    """Load the pair and build an engine from the model, speculation and context flags."""
    from hedgerow.server.engine.engine import Engine, EngineConfig
    from hedgerow.server.models.loader import load_pair
    from hedgerow.server.engine.runner import ModelRunner

    if args.max_model_len < 2:
        raise HedgerowError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    for flag in ("draft_tokens", "tree_budget", "tree_depth"):
        if getattr(args, flag) < 0:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.tree_topk < 1:
        raise HedgerowError(f"--tree-topk must be >= 1, got {args.tree_topk}")
    threads = getattr(args, "cpu_threads", None)
    if threads is not None:
        if threads < 1:
            raise HedgerowError(f"--cpu-threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    target, draft = resolve_models(args)
    pair = load_pair(target, draft, target_device=args.target_device, draft_device=args.draft_device, dtype=args.dtype,
                     model_impl=args.model_impl, max_len=args.max_model_len)
    slots = getattr(args, "max_batch_size", 1)
    config = EngineConfig(
        max_model_len=args.max_model_len,
        max_batch_size=slots,
        max_waiting=getattr(args, "max_queue", EngineConfig.max_waiting),  # `hedgerow serve --max-queue`
        spec=spec_from_args(args),
        adaptive=args.adaptive,
        overlap=args.overlap,
    )
    backend = getattr(args, "attention_backend", "auto")
    try:
        fast = dict(backend=backend, compile=args.compile, cuda_graphs=args.cuda_graphs)
        t = ModelRunner(pair.target, num_slots=slots, max_len=args.max_model_len, name="target", **fast)
        d = ModelRunner(pair.draft, num_slots=slots, max_len=args.max_model_len, name="draft", **fast) if pair.draft else None
    except ValueError as exc:
        raise HedgerowError(f"--attention-backend: {exc}") from None
    return Engine(t, d, eos_token_ids=eos_ids(pair.tokenizer, pair.target), config=config), pair.tokenizer


def spec_from_args(args):
    from hedgerow.server.engine.sequence import SpecMode, SpecParams

    return SpecParams(
        mode=SpecMode(args.mode),
        draft_tokens=args.draft_tokens,
        tree_budget=args.tree_budget,
        tree_depth=args.tree_depth,
        tree_topk=args.tree_topk,
        tree_static=args.tree_static,
    )


def eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(source)
    return ids


def sampling_from_args(args):
    from hedgerow.verify.sampling import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    except ValueError as exc:
        raise HedgerowError(f"--{str(exc).replace('_', '-')}") from None


# --- generate ---------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from hedgerow.server.detokenize import IncrementalDetokenizer
    from hedgerow.server.engine.sequence import Request

    if not args.prompt:
        raise HedgerowError("--prompt is empty")
    if args.max_new_tokens <= 0:
        raise HedgerowError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    sampling = sampling_from_args(args)
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


def setup_logging() -> None:
    """Hedgerow's own log lines (which model implementation, compile timings, request failures)
    on stderr, one line each; other libraries keep their own settings."""
    log = logging.getLogger("hedgerow")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("hedgerow: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    setup_logging()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except HedgerowError as exc:
        print(f"hedgerow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
