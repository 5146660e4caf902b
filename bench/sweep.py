"""Oracle-acceptance sweep: a systems benchmark of how much of the theoretical gain Hedgerow keeps.

Models of real shapes with random weights (no download); the drafter is ``bench.oracle``: it runs
the draft model, so drafting costs what it really costs, but proposes the target's known greedy
continuation corrupted at rate 1 - alpha per token. This measures the system (scheduling, KV
bookkeeping, verify cost, overheads), not a draft model's quality.

For each alpha, against plain decoding (``ar``) on the same engine, prompts interleaved:

    measured  = tokens/s(chain, oracle alpha) / tokens/s(ar)
    ideal     = (1 - a^(g+1)) / ((1 - a)(g c + 1))          algorithms.md §8, c = t_draft / t_target
    ideal_vc  = (1 - a^(g+1)) / (1 - a) * t_target / (g t_draft + t_verify(g+1))
    kept      = measured / ideal

a is the realised per-token acceptance (accepted / (accepted + rejections): the estimate of alpha
under independent acceptances), g = --draft-tokens. Step costs are measured on the engine's own
runners at batch 1, median of repeated calls, at a context of prompt + max_new_tokens / 2:
t_target one target pass of 1 token, t_verify(g+1) one pass of a g+1-token chain, t_draft one
draft pass of 1 token (flatten, forward, logits, argmax, the host copy included). ``ideal`` takes a
verify pass to cost one target step, as §8 does; ``ideal_vc`` charges the verify pass its measured
cost, so ``measured / ideal_vc`` is what is lost outside the model passes.

Shapes (``--target-shape``/``--draft-shape``): a preset name or ``key=value,...`` over
hidden, layers, heads, kv_heads, intermediate, vocab, tie. Presets: llama-100m / llama-10m (CPU,
the defaults), llama-8b / llama-1b (Llama-3 8B and 1B shapes: use a GPU, ``--device cuda
--dtype bfloat16``), tiny (tests).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

from hedgerow.bench.common import (
    acceptance_summary,
    add_threads_arg,
    apply_threads,
    csv,
    fmt,
    markdown_table,
    new_config,
    note_start,
    ratio,
    remember_parser,
    write_json,
)
from hedgerow.server.engine.errors import HedgerowError


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tie: bool = False

    def config(self, max_len: int):
        from transformers import LlamaConfig

        from hedgerow.server.models import attention

        attention.register()
        cfg = LlamaConfig(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            max_position_embeddings=max(max_len, 256), tie_word_embeddings=self.tie,
            bos_token_id=0, eos_token_id=1, pad_token_id=0,
        )
        cfg._attn_implementation = attention.REFERENCE
        return cfg

    def params(self) -> int:
        head_dim = self.hidden // self.heads
        attn = self.hidden * head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        emb = self.vocab * self.hidden * (1 if self.tie else 2)
        return self.layers * (attn + mlp + 2 * self.hidden) + emb + self.hidden


PRESETS = {
    "llama-100m": Shape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=32000),
    "llama-10m": Shape(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=32000, tie=True),
    "llama-8b": Shape(hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "llama-1b": Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256, tie=True),
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=256),
    "tiny-draft": Shape(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=256),
}


def parse_shape(text: str, flag: str) -> Shape:
    if text in PRESETS:
        return PRESETS[text]
    fields = {}
    try:
        for item in text.split(","):
            key, value = item.split("=")
            key = key.strip()
            fields[key] = value.strip().lower() in ("1", "true", "yes") if key == "tie" else int(value)
        shape = Shape(**fields)
    except (ValueError, TypeError):
        raise HedgerowError(f"{flag} {text!r}: a preset ({', '.join(PRESETS)}) or "
                            "hidden=..,layers=..,heads=..,kv_heads=..,intermediate=..,vocab=..[,tie=1]") from None
    if min(shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.intermediate, shape.vocab) < 1 or \
            shape.hidden % shape.heads or shape.heads % shape.kv_heads:
        raise HedgerowError(f"{flag} {text!r}: sizes must be >= 1, heads divide hidden, kv_heads divide heads")
    return shape


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sweep")
    g.add_argument("--oracle-acceptance", type=csv(float, "--oracle-acceptance"), default=[0.5, 0.7, 0.9],
                   help="alphas, per-token acceptance of the oracle drafter (default: 0.5,0.7,0.9)")
    g.add_argument("--target-shape", default="llama-100m", help="preset or key=value list (default: llama-100m)")
    g.add_argument("--draft-shape", default="llama-10m", help="preset or key=value list (default: llama-10m)")
    g.add_argument("--draft-tokens", type=int, default=4, help="gamma (default: 4)")
    g.add_argument("--num-prompts", type=int, default=4, help="random prompts (default: 4)")
    g.add_argument("--prompt-len", type=int, default=64, help="tokens per prompt (default: 64)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="per prompt, EOS ignored (default: 64)")
    g.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default: 1)")
    g.add_argument("--cost-samples", type=int, default=30, help="timed calls per step-cost measurement (default: 30)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    g.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    g.add_argument("--seed", type=int, default=0, help="weights, prompts and corruption (default: 0)")
    add_threads_arg(g)
    g = p.add_argument_group("output")
    g.add_argument("--output", help="write the results JSON here")
    g.add_argument("--plots", help="write PNG plots into this folder")
    remember_parser(p, "sweep")


def build_model(shape: Shape, max_len: int, device, dtype, seed: int):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: an 8B fp32 copy is 32 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(shape.config(max_len))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# --- step costs ----------------------------------------------------------------------------------
class _Chain:
    def __init__(self, n: int, vocab: int):
        import torch

        from hedgerow.verify.tree import chain_parents

        self.tokens = torch.randint(2, vocab, (n,))
        self.parents = chain_parents(n)


def step_cost(runner, nodes: int, prefix: int, samples: int) -> float:
    """Median seconds of one batch-1 pass over a chain of ``nodes`` tokens after ``prefix`` cached
    rows: flatten, forward, logits, argmax and the host copy, as a step does them."""
    from hedgerow.verify.flatten import flatten

    slot = runner.cache.scratch_slot  # rows no sequence reads

    def once() -> float:
        t0 = time.perf_counter()
        flat = flatten([_Chain(nodes, runner.vocab_size)], [prefix])
        runner.logits(runner.forward([slot], flat)).argmax(-1).tolist()
        return time.perf_counter() - t0

    for _ in range(3):
        once()
    return statistics.median(once() for _ in range(samples))


def measure_costs(engine, gamma: int, prefix: int, samples: int) -> dict:
    t_target = step_cost(engine.target, 1, prefix, samples)
    t_verify = step_cost(engine.target, gamma + 1, prefix, samples)
    t_draft = step_cost(engine.draft, 1, prefix, samples)
    return {"context": prefix, "t_target": t_target, "t_verify": t_verify, "t_draft": t_draft,
            "c": t_draft / t_target}


def expected_tokens(alpha: float, gamma: int) -> float:
    """(1 - a^(g+1)) / (1 - a): tokens per verify pass, bonus included (→ g + 1 as a → 1)."""
    return gamma + 1.0 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


# --- the sweep -----------------------------------------------------------------------------------
def run(args) -> int:
    import torch
    from tqdm import tqdm

    from hedgerow.bench.oracle import OracleProposer
    from hedgerow.server.engine.engine import Engine, EngineConfig
    from hedgerow.server.models.loader import parse_device, resolve_dtype
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.engine.sequence import Request, SpecMode, SpecParams

    target_shape = parse_shape(args.target_shape, "--target-shape")
    draft_shape = parse_shape(args.draft_shape, "--draft-shape")
    if target_shape.vocab != draft_shape.vocab:
        raise HedgerowError(f"target and draft shapes need one vocabulary ({target_shape.vocab} vs {draft_shape.vocab})")
    alphas = args.oracle_acceptance
    if any(not 0.0 <= a <= 1.0 for a in alphas):
        raise HedgerowError(f"--oracle-acceptance values must be in [0, 1], got {alphas}")
    for flag in ("num_prompts", "prompt_len", "max_new_tokens", "repeats", "cost_samples", "draft_tokens"):
        if getattr(args, flag) < 1:
            raise HedgerowError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    note_start(args)
    apply_threads(args)
    device = parse_device(args.device, "--device")
    dtype = resolve_dtype(args.dtype, device)
    gamma = args.draft_tokens
    max_len = args.prompt_len + args.max_new_tokens + gamma + 2

    target = build_model(target_shape, max_len, device, dtype, args.seed)
    draft = build_model(draft_shape, max_len, device, dtype, args.seed + 1)
    spec = SpecParams(mode=SpecMode.CHAIN, draft_tokens=gamma)
    engine = Engine(ModelRunner(target, num_slots=1, max_len=max_len, name="target"),
                    ModelRunner(draft, num_slots=1, max_len=max_len, name="draft"),
                    eos_token_ids=[],
                    # a fixed gamma: the oracle sets alpha, no policy second-guesses the draft length
                    config=EngineConfig(max_model_len=max_len, max_batch_size=1, spec=spec, adaptive="none"))
    oracle = OracleProposer(engine.drafter, engine.target.vocab_size)
    engine.chain = oracle  # the engine's chain mode now drafts with the oracle

    gen = torch.Generator().manual_seed(args.seed)
    prompts = [tuple(torch.randint(2, target_shape.vocab, (args.prompt_len,), generator=gen).tolist())
               for _ in range(args.num_prompts)]
    counter = iter(range(10**9))

    def generate(prompt, mode_spec, alpha=None, seed=0) -> Run:
        rid = f"sweep-{next(counter)}"
        if alpha is not None:
            oracle.continuations[rid] = continuation[prompt]
            oracle.configure(alpha, seed)
        req = Request(rid, prompt, max_new_tokens=args.max_new_tokens, spec=mode_spec, ignore_eos=True)
        before = dict(engine.times.phases)
        steps = []  # (draft tokens, accepted tokens) per verify step
        sync()
        t0 = time.perf_counter()
        seq = engine.add_request(req)
        while engine.has_work():
            for out in engine.step():
                if out.error:
                    raise RuntimeError(f"request {rid} failed: {out.error}")
                steps.append((out.draft_tokens, out.accepted_tokens))
        sync()
        seconds = time.perf_counter() - t0
        oracle.continuations.pop(rid, None)
        phases = {k: v - before.get(k, 0.0) for k, v in engine.times.phases.items()}
        return Run(list(seq.generated), seconds, seq.stats, steps, phases)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    ar_spec = replace(spec, mode=SpecMode.AR)
    continuation = {}
    for p in tqdm(prompts, desc="warm-up, continuations", file=sys.stderr, leave=False):
        continuation[p] = generate(p, ar_spec).tokens  # the target's greedy continuation; warm-up
        generate(p, spec, alpha=alphas[0], seed=args.seed)
    costs = measure_costs(engine, gamma, args.prompt_len + args.max_new_tokens // 2, args.cost_samples)

    names = ["ar"] + [f"alpha={a:g}" for a in alphas]
    runs = {name: [] for name in names}
    bar = tqdm(total=args.repeats * len(prompts) * len(names), desc="sweep", file=sys.stderr, unit="gen")
    for r in range(args.repeats):
        for i, p in enumerate(prompts):
            k = r * len(prompts) + i
            for j in range(len(names)):
                idx = (k + j) % len(names)
                if idx == 0:
                    runs["ar"].append(generate(p, ar_spec))
                else:
                    runs[names[idx]].append(generate(p, spec, alpha=alphas[idx - 1],
                                                     seed=args.seed * 7919 + 1000 * idx + k))
                bar.update()
    bar.close()

    def total(name, what):
        return sum(getattr(x, what) if what == "seconds" else len(x.tokens) for x in runs[name])

    def tps(name):
        return total(name, "tokens") / total(name, "seconds")

    ar_tps = tps("ar")
    results = [{"name": "ar", "alpha": None, "tokens_per_second": ar_tps, "speedup_vs_ar": 1.0,
                "generated_tokens": total("ar", "tokens"), "wall_seconds": total("ar", "seconds"),
                "phase_seconds": _phases(runs["ar"])}]
    for name, alpha in zip(names[1:], alphas):
        items = runs[name]
        acc = acceptance_summary(x.stats for x in items)
        a_hat = realised_alpha([step for x in items for step in x.steps])
        e_tokens = expected_tokens(a_hat, gamma) if a_hat is not None else None
        ideal = e_tokens / (gamma * costs["c"] + 1) if e_tokens else None
        ideal_vc = e_tokens * costs["t_target"] / (gamma * costs["t_draft"] + costs["t_verify"]) if e_tokens else None
        measured = ratio(tps(name), ar_tps)
        results.append({
            "name": name,
            "alpha": alpha,
            "alpha_realised": a_hat,
            "tokens_per_second": tps(name),
            "speedup_vs_ar": measured,
            "ideal_speedup": ideal,
            "ideal_speedup_verify_cost": ideal_vc,
            "kept_of_ideal": ratio(measured, ideal),
            "kept_of_ideal_verify_cost": ratio(measured, ideal_vc),
            "expected_tokens_per_step": e_tokens,
            "mean_accepted_length": acc["mean_accepted_length"],
            "acceptance_rate": acc["acceptance_rate"],
            "acceptance_length_histogram": acc["acceptance_length_histogram"],
            "verify_steps": acc["verify_steps"],
            "outputs_match_ar": all(x.tokens == a.tokens for x, a in zip(items, runs["ar"])),
            "generated_tokens": total(name, "tokens"),
            "wall_seconds": total(name, "seconds"),
            "phase_seconds": _phases(items),
        })
    data = {
        "config": new_config(
            "sweep", args, label="systems benchmark: random-weight models of real shapes, oracle drafter",
            target_shape={"name": args.target_shape, **asdict(target_shape), "params": target_shape.params()},
            draft_shape={"name": args.draft_shape, **asdict(draft_shape), "params": draft_shape.params()},
            device=str(device), dtype=str(dtype).removeprefix("torch."), draft_tokens=gamma,
            num_prompts=args.num_prompts, prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens,
            repeats=args.repeats, oracle_acceptance=alphas,
        ),
        "step_costs": costs,
        "results": results,
    }
    write_json(args.output, data)
    print(table(data))
    if args.plots:
        from pathlib import Path

        from hedgerow.bench.plots import sweep_plots

        for path in sweep_plots(data, args.plots, stem=Path(args.output).stem if args.output else "sweep"):
            print(f"wrote {path}", file=sys.stderr)
    return 0


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    stats: object  # SeqStats
    steps: list[tuple[int, int]]  # (draft tokens, accepted tokens) per verify step
    phases: dict[str, float]


def realised_alpha(steps: list[tuple[int, int]]) -> float | None:
    """Per-token acceptance under independent acceptances: accepted / (accepted + rejections), a
    rejection being a step that accepted fewer draft tokens than it drafted. (With EOS ignored and
    the draft depth capped at the tokens left, a step is never cut short by the length limit.)"""
    accepted = sum(a for _, a in steps)
    rejections = sum(1 for d, a in steps if a < d)
    return accepted / (accepted + rejections) if accepted + rejections else None


def _phases(items: list[Run]) -> dict[str, float]:
    out: dict[str, float] = {}
    for x in items:
        for k, v in x.phases.items():
            out[k] = out.get(k, 0.0) + v
    return out


def table(data: dict) -> str:
    c = data["step_costs"]
    headers = ["contender", "α realised", "tokens/s", "measured × ar", "ideal (§8)", "kept of ideal",
               "ideal, verify cost", "kept", "mean accepted length", "same tokens as ar"]
    rows = [[r["name"], fmt(r.get("alpha_realised"), 3), fmt(r["tokens_per_second"], 1),
             fmt(r["speedup_vs_ar"], 2, "×"), fmt(r.get("ideal_speedup"), 2, "×"), fmt(r.get("kept_of_ideal"), 2),
             fmt(r.get("ideal_speedup_verify_cost"), 2, "×"), fmt(r.get("kept_of_ideal_verify_cost"), 2),
             fmt(r.get("mean_accepted_length")), fmt(r.get("outputs_match_ar"))] for r in data["results"]]
    costs = (f"step costs at batch 1, context {c['context']}: t_target {c['t_target'] * 1e3:.2f} ms, "
             f"t_verify(γ+1) {c['t_verify'] * 1e3:.2f} ms, t_draft {c['t_draft'] * 1e3:.2f} ms, c = {c['c']:.3f}")
    return markdown_table(headers, rows) + "\n\n" + costs
