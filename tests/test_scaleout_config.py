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
