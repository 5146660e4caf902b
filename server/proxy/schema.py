"""OpenAI request bodies the proxy (``hedgerow.server.proxy``) accepts, and what it refuses.

Parsing is pydantic's, strict (``"stream": "yes"`` or ``"max_tokens": true`` are refused, not
converted); the checks here are the proxy's (values and support). Every refusal is an ``ApiError``
naming the OpenAI parameter, which the proxy returns as OpenAI's error JSON:
``{"error": {"message", "type", "param", "code"}}``.

Values are checked to fit the gRPC message before one is built (integers in their protobuf field's
range, text that is valid Unicode), so no value a client sends can fail the proxy itself; what they
mean (a length within the context, a speculation size within ``SPEC_LIMITS``) is the server's to
check, with the one rule every surface shares, and its refusal reaches the client as a 400 naming
the parameter.

``logprobs`` (completions: an integer k, the top k alternatives; chat: ``true``, with
``top_logprobs`` k) are the target's raw log-softmax (verify/logprobs.py), k <= 20.

``n`` (at most ``MAX_N``) asks for n choices per prompt; ``prompt`` may be a batch of prompts (at
most ``MAX_PROMPTS``, and ``MAX_CHOICES`` choices in all), bounded here before anything is tokenized.

Unsupported options are refused, never silently ignored: ``best_of`` > 1, ``echo``,
``suffix``, ``logit_bias``, non-zero ``presence_penalty`` /
``frequency_penalty``, tools and functions, a ``response_format`` other than text, non-text
message parts. An unknown parameter is refused too, as OpenAI does (a typo must not pass unseen).
Chat's bodies are in ``chat``.

Extensions (through the SDK's ``extra_body``): ``top_k``, ``ignore_eos``, ``stop_token_ids`` and
``min_tokens`` (vLLM's), ``hedgerow.step_stats`` (streams: per-step speculation stats in each chunk), and
``hedgerow: {"speculation": {"mode": "plain"|"chain"|"tree", "draft_tokens": G, "tree_budget": B,
"proposer": "model"|"ngram"|"hybrid", "ngram_max": N, "ngram_min": M}}`` (absent fields keep the
server's defaults; speculation only ever changes speed, never the output).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict

SPEC_MODES = ("plain", "chain", "tree")  # the names of pb.SpeculationMode's values, lower-case
PROPOSERS = ("model", "ngram", "hybrid")  # the names of pb.Proposer's values, lower-case
SPEC_SIZES = ("draft_tokens", "tree_budget", "ngram_max", "ngram_min")
INT32 = 2**31  # int32 fields (max_new_tokens, top_k, speculation sizes) hold values below this
MAX_TOP_LOGPROBS = 20  # the server's bound (verify/logprobs.py)
MAX_N = 16  # the server's bound (server/engine/samples.py)
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_CHOICES = 256  # prompts * n


class ApiError(Exception):
    """An error the client sees as OpenAI's error JSON with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> ApiError:
    """400 naming ``param``; the message starts with it."""
    return ApiError(400, f"{param} {message}", param=param, code=code)


def unsupported(param: str, message: str) -> ApiError:
    """400 for an option Hedgerow does not implement; the message starts with ``param``."""
    return ApiError(400, message, param=param, code="unsupported_parameter")


def int32(param: str, value: int | None, low: int | None = 0) -> None:
    """Refuse a value below ``low`` or one its protobuf int32 field cannot hold; ``low`` None: any
    int32 (the server checks the real range, far inside it)."""
    if value is None:
        return
    if low is None and not -INT32 <= value < INT32:
        raise bad(param, f"must be a 32-bit integer, got {value}")
    if low is not None and not low <= value < INT32:
        raise bad(param, f"must be in [{low}, 2^31), got {value}")


