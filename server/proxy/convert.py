"""OpenAI's wire format on one side, Hedgerow's protobuf messages on the other.

A request body becomes a ``GenerateRequest``; a ``GenerateResponse`` (or a streamed message) becomes
a completion, a chat completion or a chunk; ``ModelInfo`` becomes a model card; a chat's messages
become prompt token ids through the model's chat template. No I/O here, so what a client sees can be
read (and changed) in one place.

Finish reasons EOS and STOP -> ``"stop"``, LENGTH -> ``"length"``, ABORT (server shutting down) ->
``"abort"``. Choices are indexed as OpenAI does: prompt p's sample i is choice ``p * n + i``; usage
and stats add up over the choices. Every response carries a ``hedgerow`` object with the request's speculation stats
(verify_steps, draft_tokens, accepted_tokens, acceptance_rate, and ``proposers``: the draft and
accepted tokens of each proposer that drafted, by name).
"""

from dataclasses import dataclass

from hedgerow.server.proxy.schema import PROPOSERS, SPEC_MODES, SPEC_SIZES, ApiError, bad
from hedgerow.server.rpc import generation_pb2 as pb

FINISH = {1: "stop", 2: "length", 3: "stop", 4: "abort"}  # pb.FinishReason -> OpenAI finish_reason
MODES = {name: pb.SpeculationMode.Value(f"SPECULATION_MODE_{name.upper()}") for name in SPEC_MODES}
MODE_NAMES = {v: k for k, v in MODES.items()}
PROPOSER_VALUES = {name: pb.Proposer.Value(f"PROPOSER_{name.upper()}") for name in PROPOSERS}
PROPOSER_NAMES = {v: k for k, v in PROPOSER_VALUES.items()}


def to_proto(body, request_id: str, *, prompt: str | list[int]):
    msg = pb.GenerateRequest(request_id=request_id)
    if isinstance(prompt, str):
        msg.prompt = prompt
    else:
        msg.prompt_token_ids.extend(prompt)
    for name in ("temperature", "top_k", "top_p", "seed"):
        if (value := getattr(body, name)) is not None:
            setattr(msg.sampling, name, value)
    if (n := body.new_tokens()) is not None:
        msg.stopping.max_new_tokens = n
    msg.stopping.stop.extend(body.stops())
    msg.stopping.ignore_eos = body.ignore_eos
    msg.stopping.stop_token_ids.extend(body.stop_token_ids or ())
    if body.min_tokens is not None:
        msg.stopping.min_tokens = body.min_tokens
    msg.n = body.samples()
    if (k := body.top_logprobs_asked()) is not None:
        msg.logprobs, msg.top_logprobs = True, k
    spec = body.hedgerow.speculation if body.hedgerow else None
    if spec is not None:
        msg.speculation.SetInParent()
        if spec.mode is not None:
            msg.speculation.mode = MODES[spec.mode]
        if spec.proposer is not None:
            msg.speculation.proposer = PROPOSER_VALUES[spec.proposer]
        for name in SPEC_SIZES:
            if (value := getattr(spec, name)) is not None:
                setattr(msg.speculation, name, value)
    return msg


def usage(u, s) -> dict:
    """OpenAI's usage object; ``completion_tokens_details`` counts the accepted draft tokens of the
    completion (``accepted_prediction_tokens``) and the drafted ones the target rejected."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "completion_tokens_details": {"accepted_prediction_tokens": s.accepted_tokens,
                                          "rejected_prediction_tokens": s.draft_tokens - s.accepted_tokens}}


def total_usage(finals) -> tuple[pb.Usage, pb.Stats]:
    """The usage and stats of a request's choices together, from each choice's last message (a
    ``GenerateResponse`` or the last stream message): completion tokens and speculation counts are
    summed over the choices, prompt tokens counted once per prompt (its sample 0), as OpenAI does."""
    u, s, by = pb.Usage(), pb.Stats(), {}
    for f in finals:
        if f.index == 0:
            u.prompt_tokens += f.usage.prompt_tokens
        u.completion_tokens += f.usage.completion_tokens
        s.verify_steps += f.stats.verify_steps
        s.draft_tokens += f.stats.draft_tokens
        s.accepted_tokens += f.stats.accepted_tokens
        for p in f.stats.proposers:
            by.setdefault(p.proposer, pb.ProposerStats(proposer=p.proposer))
            by[p.proposer].draft_tokens += p.draft_tokens
            by[p.proposer].accepted_tokens += p.accepted_tokens
    s.proposers.extend(by[k] for k in sorted(by))
    return u, s


def _rate(s) -> float | None:
    return s.accepted_tokens / s.draft_tokens if s.draft_tokens else None


def stats(s) -> dict:
    return {"verify_steps": s.verify_steps, "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
            "acceptance_rate": _rate(s), "proposers": proposers(s.proposers)}


def step_stats(step) -> dict:
    """One engine step's stats (a stream message's ``StepStats``), for a chunk's ``hedgerow`` object."""
    return {"draft_tokens": step.draft_tokens, "accepted_tokens": step.accepted_tokens,
            "proposers": proposers(step.proposers), "draft_budget": step.draft_budget,
            "ngram_budget": step.ngram_budget}


