"""``hedgerow`` command line: generate, serve, proxy, train-pair, bench.

Every user error ends with one line ``hedgerow: error: ...`` and exit status 2, never a traceback.
What can be checked without torch is checked first, while the flags are parsed (ranges, --dtype
names, device syntax) and then before any model loads (that the model folders or Hugging Face ids
exist), so a mistake costs well under a second.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

from hedgerow.drafting.spec import SPEC_LIMITS, check_spec_size
from hedgerow.server.errors import HedgerowError

log = logging.getLogger("hedgerow.cli")

# Subcommands living in their own modules: each has ``add_arguments(parser)`` and ``run(args)``,
# and its docstring's first line is the subcommand's help.
SUBCOMMANDS = {
    "serve": "hedgerow.server.service.serve",
    "proxy": "hedgerow.server.proxy.cli",
    "train-pair": "hedgerow.server.embedded.train.cli",
    "bench": "hedgerow.bench.cli",
}

# --dtype's names: the loader's table (server/models/loader.py DTYPES), named here so that a wrong
# name is refused while parsing, before torch is imported (tests/test_first_hour.py checks they agree)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")

# Torch's CPU threads when a model runs on the CPU and --cpu-threads is not given (`hedgerow serve`
# keeps its own default, one fewer than the cores). Measured on the project's 2-core machine with the
# embedded pair (README, "Using your own models"): a pass of a small model is dominated by per-op
# overhead, and a second OpenMP thread only adds synchronisation and contention.
DEFAULT_CPU_THREADS = 1


class HelpFormatter(argparse.HelpFormatter):
    """Every optional flag's help ends with its default, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.required or action.default is argparse.SUPPRESS
                or not action.option_strings):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            default = "on" if action.default else "off"
        elif action.default is None:
            default = "none"
        else:
            default = "%(default)s"
        return f"{text} (default: {default})".lstrip()


class _Parser(argparse.ArgumentParser):
    """The top-level parser: an error is one line, prefixed by the subcommand it concerns."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, no usage dump
        where = self.prog.removeprefix("hedgerow").strip()  # "" at the top, "generate", "bench offline"
        raise HedgerowError(f"{where}: {message}" if where else message)


class _CommandParser(_Parser):
    """A subcommand's parser: a flag it does not know is its error, named after it (argparse would
    hand it up to the top-level parser, whose message names no subcommand)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


# --- flag types: checked while parsing, before anything heavy is imported ----------------------
def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def spec_size(name: str):
    """An argparse type: an integer within the engine's limit for ``name`` (drafting/spec.py
    SPEC_LIMITS, the same for gRPC and proxy requests)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            return check_spec_size(name, value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(name).strip()) from None

    return parse


def device_name(text: str) -> str:
    """An argparse type: ``cpu``, ``cuda`` or ``cuda:N`` (whether that CUDA device exists is checked
    when the models load)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (use cpu, cuda, cuda:0, cuda:1, ...)")
    return text


def add_cpu_threads_arg(g) -> None:
    """``--cpu-threads``, shared by every command that runs models (``apply_cpu_threads`` sets it)."""
    g.add_argument(
        "--cpu-threads", type=int_at_least(1), default=None, metavar="N",
        help=f"torch threads for CPU inference (default: {DEFAULT_CPU_THREADS}, measured fastest for the embedded pair "
        "and other small models, whose passes are too short to share; give larger models more; `hedgerow serve`: "
        "one fewer than the cores, left to the gRPC threads); models on a GPU keep torch's setting unless it is given",
    )


def apply_cpu_threads(threads: int | None, devices) -> None:
    """Set torch's CPU threads: ``threads`` if given, else DEFAULT_CPU_THREADS when any of
    ``devices`` is the CPU (a GPU run keeps torch's own setting)."""
    if threads is None and "cpu" not in devices:
        return
    import torch

    torch.set_num_threads(threads or DEFAULT_CPU_THREADS)


def add_model_args(p: argparse.ArgumentParser, compile_default: str = "off") -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", help="target model: Hugging Face id or local folder (default: the embedded pair)")
    g.add_argument("--draft", help="draft model, same tokenizer as the target (default: the embedded pair's "
                   "draft when --target is not given)")
    g.add_argument("--target-device", type=device_name, default="cpu", help="cpu, cuda, cuda:N")
    g.add_argument("--draft-device", type=device_name, default=None, help="cpu, cuda, cuda:N (default: the target's)")
    g.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="weights and activations (default: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--max-model-len", type=int_at_least(2), default=2048, help="context per sequence, prompt included")
    add_cpu_threads_arg(g)
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
        "time), auto = in the background, kept where it times faster",
    )
    g.add_argument(
        "--cuda-graphs", default="auto", choices=["auto", "off"],
        help="CUDA: capture decode and verify passes as CUDA graphs, one per shape bucket",
    )