def check_text(value, param: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800", which JSON can
    spell), anywhere in ``value``: it cannot be encoded as UTF-8 for the server."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise bad(param, f"is not valid Unicode text: it holds a lone surrogate at character {exc.start}",
                      code="invalid_text") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, param)
            check_text(item, f"{param}.{key}" if param else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_text(item, f"{param}[{i}]")


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SpeculationOptions(_Body):
    mode: str | None = None
    draft_tokens: int | None = None
    tree_budget: int | None = None
    proposer: str | None = None
    ngram_max: int | None = None
    ngram_min: int | None = None


class HedgerowOptions(_Body):
    speculation: SpeculationOptions | None = None
    step_stats: bool = False  # streams: each chunk's hedgerow object carries its engine step's stats


class StreamOptions(_Body):
    include_usage: bool = False


class _Generation(_Body):
    """Parameters completions and chat share."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Any = None  # str | list[str]
    max_tokens: int | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping; no effect
    # extensions
    top_k: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None  # vLLM's: also stop after any of these tokens
    min_tokens: int | None = None  # vLLM's: no EOS or stop token before this many new tokens
    hedgerow: HedgerowOptions | None = None
    n: int | None = None  # choices per prompt: samples sharing the prompt's prefill, seeds seed + i
    # refused unless left at their defaults
    logprobs: Any = None
    logit_bias: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def check(self) -> None:
        """Raise ApiError for the first value Hedgerow refuses."""
        check_text(self.model_dump(exclude_none=True), "")
        if self.n is not None and not 1 <= self.n <= MAX_N:
            raise bad("n", f"must be in [1, {MAX_N}] (choices per prompt), got {self.n}")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported by Hedgerow")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise unsupported(name, f"{name} must be 0: Hedgerow applies no penalties")
        if self.stream_options is not None and not self.stream:
            raise bad("stream_options", "is only allowed when stream is true")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", f"must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise bad("seed", f"must be in [0, 2^63), got {self.seed}")
        int32("max_tokens", self.max_tokens, low=1)
        int32("top_k", self.top_k)
        int32("min_tokens", self.min_tokens)
        for i, t in enumerate(self.stop_token_ids or ()):
            if not 0 <= t < 2**32:
                raise bad(f"stop_token_ids[{i}]", f"= {t} is not a token id (ids are in [0, vocabulary size))")
        if self.hedgerow is not None and self.hedgerow.step_stats and not self.stream:
            raise bad("hedgerow.step_stats", "is only allowed when stream is true")
        self.stops()
        spec = self.hedgerow.speculation if self.hedgerow else None
        if spec is not None:
            if spec.mode is not None and spec.mode not in SPEC_MODES:
                raise bad("hedgerow.speculation.mode", f"must be one of {', '.join(SPEC_MODES)}, got {spec.mode!r}")
            if spec.proposer is not None and spec.proposer not in PROPOSERS:
                raise bad("hedgerow.speculation.proposer",
                          f"must be one of {', '.join(PROPOSERS)}, got {spec.proposer!r}")
            for name in SPEC_SIZES:  # their limits: the server's (drafting/spec.py)
                int32(f"hedgerow.speculation.{name}", getattr(spec, name), low=None)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise bad("stop", "must be a string or a list of strings")
        for i, s in enumerate(stops):
            if not s:
                raise bad("stop" if isinstance(self.stop, str) else f"stop[{i}]", "is empty")
        return stops

    def new_tokens(self) -> int | None:
        """The completion length asked for; None: the server's default."""
        return self.max_tokens

    def samples(self) -> int:
        return self.n or 1


class CompletionRequest(_Generation):
    """``POST /v1/completions``: ``prompt`` is one string, one list of token ids, or a batch: a list
    of strings and token-id lists (at most ``MAX_PROMPTS``, and ``MAX_CHOICES`` choices with n)."""

    prompt: Any = None
    best_of: int | None = None
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}] (the alternatives per token), "
                                  f"got {self.logprobs!r}")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", f"best_of = {self.best_of} is not supported: Hedgerow returns every sample")
        if self.echo:
            raise unsupported("echo", "echo is not supported by Hedgerow")
        if self.suffix:
            raise unsupported("suffix", "suffix (insertion) is not supported by Hedgerow")
        self.prompts()

    def top_logprobs_asked(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its top k alternatives."""
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids; their number is bounded before anything is read."""
        p = self.prompt
        if p is None:
            raise bad("prompt", "is missing")
        if not (isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p)):
            return [_one_prompt(p, "prompt")]
        if len(p) > MAX_PROMPTS:
            raise bad("prompt", f"is a batch of {len(p)} prompts; at most {MAX_PROMPTS}")
        if len(p) * self.samples() > MAX_CHOICES:
            raise bad("prompt", f"is a batch of {len(p)} prompts of n = {self.samples()} choices each, "
                                f"{len(p) * self.samples()} choices; at most {MAX_CHOICES} per request")
        return [_one_prompt(x, f"prompt[{i}]") for i, x in enumerate(p)] if len(p) > 1 else [_one_prompt(p[0], "prompt")]


def _one_prompt(p, where: str) -> str | list[int]:
    """One prompt, text or token ids; a refusal names ``prompt`` and says where (``prompt[2]``)."""
    if isinstance(p, str):
        if not p:
            raise ApiError(400, f"{where} is empty", param="prompt")
        return p
    if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not p:
            raise ApiError(400, f"{where} is empty", param="prompt")
        if not 0 <= min(p) <= max(p) < 2**32:
            i = next(i for i, t in enumerate(p) if not 0 <= t < 2**32)
            raise ApiError(400, f"{where}[{i}] = {p[i]} is not a token id (ids are in [0, vocabulary size))",
                           param="prompt")
        return p
    raise ApiError(400, f"{where} must be a string or a list of token ids", param="prompt")
