"""The shipped monitoring files (monitoring/) against a real Prometheus and a live server.

- the Grafana dashboard is well-formed and names only metrics that server/service/metrics.py exports;
- ``promtool check config`` / ``check rules`` pass, and ``promtool test rules`` checks the recording
  rules' arithmetic and an alert on synthetic series (exact expected values);
- a live run: the gRPC server in-process with its /metrics on a free port, Prometheus (Debian's
  ``prometheus`` package) on loopback scraping it every second with the shipped rules, greedy and
  speculative traffic (chain, tree, plain decoding, sampling; hedge branches on); then every PromQL
  expression of the dashboard and every recording rule must return data through Prometheus' HTTP API.

The Prometheus tests skip when the binaries are absent (``apt-get install -y prometheus``).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from hedgerow.server.engine.sequence import ProposerCounts
from hedgerow.server.rpc import generation_pb2 as pb
from hedgerow.server.service.grpc_service import ServiceConfig
from hedgerow.server.service.metrics import Metrics
from tests.live import LiveServer
from tests.tiny import PROMPTS, nudged_engine

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "monitoring" / "grafana" / "hedgerow-dashboard.json"
PROMETHEUS_YML = ROOT / "monitoring" / "prometheus" / "prometheus.yml"
RULES = ROOT / "monitoring" / "prometheus" / "rules.yml"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool not installed (Debian: apt-get install -y prometheus)")
# Grafana's variables, as Prometheus alone must read them
GRAFANA_VARS = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*", "$replica": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard, Grafana variables substituted."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((f"{panel['title']} [{target['refId']}]", expr))
    return out


def recording_rules() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["record"] for g in groups for rule in g["rules"] if "record" in rule]


def exported_names() -> set[str]:
    """Every sample name server/service/metrics.py exports, labelled families included."""
    m = Metrics()
    m.record_step(emitted=3, draft_tokens=4, accepted_tokens=2, speculative=True, branches=1, branch_hit=True,
                  proposers={"model": ProposerCounts(3, 1), "ngram": ProposerCounts(1, 1)})
    m.record_phases({"verify": 0.01})
    m.set_load(running=1, waiting=0, kv_slots={"target": 1})
    return {line.split("{")[0].split(" ")[0] for line in m.text().splitlines() if line and not line.startswith("#")}


# --- static checks -------------------------------------------------------------------------------
@pytest.mark.unit
def test_dashboard_is_well_formed_and_uses_exported_metrics():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job", "instance", "replica"}
    for p in dash["panels"]:
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert len(refs) == len(set(refs)), p["title"]
    queries = dashboard_queries()
    text = " ".join(expr for _, expr in queries)
    for needed in ("hedgerow_spec_accepted_tokens_total", "hedgerow_spec_draft_tokens_total",
                   "hedgerow_spec_acceptance_length", "hedgerow_spec_accepted_tokens_per_position_total",
                   "hedgerow_generated_tokens_total", "hedgerow_time_to_first_token_seconds_bucket",
                   "hedgerow_inter_token_latency_seconds_bucket", "hedgerow_running_requests",
                   "hedgerow_waiting_requests", "hedgerow_kv_slots_in_use", "hedgerow_spec_draft_budget",
                   "hedgerow_step_seconds", "hedgerow_spec_branch_hits_total", "hedgerow_spec_rollback_tokens_total"):
        assert needed in text, f"the dashboard shows nothing of {needed}"
    exported = exported_names()
    rules_text = RULES.read_text()
    for name in set(re.findall(r"\bhedgerow_[a-z0-9_]+", text + rules_text)):
        assert name in exported, f"{name} is not a metric server/service/metrics.py exports"


@pytest.mark.live
@needs_prometheus
def test_promtool_checks_the_config_and_rules():
    for args in (["check", "config", str(PROMETHEUS_YML)], ["check", "rules", str(RULES)]):
        out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 15s
tests:
  - interval: 15s
    input_series:
      - series: 'hedgerow_spec_draft_tokens_total{{job="hedgerow", instance="a"}}'
        values: '0+40x20'
      - series: 'hedgerow_spec_accepted_tokens_total{{job="hedgerow", instance="a"}}'
        values: '0+30x20'
      - series: 'hedgerow_spec_verify_steps_total{{job="hedgerow", instance="a"}}'
        values: '0+10x20'
      - series: 'hedgerow_spec_accepted_tokens_per_position_total{{job="hedgerow", instance="a", position="1"}}'
        values: '0+9x20'
      - series: 'hedgerow_spec_acceptance_length_sum{{job="hedgerow", instance="a"}}'
        values: '0+40x20'
      - series: 'hedgerow_spec_acceptance_length_count{{job="hedgerow", instance="a"}}'
        values: '0+10x20'
      - series: 'hedgerow_generated_tokens_total{{job="hedgerow", instance="a"}}'
        values: '0+60x20'
      - series: 'up{{job="hedgerow", instance="a"}}'
        values: '0x20'
    promql_expr_test:
      - expr: hedgerow:acceptance_rate:rate1m
        eval_time: 3m
        exp_samples:
          - labels: 'hedgerow:acceptance_rate:rate1m{{job="hedgerow", instance="a"}}'
            value: 0.75
      - expr: hedgerow:mean_accepted_length:rate1m
        eval_time: 3m
        exp_samples:
          - labels: 'hedgerow:mean_accepted_length:rate1m{{job="hedgerow", instance="a"}}'
            value: 4
      - expr: hedgerow:acceptance_by_position:rate1m
        eval_time: 3m
        exp_samples:
          - labels: 'hedgerow:acceptance_by_position:rate1m{{job="hedgerow", instance="a", position="1"}}'
            value: 0.9
      - expr: hedgerow:tokens_per_second:rate1m
        eval_time: 3m
        exp_samples:
          - labels: 'hedgerow:tokens_per_second:rate1m{{job="hedgerow", instance="a"}}'
            value: 4
    alert_rule_test:
      - alertname: HedgerowDown
        eval_time: 3m
        exp_alerts:
          - exp_labels: {{severity: critical, job: hedgerow, instance: a}}
            exp_annotations:
              summary: "Prometheus cannot scrape Hedgerow at a"
              description: "The server is down or its --metrics-port is not reachable."
"""


