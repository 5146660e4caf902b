"""``hedgerow bench soak`` at CI size: a few seconds of mixed streams (greedy and sampled, every mode,
cancelled and disconnected clients) against a server of the tiny pair, in process and as a
`hedgerow serve` it starts itself; its JSON and the table RESULTS.md renders from it."""

from __future__ import annotations

import json
import os

import pytest

from hedgerow.bench import results, tables
from hedgerow.server.cli import main
from tests.live import text_server

LOAD = ["--concurrency", "6", "--duration", "2", "--warmup", "0.5", "--max-new-tokens", "16",
        "--cancel-share", "0.2", "--disconnect-share", "0.2"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def fibonacci(n):", "import os\n")))
    return str(path)


def check(data: dict) -> dict:
    r = data["results"]
    assert data["config"]["kind"] == "soak" and data["config"]["concurrency"] == 6
    assert r["errors"] == 0, r["error_samples"]
    assert r["requests"] == r["completed"] + r["cancelled"] + r["disconnected"] >= 12
    assert r["completed"] and r["cancelled"] and r["disconnected"] and r["sampled"]
    assert set(r["by_mode"]) == {"plain", "chain", "tree"}
    assert r["tokens_per_second"] > 0 and r["ttft_seconds"]["p50"] > 0
    rss = r["server_rss_mib"]
    assert rss["launch"] > 0 and rss["start"] > 0 and rss["end"] > 0 and rss["samples"]
    return r


@pytest.mark.live
def test_soak_against_a_running_server(tiny_folders, prompts, tmp_path, capsys):
    out = tmp_path / "soak.json"
    with text_server(tiny_folders) as h:
        assert main(["bench", "soak", "--grpc", h.address, "--server-pid", str(os.getpid()), *LOAD,
                     "--prompts", prompts, "--output", str(out)]) == 0
        h.wait_idle()  # every cancelled and disconnected request gave its KV slot back
    data = json.loads(out.read_text())
    r = check(data)
    assert r["server_exit_status"] is None and data["config"]["server_command"] is None
    assert tables.soak(r) in capsys.readouterr().out
    report = results.render(tmp_path)
    assert "## Soak: `soak`" in report and tables.soak(r) in report


@pytest.mark.slow
def test_soak_starts_and_stops_its_own_server(tiny_folders, prompts, tmp_path):
    out = tmp_path / "soak.json"
    server = f"--target {tiny_folders['target']} --draft {tiny_folders['draft']} --max-model-len 256 --compile off"
    assert main(["bench", "soak", "--server-args", server, *LOAD, "--prompts", prompts, "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert check(data)["server_exit_status"] == 0
    assert data["config"]["server_command"].startswith("hedgerow serve --port 0 --metrics-port 0 --target ")


@pytest.mark.unit
def test_soak_refuses_bad_flags(capsys):
    for flags, message in ((["--cancel-share", "0.7", "--disconnect-share", "0.5"], "--cancel-share"),
                           (["--modes", "plain,warp"], "--modes"), (["--server-pid", "1"], "--server-pid")):
        assert main(["bench", "soak", *flags]) == 2
        assert message in capsys.readouterr().err
