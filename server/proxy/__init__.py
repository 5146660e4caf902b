"""The OpenAI-compatible HTTP proxy in front of `hedgerow serve`: ``hedgerow proxy``.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream: true``
gives server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), and ``GET /health``
(no key needed; 503 unless the gRPC server reports SERVING). What is accepted and refused is listed
in ``schema``.

Each prompt of an HTTP request is one gRPC call (``Generate``, or ``GenerateStream`` when streaming)
for its n samples to the server, which tokenizes, generates and applies stop strings; the calls of a
prompt batch are all sent before any answer is read. The proxy itself only needs the tokenizer for
chat: it renders the model's chat template and sends token ids. The tokenizer is ``--tokenizer``, or
the model the server names (``ModelInfo.target``): a Hugging Face id, or ``hedgerow-embedded``, the
embedded pair this package ships; nothing is asked of the server before the first request, so the
proxy starts even while the server is down, and it uses a server that comes back within a second.

Mapping: finish reasons EOS and STOP -> ``"stop"``, LENGTH -> ``"length"``, ABORT (server shutting
down) -> ``"abort"``; gRPC INVALID_ARGUMENT -> 400, RESOURCE_EXHAUSTED -> 429 (413 for a message too
large), UNAVAILABLE -> 503, DEADLINE_EXCEEDED -> 504, anything else -> 500. A client that
disconnects cancels its gRPC calls, so the server frees the sequence's KV slot at once. Every
response carries a ``hedgerow`` object with the request's speculation stats (verify_steps,
draft_tokens, accepted_tokens, acceptance_rate).

Modules: ``cli`` (the command line: flags, socket, uvicorn), ``keys`` (the API key and TLS files,
shared with ``hedgerow serve``), ``config`` (what a proxy is started with), ``guard`` (the API key,
content type and body size, before a body is read), ``app`` (the FastAPI app: routes, error JSON),
``backend`` (the gRPC client side: channel, reconnection, ModelInfo, tokenizer, gRPC errors as HTTP
ones), ``convert`` (OpenAI bodies to protobuf and back, chat templates), ``streaming`` (server-sent
events), ``schema`` (the request bodies) and ``chat`` (chat's own).
"""
