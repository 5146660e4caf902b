"""What a proxy is started with.

One frozen value read by the app (the key, the deadline) and by the gRPC backend (the address, the
tokenizer, the names). It has a module of its own so that the command line, which ``hedgerow``
imports to build its parser, can build one without importing fastapi or grpc.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ProxyConfig:
    grpc_target: str = "127.0.0.1:50051"
    api_key: str | None = None  # None: no key needed
    tokenizer: str | None = None  # None: the model path the server reports
    served_model_name: str | None = None  # None: the server's target model name
    chat_template: str | None = None  # overrides the tokenizer's
    request_timeout: float | None = 600.0  # gRPC deadline per request; None: none
