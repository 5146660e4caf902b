"""The tree-attention kernels on a CUDA GPU (skipped without one): against the reference, with
poisoned outputs, ragged batches, a long prefix, a CUDA graph, and inside the engine.
"""

from __future__ import annotations

import pytest
import torch

from hedgerow.drafting.spec import SpecMode, SpecParams
from hedgerow.server.engine.config import EngineConfig
from hedgerow.server.engine.engine import Engine
from hedgerow.server.models import kernels
from tests.kernel_problems import DTYPES, TOLERANCE, call_args, make_problem, reference64, rel_err
from tests.tiny import EOS, PROMPTS, request, runner, tiny_model

needs_kernels = pytest.mark.skipif(not kernels.is_available(), reason="needs a CUDA GPU and cuda-python")


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype_name", ["f32", "bf16", "f16"])
def test_gpu_tree_attention_matches_reference(dtype_name, d):
    dtype = DTYPES[dtype_name]
    for seed, (prefix, nodes) in enumerate([((37, 0, 70, 300), (5, 9, 1, 64)),
                                           ((1000, 3, 2500), (33, 60, 17))]):
        p = make_problem(dtype=dtype, d=d, hq=8, hkv=2, prefix=prefix, nodes=nodes, seed=seed, device="cuda")
        out = torch.full((len(prefix), max(nodes), 8, d), float("nan"), dtype=dtype, device="cuda")
        kernels.tree_attention(**call_args(p), out=out, max_prefix_len=max(prefix))
        ref = reference64(p)
        assert not torch.isnan(out).any()
        err = rel_err(out, ref)
        assert err <= TOLERANCE[dtype], f"{dtype_name} d{d} seed {seed}: relative error {err:.2e}"


@pytest.mark.gpu
@needs_kernels
def test_gpu_tree_attention_long_prefix_default_plan():
    p = make_problem(dtype=torch.bfloat16, d=128, hq=32, hkv=8, prefix=(4000, 17), nodes=(16, 16),
                     seed=5, device="cuda")
    got = kernels.tree_attention(**call_args(p))  # max_prefix_len defaults to max_len
    ref = reference64(p)
    assert rel_err(got, ref) <= 1e-2


@pytest.mark.gpu
@needs_kernels
def test_gpu_tree_attention_in_cuda_graph():
    p = make_problem(dtype=torch.bfloat16, d=128, hq=8, hkv=2, prefix=(100, 400), nodes=(12, 7),
                     seed=9, device="cuda")
    args = call_args(p)
    kernels.load()
    out = torch.full((2, 12, 8, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.tree_attention(**args, out=out, max_prefix_len=512)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernels.tree_attention(**args, out=out, max_prefix_len=512)
    out.fill_(float("nan"))
    args["q"].copy_(torch.randn_like(args["q"]))  # new queries, same buffers
    graph.replay()
    torch.cuda.synchronize()
    ref = reference64({**args, "mask": None})
    assert rel_err(out, ref) <= 1e-2


# --- the backend inside the engine -----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_greedy_output_is_unchanged_with_the_cuda_backend():
    """End to end: greedy chain and tree output with the kernels equals the reference backend's."""
    target = tiny_model("llama", seed=0, hidden=256, dtype=torch.float32).cuda()
    draft = tiny_model("llama", seed=1, layers=1, hidden=256, dtype=torch.float32).cuda()  # head dim 64
    outs = {}
    for backend in ("reference", "cuda"):
        runners = [runner(m, slots=4, max_len=128, name=name, backend=backend)
                   for m, name in ((target, "target"), (draft, "draft"))]
        for mode in (SpecMode.CHAIN, SpecMode.TREE):
            engine = Engine(*runners, eos_token_ids=[EOS], config=EngineConfig(
                max_model_len=128, max_batch_size=4, adaptive="none", spec=SpecParams(mode=mode)))
            res = engine.generate(request(str(i), p, 24) for i, p in enumerate(PROMPTS))
            outs[backend, mode] = [res[str(i)].generated for i in range(len(PROMPTS))]
    for mode in (SpecMode.CHAIN, SpecMode.TREE):
        assert outs["cuda", mode] == outs["reference", mode]
