"""The runs of ``hedgerow bench sweep``: one batch-1 engine whose chain mode drafts with the oracle
(``bench/oracle.py``), plain decoding and every alpha interleaved prompt by prompt, and each
contender's entry of the results JSON."""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import dataclass, replace

from hedgerow.bench.common import acceptance_summary, ratio
from hedgerow.bench.sweep_model import ideal_speedups, realised_alpha
from hedgerow.bench.sweep_shapes import Shape, build_model


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    stats: object  # SeqStats
    steps: list[tuple[int, int]]  # (draft tokens, accepted tokens) per verify step
    phases: dict[str, float]


class OracleBench:
    """Random-weight target and draft in one engine; ``generate`` runs plain decoding (alpha None)
    or the oracle's chain at a given alpha, timed, greedy, EOS ignored."""

    def __init__(self, target_shape: Shape, draft_shape: Shape, args, device, dtype):
        from hedgerow.bench.oracle import OracleProposer
        from hedgerow.drafting.spec import SpecMode, SpecParams
        from hedgerow.server.engine.config import EngineConfig
        from hedgerow.server.engine.engine import Engine
        from hedgerow.server.engine.runner import ModelRunner
        from hedgerow.server.models.hf import TransformersModel
        from hedgerow.server.models.native import from_transformers

        draft_tokens = args.draft_tokens
        max_len = args.prompt_len + args.max_new_tokens + draft_tokens + 2

        def runner(shape: Shape, seed: int, name: str) -> ModelRunner:
            model = build_model(shape, max_len, device, dtype, seed)
            # the native twin copies the weights; the transformers model is dropped once copied
            driven = from_transformers(model, max_len) if args.model_impl == "native" else TransformersModel(model)
            return ModelRunner(driven, num_slots=1, max_len=max_len, name=name, cuda_graphs=args.cuda_graphs)

        # the oracle's chain alone: n-gram nodes beside it would change the acceptance it sets
        self.spec = SpecParams(mode=SpecMode.CHAIN, draft_tokens=draft_tokens, proposer="model")
        self.plain_spec = replace(self.spec, mode=SpecMode.PLAIN)
        self.engine = Engine(runner(target_shape, args.seed, "target"), runner(draft_shape, args.seed + 1, "draft"),
                             eos_token_ids=[],
                             # fixed draft tokens: the oracle sets alpha, no policy second-guesses the draft budget
                             config=EngineConfig(max_model_len=max_len, max_batch_size=1, spec=self.spec,
                                                 adaptive="none"))
        self.oracle = OracleProposer(self.engine.proposer.draft, self.engine.target.vocab_size)
        self.engine.proposer.chains = self.oracle  # the engine's chain mode now drafts with the oracle
        self.device = device
        self.max_new_tokens = args.max_new_tokens
        self.continuation: dict[tuple, list[int]] = {}  # prompt -> the target's greedy continuation
        self.counter = itertools.count()

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate(self, prompt: tuple, alpha: float | None = None, seed: int = 0) -> Run:
        from hedgerow.server.engine.sequence import Request

        engine = self.engine
        rid = f"sweep-{next(self.counter)}"
        if alpha is not None:
            self.oracle.continuations[rid] = self.continuation[prompt]
            self.oracle.configure(alpha, seed)
        spec = self.plain_spec if alpha is None else self.spec
        req = Request(rid, prompt, max_new_tokens=self.max_new_tokens, spec=spec, ignore_eos=True)
        before = dict(engine.times.phases)
        steps = []  # (draft tokens, accepted tokens) per verify step
        self._sync()
        t0 = time.perf_counter()
        seq = engine.add_request(req)
        while engine.has_work():
            for out in engine.step().outputs:
                if out.error:
                    raise RuntimeError(f"request {rid} failed: {out.error}")
                steps.append((out.draft_tokens, out.accepted_tokens))
        self._sync()
        seconds = time.perf_counter() - t0
        self.oracle.continuations.pop(rid, None)
        phases = {k: v - before.get(k, 0.0) for k, v in engine.times.phases.items()}
        return Run(list(seq.generated), seconds, seq.stats, steps, phases)

    def warm_up(self, prompts: list[tuple], alpha: float, seed: int) -> None:
        """Record each prompt's greedy continuation (the oracle's truth), warming both modes up."""
        from tqdm import tqdm

        for p in tqdm(prompts, desc="warm-up, continuations", file=sys.stderr, leave=False):
            self.continuation[p] = self.generate(p).tokens
            self.generate(p, alpha=alpha, seed=seed)

    def interleaved(self, prompts: list[tuple], alphas: list[float], repeats: int, seed: int) -> dict[str, list[Run]]:
        """Runs of ``plain`` and ``alpha=A`` for each alpha, the order rotating from prompt to prompt."""
        from tqdm import tqdm

        names = ["plain"] + [f"alpha={a:g}" for a in alphas]
        runs: dict[str, list[Run]] = {name: [] for name in names}
        bar = tqdm(total=repeats * len(prompts) * len(names), desc="sweep", file=sys.stderr, unit="gen")
        for r in range(repeats):
            for i, p in enumerate(prompts):
                k = r * len(prompts) + i
                for j in range(len(names)):
                    idx = (k + j) % len(names)
                    if idx == 0:
                        runs["plain"].append(self.generate(p))
                    else:
                        runs[names[idx]].append(self.generate(p, alpha=alphas[idx - 1],
                                                              seed=seed * 7919 + 1000 * idx + k))
                    bar.update()
        bar.close()
        return runs


