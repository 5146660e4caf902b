"""Load target and draft through transformers, from a Hugging Face id or a local folder.

Hedgerow's attention function is registered and selected at load time, so the runner owns the
KV cache and the mask (server/models/hf.py). A draft and a target must share a tokenizer: same vocabulary, same
special tokens. A mismatched pair is refused here, naming both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hedgerow.server.errors import HedgerowError
from hedgerow.server.models import hf
from hedgerow.server.models.light import generation_defaults, light_tokenizer, reads_light

log = logging.getLogger("hedgerow.loader")
MODEL_IMPLS = ("auto", "native", "transformers")
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
    """The tokenizer at ``path``: read directly where that is exact (server/models/light.py), else
    through transformers."""
    check_source(path, role)
    local = Path(path).expanduser()
    if local.is_dir() and (tok := light_tokenizer(local)) is not None:
        return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(path))
    except (OSError, ValueError) as exc:
        raise HedgerowError(f"cannot load the {role} tokenizer from {path!r}: {_first_line(exc)}") from None


def load_model(path: str, role: str, device: torch.device, dtype: torch.dtype, impl: str = "auto", max_len: int = 2048):
    """The model at ``path`` as the runner drives it: native when ``impl`` is ``native``, or
    ``auto`` and the architecture is one the native code runs exactly; transformers otherwise.
    Says which in one log line."""
    if impl not in MODEL_IMPLS:
        raise HedgerowError(f"--model-impl must be one of {', '.join(MODEL_IMPLS)}, got {impl!r}")
    check_source(path, role)
    if impl == "transformers":
        log.info("%s model: transformers (--model-impl transformers)", role)
        return _load_transformers(path, role, device, dtype)
    from hedgerow.server.models.native import UnsupportedModel, load_native

    try:
        model = load_native(os.path.expanduser(path), device=device, dtype=dtype, max_positions=max_len)
    except UnsupportedModel as exc:
        if impl == "native":
            raise HedgerowError(f"--model-impl native: the {role} model {path} cannot run natively: {exc}") from None
        log.info("%s model: transformers (%s)", role, exc)
        return _load_transformers(path, role, device, dtype)
    except (OSError, ValueError) as exc:
        raise HedgerowError(f"cannot load the {role} model from {path!r}: {_first_line(exc)}") from None
    model.generation_config = _generation_config(path)
    model.name_or_path = path
    log.info("%s model: native %s", role, model.config.architecture)
    return model


def _load_transformers(path: str, role: str, device: torch.device, dtype: torch.dtype) -> hf.TransformersModel:
    from transformers import AutoModelForCausalLM

    hf.register()
    try:
        model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(path), dtype=dtype, attn_implementation=hf.ATTENTION)
    except (OSError, ValueError) as exc:
        raise HedgerowError(f"cannot load the {role} model from {path!r}: {_first_line(exc)}") from None
    return hf.TransformersModel(model.to(device))


def _generation_config(path: str):
    """generation_config.json, where a model keeps EOS ids its tokenizer may not name (None if absent)."""
    local = Path(path).expanduser()
    if local.is_dir():
        return generation_defaults(local)
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(os.path.expanduser(path))
    except OSError:
        return None


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
    target: object  # a NativeCausalLM or a hf.TransformersModel
    draft: object | None


def load_pair(
    target: str,
    draft: str | None,
    *,
    target_device: str = "cpu",
    draft_device: str | None = None,
    dtype: str | None = None,
    model_impl: str = "auto",
    max_len: int = 2048,
    quiet: bool = False,
) -> LoadedPair:
    """``quiet``: no "Loading weights" bars from transformers, where it is used at all (the command
    line says what loads in one line)."""
    if quiet and (model_impl == "transformers" or not all(reads_light(p) for p in (target, draft) if p)):
        quiet_transformers()
    tdev = parse_device(target_device, "--target-device")
    ddev = parse_device(draft_device or target_device, "--draft-device")
    tokenizer = load_tokenizer(target, "target")
    if draft is not None:
        check_pair(tokenizer, load_tokenizer(draft, "draft"), target, draft)
    target_model = load_model(target, "target", tdev, resolve_dtype(dtype, tdev), model_impl, max_len)
    draft_model = load_model(draft, "draft", ddev, resolve_dtype(dtype, ddev), model_impl, max_len) if draft else None
    return LoadedPair(tokenizer, target_model, draft_model)


def quiet_transformers() -> None:
    """Turn transformers' progress bars off and keep huggingface_hub's download bars as they were
    (transformers' switch turns both off): downloads are progress worth seeing. Only the command
    line asks for this; a library user's settings are theirs."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as transformers_logging

    download_bars = not hub.are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()
    if download_bars:
        hub.enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
