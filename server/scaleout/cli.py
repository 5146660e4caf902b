"""``hedgerow serve --ray``: the same server as replicas of a Ray Serve application.

    hedgerow serve --ray [--ray-address auto|HOST:PORT] [--replicas N | --min-replicas A --max-replicas B]
                   [--gpus-per-replica 0|1|2] [--port 50051] [--http-port 8000] [--metrics-targets FILE]

Starts a Ray cluster on this machine (or joins one: ``--ray-address auto`` finds a cluster started
with ``ray start``, ``HOST:PORT`` names its head), starts Ray Serve with its gRPC proxy on ``--port``
(``hedgerow.v1.Generation`` and health) and its HTTP proxy on ``--http-port`` (the OpenAI API of
``hedgerow proxy``), and deploys the application of ``app``: every replica one engine. The model,
speculation and serving flags are ``hedgerow serve``'s, applied in every replica. Then it waits;
with ``--metrics-targets`` it keeps that Prometheus file-discovery file current every few seconds.
SIGTERM or SIGINT deletes the application (Serve lets each replica finish its requests for up to
``app.GRACEFUL_SHUTDOWN_S``), and a cluster this command started is stopped with it.

Not carried over from the single process: ``--tls-cert``/``--tls-key`` (Serve 2.60's gRPC proxy
has no TLS option; put TLS in front, at a load balancer or an ingress) and ``--metrics-port`` (each
replica serves its metrics on a free port, listed by ``--metrics-targets``).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from hedgerow.server.errors import HedgerowError

TARGETS_EVERY_S = 5.0


def _float_above_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_ray_arguments(p: argparse.ArgumentParser) -> None:
    from hedgerow.server.cli import int_at_least

    g = p.add_argument_group("scale-out on Ray Serve (--ray)")
    g.add_argument("--ray", action="store_true",
                   help="serve as replicas of a Ray Serve application: gRPC on --port, the OpenAI API on --http-port")
    g.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="the Ray cluster to join: auto = the one `ray start` began on this machine (default: start a "
                   "local one, stopped on exit)")
    g.add_argument("--replicas", type=int_at_least(1), default=None, metavar="N",
                   help="a fixed number of replicas, one engine each (default: 1)")
    g.add_argument("--min-replicas", type=int_at_least(0), default=None, metavar="N",
                   help="autoscale: the fewest replicas (default: 1 when --max-replicas is given)")
    g.add_argument("--max-replicas", type=int_at_least(1), default=None, metavar="N",
                   help="autoscale: the most replicas (default: --min-replicas)")
    g.add_argument("--target-ongoing-requests", type=_float_above_zero, default=8.0, metavar="R",
                   help="autoscale: requests in flight per replica that Serve aims at (default: 8)")
    g.add_argument("--gpus-per-replica", type=int, default=0, choices=[0, 1, 2],
                   help="0: CPU; 1: both models on the replica's GPU; 2: the target on its first, the draft on its "
                   "second (default: 0)")
    g.add_argument("--cpus-per-replica", type=_float_above_zero, default=1.0, metavar="C",
                   help="CPUs Ray reserves per replica; torch's threads on CPU unless --cpu-threads (default: 1)")
    g.add_argument("--http-port", type=int, default=8000,
                   help="the OpenAI-compatible API (Serve's HTTP proxy) (default: 8000)")
    g.add_argument("--metrics-targets", default=None, metavar="FILE",
                   help="keep a Prometheus file_sd file of every replica's /metrics here (default: none)")


def check(args):
    """What can be refused before Ray starts; returns the ScaleOut."""
    from hedgerow.server.scaleout.app import ScaleOut

    if args.tls_cert or args.tls_key:
        raise HedgerowError("--tls-cert/--tls-key with --ray: Ray Serve's gRPC proxy has no TLS; terminate TLS in "
                            "front of it (a load balancer, a Kubernetes ingress)")
    for flag in ("port", "http_port"):
        if not 1 <= getattr(args, flag) <= 65535:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be in [1, 65535] with --ray, got {getattr(args, flag)}")
    if args.port == args.http_port:
        raise HedgerowError(f"--port and --http-port are both {args.port}")
    for flag in ("max_batch_size", "max_queue", "max_new_tokens"):
        if getattr(args, flag) < 1:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise HedgerowError("--served-model-name is empty")
    scale = ScaleOut.from_args(args)
    if args.ray_address is None:  # a local cluster: the ports are this machine's
        from hedgerow.server.service.serve import check_port_free

        check_port_free(args.host, args.port, "--host/--port")
        check_port_free(args.host, args.http_port, "--host/--http-port")
    return scale


def run(args) -> int:
    from hedgerow.server.cli import resolve_models
    from hedgerow.server.proxy.keys import api_key

    scale = check(args)
    key = api_key(args)
    resolve_models(args)  # a missing model folder is named before Ray starts
    from hedgerow.server.scaleout.app import replica_args

    replica_args(args, scale)  # device flags that contradict --gpus-per-replica

    import ray
    from ray import serve

    from hedgerow.server.scaleout.app import APP_NAME, build, serve_options
    from hedgerow.server.scaleout.directory import remove_directory, replica_targets, write_targets

    local = args.ray_address is None
    ray.init(address=args.ray_address, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        http, grpc = serve_options(args)
        serve.start(http_options=http, grpc_options=grpc)
        print(f"hedgerow: deploying {scale.replicas or f'{scale.min_replicas}-{scale.max_replicas}'} replica(s) on "
              f"Ray ({'a local cluster' if local else args.ray_address})", file=sys.stderr, flush=True)
        serve.run(build(args, key), name=APP_NAME, route_prefix="/")
        print(f"hedgerow: serving hedgerow.v1.Generation on {args.host}:{args.port}, the OpenAI API on "
              f"http://{args.host}:{args.http_port}/v1 (Ray Serve)", flush=True)
        while not stop.wait(TARGETS_EVERY_S if args.metrics_targets else None):
            write_targets(args.metrics_targets, replica_targets(), APP_NAME)
        print("hedgerow: stopping: deleting the application (replicas finish their requests)", file=sys.stderr,
              flush=True)
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
        remove_directory()
    finally:
        ray.shutdown()
    print("hedgerow: stopped", file=sys.stderr, flush=True)
    return 0


def run_serve(args) -> int:
    """``hedgerow serve``'s command function once the Ray group is added to its parser: the single
    process, or with ``--ray`` this module's ``run``."""
    if args.ray:
        return run(args)
    from hedgerow.server.service.serve import run as serve_one

    return serve_one(args)
