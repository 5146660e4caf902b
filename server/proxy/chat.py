"""``POST /v1/chat/completions`` bodies: the messages, their rendering for the chat template, and what
chat refuses beyond the parameters it shares with completions (``schema``): tool calling, non-text
message parts, a ``response_format`` other than text."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from hedgerow.server.proxy.schema import MAX_TOP_LOGPROBS, _Body, _Generation, bad, int32, unsupported


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # refused when set: Hedgerow does no tool calling
    tool_calls: Any = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None

    def for_template(self, i: int) -> dict:
        """The message as a chat template expects it: role and plain-text content."""
        where = f"messages[{i}]"
        if self.role in ("tool", "function"):
            raise unsupported(f"{where}.role",
                              f"{where}.role {self.role!r} is not supported: Hedgerow does no tool calling")
        if self.tool_calls or self.function_call:
            raise unsupported(f"{where}.tool_calls",
                              f"{where}.tool_calls is not supported: Hedgerow does no tool calling")
        content = self.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise unsupported(f"{where}.content[{j}]",
                                      f"{where}.content[{j}] is of type {part.type!r}: Hedgerow takes text only")
            content = "".join(part.text for part in content)
        if content is None and self.role != "assistant":
            raise bad(f"{where}.content", "is missing")
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Generation):
    """``POST /v1/chat/completions``; the prompt is the model's chat template applied to
    ``messages``, ending with the assistant's turn."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # meaningless without tools
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    def check(self) -> None:
        super().check()
        if self.logprobs is not None and not isinstance(self.logprobs, bool):
            raise bad("logprobs", f"must be true or false, got {self.logprobs!r}")
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise bad("top_logprobs", "needs logprobs: true")
            if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
                raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.tools or self.functions:
            name = "tools" if self.tools else "functions"
            raise unsupported(name, f"{name} is not supported: Hedgerow does no tool calling")
        if self.tool_choice not in (None, "none"):
            raise unsupported("tool_choice", "tool_choice must be 'none': Hedgerow does no tool calling")
        if self.function_call not in (None, "none"):
            raise unsupported("function_call", "function_call must be 'none': Hedgerow does no tool calling")
        if self.response_format is not None:
            kind = self.response_format.get("type") if isinstance(self.response_format, dict) else None
            if kind != "text":
                raise unsupported("response_format",
                                  f"response_format {kind!r} is not supported: Hedgerow produces text only")
        if self.max_completion_tokens is not None:
            int32("max_completion_tokens", self.max_completion_tokens, low=1)
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise bad("max_completion_tokens", "and max_tokens differ: set one of them")
        if not self.messages:
            raise bad("messages", "is empty")
        self.template_messages()

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict]:
        return [m.for_template(i) for i, m in enumerate(self.messages)]

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
