"""The results report: bench/RESULTS.md is what the committed JSONs give, it and the bench README
are self-contained, plots are drawn into their own folder, old result files are read in today's
names, and the targets are stated from the numbers."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.bench_common import HAS_MPL, ROOT

pytestmark = pytest.mark.live


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
                            [(r.get("name"), r.get("speculation"), sorted(r)) for r in data["results"]]
                            if isinstance(data["results"], list) else sorted(data["results"])])  # a soak: one dict
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
    assert "- native draft cost per token ≤ 0.5× transformers': met; best measured 0.25× (`y`)." in text
    assert "- dynamic tree (native) ≥ 1.0× chain (native): not met; best measured 0.89× (`y`)." in text
