"""Serve's autoscaling of ``hedgerow serve --ray --min-replicas 1 --max-replicas 2``, on a local Ray
cluster of this machine: under load it adds the second replica, idle it goes back to one, and
every request sent meanwhile completes (greedy, its full length, no error).

The deployment's autoscaling config gets short delays (``AUTOSCALING``) so that the whole cycle
fits in about a minute and a half on two cores: Serve's defaults wait 30 s before adding a replica
and 600 s before removing one. Skipped, with the reason, where ray[serve] is not installed.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
import pytest

ray = pytest.importorskip("ray", reason='ray is not installed: pip install -e ".[ray]"')
serve = pytest.importorskip("ray.serve", reason='ray[serve] is not installed: pip install -e ".[ray]"')

from hedgerow.server.rpc import generation_pb2 as pb  # noqa: E402
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc  # noqa: E402
from hedgerow.server.scaleout.app import APP_NAME, DEPLOYMENT_NAME, build, parser, serve_options  # noqa: E402
from hedgerow.server.scaleout.replica import REPLICA_TRAILER  # noqa: E402

AUTOSCALING = {"metrics_interval_s": 0.5, "look_back_period_s": 2.0, "upscale_delay_s": 1.0,
               "downscale_delay_s": 4.0}
CLIENTS = 6  # in flight, against a target of 1 per replica: Serve wants 2 replicas (its maximum)
TOKENS = 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return status.replica_states.get("RUNNING", 0)


def wait_for(what: str, ok, timeout: float) -> float:
    """Poll ``ok()`` every half second; the seconds it took."""
    start = time.monotonic()
    while not ok():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout:g} s"
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.mark.slow
def test_autoscaling_adds_a_replica_under_load_and_removes_it_when_idle():
    grpc_port, http_port = free_port(), free_port()
    args = parser().parse_args(f"--ray --min-replicas 1 --max-replicas 2 --target-ongoing-requests 1 --compile off "
                               f"--max-batch-size 8 --port {grpc_port} --http-port {http_port}".split())
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        http_options, grpc_options = serve_options(args)
        serve.start(http_options=http_options, grpc_options=grpc_options)
        serve.run(build(args, None, autoscaling=AUTOSCALING), name=APP_NAME, route_prefix="/")
        assert running_replicas() == 1
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = pb_grpc.GenerationStub(channel)
        stop = threading.Event()
        outcomes: list[tuple[str, int, str | None]] = []  # (status, tokens, replica) of every request sent

        def client(i: int) -> None:
            n = 0
            while not stop.is_set():
                msg = pb.GenerateRequest(prompt=f"def task_{i}_{n}(x):", stopping=pb.StoppingCriteria(
                    max_new_tokens=TOKENS, ignore_eos=True))
                n += 1
                try:
                    response, call = stub.Generate.with_call(msg, timeout=120)
                    replica = dict(call.trailing_metadata() or ()).get(REPLICA_TRAILER)
                    outcomes.append(("OK", len(response.token_ids), replica))
                except grpc.RpcError as exc:
                    outcomes.append((f"{exc.code().name}: {exc.details()}", 0, None))

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        try:
            up = wait_for("scaled to 2 replicas under load", lambda: running_replicas() == 2, 90)
            # both replicas serve: a request answered by each
            wait_for("the new replica serves", lambda: len({r for _, _, r in list(outcomes) if r}) == 2, 45)
        finally:
            stop.set()
            for t in threads:
                t.join(150)
        assert not any(t.is_alive() for t in threads), "a request hung"
        down = wait_for("back to 1 replica when idle", lambda: running_replicas() == 1, 60)
        lost = [o for o in outcomes if o[0] != "OK" or o[1] != TOKENS]
        assert not lost, f"{len(lost)} of {len(outcomes)} requests lost: {lost[:3]}"
        response = stub.Generate(pb.GenerateRequest(prompt="def after(x):", stopping=pb.StoppingCriteria(
            max_new_tokens=8, ignore_eos=True)), timeout=60)  # the one left serves
        assert len(response.token_ids) == 8
        channel.close()
        print(f"autoscaling: 2 replicas {up:.1f} s into the load, back to 1 {down:.1f} s after it; "
              f"{len(outcomes)} requests, all complete")
    finally:
        serve.shutdown()
        ray.shutdown()