@pytest.mark.live
@needs_prometheus
def test_promtool_unit_tests_the_rules(tmp_path):
    """Synthetic counters with known rates: 30 accepted per 40 drafted is 0.75, and so on."""
    tests = tmp_path / "rules_test.yml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(RULES))))
    out = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --- live: server + Prometheus -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def traffic(server: LiveServer) -> None:
    """Greedy and speculative requests (chain, tree, plain decoding, seeded sampling) at once."""
    reqs = []
    for i, prompt in enumerate(PROMPTS):
        for mode in (pb.SPECULATION_MODE_CHAIN, pb.SPECULATION_MODE_TREE, pb.SPECULATION_MODE_PLAIN):
            msg = pb.GenerateRequest(prompt_token_ids=prompt, stopping=pb.StoppingCriteria(max_new_tokens=24))
            msg.speculation.mode = mode
            reqs.append(msg)
        sampled = pb.GenerateRequest(prompt_token_ids=prompt, stopping=pb.StoppingCriteria(max_new_tokens=16),
                                     sampling=pb.SamplingParams(temperature=0.8, top_p=0.9, seed=i))
        reqs.append(sampled)
    futures = [server.stub.Generate.future(r, timeout=120) for r in reqs]
    outs = [f.result() for f in futures]
    assert sum(o.stats.draft_tokens for o in outs) > 0 and sum(o.stats.accepted_tokens for o in outs) > 0


class Prometheus:
    """A Prometheus on loopback, with the shipped config retargeted at the live server."""

    def __init__(self, workdir: Path, metrics_port: int):
        config = yaml.safe_load(PROMETHEUS_YML.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(RULES)]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        check = subprocess.run([PROMTOOL, "check", "config", str(self.config)], capture_output=True, text=True,
                               timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.log = open(workdir / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url[len('http://'):]}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.proc.poll() is None, f"prometheus exited: {self.logs()}"
            assert time.monotonic() < deadline, f"prometheus not ready: {self.logs()}"
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(self.url + "/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def logs(self) -> str:
        self.log.seek(0)
        return self.log.read()[-3000:]

    def query(self, expr: str) -> list:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        except urllib.error.HTTPError as exc:  # 400 for a bad expression: show why
            raise AssertionError(f"{expr}: {exc.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait(self, check, what: str, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        while not (result := check()):
            assert self.proc.poll() is None, f"prometheus exited: {self.logs()}"
            assert time.monotonic() < deadline, f"{what}: {check.__doc__ or ''} {self.logs()}"
            time.sleep(0.5)
        return result

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def served(tiny_tokenizer):
    """The live server: a draft close to the target accepts about half its tokens; branch overlap
    fills the branch counters; a fixed draft length keeps every speculative step speculating."""
    with LiveServer(nudged_engine(overlap="branch"), tiny_tokenizer, config=ServiceConfig(target_name="tiny")) as s:
        yield s


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus/promtool not installed (Debian: apt-get install -y prometheus)")
    p = Prometheus(tmp_path_factory.mktemp("prometheus"), served.serve_metrics())
    yield p
    p.close()


@pytest.mark.slow
@needs_prometheus
def test_every_dashboard_query_and_recording_rule_returns_data(served, prometheus):
    up = 'up{job="hedgerow"} == 1'
    prometheus.wait(lambda: prometheus.query(up), "the server was never scraped")
    # two bursts of traffic a few scrapes apart, so every counter (labelled ones too) has a rate
    traffic(served)
    time.sleep(2.5)
    traffic(served)

    queries = dashboard_queries() + [(f"recording rule {r}", r) for r in recording_rules()]

    def empty() -> list[str]:
        return [f"{title}: {expr}" for title, expr in queries if not prometheus.query(expr)]

    deadline = time.monotonic() + 60
    while missing := empty():
        assert time.monotonic() < deadline, "no data for:\n" + "\n".join(missing) + "\n" + prometheus.logs()
        time.sleep(1)

    def value(expr: str) -> float:
        (sample,) = prometheus.query(expr)
        return float(sample["value"][1])

    rate = value("hedgerow:acceptance_rate:rate1m")
    assert 0 < rate <= 1, rate
    acceptance = dict(dashboard_queries())["Acceptance rate [A]"]
    assert value(acceptance) == pytest.approx(rate, rel=0.2)
    length = value("hedgerow:mean_accepted_length:rate1m")
    assert 1 <= length <= 5, length  # gamma 4: at most 4 accepted + the bonus token
    assert value("hedgerow:tokens_per_second:rate1m") > 0
    assert math.isfinite(value("hedgerow:time_to_first_token_seconds:p99_rate1m"))
    rules = json.loads(urllib.request.urlopen(prometheus.url + "/api/v1/rules", timeout=10).read())["data"]["groups"]
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
