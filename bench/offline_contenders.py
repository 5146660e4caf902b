"""The contenders of ``hedgerow bench offline``, and one timed generation through each.

Hedgerow's modes (``plain``, ``chain[@G]``, ``tree[@B]``, ``tree-static[@B]``) run through one Hedgerow
engine (batch 1) with a per-request ``SpecParams``; the baselines are transformers' ``generate``
(``hf``) and assisted generation (``hf-assisted``, its default schedule) on the same model objects,
switched to SDPA attention for the call.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass, replace

from hedgerow.server.engine.errors import HedgerowError

ENGINE_MODES = ("plain", "chain", "tree", "tree-static")
BASELINES = ("hf", "hf-assisted")


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "engine", "hf" or "hf-assisted"
    spec: object = None  # SpecParams, for engine modes

    @property
    def uses_draft(self) -> bool:
        return self.kind == "hf-assisted" or (self.kind == "engine" and self.spec.mode.value != "plain")


def parse_contenders(args) -> list[Contender]:
    """``--modes`` then ``--baselines``; every mode takes the speculation flags, ``@N`` overriding
    the draft tokens (chain) or the tree budget (tree, tree-static)."""
    from hedgerow.server.cli import spec_from_args
    from hedgerow.server.engine.sequence import SpecMode

    try:
        base = spec_from_args(argparse.Namespace(**{**vars(args), "mode": "chain"}))
    except ValueError as exc:
        raise HedgerowError(f"--{str(exc).replace('_', '-')}") from None
    out: list[Contender] = []
    for name in args.modes:
        mode, _, n = name.partition("@")
        if mode not in ENGINE_MODES or (n and (not n.isdigit() or mode == "plain")):
            raise HedgerowError(f"--modes: {name!r} is not one of plain, chain[@G], tree[@B], tree-static[@B]")
        if mode == "plain":
            spec = replace(base, mode=SpecMode.PLAIN)
        elif mode == "chain":
            spec = replace(base, mode=SpecMode.CHAIN, draft_tokens=int(n) if n else base.draft_tokens)
        else:
            spec = replace(base, mode=SpecMode.TREE, tree_static=mode == "tree-static" or base.tree_static,
                           tree_budget=int(n) if n else base.tree_budget)
        out.append(Contender(name, "engine", spec))
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
    return {"name": c.name, "kind": c.kind, "spec": spec}


@dataclass
class Run:
    tokens: list[int]
    seconds: float
    stats: object = None  # SeqStats, engine modes only
    phases: dict = dataclasses.field(default_factory=dict)


class Runner:
    """Runs one prompt through one contender and times it (prefill included, tokenization not)."""

    def __init__(self, engine, tokenizer, sampling, max_new_tokens: int):
        from hedgerow.server.cli import eos_ids

        self.engine = engine
        self.device = engine.target.device
        self.sampling = sampling
        self.max_new_tokens = max_new_tokens
        self.eos = sorted(eos_ids(tokenizer, engine.target.model))
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

        self.counter += 1
        sampling = self.sampling if self.sampling.greedy else replace(self.sampling, seed=seed)
        req = Request(f"bench-{self.counter}", tuple(prompt_ids), sampling, self.max_new_tokens, c.spec)
        before = dict(self.engine.times.phases)
        self._sync()
        t0 = time.perf_counter()
        seq = self.engine.generate([req])[req.request_id]
        self._sync()
        seconds = time.perf_counter() - t0
        phases = {k: v - before.get(k, 0.0) for k, v in self.engine.times.phases.items()}
        return Run(list(seq.generated), seconds, seq.stats, phases)

    def baselines(self) -> tuple:
        """The target and draft as transformers loads them (SDPA attention), the same weights at
        the engine's dtype and device: the baselines run transformers' code, not Hedgerow's."""
        if self._baselines is None:
            from transformers import AutoModelForCausalLM

            def load(runner):
                if runner is None:
                    return None
                model = AutoModelForCausalLM.from_pretrained(runner.model.name_or_path, dtype=runner.dtype,
                                                             attn_implementation="sdpa")
                return model.to(runner.device).eval()

            self._baselines = load(self.engine.target), load(self.engine.draft)
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
