"""The speed parts of ``hedgerow bench gpu``: the oracle sweep on 8B- and 1B-shaped models, tree
attention timed against SDPA, and draft and target pass times of both model implementations;
with their CPU ("dry") variants, which build the same shapes and run the same code small.

Figures of a speed part are measurements: it passes when it ran (and, for the attention timing,
when the kernel agreed with SDPA); the targets they bear on are stated beside the figures.
"""

from __future__ import annotations

import argparse

import torch

from hedgerow.bench.gpu_common import Context, Outcome, kernels_missing, median_ms, random_tree, skipped, verdict

# A short sweep sized to its part's budget: 2 prompts of 64 tokens, 64 new tokens, 3 alphas.
SWEEP_FLAGS = ["--oracle-acceptance", "0.6,0.8,0.9", "--target-shape", "llama-8b", "--draft-shape", "llama-1b",
               "--dtype", "bfloat16", "--model-impl", "native", "--cuda-graphs", "auto", "--num-prompts", "2",
               "--prompt-len", "64", "--max-new-tokens", "64", "--cost-samples", "10"]
DRY_SWEEP_FLAGS = ["--oracle-acceptance", "0.8", "--target-shape", "tiny", "--draft-shape", "tiny-draft",
                   "--model-impl", "native", "--num-prompts", "1", "--prompt-len", "8", "--max-new-tokens", "12",
                   "--cost-samples", "3"]
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3 8B attention
TREE_SIZES, ATTENTION_PREFIXES, BATCHES = (16, 64), (512, 2048, 8192), (1, 8)
ATTENTION_TOLERANCE = 2e-2  # ||kernel - SDPA|| / ||SDPA||, both bf16
PASS_DRAFT_TOKENS = 4  # passes of 1 and 5 tokens (after sweep_model.PASS_CONTEXT cached rows)


# --- 4. the oracle sweep -------------------------------------------------------------------------
def sweep_args(flags: list[str]) -> argparse.Namespace:
    """``hedgerow bench sweep``'s arguments from ``flags``: its JSON then names the command."""
    from hedgerow.bench import sweep

    p = argparse.ArgumentParser(prog="hedgerow bench sweep")
    sweep.add_arguments(p)
    return p.parse_args(flags)


def _sweep_summary(data: dict) -> tuple[bool, str]:
    res = data["results"][1:]
    same = all(r["outputs_match_plain"] for r in res)
    text = "; ".join(f"α {r['alpha']:g}: {r['speedup_vs_plain']:.2f}× (ideal {r['ideal_speedup']:.2f}×)"
                     for r in res)
    return same, f"{text}; c = {data['step_costs']['c']:.3f}; output equal to plain decoding: {'yes' if same else 'no'}"


def sweep_check(ctx: Context) -> Outcome:
    """``bench sweep`` on the GPU, native models with CUDA graphs. Equal output is reported, not
    required: bf16 random weights have near-tied logits, which passes of other shapes may flip
    (exactness is the business of the correctness parts)."""
    from hedgerow.bench import sweep

    data = sweep.measure(sweep_args(SWEEP_FLAGS + ["--device", str(ctx.device), "--seed", str(ctx.seed)]))
    _, text = _sweep_summary(data)
    return verdict(True, text, sweep=data)


def sweep_dry(ctx: Context) -> Outcome:
    """CPU: the 8B and 1B shapes build on the meta device (no memory), natively, with the parameter
    count the sweep reports; then the same sweep code on tiny shapes."""
    from hedgerow.bench import sweep
    from hedgerow.bench.sweep_shapes import PRESETS, build_model
    from hedgerow.server.models.native import from_transformers

    counts = {}
    for name in ("llama-8b", "llama-1b"):
        shape = PRESETS[name]
        native = from_transformers(build_model(shape, 256, torch.device("meta"), torch.bfloat16, ctx.seed), 256)
        counts[name] = (sum(p.numel() for p in native.parameters()), shape.params())
    built = all(got == want for got, want in counts.values())
    data = sweep.measure(sweep_args(DRY_SWEEP_FLAGS + ["--seed", str(ctx.seed)]))
    same, text = _sweep_summary(data)
    shapes = ", ".join(f"{name} {got / 1e9:.2f}B parameters" for name, (got, _) in counts.items())
    return verdict(built and same, f"{shapes}: built natively on the meta device{'' if built else ' (count differs)'}; "
                   f"tiny shapes on the CPU: {text}", parameters=counts, sweep=data)


