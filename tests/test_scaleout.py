"""Scale-out on Ray Serve (hedgerow.server.scaleout), on a local Ray cluster of this machine: two
replicas of the embedded pair behind Serve's gRPC and HTTP proxies.

- 16 concurrent greedy requests, over gRPC and over the OpenAI API, give exactly what the
  single-process server (and its proxy) gives, and both replicas served some: by the replica each
  response names and by each replica's own ``hedgerow_requests_total``;
- the same refusals, with the same status and words, as the single process (bad input, no key);
- a replica's process killed mid-load: its requests end with UNAVAILABLE and one sentence (not
  Ray's text), never a hang; the other replica's complete; new requests are served; Serve starts a
  replacement.

One cluster for the module (starting Ray and loading two replicas takes about half a minute on two
cores); skipped, with the reason, where ray[serve] is not installed (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import threading
import time

import grpc
import httpx
import pytest

ray = pytest.importorskip("ray", reason='ray is not installed: pip install -e ".[ray]"')
serve = pytest.importorskip("ray.serve", reason='ray[serve] is not installed: pip install -e ".[ray]"')

from hedgerow.server.rpc import generation_pb2 as pb  # noqa: E402
from hedgerow.server.rpc import generation_pb2_grpc as pb_grpc  # noqa: E402
from hedgerow.server.scaleout.app import APP_NAME, DEPLOYMENT_NAME, build, parser, serve_options  # noqa: E402
from hedgerow.server.scaleout.directory import replica_targets  # noqa: E402
from hedgerow.server.scaleout.grpc_services import REPLICA_STOPPED  # noqa: E402
from hedgerow.server.scaleout.replica import REPLICA_HEADER, REPLICA_TRAILER  # noqa: E402
from tests.live import LiveProxy, LiveServer  # noqa: E402

KEY = "scale-out-test-key"
AUTH = (("authorization", f"Bearer {KEY}"),)
PROMPTS = [f"def {name}(x{i}):" for i, name in enumerate(
    ["add", "mean", "parse", "load", "save", "split", "merge", "walk", "count", "clean", "render", "fetch",
     "close", "open", "sort", "find"])]
FLAGS = "--compile off --max-batch-size 8 --max-new-tokens 24"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference():
    """The single-process server (and proxy) of the same flags: 16 concurrent greedy requests."""
    from hedgerow.server.cli import build_engine
    from hedgerow.server.service.requests import ServiceConfig

    args = parser().parse_args(FLAGS.split())
    args.cpu_threads = 1
    engine, tokenizer = build_engine(args)
    config = ServiceConfig(target_name="hedgerow-embedded", draft_name="hedgerow-embedded-draft")
    with LiveServer(engine, tokenizer, config=config) as server, LiveProxy(server.address) as proxy:
        with cf.ThreadPoolExecutor(16) as pool:
            grpc_out = list(pool.map(lambda p: _generate(server.stub, p)[0], PROMPTS))
            http_out = list(pool.map(lambda p: _complete(proxy.url, p, None)[0], PROMPTS))
    return grpc_out, http_out


@pytest.fixture(scope="module")
def cluster(reference):
    """Two replicas on a local Ray cluster; yields (gRPC channel, HTTP URL)."""
    grpc_port, http_port = free_port(), free_port()
    args = parser().parse_args(f"--ray --replicas 2 {FLAGS} --port {grpc_port} --http-port {http_port}".split())
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        http_options, grpc_options = serve_options(args)
        serve.start(http_options=http_options, grpc_options=grpc_options)
        serve.run(build(args, KEY), name=APP_NAME, route_prefix="/")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        yield channel, f"http://127.0.0.1:{http_port}"
        channel.close()
    finally:
        serve.shutdown()
        ray.shutdown()


def _generate(stub, prompt: str, n: int = 24):
    response, call = stub.Generate.with_call(
        pb.GenerateRequest(prompt=prompt, stopping=pb.StoppingCriteria(max_new_tokens=n)), timeout=120,
        metadata=AUTH)
    return (response.text, tuple(response.token_ids)), dict(call.trailing_metadata() or ()).get(REPLICA_TRAILER)


def _complete(url: str, prompt: str, key: str | None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(url + "/v1/completions", json={"model": "hedgerow-embedded", "prompt": prompt, "max_tokens": 24},
                   headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"], r.headers.get(REPLICA_HEADER)


def _requests_by_replica() -> dict[str, float]:
    """Each live replica's ``hedgerow_requests_total``, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for replica, address in replica_targets().items():
        text = httpx.get(f"http://{address}/metrics", timeout=10).text
        counts[replica] = sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                              if s.name == "hedgerow_requests_total")
    return counts


