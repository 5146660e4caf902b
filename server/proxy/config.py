"""What a proxy is started with.

One frozen value read by the app (the key, the body limit, the deadline) and by the gRPC backend (the
address and how to reach it, the tokenizer, the names). It has a module of its own so that the
command line, which ``hedgerow`` imports to build its parser, can build one without importing
fastapi or grpc.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProxyConfig:
    grpc_target: str = "127.0.0.1:50051"
    api_key: str | None = None  # None: no key needed
    tokenizer: str | None = None  # None: the model the server reports (the embedded pair's own folder)
    served_model_name: str | None = None  # None: the server's target model name
    chat_template: str | None = None  # overrides the tokenizer's
    request_timeout: float | None = 600.0  # gRPC deadline per request; None: none
    max_body_bytes: int = 4 << 20  # larger request bodies are refused with 413, unread
    grpc_api_key: str | None = None  # sent to the server as 'authorization: Bearer' metadata
    grpc_tls_ca: bytes | None = None  # PEM roots: reach the server over TLS, trusting these