def random_prompts(vocab: int, num: int, length: int, seed: int) -> list[tuple]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(2, vocab, (length,), generator=gen).tolist()) for _ in range(num)]


def results(runs: dict[str, list[Run]], alphas: list[float], draft_tokens: int, costs: dict) -> list[dict]:
    """plain's entry, then one per alpha: measured speedup, the ideal ones and how much of them is kept."""
    def tokens(items: list[Run]) -> int:
        return sum(len(x.tokens) for x in items)

    def seconds(items: list[Run]) -> float:
        return sum(x.seconds for x in items)

    def tps(items: list[Run]) -> float:
        return tokens(items) / seconds(items)

    plain_tps = tps(runs["plain"])
    out = [{"name": "plain", "alpha": None, "tokens_per_second": plain_tps, "speedup_vs_plain": 1.0,
            "generated_tokens": tokens(runs["plain"]), "wall_seconds": seconds(runs["plain"]),
            "phase_seconds": _phases(runs["plain"])}]
    for alpha in alphas:
        name = f"alpha={alpha:g}"
        items = runs[name]
        acc = acceptance_summary(x.stats for x in items)
        a_hat = realised_alpha([step for x in items for step in x.steps])
        e_tokens, ideal, ideal_vc = ideal_speedups(a_hat, draft_tokens, costs)
        measured = ratio(tps(items), plain_tps)
        out.append({
            "name": name,
            "alpha": alpha,
            "alpha_realised": a_hat,
            "tokens_per_second": tps(items),
            "speedup_vs_plain": measured,
            "ideal_speedup": ideal,
            "ideal_speedup_verify_cost": ideal_vc,
            "kept_of_ideal": ratio(measured, ideal),
            "kept_of_ideal_verify_cost": ratio(measured, ideal_vc),
            "expected_tokens_per_step": e_tokens,
            "mean_accepted_length": acc["mean_accepted_length"],
            "acceptance_rate": acc["acceptance_rate"],
            "acceptance_length_histogram": acc["acceptance_length_histogram"],
            "verify_steps": acc["verify_steps"],
            "outputs_match_plain": all(x.tokens == a.tokens for x, a in zip(items, runs["plain"])),
            "generated_tokens": tokens(items),
            "wall_seconds": seconds(items),
            "phase_seconds": _phases(items),
        })
    return out


def _phases(items: list[Run]) -> dict[str, float]:
    out: dict[str, float] = {}
    for x in items:
        for k, v in x.phases.items():
            out[k] = out.get(k, 0.0) + v
    return out
