"""The correctness parts of ``hedgerow bench gpu``: the CUDA tree-attention kernel against its
PyTorch reference, CUDA-graph replay against eager passes, and greedy output end to end against
transformers' ``generate``; with the CPU ("dry") variants of the first and the last.

Each check is the GPU counterpart of a test (tests/test_kernels_gpu.py, tests/test_engine.py) run
where the tests cannot be: a machine with a GPU, torch and transformers, but no pytest.
"""

from __future__ import annotations

import torch

from hedgerow.bench.gpu_common import (
    EOS,
    PROMPTS,
    VOCAB,
    Context,
    Outcome,
    hf_greedy,
    kernels_missing,
    random_tree,
    skipped,
    tiny_pair,
    verdict,
)

# (query heads, kv heads, head dim, cached prefix per sequence, tree nodes per sequence)
KERNEL_CASES = [
    (8, 2, 64, (37, 0, 70, 300), (5, 9, 1, 64)),
    (32, 8, 128, (1000, 3, 2500), (33, 60, 17)),
    (32, 8, 128, (8000,), (16,)),
]
# ||out - ref|| / ||ref|| against a float64 reference, as tests/kernel_problems.py allows
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
MAX_LEN = 512  # KV rows per slot of the tiny engines
SLOTS = 4  # sequences the tiny engines hold at once
GRAPH_PREFIXES = [10, 100, 200, 37]  # cached rows of slots 0..3 in the graph check: several KV buckets
# (batch rows, tokens per row, a tree rather than a chain): decode, chain verify and tree verify buckets
GRAPH_CASES = [(1, 1, False), (3, 1, False), (4, 1, False), (1, 5, False), (2, 5, False), (1, 16, True),
               (4, 16, True), (2, 40, True)]
GRAPH_TOLERANCE = 1e-4  # max |eager - graph| / max |eager| over the logits, float32


# --- 1. the kernel against the reference ---------------------------------------------------------
def kernel_problem(hq: int, hkv: int, d: int, prefix: tuple, nodes: tuple, dtype, device, gen) -> dict:
    """A ragged verify batch as tests/kernel_problems.py builds one: slots out of order, unused cache
    rows and padding queries NaN (a kernel that reads them shows NaN), q as transformers hands it
    ([B, Hq, N, D] view of [B, N, Hq, D])."""
    from hedgerow.server.models.kernels import pack_tree_mask
    from hedgerow.verify.flatten import flatten

    batch, n_max = len(prefix), max(nodes)
    num_slots, max_len = batch + 2, max(p + n for p, n in zip(prefix, nodes)) + 8
    slots = torch.randperm(num_slots, generator=gen)[:batch]
    caches = [torch.full((num_slots, hkv, max_len, d), float("nan")) for _ in range(2)]
    for b in range(batch):
        for cache in caches:
            cache[slots[b], :, : prefix[b] + nodes[b]] = torch.randn((hkv, prefix[b] + nodes[b], d), generator=gen)
    ancestors = flatten([random_tree(n, gen) for n in nodes], list(prefix)).ancestors
    q = torch.randn((batch, n_max, hq, d), generator=gen)
    for b in range(batch):
        q[b, nodes[b]:] = float("nan")
    return dict(q=q.to(device=device, dtype=dtype).transpose(1, 2),
                k_cache=caches[0].to(device=device, dtype=dtype), v_cache=caches[1].to(device=device, dtype=dtype),
                slots=slots.to(device=device, dtype=torch.int32),
                prefix_lens=torch.tensor(prefix, dtype=torch.int32, device=device),
                num_nodes=torch.tensor(nodes, dtype=torch.int32, device=device),
                tree_mask_bits=pack_tree_mask(ancestors).to(device))


