"""``hedgerow bench drafts``: each draft's shape, acceptance and cost per token against one target,
random-weight shapes made (and named) by ``python -m hedgerow.bench.random_draft``, and its RESULTS.md
section."""

from __future__ import annotations

import json

import pytest

from hedgerow.bench import random_draft, tables
from hedgerow.bench.report_sections import SECTIONS
from tests.bench_common import ROOT, bench

pytestmark = pytest.mark.live


def test_random_draft_takes_another_shape_and_says_how_it_was_made(tmp_path):
    out = tmp_path / "L1"
    assert random_draft.main([str(out), "--shape", "1:64:4:2:96", "--seed", "3"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (1, 64, 96)
    assert config["vocab_size"] == json.loads((ROOT / "server/embedded/draft/config.json").read_text())["vocab_size"]
    made = json.loads((out / random_draft.MARKER).read_text())
    assert made["command"] == f"python -m hedgerow.bench.random_draft {out} --shape 1:64:4:2:96 --seed 3"
    with pytest.raises(SystemExit):
        random_draft.main([str(tmp_path / "bad"), "--shape", "1:65:4:2:96"])  # hidden not a multiple of heads


def test_drafts_measures_acceptance_and_cost_per_draft(tmp_path):
    small = tmp_path / "small"
    assert random_draft.main([str(small), "--shape", "1:64:4:2:96"]) == 0
    out = tmp_path / "drafts.json"
    shipped = str(ROOT / "server" / "embedded" / "draft")
    assert bench("drafts", "--drafts", f"shipped={shipped},{small}", "--num-prompts", "2", "--max-new-tokens", "24",
                 "--pass-samples", "2", "--output", str(out)) == 0
    data = json.loads(out.read_text())
    assert data["config"]["kind"] == "drafts" and data["config"]["draft_tokens"] == 4
    trained, rand = data["results"]
    assert (trained["name"], trained["layers"], trained["hidden"], trained["random_weights"]) == ("shipped", 4, 128, None)
    assert rand["name"] == "small" and rand["layers"] == 1 and rand["random_weights"].endswith(f"{small} --shape 1:64:4:2:96")
    for r in (trained, rand):
        assert r["draft_tokens"] > 0 and 0 <= r["acceptance_rate"] <= 1
        assert r["c"] == pytest.approx(r["t_draft"] / r["t_target"]) and r["t_draft_pass"] > 0
    assert trained["acceptance_rate"] > 0.3 > rand["acceptance_rate"]  # the trained draft is accepted, noise is not
    section = "\n".join(SECTIONS["drafts"]("drafts", data, "bench/results"))
    assert tables.drafts(data["results"]) in section and rand["random_weights"] in section
