"""Load target and draft through transformers, from a Hugging Face id or a local folder.

Hedgerow's attention function is registered and selected at load time, so the runner owns the
KV cache and the mask (server/models/hf.py). A draft and a target must share a tokenizer: same vocabulary, same
special tokens. A mismatched pair is refused here, naming both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hedgerow.server.engine.errors import HedgerowError
from hedgerow.server.models import hf

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_device(name: str, flag: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise HedgerowError(f"{flag} {name!r} is not a device (use cpu, cuda, cuda:0, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HedgerowError(f"{flag} {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HedgerowError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise HedgerowError(f"{flag} {name!r}: only cpu and cuda devices are supported")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """Default: float32 on CPU, bfloat16 on CUDA."""
    if name is None or name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise HedgerowError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.sep + os.sep in path or path.count("/") != 1


def check_source(path: str, role: str) -> None:
    if Path(path).expanduser().is_dir():
        if not (Path(path).expanduser() / "config.json").is_file():
            raise HedgerowError(f"{role} model folder {path} has no config.json")
        return
    if _looks_local(path):
        raise HedgerowError(f"{role} model folder not found: {path}")


def load_tokenizer(path: str, role: str):
    from transformers import AutoTokenizer

    check_source(path, role)
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as exc:
        raise HedgerowError(f"cannot load the {role} tokenizer from {path!r}: {_first_line(exc)}") from None


def load_model(path: str, role: str, device: torch.device, dtype: torch.dtype) -> hf.TransformersModel:
    from transformers import AutoModelForCausalLM

    check_source(path, role)
    hf.register()
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), dtype=dtype, attn_implementation=hf.ATTENTION)
    except (OSError, ValueError) as exc:
        raise HedgerowError(f"cannot load the {role} model from {path!r}: {_first_line(exc)}") from None
    return hf.TransformersModel(model.to(device))


def _special_tokens(tok) -> dict[str, object]:
    return {name: getattr(tok, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}


def check_pair(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    """Refuse a draft whose tokenizer differs from the target's (vocabulary or special tokens)."""
    tv, dv = target_tok.get_vocab(), draft_tok.get_vocab()
    if tv != dv:
        only_t = len(tv.keys() - dv.keys())
        only_d = len(dv.keys() - tv.keys())
        moved = sum(1 for k in tv.keys() & dv.keys() if tv[k] != dv[k])
        raise HedgerowError(
            f"draft {draft_name} and target {target_name} do not share a tokenizer: vocabularies differ "
            f"({len(dv)} vs {len(tv)} tokens; {only_d} only in the draft, {only_t} only in the target, "
            f"{moved} with different ids)"
        )
    ts, ds = _special_tokens(target_tok), _special_tokens(draft_tok)
    diff = [f"{k}: {ds[k]!r} vs {ts[k]!r}" for k in ts if ts[k] != ds[k]]
    if diff:
        raise HedgerowError(
            f"draft {draft_name} and target {target_name} do not share special tokens ({'; '.join(diff)})"
        )


@dataclass
class LoadedPair:
    tokenizer: object
    target: hf.TransformersModel
    draft: hf.TransformersModel | None


def load_pair(
    target: str,
    draft: str | None,
    *,
    target_device: str = "cpu",
    draft_device: str | None = None,
    dtype: str | None = None,
) -> LoadedPair:
    tdev = parse_device(target_device, "--target-device")
    ddev = parse_device(draft_device or target_device, "--draft-device")
    tokenizer = load_tokenizer(target, "target")
    if draft is not None:
        check_pair(tokenizer, load_tokenizer(draft, "draft"), target, draft)
    target_model = load_model(target, "target", tdev, resolve_dtype(dtype, tdev))
    draft_model = load_model(draft, "draft", ddev, resolve_dtype(dtype, ddev)) if draft else None
    return LoadedPair(tokenizer, target_model, draft_model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