@pytest.mark.slow
def test_two_replicas_give_the_single_process_output_over_grpc_and_the_openai_api(cluster, reference):
    channel, url = cluster
    stub = pb_grpc.GenerationStub(channel)
    grpc_ref, http_ref = reference
    with cf.ThreadPoolExecutor(16) as pool:
        over_grpc = list(pool.map(lambda p: _generate(stub, p), PROMPTS))
        over_http = list(pool.map(lambda p: _complete(url, p, KEY), PROMPTS))
    assert [out for out, _ in over_grpc] == grpc_ref
    assert [out for out, _ in over_http] == http_ref
    assert len({replica for _, replica in over_grpc}) == 2, "both replicas serve gRPC requests"
    assert len({replica for _, replica in over_http}) == 2, "both replicas serve OpenAI requests"
    counts = _requests_by_replica()
    assert len(counts) == 2 and all(n > 0 for n in counts.values()), counts
    assert sum(counts.values()) >= 2 * len(PROMPTS)


@pytest.mark.slow
def test_replicas_refuse_as_the_single_process_does(cluster):
    channel, url = cluster
    stub = pb_grpc.GenerationStub(channel)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(prompt="x"), timeout=60)
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(pb.GenerateRequest(prompt=""), timeout=60, metadata=AUTH)
    assert (refused.value.code(), refused.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
    with pytest.raises(grpc.RpcError) as refused:  # a stream refused before its first message
        list(stub.GenerateStream(pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=2.0)), timeout=60,
                                 metadata=AUTH))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("sampling.top_p must be in (0, 1]")
    raw = channel.unary_unary("/hedgerow.v1.Generation/Generate")  # bytes in, bytes out
    with pytest.raises(grpc.RpcError) as refused:  # not UTF-8: the field named, by hedgerow serve's deserializer
        raw(b"\x0a\x02\xff\xfe", timeout=60, metadata=AUTH)
    assert (refused.value.code(), refused.value.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "request_id is not valid UTF-8 (byte 0)")
    r = httpx.post(url + "/v1/completions", json={"model": "hedgerow-embedded", "prompt": "x"}, timeout=60)
    assert r.status_code == 401 and r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json={"model": "hedgerow-embedded", "prompt": "x", "top_p": 2},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p", r.text
    assert httpx.get(url + "/health", timeout=60).json() == {"status": "ok"}


@pytest.mark.slow
def test_a_killed_replica_ends_its_requests_with_a_status_and_the_other_goes_on(cluster):
    channel, url = cluster
    stub = pb_grpc.GenerationStub(channel)
    before = replica_targets()
    assert len(before) == 2

    under_way = threading.Semaphore(0)  # released once per stream, at its first message

    def long_stream(i: int):
        """(status, tokens, replica) of a long stream; the replica is known once it ends well."""
        tokens = 0
        call = stub.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[i], stopping=pb.StoppingCriteria(
            max_new_tokens=384, ignore_eos=True)), timeout=120, metadata=AUTH)
        try:
            for message in call:
                if tokens == 0:
                    under_way.release()
                tokens += len(message.token_ids)
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), tokens, None
        return grpc.StatusCode.OK, "", tokens, dict(call.trailing_metadata()).get(REPLICA_TRAILER)

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(long_stream, i) for i in range(8)]
        # every stream is under way (the replicas each decode four): kill then, not after a fixed
        # wait, which a fast machine may spend finishing the streams
        for _ in futures:
            assert under_way.acquire(timeout=60), "a stream did not start"
        victim = sorted(before)[0]
        name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == "serve" and DEPLOYMENT_NAME in a["name"] and a["name"].endswith(victim))
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        started = time.monotonic()
        done, pending = cf.wait(futures, timeout=150)
        assert not pending, "a request hung after its replica died"
    results = [f.result() for f in futures]
    failed = [r for r in results if r[0] is not grpc.StatusCode.OK]
    served = [r for r in results if r[0] is grpc.StatusCode.OK]
    assert failed, f"no request was on the killed replica: {results}"
    assert served, f"no request completed on the other replica: {results}"
    assert all(r[2] == 384 and r[3] != victim for r in served), served
    for code, details, _, _ in failed:  # one sentence and "try again", not Ray's INTERNAL with actor ids and pids
        assert (code, details) == (grpc.StatusCode.UNAVAILABLE, REPLICA_STOPPED), (code, details)
    print(f"killed replica {victim}: {len(failed)} requests ended with {sorted({r[0].name for r in failed})} "
          f"within {time.monotonic() - started:.1f} s ({failed[0][1][:160]!r}); {len(served)} completed on the other")

    # new requests are served while Serve replaces the dead replica, and then by two again
    (text, ids), replica = _generate(stub, PROMPTS[0])
    assert replica != victim and len(ids) == 24
    deadline = time.monotonic() + 150
    while True:
        live = set(replica_targets())
        if len(live) == 2 and victim not in live:
            break
        assert time.monotonic() < deadline, f"Serve did not replace the killed replica: {live}"
        time.sleep(2)
    _, url_replica = _complete(url, PROMPTS[1], KEY)
    assert url_replica in live
