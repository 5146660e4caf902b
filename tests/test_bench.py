"""The benchmark harness's other commands on tiny models: the oracle sweep, the GPU check as CI runs
it (on a CPU), ``hedgerow bench`` as a subcommand, and the random draft. The offline benchmark,
the serving load client and the results report have files of their own (test_bench_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hedgerow.bench import tables
from hedgerow.server.cli import build_parser
from tests.bench_common import HAS_MPL, bench, plots

pytestmark = pytest.mark.live


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
