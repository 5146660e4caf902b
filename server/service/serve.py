"""serve the hedgerow.v1.Generation gRPC service (streaming, continuous batching) with Prometheus metrics

    hedgerow serve --target T --draft D [--port 50051] [--metrics-port 9400] [--max-batch-size 16]

Health (``grpc.health.v1``) and server reflection are served beside the service, so ``grpcurl``
works without the .proto. SIGTERM or SIGINT drains: new requests are refused, those in flight
finish (for at most ``--drain-timeout`` seconds), then the process exits 0. A second signal ends
the requests still in flight at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from hedgerow.server.cli import add_model_args, add_spec_args, build_engine, resolve_models
from hedgerow.server.errors import HedgerowError


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_args(p, compile_default="auto")
    add_spec_args(p)
    g = p.add_argument_group("serving")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port; 0 = any free port (default: 50051)")
    g.add_argument("--metrics-port", type=int, default=9400,
                   help="Prometheus /metrics port on the same host; 0 = any free port (default: 9400)")
    g.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default: 16)")
    g.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond the batch; more get RESOURCE_EXHAUSTED (default: 256)")
    g.add_argument("--max-new-tokens", type=int, default=128,
                   help="default max_new_tokens of requests that give none (default: 128)")
    g.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default: 300)")


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
    if args.cpu_threads is None:
        args.cpu_threads = default_cpu_threads(args)
    target, draft = resolve_models(args)
    engine, tokenizer = build_engine(args)
    config = ServiceConfig(target_name=target, draft_name=draft or "", default_max_new_tokens=args.max_new_tokens)
    return asyncio.run(_serve(args, engine, tokenizer, config, Metrics()))


async def _serve(args, engine, tokenizer, config, metrics) -> int:
    from hedgerow.server.service.grpc_service import SERVICE_NAME, start_server

    http = metrics.serve(args.metrics_port, args.host)
    server = await start_server(engine, tokenizer, host=args.host, port=args.port, config=config, metrics=metrics)
    signals = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    print(f"hedgerow: serving {SERVICE_NAME} on {args.host}:{server.port}, "
          f"metrics on :{http.server_port}", flush=True)

    sig = await signals.get()
    print(f"hedgerow: {signal.Signals(sig).name}: draining in-flight requests", file=sys.stderr, flush=True)
    drain = asyncio.create_task(server.stop(args.drain_timeout))
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        print("hedgerow: second signal: ending in-flight requests now", file=sys.stderr, flush=True)
        await server.server.stop(None)
        await drain
    second.cancel()
    http.shutdown()
    print("hedgerow: stopped", file=sys.stderr, flush=True)
    return 0
