"""Scale-out's configuration without a cluster: the replica flags, the devices each replica's models
go on, the refusals before Ray starts, the Prometheus file-discovery file, and the KubeRay manifests
(their Serve config read by Serve's own schema where ray is installed, their flags by ours)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from hedgerow.server.errors import HedgerowError
from hedgerow.server.scaleout.app import ScaleOut, parser, replica_args
from hedgerow.server.scaleout.cli import check
from hedgerow.server.scaleout.directory import write_targets
from hedgerow.server.scaleout.grpc_services import SERVICER_FUNCTIONS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kuberay").glob("*.yaml"))


def flags(text: str):
    return parser().parse_args(shlex.split(text))


def test_replicas_fixed_or_autoscaled_become_serve_options():
    fixed = ScaleOut.from_args(flags("--replicas 3 --gpus-per-replica 1 --cpus-per-replica 2"))
    options = fixed.deployment_options(max_ongoing_requests=272)
    assert options["num_replicas"] == 3 and "autoscaling_config" not in options
    assert options["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 1}
    assert options["max_ongoing_requests"] == 272
    auto = ScaleOut.from_args(flags("--min-replicas 1 --max-replicas 4 --target-ongoing-requests 6"))
    config = auto.deployment_options(max_ongoing_requests=8)["autoscaling_config"]
    assert config == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 6.0}
    assert ScaleOut.from_args(flags("--max-replicas 2")).min_replicas == 1
    assert ScaleOut.from_args(flags("")).replicas == 1


@pytest.mark.parametrize("text, message", [
    ("--replicas 2 --max-replicas 3", "give one or the other"),
    ("--min-replicas 3 --max-replicas 2", "--max-replicas must be >= --min-replicas"),
    ("--min-replicas 0 --max-replicas 0", "--max-replicas"),
])
def test_contradicting_replica_flags_are_refused(text, message):
    with pytest.raises((HedgerowError, SystemExit)) as refused:
        ScaleOut.from_args(flags(text))
    if refused.type is HedgerowError:
        assert message in str(refused.value)


def test_each_replica_puts_its_models_on_its_own_gpus():
    one = replica_args(flags("--gpus-per-replica 1"), ScaleOut(gpus_per_replica=1))
    assert (one.target_device, one.draft_device) == ("cuda:0", "cuda:0")
    two = replica_args(flags("--gpus-per-replica 2"), ScaleOut(gpus_per_replica=2))
    assert (two.target_device, two.draft_device) == ("cuda:0", "cuda:1")  # target first, draft second
    cpu = replica_args(flags("--cpus-per-replica 3"), ScaleOut(cpus_per_replica=3))
    assert (cpu.target_device, cpu.cpu_threads) == ("cpu", 3)
    with pytest.raises(HedgerowError, match="leave out --target-device"):
        replica_args(flags("--target-device cuda:1"), ScaleOut(gpus_per_replica=2))
    with pytest.raises(HedgerowError, match="no GPU unless --gpus-per-replica"):
        replica_args(flags("--target-device cuda"), ScaleOut())


def test_what_serve_ray_cannot_do_is_refused_before_ray_starts(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    with pytest.raises(HedgerowError, match="gRPC proxy has no TLS"):
        check(flags(f"--tls-cert {cert} --tls-key {key}"))
    with pytest.raises(HedgerowError, match="--port and --http-port are both"):
        check(flags("--port 8000 --http-port 8000 --ray-address auto"))
    with pytest.raises(SystemExit):  # argparse: 3 GPUs is not a choice
        flags("--gpus-per-replica 3")


def test_the_targets_file_lists_each_replica_with_its_label(tmp_path):
    path = tmp_path / "targets.json"
    write_targets(str(path), {"b2": "10.0.0.2:41000", "a1": "10.0.0.1:40000"}, "hedgerow")
    assert json.loads(path.read_text()) == [
        {"targets": ["10.0.0.1:40000"], "labels": {"replica": "a1", "hedgerow_app": "hedgerow"}},
        {"targets": ["10.0.0.2:41000"], "labels": {"replica": "b2", "hedgerow_app": "hedgerow"}},
    ]


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifests_deploy_the_application_of_serve_ray(manifest):
    service = yaml.safe_load(manifest.read_text())
    assert service["kind"] == "RayService"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["grpc_options"]["grpc_servicer_functions"] == SERVICER_FUNCTIONS
    (app,) = config["applications"]
    assert app["import_path"] == "hedgerow.server.scaleout.app:build_app"
    scale = ScaleOut.from_args(flags(app["args"]["flags"]))
    gpus = {c["resources"]["limits"].get("nvidia.com/gpu") for g in service["spec"]["rayClusterConfig"]
            ["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]}
    assert gpus == ({None} if scale.gpus_per_replica == 0 else {str(scale.gpus_per_replica)})
    try:
        from ray.serve.schema import ServeDeploySchema
    except ImportError:
        return  # the flags are checked; Serve's own schema needs ray
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)


def test_a_dead_replicas_calls_end_unavailable_with_one_sentence():
    """Serve's proxy ends the calls of a replica whose process died with INTERNAL and Ray's text;
    the handlers made for Hedgerow's services end them with UNAVAILABLE and REPLICA_STOPPED, and
    leave every other status, and other applications' handlers, as they are."""
    import asyncio
    from types import SimpleNamespace

    import grpc

    from hedgerow.server.scaleout.grpc_services import REPLICA_STOPPED, add_services, replica_died

    ray_text = ("The actor died unexpectedly before finishing this task.\n\tclass_name: ServeReplica:hedgerow:"
                "HedgerowReplica\n\tactor_id: 2d5e0b4f\n\tpid: 41234\n\tip: 10.0.0.2")

    class Context:
        def __init__(self):
            self._code, self._details = None, None

        def code(self):
            return self._code

        def details(self):
            return self._details

        def set_code(self, code):
            self._code = code

        def set_details(self, details):
            self._details = details

    def factory(service_method, streaming_type):
        """Serve's factory, as its handlers end: the status of the call's ending."""
        ending = endings.get(service_method, (grpc.StatusCode.OK, ""))
        if service_method.endswith("Stream"):
            async def stream(request, context):
                yield b"one"
                context.set_code(ending[0])
                context.set_details(ending[1])
            return stream

        async def unary(request, context):
            context.set_code(ending[0])
            context.set_details(ending[1])
            return b""
        return unary

    class Server:
        def __init__(self):
            self.service_handler_factory = factory
            self.made = {}

        def add_generic_rpc_handlers(self, handlers):
            for method in handlers[0]._method_handlers:
                self.made[method] = self.service_handler_factory(service_method=method, streaming_type=None)

        def add_registered_method_handlers(self, service, handlers):
            pass

    died = (grpc.StatusCode.INTERNAL, ray_text)
    endings = {"/hedgerow.v1.Generation/Generate": died, "/hedgerow.v1.Generation/GenerateStream": died,
               "/hedgerow.v1.Generation/ModelInfo": (grpc.StatusCode.INVALID_ARGUMENT, "the actor died, said a user"),
               "/grpc.health.v1.Health/Check": (grpc.StatusCode.INTERNAL, "something else broke"),
               "/grpc.health.v1.Health/Watch": died}
    server = Server()
    methods = ("Generate", "GenerateStream", "ModelInfo", "Check", "Watch", "List")
    add_services(SimpleNamespace(**dict.fromkeys(methods)), server)
    assert server.service_handler_factory is factory  # other applications keep Serve's own handlers

    async def call(method):
        context = Context()
        handler = server.made[method]
        if method.endswith(("Stream", "Watch")):
            assert [m async for m in handler(b"", context)] == [b"one"]
        else:
            await handler(b"", context)
        return context.code(), context.details()

    unavailable = (grpc.StatusCode.UNAVAILABLE, REPLICA_STOPPED)
    for method in ("/hedgerow.v1.Generation/Generate", "/hedgerow.v1.Generation/GenerateStream"):
        assert asyncio.run(call(method)) == unavailable, method
    assert asyncio.run(call("/hedgerow.v1.Generation/ModelInfo")) == endings["/hedgerow.v1.Generation/ModelInfo"]
    assert asyncio.run(call("/grpc.health.v1.Health/Check")) == endings["/grpc.health.v1.Health/Check"]
    assert replica_died(grpc.StatusCode.INTERNAL, "ray.exceptions.ActorUnavailableError: The actor 9f is unavailable")
    assert not replica_died(grpc.StatusCode.OK, ray_text) and not replica_died(grpc.StatusCode.INTERNAL, None)