# --- 5. tree attention: the kernel against SDPA --------------------------------------------------
def attention_problem(batch: int, nodes: int, prefix: int, device, dtype, gen) -> tuple:
    """q, the slot caches and the pass's ``ForwardPlan`` of a verify pass: ``batch`` sequences of
    ``prefix`` cached rows, each with a random tree of ``nodes`` nodes; 8B attention shapes. The
    trees come from ``gen`` (CPU), the tensors from a generator on ``device`` seeded by it."""
    from hedgerow.server.models.attention import ForwardPlan, TreeKernelPlan
    from hedgerow.server.models.kernels import pack_tree_mask
    from hedgerow.verify.flatten import flatten

    flat = flatten([random_tree(nodes, gen) for _ in range(batch)], [prefix] * batch).to(device)
    on_device = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    keys, values = (torch.randn((batch + 1, KV_HEADS, prefix + nodes, HEAD_DIM), generator=on_device, device=device,
                                dtype=dtype) for _ in range(2))  # slot ``batch`` is the scratch slot, as in the cache
    q = torch.randn((batch, nodes, HEADS, HEAD_DIM), generator=on_device, device=device, dtype=dtype)
    slots = torch.arange(batch, device=device)
    tree = TreeKernelPlan(flat.prefix_lens.to(torch.int32), flat.num_nodes.to(torch.int32),
                          pack_tree_mask(flat.ancestors))
    plan = ForwardPlan(write_slots=slots[:, None].expand(batch, nodes), write_rows=flat.cache_rows, read_slots=slots,
                       mask=flat.mask, read_range=(0, batch), tree=tree)
    return q, keys, values, plan


def attention_check(ctx: Context) -> Outcome:
    """Both backends of server/models/attention.py on the same bf16 problems: ``reference`` (SDPA
    with the dense tree mask, reading the slots as a view) and ``cuda`` (the kernel)."""
    missing = kernels_missing()
    if missing:
        return skipped(missing)
    from hedgerow.server.models.attention import BACKENDS

    gen = torch.Generator().manual_seed(ctx.seed)
    rows, scale = [], HEAD_DIM ** -0.5
    for batch in BATCHES:
        for nodes in TREE_SIZES:
            for prefix in ATTENTION_PREFIXES:
                if ctx.left() <= 0:
                    break
                q, keys, values, plan = attention_problem(batch, nodes, prefix, ctx.device, torch.bfloat16, gen)
                sdpa, kernel = (BACKENDS[b](q, keys, values, plan, scale).float() for b in ("reference", "cuda"))
                diff = float((kernel - sdpa).norm() / sdpa.norm())
                times = {b: median_ms(lambda b=b: BACKENDS[b](q, keys, values, plan, scale), ctx.device)
                         for b in ("reference", "cuda")}
                rows.append({"batch": batch, "nodes": nodes, "prefix": prefix, "sdpa_ms": times["reference"],
                             "kernel_ms": times["cuda"], "sdpa_over_kernel": times["reference"] / times["cuda"],
                             "relative_difference": diff})
    planned = len(BATCHES) * len(TREE_SIZES) * len(ATTENTION_PREFIXES)
    agree = all(r["relative_difference"] <= ATTENTION_TOLERANCE for r in rows)
    faster = sum(r["sdpa_over_kernel"] > 1 for r in rows)
    ratios = [r["sdpa_over_kernel"] for r in rows] or [float("nan")]
    cut = "" if len(rows) == planned else f"; {planned - len(rows)} sizes not timed (part budget)"
    return verdict(bool(rows) and agree,
                   f"{len(rows)} sizes: the kernel faster than SDPA in {faster} (SDPA / kernel "
                   f"{min(ratios):.2f}×–{max(ratios):.2f}×); "
                   f"outputs agree within {ATTENTION_TOLERANCE:g}: {'yes' if agree else 'no'}{cut}", rows=rows)


