"""What the proxy checks before it reads a request's body: the API key, then the body's type and size.

A pure ASGI middleware in front of the app. FastAPI reads and parses a route's body before any of
its dependencies run, so a key checked there is checked after a gigabyte was read; here the order
is: the ``Authorization`` header (401 at once, the body unread), the ``Content-Type`` (none is taken
as JSON; another type is a 415 that says what to send), the ``Content-Length`` (413 at once when it
is over ``--max-body-bytes``), then the body, read chunk by chunk and refused with 413 the moment it
passes the limit, so what a request can make the proxy hold is bounded whatever it claims. A refusal
before the body was read closes the connection, so the client stops sending it. The body read here
is handed to the app as if it came from the client.

Refusals are OpenAI's error JSON, written with ``ensure_ascii`` so that any text a client sent (a
model name holding a lone surrogate, say) can be echoed without failing the response itself.
"""

from __future__ import annotations

import json
from email.message import Message

from starlette.responses import Response

from hedgerow.server.proxy.keys import bearer_matches
from hedgerow.server.proxy.schema import ApiError

BODY_METHODS = ("POST", "PUT", "PATCH")


def error_response(exc: ApiError, *, close: bool = False) -> Response:
    """``exc`` as OpenAI's error JSON; ``close``: end the connection after it."""
    return Response(json.dumps(exc.body(), ensure_ascii=True), status_code=exc.status, media_type="application/json",
                    headers={"connection": "close"} if close else None)


class _Gone(Exception):
    """The client disconnected while its body was being read."""


class Guard:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, open_paths=("/health",)):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if self.api_key is not None and scope["path"] not in self.open_paths:
                if not bearer_matches(headers.get("authorization"), self.api_key):
                    raise ApiError(401, "Incorrect API key provided: send 'Authorization: Bearer <key>' with the key "
                                        "the proxy was started with", code="invalid_api_key")
            if scope["method"] in BODY_METHODS:
                scope = _as_json(scope, headers.get("content-type"))
                length = headers.get("content-length", "")
                if length.isdigit() and int(length) > self.max_body_bytes:
                    raise self._too_large()
                body = await self._read(receive)
                receive = _replay(body, receive)
        except ApiError as exc:
            await error_response(exc, close=True)(scope, receive, send)
            return
        except _Gone:
            return
        await self.app(scope, receive, send)

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is larger than {self.max_body_bytes} bytes, the most this proxy "
                             "accepts (--max-body-bytes)", code="request_too_large")

    async def _read(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _as_json(scope: dict, content_type: str | None) -> dict:
    """The scope with a JSON content type: added when there is none, refused when it is another."""
    if content_type is None:
        return {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
    message = Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    if message.get_content_maintype() != "application" or not (subtype == "json" or subtype.endswith("+json")):
        raise ApiError(415, f"the request body must be JSON, sent with 'Content-Type: application/json' (this one "
                            f"came as {message.get_content_type()!r})", code="unsupported_media_type")
    return scope


def _replay(body: bytes, receive):
    """A ``receive`` that gives the app the body already read, then the client's own messages."""
    given = False

    async def replay():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