def kernels_check(ctx: Context) -> Outcome:
    """``tree_attention`` on random ragged problems, three dtypes and several shapes, against
    ``tree_attention_reference`` computed in float64."""
    missing = kernels_missing()
    if missing:
        return skipped(missing)
    from hedgerow.server.models import kernels

    gen = torch.Generator().manual_seed(ctx.seed)
    rows = []
    for dtype, name in DTYPE_NAMES.items():
        for hq, hkv, d, prefix, nodes in KERNEL_CASES:
            p = kernel_problem(hq, hkv, d, prefix, nodes, dtype, ctx.device, gen)
            out = torch.full((len(prefix), max(nodes), hq, d), float("nan"), dtype=dtype, device=ctx.device)
            kernels.tree_attention(**p, out=out, max_prefix_len=max(prefix))
            wide = {k: v.double() if k in ("q", "k_cache", "v_cache") else v for k, v in p.items()}
            ref = kernels.tree_attention_reference(**wide, compute_dtype=torch.float64)
            err = float((out.double() - ref).norm() / ref.norm())
            nan = bool(out.isnan().any())
            rows.append({"dtype": name, "heads": f"{hq}/{hkv}", "head_dim": d, "prefix": list(prefix),
                         "nodes": list(nodes), "relative_error": err, "tolerance": TOLERANCE[dtype],
                         "max_abs_error": float((out.double() - ref).abs().max()), "nan": nan,
                         "ok": not nan and err <= TOLERANCE[dtype]})
    worst = ", ".join(f"{name} {max(r['relative_error'] for r in rows if r['dtype'] == name):.1e} "
                      f"(≤ {TOLERANCE[dtype]:g})" for dtype, name in DTYPE_NAMES.items())
    good = sum(r["ok"] for r in rows)
    return verdict(good == len(rows), f"{good} of {len(rows)} problems within tolerance; worst relative error "
                   f"{worst}", rows=rows)


def kernels_dry(ctx: Context) -> Outcome:
    """CPU: the kernel sources compile to sm_90 (Hopper) cubin with NVRTC, every entry point in it."""
    from hedgerow.server.models import kernels

    try:
        cubins = kernels.compile_kernels("sm_90")
    except kernels.CudaKernelsUnavailable as exc:
        return skipped(f"NVRTC cannot compile here: {str(exc).splitlines()[0]}")
    names = [n for names in kernels.KERNEL_NAMES.values() for n in names]
    missing = [n for m, names in kernels.KERNEL_NAMES.items() for n in names if n.encode() not in cubins[m]]
    elf = all(c[:4] == b"\x7fELF" for c in cubins.values())
    size = sum(len(c) for c in cubins.values())
    return verdict(elf and not missing, f"the kernel sources compile to sm_90 cubin with NVRTC ({size // 1024} KiB), "
                   f"{len(names) - len(missing)} of {len(names)} entry points in it", missing=missing, cubin_bytes=size)


# --- 2. CUDA-graph replay against eager passes --------------------------------------------------
def graphs_check(ctx: Context) -> Outcome:
    """A tiny random native model on CUDA: runners with ``cuda_graphs="auto"`` and ``"off"`` give
    the same logits for decode and verify passes of several buckets (each bucket captured at its
    first pass, replayed with new inputs at the second), and the same greedy output through the
    engine; with each attention backend available."""
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.models.native import from_transformers
    from hedgerow.verify.flatten import flatten
    from hedgerow.verify.tree import DraftTree

    gen = torch.Generator().manual_seed(ctx.seed)
    models = [from_transformers(m, MAX_LEN) for m in tiny_pair("llama", ctx.device, torch.float32, 256, ctx.seed)]
    worst, flipped, passes, engine_runs, differ, captured = 0.0, [], 0, 0, [], 0
    backends = ["reference"] + ([] if kernels_missing() else ["cuda"])
    for backend in backends:
        eager, graphed = ([ModelRunner(m, num_slots=SLOTS, max_len=MAX_LEN, name=role, backend=backend,
                                       cuda_graphs=graphs) for m, role in zip(models, ("target", "draft"))]
                          for graphs in ("off", "auto"))
        prompts = [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in GRAPH_PREFIXES]
        for r in (eager[0], graphed[0]):  # prefill chunks are longer than a graph takes: eager in both
            r.extend(list(range(SLOTS)), [0] * SLOTS, prompts, chunk=512)
        for batch, nodes, tree in GRAPH_CASES:
            for _ in range(2):
                trees = [random_tree(nodes, gen) if tree else
                         DraftTree.chain(torch.randint(2, VOCAB, (nodes,), generator=gen).tolist())
                         for _ in range(batch)]
                flat = flatten(trees, GRAPH_PREFIXES[:batch])
                a, b = (r[0].logits(r[0].forward(list(range(batch)), flat)) for r in (eager, graphed))
                valid = flat.valid.to(ctx.device)
                worst = max(worst, float((a - b).abs()[valid].max() / a.abs()[valid].max()))
                if not torch.equal(a.argmax(-1)[valid], b.argmax(-1)[valid]):
                    flipped.append(f"{backend} batch {batch} x {nodes}")
                passes += 1
        captured += len(graphed[0].graphs.graphs) if graphed[0].graphs is not None else 0
        for mode in ("chain", "tree"):
            outs = [generate(runners, mode, PROMPTS, 24) for runners in (eager, graphed)]
            engine_runs += 1
            if outs[0] != outs[1]:
                differ.append(f"{backend} {mode}")
    ok = captured > 0 and worst <= GRAPH_TOLERANCE and not flipped and not differ  # no graph: nothing was compared
    return verdict(ok, f"{passes} passes ({', '.join(backends)} backend), {captured} graphs captured: max logit "
                   f"difference {worst:.1e} of the largest logit (≤ {GRAPH_TOLERANCE:g}), argmax differs in "
                   f"{len(flipped)}; greedy engine output equal in {engine_runs - len(differ)} of {engine_runs} runs",
                   max_relative_difference=worst, argmax_differs=flipped, engine_output_differs=differ,
                   passes=passes, graphs_captured=captured, backends=backends)