def add_spec_args(p: argparse.ArgumentParser, include_mode: bool = True, title: str = "speculation") -> None:
    """The speculation flags; their ranges are the engine's (drafting/spec.py SPEC_LIMITS)."""

    def limits(name: str) -> str:
        return "[{}, {}]".format(*SPEC_LIMITS[name])

    g = p.add_argument_group(title)
    if include_mode:
        g.add_argument("--mode", default="chain", choices=["plain", "chain", "tree"],
                       help="plain = plain decoding, one target pass per token (no draft); chain = a chain of "
                       "draft tokens per step; tree = a token tree verified in one pass")
    g.add_argument("--draft-tokens", type=spec_size("draft_tokens"), default=4,
                   help=f"draft tokens per step (chain), in {limits('draft_tokens')}")
    g.add_argument("--tree-budget", type=spec_size("tree_budget"), default=16,
                   help=f"draft nodes per step below the root (tree), in {limits('tree_budget')}")
    g.add_argument("--tree-depth", type=spec_size("tree_depth"), default=6,
                   help=f"levels below the root (tree), in {limits('tree_depth')}")
    g.add_argument("--tree-topk", type=spec_size("tree_topk"), default=4,
                   help=f"children per expanded node (tree), in {limits('tree_topk')}")
    g.add_argument("--tree-static", action="store_true", help="a fixed top-k rank shape instead of a dynamic tree")
    g.add_argument("--proposer", default=None, choices=["model", "ngram", "hybrid"],
                   help="where draft tokens come from: model = the draft model; ngram = prompt lookup, copying what "
                   "followed the text's own suffix earlier (no draft pass, no draft model needed); hybrid = the draft "
                   "model's draft with n-gram continuations as extra branches (default: hybrid with a draft model, "
                   "ngram without)")
    g.add_argument("--ngram-max", type=spec_size("ngram_max"), default=4,
                   help=f"n-gram lookup: the longest suffix matched, in tokens, in {limits('ngram_max')}")
    g.add_argument("--ngram-min", type=spec_size("ngram_min"), default=2,
                   help=f"n-gram lookup: the shortest suffix matched, in tokens, in {limits('ngram_min')}")
    g.add_argument("--ngram-pool", type=int_at_least(0), default=0,
                   help="n-gram lookup: entries of a server-wide pool of n-grams from recent outputs, asked when a "
                   "request's own text has no match (least recently used dropped first; 0 = no pool)")
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
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1]; 1 = off")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, a fresh one per request)")


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The command line. ``commands``: the subcommands whose flags are added (default: all); the
    others are listed but their modules are not imported, so that a command's mistake is reported
    without waiting for another command's imports (torch, for some)."""
    parser = _Parser(prog="hedgerow", description="Speculative-decoding inference server. "
                     "`hedgerow COMMAND --help` lists a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)

    gen = sub.add_parser("generate", help="generate text for one prompt, streaming to stdout")
    add_model_args(gen)
    add_spec_args(gen)
    add_sampling_args(gen)
    g = gen.add_argument_group("generation")
    g.add_argument("--prompt", required=True, help="the text to continue (required)")
    g.add_argument("--max-new-tokens", type=int_at_least(1), default=128, help="tokens to generate at most")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token_ids, stats) instead")
    gen.set_defaults(func=cmd_generate)

    for name, module in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=_summary(module))
        if commands is None or name in commands:
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
    return parser


def _summary(module: str) -> str:
    """The first line of a subcommand module's docstring, read from its source without importing it."""
    source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
    return ast.get_docstring(ast.parse(source)).strip().splitlines()[0]


# --- shared construction ----------------------------------------------------------------------
def resolve_models(args) -> tuple[str, str | None]:
    """The target and draft to load (the embedded pair without --target), checked to exist before
    anything loads: the target first, so a wrong --target is the error shown."""
    target, draft = args.target, args.draft
    if target is None:
        try:
            from hedgerow.server.embedded import default_pair
        except ImportError:
            raise HedgerowError("no --target given and the embedded model pair is not installed") from None
        embedded_target, embedded_draft = default_pair()
        target = embedded_target
        draft = draft or embedded_draft
    check_model_source(target, "target")
    if getattr(args, "mode", "chain") == "plain":
        return target, None
    if draft is None:
        raise HedgerowError(f"--mode {args.mode} needs --draft (or --mode plain)")
    check_model_source(draft, "draft")
    return target, draft


def _looks_local(name: str) -> bool:
    """The loader's rule (server/models/loader.py): anything but ``owner/name`` is a path."""
    return name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") != 1


