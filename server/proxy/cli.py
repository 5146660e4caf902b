"""serve an OpenAI-compatible HTTP API (completions, chat, SSE streaming) in front of `hedgerow serve`

    hedgerow proxy --grpc 127.0.0.1:50051 [--host 127.0.0.1] [--port 8000] [--api-key-file FILE]

The command line of the proxy (described in ``hedgerow.server.proxy``): the flags, checked into a
``ProxyConfig``, the listening socket, and uvicorn serving the app until SIGTERM. ``hedgerow`` imports
this module to build its parser, so it imports nothing heavy; the app (fastapi, grpc) and uvicorn
are imported by ``run``. The key is best given in ``$HEDGEROW_API_KEY`` or a file, not on the
command line (``keys``); the same key is sent on to the gRPC server unless ``--grpc-api-key-file``
names another.
"""

import argparse
import signal
import socket
import sys
from pathlib import Path

from hedgerow.server.errors import HedgerowError
from hedgerow.server.proxy.config import ProxyConfig
from hedgerow.server.proxy.keys import add_key_args, add_tls_args, api_key, read_key_file, read_pem, tls_files


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("proxy")
    g.add_argument("--grpc", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="the `hedgerow serve` gRPC address (default: 127.0.0.1:50051)")
    g.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port; 0 = any free port (default: 8000)")
    add_key_args(g, "every route but /health")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20, metavar="BYTES",
                   help="larger request bodies get 413 without being read (default: 4194304)")
    g.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer for chat templates: HF id or folder (default: the model the server names: a "
                   "Hugging Face id, or the embedded pair; a model served from a folder needs this flag)")
    g.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template replacing the tokenizer's")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send and see (default: the name the server reports)")
    g.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="seconds a request may take before 504; 0 = no limit (default: 600)")
    g.add_argument("--drain-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="seconds open requests get to finish after SIGTERM (default: 300)")
    add_tls_args(g, "HTTPS")
    g = p.add_argument_group("the gRPC server")
    g.add_argument("--grpc-api-key-file", default=None, metavar="FILE",
                   help="the key `hedgerow serve` requires, first line of FILE (default: the proxy's own key)")
    g.add_argument("--grpc-tls-ca", default=None, metavar="PEM",
                   help="reach the gRPC server over TLS, trusting the certificates of this file (default: plaintext)")


def config_from_args(args) -> ProxyConfig:
    host, sep, port = args.grpc.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise HedgerowError(f"--grpc must be HOST:PORT with a port in [1, 65535], got {args.grpc!r}")
    if not 0 <= args.port <= 65535:
        raise HedgerowError(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_bytes < 1:
        raise HedgerowError(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    key = api_key(args)
    grpc_key = read_key_file(args.grpc_api_key_file, "--grpc-api-key-file") if args.grpc_api_key_file else key
    ca = read_pem(Path(args.grpc_tls_ca).expanduser(), "--grpc-tls-ca") if args.grpc_tls_ca else None
    for flag in ("request_timeout", "drain_timeout"):
        if not getattr(args, flag) >= 0:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    template = None
    if args.chat_template is not None:
        try:
            template = Path(args.chat_template).expanduser().read_text()
        except OSError as exc:
            raise HedgerowError(f"--chat-template {args.chat_template}: {exc.strerror or exc}") from None
    return ProxyConfig(grpc_target=args.grpc, api_key=key, tokenizer=args.tokenizer,
                       served_model_name=args.served_model_name, chat_template=template,
                       request_timeout=args.request_timeout or None, max_body_bytes=args.max_body_bytes,
                       grpc_api_key=grpc_key, grpc_tls_ca=ca)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (bound before uvicorn starts, so ``--port 0`` can report its port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise HedgerowError(f"cannot listen on {host}:{port} (--host/--port): {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


def run(args) -> int:
    import uvicorn

    from hedgerow.server.proxy.app import create_app

    config = config_from_args(args)
    tls = tls_files(args)
    sock = listen(args.host, args.port)
    ssl = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning",
                                           timeout_graceful_shutdown=args.drain_timeout, **ssl))
    port = sock.getsockname()[1]
    scheme = "https" if tls else "http"
    print(f"hedgerow: OpenAI API on {scheme}://{args.host}:{port}/v1, gRPC server {args.grpc}", flush=True)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: make that
    # handler a no-op, so that a drained proxy exits 0 (as `hedgerow serve` does)
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run(sockets=[sock])
    print("hedgerow: proxy stopped", file=sys.stderr, flush=True)
    return 0
