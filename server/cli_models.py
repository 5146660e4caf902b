"""From the model and speculation flags to a loaded engine: which models to load, refused in one
line before anything loads when they cannot be had (a missing folder, an uncached Hugging Face id
with the hub out of reach), then the pair, the runners and the engine.

Torch, transformers and the engine are imported inside the functions that need them, so that the
checks cost well under a second.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

from hedgerow.server.cli_args import apply_cpu_threads
from hedgerow.server.errors import HedgerowError

log = logging.getLogger("hedgerow.cli")


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


def build_engine(args):
    """Load the pair and build an engine from the model, speculation and context flags."""
    target, draft = resolve_models(args)
    devices = {args.target_device, args.draft_device or args.target_device}
    if args.target is not None:
        what = f"target {target}" + (f" and draft {draft}" if draft else "")
    elif not draft:
        what = "the embedded target"
    else:
        what = "the embedded pair" if args.draft is None else f"the embedded target and draft {draft}"
    log.info("loading %s on %s", what, " and ".join(sorted(devices)))
    apply_cpu_threads(getattr(args, "cpu_threads", None), devices)

    from hedgerow.server.engine.engine import Engine, EngineConfig
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.models.loader import load_pair

    pair = load_pair(target, draft, target_device=args.target_device, draft_device=args.draft_device, dtype=args.dtype,
                     model_impl=args.model_impl, max_len=args.max_model_len, quiet=True)
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
        d = ModelRunner(pair.draft, num_slots=slots, max_len=args.max_model_len, name="draft", drafts=True,
                        **fast) if pair.draft else None
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else ""

