"""The Serve application: the replica deployment, its sizes and devices, the proxies' options.

``build(args)`` turns parsed ``hedgerow serve --ray`` flags into a Serve application;
``build_app({"flags": "..."})`` is the same from a string of those flags, the form a Serve config
file (and KubeRay's ``serveConfigV2``) uses: ``import_path: hedgerow.server.scaleout.app:build_app``.
``serve_options(args)`` are the HTTP and gRPC proxies' options, which belong to the cluster's Serve
instance rather than to the application (``hedgerow serve --ray`` passes them to ``serve.start``; a
Serve config file has them as ``http_options`` and ``grpc_options``).

Replicas (``ScaleOut``): a fixed number, or Serve's autoscaling between a minimum and a maximum,
aiming at ``target_ongoing_requests`` requests in flight per replica. A replica takes up to
``--max-batch-size`` + ``--max-queue`` requests, as one process does; more wait in Serve's router.
Devices: Ray gives each replica its own GPUs and numbers them from 0 inside it (it sets
``CUDA_VISIBLE_DEVICES``), so with one GPU per replica both models go on ``cuda:0``, and with two
the target goes on ``cuda:0`` and the draft on ``cuda:1``, the replica's first and second GPU.
"""

from __future__ import annotations

import argparse
import copy
import shlex
from dataclasses import dataclass

from hedgerow.server.errors import HedgerowError

APP_NAME = "hedgerow"
DEPLOYMENT_NAME = "HedgerowReplica"
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0
GRACEFUL_SHUTDOWN_S = 30.0


@dataclass(frozen=True)
class ScaleOut:
    """How many replicas, and what each one holds. Checked once, from the flags (``from_args``)."""

    replicas: int | None = 1  # None: autoscaling
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0
    gpus_per_replica: int = 0
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        if self.replicas is not None and self.replicas < 1:
            raise HedgerowError(f"--replicas must be >= 1, got {self.replicas}")
        if self.replicas is None:
            if self.min_replicas < 0:
                raise HedgerowError(f"--min-replicas must be >= 0, got {self.min_replicas}")
            if self.max_replicas < max(1, self.min_replicas):
                raise HedgerowError(f"--max-replicas must be >= --min-replicas and >= 1, got {self.max_replicas}")
        if not self.target_ongoing_requests > 0:
            raise HedgerowError(f"--target-ongoing-requests must be > 0, got {self.target_ongoing_requests}")
        if self.gpus_per_replica not in (0, 1, 2):
            raise HedgerowError(f"--gpus-per-replica must be 0, 1 or 2 (target and draft), got {self.gpus_per_replica}")
        if not self.cpus_per_replica > 0:
            raise HedgerowError(f"--cpus-per-replica must be > 0, got {self.cpus_per_replica}")

    @classmethod
    def from_args(cls, args) -> ScaleOut:
        autoscale = args.min_replicas is not None or args.max_replicas is not None
        if autoscale and args.replicas is not None:
            raise HedgerowError("--replicas is a fixed number; --min-replicas/--max-replicas autoscale: give one or "
                                "the other")
        if autoscale:
            low = 1 if args.min_replicas is None else args.min_replicas
            high = max(low, 1) if args.max_replicas is None else args.max_replicas
            return cls(None, low, high, args.target_ongoing_requests, args.gpus_per_replica, args.cpus_per_replica)
        n = 1 if args.replicas is None else args.replicas
        return cls(n, n, n, args.target_ongoing_requests, args.gpus_per_replica, args.cpus_per_replica)

    def deployment_options(self, max_ongoing_requests: int) -> dict:
        options = {
            "name": DEPLOYMENT_NAME,
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": max_ongoing_requests,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "health_check_timeout_s": HEALTH_CHECK_TIMEOUT_S,
            "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
        }
        if self.replicas is not None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": max(1, self.min_replicas),
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        return options


def replica_args(args, scale: ScaleOut) -> argparse.Namespace:
    """The flags a replica builds its engine from: the devices of its own GPUs, and torch threads
    for the CPUs Ray gives it unless ``--cpu-threads`` says otherwise."""
    args = copy.copy(args)
    if scale.gpus_per_replica:
        if args.target_device != "cpu" or args.draft_device is not None:
            raise HedgerowError("--gpus-per-replica places the models on each replica's own GPUs: leave out "
                                "--target-device and --draft-device")
        args.target_device = "cuda:0"
        args.draft_device = "cuda:1" if scale.gpus_per_replica == 2 else "cuda:0"
    elif "cuda" in (args.target_device or "") or "cuda" in (args.draft_device or ""):
        raise HedgerowError("a replica has no GPU unless --gpus-per-replica gives it one (1: both models on it; "
                            "2: the target on the first, the draft on the second)")
    if args.cpu_threads is None and "cpu" in (args.target_device, args.draft_device or args.target_device):
        args.cpu_threads = max(1, int(scale.cpus_per_replica))
    return args


def proxy_config(args, key: str | None):
    from hedgerow.server.proxy.config import ProxyConfig

    return ProxyConfig(api_key=key, served_model_name=None)  # ModelInfo already carries --served-model-name


def build(args, key: str | None, autoscaling: dict | None = None):
    """The Serve application of parsed ``hedgerow serve --ray`` flags. ``autoscaling``: more keys of
    Serve's ``AutoscalingConfig`` (``upscale_delay_s``, ``downscale_delay_s``, ``metrics_interval_s``,
    ``look_back_period_s``, ...) over Serve's defaults, with ``--min-replicas``/``--max-replicas``."""
    from ray import serve

    from hedgerow.server.scaleout.replica import HedgerowReplica

    scale = ScaleOut.from_args(args)
    options = scale.deployment_options(max_ongoing_requests=args.max_batch_size + args.max_queue)
    if autoscaling:
        if "autoscaling_config" not in options:
            raise HedgerowError("autoscaling settings need --min-replicas/--max-replicas, not --replicas")
        options["autoscaling_config"] = {**options["autoscaling_config"], **autoscaling}
    deployment = serve.deployment(serve.ingress()(HedgerowReplica), **options)
    return deployment.bind(replica_args(args, scale), key, proxy_config(args, key))


def parser() -> argparse.ArgumentParser:
    """``hedgerow serve``'s flags and the Ray group, for ``build_app``."""
    from hedgerow.server.scaleout.cli import add_ray_arguments
    from hedgerow.server.service.serve import add_arguments

    p = argparse.ArgumentParser(prog="hedgerow serve --ray", add_help=False)
    add_arguments(p)
    add_ray_arguments(p)
    return p


def build_app(options: dict):
    """Serve's application builder: ``{"flags": "--replicas 2 --mode chain ..."}``, the flags of
    ``hedgerow serve --ray``. The key comes from ``$HEDGEROW_API_KEY`` or ``--api-key-file``."""
    from hedgerow.server.proxy.keys import api_key

    unknown = set(options) - {"flags"}
    if unknown:
        raise HedgerowError(f"the application's args take 'flags' only, got {sorted(unknown)}")
    args = parser().parse_args(shlex.split(options.get("flags", "")))
    return build(args, api_key(args))


def serve_options(args) -> tuple[dict, dict]:
    """(http_options, grpc_options) for ``serve.start``."""
    from hedgerow.server.scaleout.grpc_services import SERVICER_FUNCTIONS

    http = {"host": args.host, "port": args.http_port}
    grpc = {"port": args.port, "grpc_servicer_functions": SERVICER_FUNCTIONS}
    return http, grpc
