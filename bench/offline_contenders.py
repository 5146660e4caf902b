"""The contenders of ``hedgerow bench offline``, and one timed generation through each.

Hedgerow's modes (``plain``, ``chain[@G]``, ``tree[@B]``, ``tree-static[@B]``, each optionally
``/model``, ``/ngram`` or ``/hybrid``, its proposer, and ``:native`` or ``:transformers``) run
through a Hedgerow engine (batch 1) of their model implementation, one engine per implementation,
with a per-request ``SpecParams``: so one run measures the native fast path against transformers'
modules driven by the same engine, and the proposers against each other. The
baselines are transformers' ``generate`` (``hf``) and assisted generation (``hf-assisted``, its
default schedule) on transformers' own models of the same weights, with SDPA attention.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, replace

from hedgerow.server.errors import HedgerowError

ENGINE_MODES = ("plain", "chain", "tree", "tree-static")
PROPOSERS = ("model", "ngram", "hybrid")
IMPLS = ("native", "transformers")
BASELINES = ("hf", "hf-assisted")


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "engine", "hf" or "hf-assisted"
    spec: object = None  # SpecParams, for engine modes
    impl: str | None = None  # engine modes: the --model-impl its engine is built with (auto, native, transformers)

    @property
    def uses_draft(self) -> bool:
        return self.kind == "hf-assisted" or (self.kind == "engine" and self.spec.uses_model)


def parse_contenders(args) -> list[Contender]:
    """``--modes`` then ``--baselines``; every mode takes the speculation flags, ``@N`` overriding
    the draft tokens (chain) or the tree budget (tree, tree-static), ``/PROPOSER`` the run's
    ``--proposer`` (whose default is the engine's: hybrid with a draft model), ``:IMPL`` the run's
    ``--model-impl``."""
    from hedgerow.server.cli import spec_from_args
    from hedgerow.server.engine.sequence import SpecMode

    try:
        base = spec_from_args(argparse.Namespace(**{**vars(args), "mode": "chain"}))
    except ValueError as exc:
        raise HedgerowError(f"--{str(exc).replace('_', '-')}") from None
    out: list[Contender] = []
    for name in args.modes:
        head, colon, impl = name.partition(":")
        head, slash, proposer = head.partition("/")
        mode, _, n = head.partition("@")
        if (mode not in ENGINE_MODES or (n and (not n.isdigit() or mode == "plain"))
                or (slash and (proposer not in PROPOSERS or mode == "plain")) or (colon and impl not in IMPLS)):
            raise HedgerowError(f"--modes: {name!r} is not one of plain, chain[@G], tree[@B], tree-static[@B], "
                                "each optionally followed by /model, /ngram or /hybrid (not plain), then by :native "
                                "or :transformers")
        own = replace(base, proposer=proposer) if slash else base
        if mode == "plain":
            spec = replace(own, mode=SpecMode.PLAIN)
        elif mode == "chain":
            spec = replace(own, mode=SpecMode.CHAIN, draft_tokens=int(n) if n else own.draft_tokens)
        else:
            spec = replace(own, mode=SpecMode.TREE, tree_static=mode == "tree-static" or own.tree_static,
                           tree_budget=int(n) if n else own.tree_budget)
        out.append(Contender(name, "engine", spec, impl if colon else args.model_impl))
    for name in args.baselines:
        if name == "none":
            continue
        if name not in BASELINES:
            raise HedgerowError(f"--baselines: {name!r} is not one of hf, hf-assisted, none")
        out.append(Contender(name, name))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise HedgerowError(f"--modes/--baselines name a contender twice: {','.join(names)}")
    return out


def describe(c: Contender) -> dict:
    """A contender as the results JSON records it."""
    spec = None
    if c.spec is not None:
        spec = dataclasses.asdict(c.spec)
        spec["mode"] = c.spec.mode.value
        spec["proposer"] = c.spec.proposer.value if c.spec.proposer is not None else None
    return {"name": c.name, "kind": c.kind, "spec": spec, "model_impl": c.impl}


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    stats: object = None  # SeqStats, engine modes only
    phases: dict = dataclasses.field(default_factory=dict)


class Runner:
    """Runs one prompt through one contender and times it (prefill included, tokenization not).
    ``engines`` maps each engine contender's ``impl`` to its engine; all share one tokenizer."""

    def __init__(self, engines: dict, tokenizer, sampling, max_new_tokens: int):
        from hedgerow.server.cli import eos_ids

        self.engines = engines
        first = next(iter(engines.values()))
        self.device = first.target.device
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.eos = sorted(eos_ids(tokenizer, first.target.model))
        self._baselines = None  # transformers' own models of the pair, loaded at the first baseline run
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else 0)
        self.counter = 0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, c: Contender, prompt_ids: list[int], seed: int) -> Run:
        if c.kind == "engine":
            return self._engine(c, prompt_ids, seed)
        return self._hf(c, prompt_ids, seed)

    def _engine(self, c: Contender, prompt_ids: list[int], seed: int) -> Run:
        from hedgerow.server.engine.sequence import Request

        engine = self.engines[c.impl]
        self.counter += 1
        sampling = self.sampling if self.sampling.greedy else replace(self.sampling, seed=seed)
        req = Request(f"bench-{self.counter}", tuple(prompt_ids), sampling, self.max_new_tokens, c.spec)
        before = dict(engine.times.phases)
        self._sync()
        t0 = time.perf_counter()
        seq = engine.generate([req])[req.request_id]
        self._sync()
        seconds = time.perf_counter() - t0
        phases = {k: v - before.get(k, 0.0) for k, v in engine.times.phases.items()}
        return Run(list(seq.generated), seconds, seq.stats, phases)

    def baselines(self) -> tuple:
        """The target and draft as transformers loads them (SDPA attention), the same weights at
        the engines' dtype and device: the baselines run transformers' code, not Hedgerow's."""
        if self._baselines is None:
            from transformers import AutoModelForCausalLM

            def load(runner):
                if runner is None:
                    return None
                model = AutoModelForCausalLM.from_pretrained(runner.model.name_or_path, dtype=runner.dtype,
                                                             attn_implementation="sdpa")
                return model.to(runner.device).eval()

            engines = list(self.engines.values())
            draft = next((e.draft for e in engines if e.draft is not None), None)
            self._baselines = load(engines[0].target), load(draft)
        return self._baselines

    def _hf(self, c: Contender, prompt_ids: list[int], seed: int) -> Run:
        import torch

        target, draft = self.baselines()
        kwargs = dict(max_new_tokens=self.max_new_tokens, eos_token_id=self.eos, pad_token_id=self.pad)
        if self.sampling.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=self.sampling.temperature, top_k=self.sampling.top_k,
                          top_p=self.sampling.top_p)
        if c.kind == "hf-assisted":
            kwargs["assistant_model"] = draft
        ids = torch.tensor([prompt_ids], device=self.device)
        mask = torch.ones_like(ids)
        torch.manual_seed(seed)
        self._sync()
        t0 = time.perf_counter()
        out = target.generate(ids, attention_mask=mask, **kwargs)
        self._sync()
        seconds = time.perf_counter() - t0
        gen = out[0, len(prompt_ids):].tolist()
        for i, tok in enumerate(gen):  # batch 1 stops at EOS; cut defensively all the same
            if tok in self.eos:
                gen = gen[: i + 1]
                break
        return Run(gen, seconds)