def proposers(entries) -> dict:
    """``ProposerStats`` messages by proposer name: {"model": {draft_tokens, accepted_tokens, acceptance_rate}}."""
    return {PROPOSER_NAMES[p.proposer]: {"draft_tokens": p.draft_tokens, "accepted_tokens": p.accepted_tokens,
                                         "acceptance_rate": _rate(p)} for p in entries}


@dataclass(frozen=True)
class Shape:
    """How completions and chat differ on the wire."""

    chat: bool
    id: str
    model: str
    created: int
    logprobs: bool = False  # the request asked for logprobs

    def logprobs_of(self, entries, offset: int = 0) -> dict | None:
        """OpenAI's ``logprobs`` object of a choice (or a chunk's) from ``TokenLogprob`` messages;
        ``offset``: characters of the completion before these tokens (completions' text_offset)."""
        if not self.logprobs:
            return None
        if self.chat:
            def item(t, lp):
                return {"token": t, "logprob": lp, "bytes": list(t.encode())}

            return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(a.token, a.logprob)
                                                                              for a in e.top_logprobs]}
                                for e in entries], "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{a.token: a.logprob for a in e.top_logprobs} for e in entries],
                "text_offset": offsets}

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, responses) -> dict:
        """One ``GenerateResponse`` per prompt, in order: choice p * n + i is prompt p's sample i."""
        samples = [s for r in responses for s in (r.samples or [r])]
        choices = []
        for k, sample in enumerate(samples):
            reason, logprobs = FINISH.get(sample.finish_reason), self.logprobs_of(sample.logprobs)
            if self.chat:
                choices.append({"index": k, "message": {"role": "assistant", "content": sample.text},
                                "logprobs": logprobs, "finish_reason": reason})
            else:
                choices.append({"index": k, "text": sample.text, "logprobs": logprobs, "finish_reason": reason})
        u, s = total_usage(samples)
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": usage(u, s), "hedgerow": stats(s)}

    def chunk(self, text: str | None, reason: str | None = None, *, role: bool = False,
              logprobs: dict | None = None, index: int = 0) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}


def model_card(info, model: str, created: int) -> dict:
    """The ``/v1/models`` entry of the served model, ``info`` being the server's ModelInfo."""
    spec = info.default_speculation
    return {"id": model, "object": "model", "created": created, "owned_by": "hedgerow",
            "hedgerow": {"target": info.target, "draft": info.draft or None, "max_model_len": info.max_model_len,
                         "vocab_size": info.vocab_size, "max_batch_size": info.max_batch_size,
                         "default_max_new_tokens": info.default_max_new_tokens,
                         "default_speculation": {"mode": MODE_NAMES.get(spec.mode),
                                                 "proposer": PROPOSER_NAMES.get(spec.proposer),
                                                 **{name: getattr(spec, name) for name in SPEC_SIZES}}}}


def render_chat(tokenizer, messages: list[dict], model: str) -> list[int]:
    """The prompt token ids of a chat, ending where the assistant's reply begins.

    The template is rendered to text and encoded without special tokens: templates write their own
    BOS, and ``encode``'s default would add a second one."""
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"the model {model!r} has no chat template (its tokenizer defines none): use "
                            f"/v1/completions with a prompt you format, or start the proxy with --chat-template FILE",
                       param="messages", code="no_chat_template")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2's TemplateError, or the template's own raise_exception()
        raise bad("messages", f"do not fit the model's chat template: {exc}", code="chat_template_error") from None
    return tokenizer.encode(text, add_special_tokens=False)
