"""serve the hedgerow.v1.Generation gRPC service (streaming, continuous batching) with Prometheus metrics

    hedgerow serve --target T --draft D [--port 50051] [--metrics-port 9400] [--max-batch-size 16]

Health (``grpc.health.v1``) and server reflection are served beside the service, so ``grpcurl``
works without the .proto. SIGTERM or SIGINT drains: health says NOT_SERVING, new requests get
UNAVAILABLE, those in flight finish (for at most ``--drain-timeout`` seconds), then the process
exits 0. A second signal, or the timeout, ends the requests still in flight at once, each with a
last message carrying FINISH_REASON_ABORT and its tokens so far. If the engine thread dies, the
process exits 1, for a supervisor to restart it.

The ports are checked to be free before any model loads (a port another process holds is refused in
one line, exit 2). Models are named to clients by their Hugging Face id or folder name, never a path
(``--served-model-name`` overrides). With a key (``--api-key-file``, ``$HEDGEROW_API_KEY``) every
call but health's needs ``authorization: Bearer KEY`` metadata; ``--tls-cert``/``--tls-key`` serve
TLS. Metrics listen on ``--metrics-host``, 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import signal
import socket
import sys
from pathlib import Path

from hedgerow.server.cli import add_model_args, add_spec_args, build_engine, int_at_least, resolve_models
from hedgerow.server.errors import HedgerowError
from hedgerow.server.proxy.keys import add_key_args, add_tls_args, api_key, tls_files

# What clients see as the embedded pair's names; server/proxy/backend.py maps the first back to the
# pair's tokenizer (a test checks the two agree).
EMBEDDED_NAMES = ("hedgerow-embedded", "hedgerow-embedded-draft")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, compile_default="auto")
    add_spec_args(p)
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="gRPC address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port; 0 = any free port (default: 50051)")
    g.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the Prometheus /metrics endpoint (default: 127.0.0.1; 0.0.0.0 for a remote "
                   "Prometheus)")
    g.add_argument("--metrics-port", type=int, default=9400,
                   help="Prometheus /metrics port; 0 = any free port (default: 9400)")
    g.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default: 16)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond the batch; more get RESOURCE_EXHAUSTED (default: 256)")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="default max_new_tokens of requests that give none (default: 128)")
    g.add_argument("--max-prompt-bytes", type=int_at_least(1), default=1 << 20, metavar="BYTES",
                   help="largest text prompt in UTF-8 bytes, refused before it is tokenized; gRPC refuses a "
                   "request message over 4 times the largest valid one (default: 1048576)")
    g.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default: 300)")
    g.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the target's name in ModelInfo (default: its Hugging Face id or folder name; "
                   f"{EMBEDDED_NAMES[0]} for the embedded pair)")
    g = p.add_argument_group("access")
    add_key_args(g, "every gRPC call but health's (as 'authorization' metadata)")
    add_tls_args(g, "gRPC")


def _check(args) -> None:
    for flag in ("port", "metrics_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be in [0, 65535], got {value}")
    for flag in ("max_batch_size", "max_queue", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not args.drain_timeout >= 0:
        raise HedgerowError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise HedgerowError("--served-model-name is empty")
    check_port_free(args.host, args.port, "--host/--port")
    check_port_free(args.metrics_host, args.metrics_port, "--metrics-host/--metrics-port")


def check_port_free(host: str, port: int, flags: str) -> None:
    """Refuse, in one line, a port another process listens on (before any model loads). gRPC's own
    bind would fail too (the server sets ``grpc.so_reuseport`` 0), but only after loading, with
    lines of its own."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise HedgerowError(f"cannot listen on {host}:{port} ({flags}): {exc.strerror}") from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise HedgerowError(f"{host}:{port} is in use by another process ({flags})") from None
                raise HedgerowError(f"cannot listen on {host}:{port} ({flags}): {exc.strerror or exc}") from None


