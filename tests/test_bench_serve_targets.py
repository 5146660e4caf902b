"""``hedgerow bench serve`` against several servers in one run: each target measured at the same
levels, results keyed by target with ratios to the first, the command line that reproduces the run,
servers the benchmark starts and stops itself (``--start``), and the report's section of such a run."""

from __future__ import annotations

import json
import shlex
import socket
import sys

import pytest

from tests.bench_common import bench
from tests.bench_common import prompts_file  # noqa: F401  (a fixture)
from tests.test_bench_serve import _check_serve, grpc_server

pytestmark = pytest.mark.live


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_targets_in_one_run_against_the_first(tiny_folders, prompts_file, tmp_path, capsys):  # noqa: F811
    from hedgerow.bench.report_sections import serve_section

    out = tmp_path / "serve.json"
    with grpc_server(tiny_folders) as a, grpc_server(tiny_folders) as b:
        assert bench("serve", "--grpc", f"one={a}", "--grpc", f"two={b}", "--concurrency", "1,2", "--requests", "3",
                     "--prompts", str(prompts_file), "--max-new-tokens", "6", "--ignore-eos", "--warmup", "1",
                     "--output", str(out)) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    cfg, results = data["config"], data["results"]
    assert [t["name"] for t in cfg["targets"]] == ["one", "two"] and cfg["address"] == a
    assert all(len(t["load_average_before"]) == 3 and len(t["load_average_after"]) == 3 for t in cfg["targets"])
    assert "--grpc one=" in cfg["command"] and "--grpc two=" in cfg["command"]  # the flag repeated, as given
    assert shlex.split(cfg["command"])[3:7] == ["--grpc", f"one={a}", "--grpc", f"two={b}"]
    for name in ("one", "two"):
        _check_serve({"config": cfg, "results": [r for r in results if r["target"] == name]}, [1, 2],
                     ["plain", "chain"])
    assert all(r["vs_reference"] is None for r in results if r["target"] == "one")
    second = [r for r in results if r["target"] == "two"]
    assert len(second) == 4 and all(r["vs_reference"]["tokens_per_second"] > 0 for r in second)
    assert "| target |" in printed and "two tokens/s (× one)" in printed
    text = "\n".join(serve_section("serve", data, "bench/results"))
    assert "Targets, measured one after the other" in text and "`two`: tokens/s plain" in text
    assert "two tokens/s (× one)" in text


def test_start_runs_each_server_in_turn_and_stops_it(tiny_folders, prompts_file, tmp_path):  # noqa: F811
    out = tmp_path / "serve.json"
    port = _free_port()
    command = (f"hedgerow serve --target {tiny_folders['target']} --draft {tiny_folders['draft']} --port {port} "
               "--metrics-port 0 --compile off --max-batch-size 2")
    assert bench("serve", "--start", "--grpc", f"started=127.0.0.1:{port}", "--server-command", command,
                 "--concurrency", "2", "--requests", "2", "--spec-modes", "plain", "--prompts", str(prompts_file),
                 "--max-new-tokens", "4", "--warmup", "0", "--start-timeout", "180", "--output", str(out)) == 0
    (target,) = json.loads(out.read_text())["config"]["targets"]
    assert target["started"] and target["server_command"] == command and target["server_exit_status"] == 0
    assert target["server"]["max_batch_size"] == 2
    with socket.socket() as s:  # stopped: the port is free again
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("argv, message", [
    (["--grpc", "a=127.0.0.1:1", "--grpc", "a=127.0.0.1:2"], "named alike"),
    (["--grpc", "127.0.0.1:1", "--grpc", "127.0.0.1:2", "--server-command", "x"], "1 given for 2 target(s)"),
    (["--start", "--grpc", "127.0.0.1:1"], "--start runs each target's --server-command"),
])
def test_bad_targets_are_refused_before_any_request(argv, message, prompts_file, capsys):  # noqa: F811
    assert bench("serve", *argv, "--requests", "1", "--prompts", str(prompts_file)) == 2
    assert message in capsys.readouterr().err


def test_a_server_that_does_not_come_up_is_named_with_its_log(prompts_file, capsys):  # noqa: F811
    command = f"{shlex.quote(sys.executable)} -c 'import sys; print(\"no model here\"); sys.exit(3)'"
    assert bench("serve", "--start", "--grpc", "127.0.0.1:1", "--server-command", command, "--requests", "1",
                 "--prompts", str(prompts_file), "--start-timeout", "30") == 2
    err = capsys.readouterr().err
    assert "exited with status 3" in err and "no model here" in err