def check_model_source(name: str, role: str) -> None:
    """Refuse, naming ``name``, a model that cannot be had: a folder that is not there or has no
    config.json, or a Hugging Face id that is neither in the local cache nor reachable."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise HedgerowError(f"{role} model folder {name} has no config.json")
        return
    if _looks_local(name):
        raise HedgerowError(f"{role} model folder not found: {name}")
    check_hub_id(name, role)


def check_hub_id(name: str, role: str) -> None:
    """A Hugging Face id, offline (HF_HUB_OFFLINE, or the hub cannot be reached): in the cache, or
    refused in one line. Left to itself, huggingface_hub retries a dead connection for about a
    minute per file; with the files cached and the hub unreachable, it is switched to offline mode
    for this process, so the cache is read at once."""
    from huggingface_hub import constants, try_to_load_from_cache

    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except ValueError as exc:  # huggingface_hub's HFValidationError: not a possible id
        raise HedgerowError(f"{role} model {name!r} is neither a local folder nor a Hugging Face id: "
                            f"{_first_line(exc)}") from None
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set"
    else:
        why = hub_unreachable()
        if why is None:
            return
    if not cached:
        raise HedgerowError(f"{role} model {name} is not a local folder and not in the Hugging Face cache, "
                            f"and {why}")
    if not constants.HF_HUB_OFFLINE:
        log.info("%s: loading %s from the Hugging Face cache", why, name)
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"


@functools.cache
def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face endpoint cannot be reached within ``timeout`` seconds (None when it
    answers). One request through huggingface_hub's own session, so proxies and certificates are
    those it would use."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # any transport failure (DNS, refused, timeout, TLS) means the same here
        return f"{constants.ENDPOINT} cannot be reached ({_first_line(exc) or type(exc).__name__})"
    return None


def quiet_transformers() -> None:
    """No "Loading weights" bars from transformers while the command line loads models (one log
    line says what loads). Download bars, from huggingface_hub, stay: they are progress worth
    seeing. Only the command line calls this; a library user's settings are theirs."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    download_bars = not hub.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns huggingface_hub's off
    if download_bars:
        hub.enable_progress_bars()


def build_engine(args):
    """Load the pair and build an engine from the model, speculation and context flags."""
    target, draft = resolve_models(args)
    devices = {args.target_device, args.draft_device or args.target_device}
    if args.target is None:
        what = "the embedded pair" if draft else "the embedded target"
    else:
        what = f"target {target}" + (f" and draft {draft}" if draft else "")
    log.info("loading %s on %s", what, " and ".join(sorted(devices)))
    apply_cpu_threads(getattr(args, "cpu_threads", None), devices)
    quiet_transformers()

    from hedgerow.server.engine.engine import Engine, EngineConfig
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.models.loader import load_pair

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
        ngram_pool=args.ngram_pool,
    )
    backend = getattr(args, "attention_backend", "auto")
    if args.compile == "on" and "cpu" in devices:
        log.info("compiling the passes (--compile on: tens of seconds per model the first time)")
    try:
        fast = dict(backend=backend, compile=args.compile, cuda_graphs=args.cuda_graphs)
        t = ModelRunner(pair.target, num_slots=slots, max_len=args.max_model_len, name="target", **fast)
        d = ModelRunner(pair.draft, num_slots=slots, max_len=args.max_model_len, name="draft", **fast) if pair.draft else None
    except ValueError as exc:
        raise HedgerowError(f"--attention-backend: {exc}") from None
    if d is not None and args.adaptive == "cost":
        log.info("timing target and draft passes for the cost policy")
    return Engine(t, d, eos_token_ids=eos_ids(pair.tokenizer, pair.target), config=config), pair.tokenizer


def spec_from_args(args):
    from hedgerow.drafting.spec import SpecMode, SpecParams

    try:
        return SpecParams(
            mode=SpecMode(args.mode),
            draft_tokens=args.draft_tokens,
            tree_budget=args.tree_budget,
            tree_depth=args.tree_depth,
            tree_topk=args.tree_topk,
            tree_static=args.tree_static,
            proposer=args.proposer,
            ngram_max=args.ngram_max,
            ngram_min=args.ngram_min,
        )
    except ValueError as exc:  # a caller that built its arguments without the parser
        raise HedgerowError(f"--{str(exc).replace('_', '-')}") from None


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""


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
        argv = sys.argv[1:] if argv is None else argv
        parser = build_parser(commands=[word for word in argv[:1] if not word.startswith("-")])
        args = parser.parse_args(argv)
        if args.command is None:  # bare `hedgerow`: what it can do
            parser.print_help()
            return 0
        return args.func(args)
    except HedgerowError as exc:
        print(f"hedgerow: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
