"""The flags that several commands share, and their types: each checked while the flags are parsed,
before anything heavy (torch) is imported.

``add_model_args``, ``add_spec_args`` and ``add_sampling_args`` add an argument group each;
``generate``, ``serve`` and ``bench offline`` build their parsers from them.
"""

from __future__ import annotations

import argparse
import re

from hedgerow.drafting.spec import SPEC_LIMITS, check_spec_size

# --dtype's names: the loader's table (server/models/loader.py DTYPES), named here so that a wrong
# name is refused while parsing, before torch is imported (tests/test_first_hour.py checks they agree)
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")

# Torch's CPU threads when a model runs on the CPU and --cpu-threads is not given (`hedgerow serve`
# keeps its own default, one fewer than the cores). Measured on the project's 2-core machine with the
# embedded pair (README, "Using your own models"): a pass of a small model is dominated by per-op
# overhead, and a second OpenMP thread only adds synchronisation and contention.
DEFAULT_CPU_THREADS = 1


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

