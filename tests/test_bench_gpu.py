"""``hedgerow bench gpu`` beyond its CPU run (tests/test_bench.py): parts skipped by budget, bad flags,
the GPU parts' own code on the CPU with the PyTorch reference standing in for the CUDA kernel, and
the report's tables of a GPU run."""

from __future__ import annotations

import json
import time

import pytest
import torch

from hedgerow.bench import gpu, gpu_checks, gpu_speed, results, tables
from hedgerow.bench.gpu_common import Context
from hedgerow.server.cli import main
from hedgerow.server.models import kernels

on_cpu = pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command runs the full check (minutes)")


@pytest.mark.engine
@on_cpu
def test_gpu_parts_beyond_the_budget_are_skipped_by_name(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--budget", "25", "--parts", "sweep,attention-timing", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "skipped sweep (dry, CPU): its budget of 60 s exceeds the 25 s left of --budget 25" in printed
    data = json.loads(out.read_text())
    assert [r["part"] for r in data["results"]] == ["sweep", "attention-timing"]
    assert data["results"][0]["dry"]["status"] == "skipped" and data["results"][1]["dry"]["status"] == "passed"


@pytest.mark.unit
def test_gpu_bad_parts_is_one_line(capsys):
    assert main(["bench", "gpu", "--parts", "kernels,nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err


@pytest.fixture
def reference_kernel(monkeypatch):
    """The PyTorch reference standing in for the CUDA kernel (writing into ``out`` as the kernel does),
    small problems and sizes: the GPU parts' code runs on the CPU."""
    reference = kernels.tree_attention_reference

    def stand_in(*args, out=None, max_prefix_len=None, **kwargs):
        ref = reference(*args, **kwargs)
        return ref if out is None else out.copy_(ref)

    monkeypatch.setattr(kernels, "tree_attention", stand_in)
    for module in (gpu_checks, gpu_speed):
        monkeypatch.setattr(module, "kernels_missing", lambda: None)
    monkeypatch.setattr(gpu_checks, "KERNEL_CASES", [(8, 2, 64, (37, 0, 70), (5, 9, 1)), (4, 4, 128, (100,), (16,))])
    monkeypatch.setattr(gpu_speed, "BATCHES", (1, 2))
    monkeypatch.setattr(gpu_speed, "TREE_SIZES", (4,))
    monkeypatch.setattr(gpu_speed, "ATTENTION_PREFIXES", (16, 40))
    return stand_in


@pytest.mark.engine
def test_gpu_parts_code_on_the_cpu_and_the_report_of_a_gpu_run(reference_kernel, monkeypatch, tmp_path):
    ctx = Context(torch.device("cpu"), time.monotonic() + 600)
    checked = gpu_checks.kernels_check(ctx)
    assert checked.status == "passed" and len(checked.figures["rows"]) == 6, checked.summary
    timed = gpu_speed.attention_check(ctx)
    assert timed.status == "passed" and len(timed.figures["rows"]) == 4, timed.summary
    assert {(r["batch"], r["nodes"], r["prefix"]) for r in timed.figures["rows"]} == {
        (b, 4, p) for b in (1, 2) for p in (16, 40)}
    with monkeypatch.context() as m:
        m.setattr(kernels, "tree_attention", lambda *a, **k: None)  # a kernel that writes nothing
        assert gpu_checks.kernels_check(ctx).status == "failed"  # its output stays NaN
    monkeypatch.setattr(gpu_checks, "kernels_missing", lambda: "no kernels")  # the cuda backend needs CUDA
    graphs = gpu_checks.graphs_check(ctx)
    # on a CPU no graph is captured: both runners are eager, equal, and the check says it compared nothing
    assert graphs.status == "failed" and "0 graphs captured" in graphs.summary
    assert graphs.figures["max_relative_difference"] == 0.0 and graphs.figures["passes"] == 16
    assert not graphs.figures["engine_output_differs"]

    times = gpu_speed.pass_times_dry(ctx).figures["pass_times"]
    sweep = gpu_speed.sweep_dry(ctx).figures["sweep"]
    figures = {"kernels": checked.figures, "attention-timing": timed.figures, "sweep": {"sweep": sweep},
               "pass-times": {"pass_times": times}}
    run = json.loads(json.dumps(sweep["config"]))  # a machine and a command, as a GPU run records them
    run.update(kind="gpu", command="hedgerow bench gpu", device="cuda:0", torch_cuda="12.8", kernels_available=True,
               budget_seconds=420.0, seconds=200.0)
    parts = [{"part": p.name, "title": p.title, "status": "passed", "summary": "figures", "seconds": 1.0,
              "budget_seconds": p.budget, "figures": figures.get(p.name, {}), "dry": None} for p in gpu.PARTS]
    (tmp_path / "gpu_h200.json").write_text(json.dumps({"config": run, "results": parts}))
    text = results.render(tmp_path)
    assert "6 parts passed, 0 failed, 0 skipped" in text and "CPU dry run" not in text
    for table in (tables.gpu_kernels(checked.figures["rows"]), tables.gpu_attention(timed.figures["rows"]),
                  tables.sweep(sweep["results"]), tables.step_costs(sweep), tables.pass_times(times)):
        assert table in text