def served_names(target: str, draft: str | None, override: str | None) -> tuple[str, str]:
    """The (target, draft) names clients see: a Hugging Face id as it is, a local folder by its own
    name, the embedded pair by EMBEDDED_NAMES; never a path of this machine."""
    try:
        from hedgerow.server.embedded import default_pair

        embedded = tuple(Path(p).resolve() for p in default_pair())
    except ImportError:
        embedded = ()

    def name(source: str, role: int) -> str:
        path = Path(source).expanduser()
        if not path.is_dir():
            return source  # resolve_models let it through: a Hugging Face id
        path = path.resolve()
        return EMBEDDED_NAMES[role] if path in embedded else path.name

    return override or name(target, 0), name(draft, 1) if draft else ""


def default_cpu_threads(args) -> int | None:
    """Torch threads when a model runs on the CPU: one core fewer than the process may use, left
    to the gRPC and streaming threads. With every core in torch's OpenMP pool, each small kernel of
    a drafting step waits for a thread the server has descheduled (bench/RESULTS.md: `serve_grpc_cost`
    against `serve_grpc_cost_threads2`)."""
    if "cpu" not in (args.target_device, args.draft_device or args.target_device):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def run(args) -> int:
    from hedgerow.server.service.grpc_service import ServiceConfig
    from hedgerow.server.service.metrics import Metrics

    _check(args)
    key = api_key(args)
    tls = tls_files(args)
    if args.cpu_threads is None:
        args.cpu_threads = default_cpu_threads(args)
    target, draft = resolve_models(args)
    engine, tokenizer = build_engine(args)
    target_name, draft_name = served_names(target, draft, args.served_model_name)
    config = ServiceConfig(target_name=target_name, draft_name=draft_name, default_max_new_tokens=args.max_new_tokens,
                           max_prompt_bytes=args.max_prompt_bytes)
    pem = (tls[0].read_bytes(), tls[1].read_bytes()) if tls else None
    return asyncio.run(_serve(args, engine, tokenizer, config, Metrics(), key, pem))


async def _serve(args, engine, tokenizer, config, metrics, key, tls) -> int:
    from hedgerow.server.service.grpc_service import SERVICE_NAME, start_server

    http = metrics.serve(args.metrics_port, args.metrics_host)
    server = await start_server(engine, tokenizer, host=args.host, port=args.port, config=config, metrics=metrics,
                                api_key=key, tls=tls)
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    print(f"hedgerow: serving {SERVICE_NAME} on {args.host}:{server.port}{' (TLS)' if tls else ''}, "
          f"metrics on {args.metrics_host}:{http.server_port}", flush=True)

    first = asyncio.create_task(signals.get())
    died = asyncio.create_task(server.died.wait())
    await asyncio.wait({first, died}, return_when=asyncio.FIRST_COMPLETED)
    if not first.done():
        first.cancel()
        print("hedgerow: error: the engine thread stopped (the log above says why): exiting for a restart",
              file=sys.stderr, flush=True)
        await server.stop(None)
        http.shutdown()
        return 1
    died.cancel()
    print(f"hedgerow: {signal.Signals(first.result()).name}: draining in-flight requests", file=sys.stderr, flush=True)
    force = asyncio.Event()

    async def second_signal() -> None:
        await signals.get()
        print("hedgerow: second signal: ending in-flight requests now", file=sys.stderr, flush=True)
        force.set()

    second = asyncio.create_task(second_signal())
    drained = await server.stop(args.drain_timeout, force)
    second.cancel()
    if not drained and not force.is_set():
        print(f"hedgerow: --drain-timeout ({args.drain_timeout:g} s) passed: in-flight requests ended",
              file=sys.stderr, flush=True)
    http.shutdown()
    if server.died.is_set():  # while draining
        print("hedgerow: error: the engine thread stopped while draining (the log above says why)",
              file=sys.stderr, flush=True)
        return 1
    print("hedgerow: stopped", file=sys.stderr, flush=True)
    return 0