# --- 3. greedy output end to end -----------------------------------------------------------------
MODES = ("plain", "chain", "tree", "tree-static")


def spec_of(mode: str):
    from hedgerow.drafting.spec import SpecMode, SpecParams

    if mode == "tree-static":
        return SpecParams(mode=SpecMode.TREE, tree_budget=16, tree_static=True)
    return SpecParams(mode=SpecMode(mode), draft_tokens=4, tree_budget=16)


def generate(runners: list, mode: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy output of ``prompts`` run together (continuous batching) by an engine over ``runners``."""
    from hedgerow.server.engine.config import EngineConfig
    from hedgerow.server.engine.engine import Engine
    from hedgerow.server.engine.sequence import Request

    engine = Engine(*runners, eos_token_ids=[EOS], config=EngineConfig(
        max_model_len=MAX_LEN, max_batch_size=SLOTS, adaptive="none", spec=spec_of(mode)))
    done = engine.generate(Request(str(i), tuple(p), max_new_tokens=new_tokens) for i, p in enumerate(prompts))
    return [done[str(i)].generated for i in range(len(prompts))]


def greedy_equality(ctx: Context, backend: str, graphs: str, hidden: int, new_tokens: int) -> Outcome:
    """Tiny random Llama and Qwen2 pairs, native: every mode at batch 1 (one prompt at a time) and
    batch 4 (all together) gives transformers' greedy ``generate`` on the target, token for token."""
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.models.native import from_transformers

    runs, failures, archs = 0, [], []
    for arch in ("llama", "qwen2"):
        if ctx.left() <= 0:
            break
        archs.append(arch)
        target, draft = tiny_pair(arch, ctx.device, torch.float32, hidden, ctx.seed)
        want = [hf_greedy(target, p, new_tokens) for p in PROMPTS]
        runners = [ModelRunner(from_transformers(m, MAX_LEN), num_slots=SLOTS, max_len=MAX_LEN, name=role,
                               backend=backend, cuda_graphs=graphs)
                   for m, role in ((target, "target"), (draft, "draft"))]
        for mode in MODES:
            alone = [generate(runners, mode, [p], new_tokens)[0] for p in PROMPTS]
            for batch, got in (("1", alone), ("4", generate(runners, mode, PROMPTS, new_tokens))):
                runs += 1
                if got != want:
                    failures.append(f"{arch} {mode} batch {batch}")
    cut = "" if len(archs) == 2 else f"; stopped at the part's budget after {', '.join(archs) or 'nothing'}"
    return verdict(bool(runs) and not failures,
                   f"{runs - len(failures)} of {runs} runs ({', '.join(archs)} × {', '.join(MODES)} × batch 1, 4; "
                   f"{backend} attention, CUDA graphs {graphs}) equal transformers' greedy generate"
                   + (f"; differ: {', '.join(failures)}" if failures else "") + cut,
                   runs=runs, failures=failures, attention_backend=backend, cuda_graphs=graphs, new_tokens=new_tokens)


def e2e_check(ctx: Context) -> Outcome:
    missing = kernels_missing()
    if missing:
        return skipped(missing)
    return greedy_equality(ctx, "cuda", "auto", hidden=256, new_tokens=24)


def e2e_dry(ctx: Context) -> Outcome:
    """CPU: the same check with the reference attention and no graphs, on smaller models."""
    return greedy_equality(ctx, "reference", "off", hidden=64, new_tokens=16)