def attention_dry(ctx: Context) -> Outcome:
    """CPU: the smallest 8B-shaped problem builds, with the kernel's plan, and its SDPA path runs."""
    from hedgerow.server.models.attention import BACKENDS

    q, keys, values, plan = attention_problem(BATCHES[0], TREE_SIZES[0], ATTENTION_PREFIXES[0], ctx.device,
                                              torch.float32, torch.Generator().manual_seed(ctx.seed))
    out = BACKENDS["reference"](q, keys, values, plan, HEAD_DIM ** -0.5)
    ms = median_ms(lambda: BACKENDS["reference"](q, keys, values, plan, HEAD_DIM ** -0.5), ctx.device, iters=5)
    ok = plan.tree is not None and bool(out.isfinite().all())
    return verdict(ok, f"batch {BATCHES[0]}, tree {TREE_SIZES[0]}, prefix {ATTENTION_PREFIXES[0]} builds with the "
                   f"kernel's plan; its SDPA path runs on the CPU ({ms:.2f} ms, float32); the kernel needs CUDA")


# --- 6. pass times of both implementations -------------------------------------------------------
def implementation_pass_times(ctx: Context, target_shape: str, draft_shape: str, dtype, samples: int) -> dict:
    """``sweep_model.pass_times`` of random-weight models of the two shapes, driven natively (CUDA
    graphs where on CUDA) and through transformers' modules, the implementations interleaved."""
    from hedgerow.bench.sweep_model import PASS_CONTEXT, pass_times
    from hedgerow.bench.sweep_shapes import PRESETS, build_model
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.models.hf import TransformersModel
    from hedgerow.server.models.native import from_transformers

    max_len = PASS_CONTEXT + PASS_DRAFT_TOKENS + 8
    models = [build_model(PRESETS[s], max_len, ctx.device, dtype, ctx.seed + i)
              for i, s in enumerate((target_shape, draft_shape))]
    graphs = "auto" if ctx.device.type == "cuda" else "off"
    pairs = {
        "native": tuple(ModelRunner(from_transformers(m, max_len), num_slots=1, max_len=max_len, name=role,
                                    cuda_graphs=graphs) for m, role in zip(models, ("target", "draft"))),
        "transformers": tuple(ModelRunner(TransformersModel(m), num_slots=1, max_len=max_len, name=role)
                              for m, role in zip(models, ("target", "draft"))),
    }
    times = pass_times(pairs, PASS_DRAFT_TOKENS, PASS_CONTEXT, samples)
    for impl, (target, _) in pairs.items():
        times[impl].update(verify_tokens=PASS_DRAFT_TOKENS + 1, samples=samples, compile="off",
                           cuda_graphs="auto" if target.graphs is not None else "off")
    return times


def _pass_summary(times: dict) -> str:
    native, hf = times["native"], times["transformers"]

    def pair(key: str, what: str) -> str:
        return (f"{what} native {1e3 * native[key]:.2f} ms vs transformers {1e3 * hf[key]:.2f} ms "
                f"({native[key] / hf[key]:.2f}×)")

    draft_ratio = native["t_draft"] / hf["t_draft"]
    return (f"{pair('t_draft', 'draft pass')}, target ≤ 0.5×: {'met' if draft_ratio <= 0.5 else 'not met'}; "
            f"{pair('t_target', 'target pass')}; {pair('t_verify', 'verify pass (5 tokens)')}; "
            f"c native {native['c']:.3f}, transformers {hf['c']:.3f}")


def pass_times_check(ctx: Context) -> Outcome:
    times = implementation_pass_times(ctx, "llama-8b", "llama-1b", torch.bfloat16, samples=20)
    return verdict(True, "8B target, 1B draft, bf16: " + _pass_summary(times), pass_times=times)


def pass_times_dry(ctx: Context) -> Outcome:
    """CPU: the same measurement on tiny shapes (its figures say nothing about a GPU)."""
    times = implementation_pass_times(ctx, "tiny", "tiny-draft", torch.float32, samples=3)
    return verdict(True, "tiny shapes on the CPU, float32: " + _pass_summary(times), pass_times=times)
