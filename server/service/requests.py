"""A ``GenerateRequest`` as an engine ``Request``: every field checked, cheapest checks first.

A refusal is a HedgerowError whose message starts with the offending field (the service maps it to
INVALID_ARGUMENT). Sizes are checked before anything expensive: a text prompt's UTF-8 bytes against
``max_prompt_bytes`` before it is tokenized, token ids against the context before they are scanned.
Tokenizing runs on the service's worker threads, never on the event loop, so one large prompt costs
the other clients nothing but a share of the CPU. Speculation sizes are checked by the engine's own
rule (``SpecParams``, drafting/spec.py), the one the command line and the proxy's extension share.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, replace

from hedgerow.drafting.spec import ProposerKind
from hedgerow.server.engine.samples import MAX_SAMPLES, sample_requests
from hedgerow.server.engine.sequence import Request, SpecMode, SpecParams
from hedgerow.server.errors import HedgerowError
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.verify.logprobs import MAX_TOP_LOGPROBS
from hedgerow.verify.sampling import SamplingParams

MODES = {
    pb.SPECULATION_MODE_PLAIN: SpecMode.PLAIN,
    pb.SPECULATION_MODE_CHAIN: SpecMode.CHAIN,
    pb.SPECULATION_MODE_TREE: SpecMode.TREE,
}
MODE_NAMES = {v: k for k, v in MODES.items()}
PROPOSERS = {
    pb.PROPOSER_MODEL: ProposerKind.MODEL,
    pb.PROPOSER_NGRAM: ProposerKind.NGRAM,
    pb.PROPOSER_HYBRID: ProposerKind.HYBRID,
}
PROPOSER_NAMES = {v: k for k, v in PROPOSERS.items()}


@dataclass(frozen=True)
class ServiceConfig:
    """What the edge allows and reports; the engine's own limits come from its EngineConfig."""

    target_name: str = ""  # as clients see it (ModelInfo): a Hugging Face id or a short name, no path
    draft_name: str = ""
    default_max_new_tokens: int = 128  # capped at max_model_len
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # per stop string
    max_stop_token_ids: int = 64
    max_request_id_chars: int = 256
    max_prompt_bytes: int = 1 << 20  # UTF-8 bytes of a text prompt, refused before it is tokenized
    max_request_tokens: int = 16384  # new tokens a request may ask for over its samples: n * max_new_tokens

    def __post_init__(self) -> None:
        for name in ("default_max_new_tokens", "max_stop_chars", "max_request_id_chars", "max_prompt_bytes",
                     "max_request_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def message_limit(self, max_model_len: int) -> int:
        """gRPC's largest request message in bytes (decompressed). Four times what the largest valid
        request occupies (a prompt at ``max_prompt_bytes``, or ``max_model_len`` token ids of at most 5
        bytes each, plus stop strings and the request id), so that an oversized prompt still reaches
        the service, which refuses it by name and counts it; beyond that gRPC refuses the message
        itself (RESOURCE_EXHAUSTED) before parsing or inflating more of it."""
        largest = max(self.max_prompt_bytes, 5 * max_model_len)
        extras = 4 * (self.max_stop_strings * self.max_stop_chars + self.max_request_id_chars) \
            + 5 * self.max_stop_token_ids + 1024
        return 4 * (largest + extras)


class RequestConverter:
    """Turns a ``GenerateRequest`` into the ``Request`` of each of its n samples and its stop strings
    (``await convert(msg)``), or raises HedgerowError whose message starts with the offending field."""

    def __init__(self, tokenizer, *, vocab_size: int, max_model_len: int, default_spec: SpecParams,
                 config: ServiceConfig, pool: Executor):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.default_spec = default_spec
        self.config = config
        self.pool = pool

    async def __call__(self, msg: pb.GenerateRequest) -> tuple[list[Request], tuple[str, ...]]:
        cfg = self.config
        rid = msg.request_id or uuid.uuid4().hex
        if len(rid) > cfg.max_request_id_chars:
            raise HedgerowError(f"request_id is {len(rid)} characters; at most {cfg.max_request_id_chars}")
        n = msg.n or 1
        if n > MAX_SAMPLES:
            raise HedgerowError(f"n must be in [1, {MAX_SAMPLES}] (samples of the prompt), got {n}")
        text, ids = self._prompt(msg)
        sampling = self._sampling(msg.sampling)
        stopping = msg.stopping
        max_new = stopping.max_new_tokens if stopping.HasField("max_new_tokens") else min(
            cfg.default_max_new_tokens, self.max_model_len)
        if not 1 <= max_new <= self.max_model_len:
            raise HedgerowError(f"stopping.max_new_tokens must be in [1, {self.max_model_len}] "
                                f"(max_model_len), got {max_new}")
        if n * max_new > cfg.max_request_tokens:
            raise HedgerowError(f"n = {n} samples of up to {max_new} new tokens each is {n * max_new}; a request may "
                                f"ask for at most {cfg.max_request_tokens} new tokens over its samples")
        stops = tuple(stopping.stop)
        if len(stops) > cfg.max_stop_strings:
            raise HedgerowError(f"stopping.stop has {len(stops)} strings; at most {cfg.max_stop_strings}")
        for i, s in enumerate(stops):
            if not s:
                raise HedgerowError(f"stopping.stop[{i}] is empty")
            if len(s) > cfg.max_stop_chars:
                raise HedgerowError(f"stopping.stop[{i}] is {len(s)} characters; at most {cfg.max_stop_chars}")
        stop_ids = tuple(stopping.stop_token_ids)
        if len(stop_ids) > cfg.max_stop_token_ids:
            raise HedgerowError(f"stopping.stop_token_ids has {len(stop_ids)} ids; at most {cfg.max_stop_token_ids}")
        for i, t in enumerate(stop_ids):
            if t >= self.vocab_size:
                raise HedgerowError(f"stopping.stop_token_ids[{i}] = {t} is outside the vocabulary [0, {self.vocab_size})")
        if stopping.min_tokens > max_new:
            raise HedgerowError(f"stopping.min_tokens must be in [0, max_new_tokens {max_new}], got {stopping.min_tokens}")
        if msg.top_logprobs and not msg.logprobs:
            raise HedgerowError("top_logprobs needs logprobs")
        if msg.top_logprobs > MAX_TOP_LOGPROBS:
            raise HedgerowError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {msg.top_logprobs}")
        spec = self._spec(msg.speculation) if msg.HasField("speculation") else None
        if text is not None:  # last: the one expensive step, once everything else is known to be fine
            ids = await asyncio.get_running_loop().run_in_executor(self.pool, self.tokenizer.encode, text)
            ids = self._check_length(tuple(ids), "prompt")
        request = Request(rid, ids, sampling, max_new, spec, ignore_eos=stopping.ignore_eos, stop_token_ids=stop_ids,
                          min_tokens=stopping.min_tokens, logprobs=msg.top_logprobs if msg.logprobs else None)
        return sample_requests(request, n), stops

    def _prompt(self, msg: pb.GenerateRequest) -> tuple[str | None, tuple[int, ...]]:
        """The prompt as (text, None) or (None, token ids), checked for size and range."""
        has_text, has_ids = msg.HasField("prompt"), len(msg.prompt_token_ids) > 0
        if has_text and has_ids:
            raise HedgerowError("prompt and prompt_token_ids are both set; set exactly one")
        if not has_text and not has_ids:
            raise HedgerowError("prompt is missing: set prompt or prompt_token_ids")
        if has_text:
            text, cap = msg.prompt, self.config.max_prompt_bytes
            if not text:
                raise HedgerowError("prompt is empty")
            at_least = len(text) > cap  # characters <= bytes: no need to encode to know
            size = len(text) if at_least else len(text.encode())
            if size > cap:
                raise HedgerowError(f"prompt is {'at least ' if at_least else ''}{size} bytes; at most {cap} "
                                    f"(the server's --max-prompt-bytes)")
            return text, ()
        ids = self._check_length(tuple(msg.prompt_token_ids), "prompt_token_ids")
        if max(ids) >= self.vocab_size:
            i = next(i for i, t in enumerate(ids) if t >= self.vocab_size)
            raise HedgerowError(f"prompt_token_ids[{i}] = {ids[i]} is outside the vocabulary [0, {self.vocab_size})")
        return None, ids

    def _check_length(self, ids: tuple[int, ...], field: str) -> tuple[int, ...]:
        if not ids:
            raise HedgerowError(f"{field} is empty after tokenization")
        if len(ids) >= self.max_model_len:
            raise HedgerowError(f"{field} is {len(ids)} tokens; the context (max_model_len {self.max_model_len}) "
                                f"holds at most {self.max_model_len - 1} prompt tokens")
        return ids

    @staticmethod
    def _sampling(s: pb.SamplingParams) -> SamplingParams:
        temperature = s.temperature if s.HasField("temperature") else 0.0
        top_k = s.top_k if s.HasField("top_k") else 0
        top_p = s.top_p if s.HasField("top_p") else 1.0
        seed = s.seed if s.HasField("seed") else None
        if not math.isfinite(temperature) or temperature < 0:
            raise HedgerowError(f"sampling.temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if top_k < 0:
            raise HedgerowError(f"sampling.top_k must be >= 0 (0 = off), got {top_k}")
        if not 0.0 < top_p <= 1.0:  # NaN fails this too
            raise HedgerowError(f"sampling.top_p must be in (0, 1], got {top_p}")
        if seed is not None and seed < 0:
            raise HedgerowError(f"sampling.seed must be >= 0, got {seed}")
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)

    def _spec(self, s: pb.SpeculationParams) -> SpecParams:
        base = self.default_spec
        mode = _enum_field("speculation.mode", s.mode, MODES, pb.SpeculationMode, base.mode)
        proposer = _enum_field("speculation.proposer", s.proposer, PROPOSERS, pb.Proposer, base.proposer)
        sizes = {name: getattr(s, name) for name in ("draft_tokens", "tree_budget", "ngram_max", "ngram_min")
                 if s.HasField(name)}
        try:  # SpecParams checks every size against SPEC_LIMITS; its message starts with the size's name
            return replace(base, mode=mode, proposer=proposer, **sizes)  # the rest: the server's defaults
        except ValueError as exc:
            raise HedgerowError(f"speculation.{exc}") from None


def _enum_field(name: str, value: int, known: dict, enum, default):
    """A proto enum field's value: ``default`` when unspecified (0), else its entry in ``known``;
    an unknown number is refused naming the field and the enum's values."""
    if value == 0:
        return default
    if value in known:
        return known[value]
    raise HedgerowError(f"{name} {value} is not a {enum.DESCRIPTOR.name} (one of {', '.join(enum.keys())})")
