"""Greedy draft runs: a chain of draft tokens from as few calls as possible.

A greedy chain is a loop: feed a token, take the argmax of its logits, feed that. Run as one
runner pass per token, each token pays the pass's fixed cost on the host (a flattened batch, the
pass plan, the compiled graph's guards, the output head, the argmax copied back), and for a small
draft model that fixed cost is most of the pass. Here the loop runs on the device:

- one call feeds each row's catch-up tokens (committed tokens the draft has not seen), takes the
  logits of each row's last one, and then drafts ``chunk - 1`` more tokens, every next token the
  argmax of the last logits, without leaving the graph: the plan (KV rows to write, rows to read,
  the causal mask) is computed from the positions inside the function;
- a chain of g tokens is one or more such calls: chunks of CHUNKS tokens (largest first), a later
  call feeding the previous call's last token. Compiled (``--compile``), each (chunk, one row or
  more, one token fed or more) is one graph, so a 4-token chain is one graph call.

The rows written and the tokens chosen are exactly those of the pass-per-token loop (a chain's KV
row t holds its token t; the mask lets query t see rows 0..t of its slot). Only greedy chains run
here: a sampled chain draws from the warped draft distribution with its own generator, on the host.
"""

from __future__ import annotations

import torch

from hedgerow.server.engine.fast_pass import SlotAttention, allow_recompiles, call_compiled, compile_class
from hedgerow.server.engine.kv_cache import SlotKVCache
from hedgerow.server.models.attention import Backend, ForwardPlan

CHUNKS = (4, 1)  # tokens per call, largest first: 6 tokens = 4 + 1 + 1 (each chunk size is 4 more graphs to compile)
MAX_FED = 64  # catch-up tokens per row beyond which the first call stays eager (a long catch-up is rare)


def split(tokens: int) -> list[int]:
    """The chunks a chain of ``tokens`` is drafted in: largest first, as few calls as possible."""
    out = []
    for c in CHUNKS:
        while tokens >= c:
            out.append(c)
            tokens -= c
    return out


class GreedyRunFunction:
    """One call of a greedy run as a function of tensors only (no host sync, no branch on data)."""

    def __init__(self, model, cache: SlotKVCache, backend: Backend, chunk: int):
        self.model, self.cache, self.backend, self.chunk = model, cache, backend, chunk

    def __call__(self, tokens, positions, write_slots, last, slots, rows, vocab: int):
        """tokens, positions [B, T] (padding: position 0), write_slots [B, T] (the scratch slot for
        padding), last [B] index of each row's last real token, slots [B], rows [K] = arange(K)
        with K above every position written -> (tokens [B, chunk], logits [B, chunk, vocab'])."""
        b = torch.arange(tokens.shape[0], device=tokens.device)
        h = self._pass(tokens, positions, write_slots, slots, rows)[b, last]  # [B, hidden]
        pos = positions[b, last]  # [B]: position of the token the logits follow
        out_tokens, out_logits = [], []
        for j in range(self.chunk):
            logits = self.model.logits(h)[..., :vocab]  # [B, vocab']
            token = logits.argmax(-1)
            out_tokens.append(token)
            out_logits.append(logits)
            if j + 1 == self.chunk:
                break
            pos = pos + 1
            h = self._pass(token[:, None], pos[:, None], slots[:, None], slots, rows)[:, 0]
        return torch.stack(out_tokens, 1), torch.stack(out_logits, 1)

    def _pass(self, tokens, positions, write_slots, slots, rows) -> torch.Tensor:
        """A pass over chains whose KV row is their position: query t sees its slot's rows 0..t."""
        mask = (rows[None, None, :] <= positions[:, :, None])[:, None]  # [B, 1, T, K]
        write_rows = torch.where(write_slots == slots[:, None], positions, torch.arange(
            positions.shape[1], device=positions.device)[None, :])
        plan = ForwardPlan(write_slots, write_rows, slots, mask)
        return self.model.forward(tokens, positions, SlotAttention(self.cache, plan, self.backend))


class GreedyRuns:
    """Greedy chains for one runner: the calls of each chunk size, compiled or eager."""

    def __init__(self, model, cache: SlotKVCache, backend: Backend, name: str, compile_backend: str | None):
        """``compile_backend``: torch.compile's backend, or None to run eagerly."""
        self.cache, self.name = cache, name
        self.device = cache.device
        self.eager = {c: GreedyRunFunction(model, cache, backend, c) for c in CHUNKS}
        self.compiled = None
        if compile_backend is not None:
            allow_recompiles()
            self.compiled = {c: torch.compile(f, fullgraph=True, backend=compile_backend) for c, f in self.eager.items()}
        self.enabled: set[tuple[int, bool, bool]] = set()  # (chunk, one row, one token fed) compiled and in use
        self.report: dict[tuple[int, bool, bool], dict] = {}

    @torch.inference_mode()
    def __call__(self, slots: list[int], starts: list[int], fed: list[list[int]], tokens: int,
                 vocab: int) -> tuple[list[list[int]], torch.Tensor]:
        """Feed row i the tokens ``fed[i]`` at positions ``starts[i]`` on (into ``slots[i]``), then
        draft ``tokens`` greedy tokens per row. Returns the tokens [B][tokens] and the logits each
        was chosen from, [B, tokens, vocab'] (vocab' = min(vocab, the model's)); the KV rows
        written are those of the fed tokens and of every drafted token but the last."""
        ends = [s + len(f) + tokens - 1 for s, f in zip(starts, fed)]  # rows a row's run needs
        if max(ends) > self.cache.max_len:
            raise ValueError(f"{self.name}: a greedy run needs {max(ends)} KV rows, the cache holds {self.cache.max_len}")
        batch, width = len(slots), max(len(f) for f in fed)
        rows = torch.arange(max(*ends, 2), device=self.device)  # at least 2: a size of 1 would recompile
        slot_t = torch.tensor(slots, device=self.device)
        tok = torch.zeros(batch, width, dtype=torch.long)
        pos = torch.zeros(batch, width, dtype=torch.long)
        write = torch.full((batch, width), self.cache.scratch_slot, dtype=torch.long)
        for i, (s, f) in enumerate(zip(starts, fed)):
            tok[i, : len(f)] = torch.tensor(f)
            pos[i, : len(f)] = torch.arange(s, s + len(f))
            write[i, : len(f)] = slots[i]
        last = torch.tensor([len(f) - 1 for f in fed], device=self.device)
        tok, pos, write = tok.to(self.device), pos.to(self.device), write.to(self.device)
        out_tokens, out_logits = [], []
        for chunk in split(tokens):
            t, lg = self._call(chunk, tok, pos, write, last, slot_t, rows, vocab)
            out_tokens.append(t)
            out_logits.append(lg)
            pos = pos[torch.arange(batch, device=self.device), last][:, None] + chunk  # the last token's row
            # contiguous strides even for one row ([1, 1] views count as contiguous with any stride,
            # and a compiled call guards on strides: it would recompile)
            tok = t[:, -1:].clone(memory_format=torch.contiguous_format)
            write, last = slot_t[:, None].clone(memory_format=torch.contiguous_format), torch.zeros_like(last)
        return torch.cat(out_tokens, 1).tolist(), torch.cat(out_logits, 1)

    def _call(self, chunk: int, *args):
        key = (chunk, args[0].shape[0] == 1, args[0].shape[1] == 1)
        if self.compiled is None or key not in self.enabled or args[0].shape[1] > MAX_FED:
            return self.eager[chunk](*args)
        # as a compiled pass: a class whose compiled call fails runs eagerly from now on (a call
        # writes only its own rows, so running it again is safe)
        return call_compiled(f"{self.name} greedy run {key}", self.compiled[chunk], self.eager[chunk], args,
                             lambda: self.enabled.discard(key))

    def prepare(self, vocab: int, measure: bool) -> None:
        """Compile every class on a run in the scratch slot (after 16 rows, so that no size is 1 by
        accident), time it against eager when ``measure``, switch it on if it may be used."""
        for chunk in CHUNKS:
            for one_row in (True, False):
                for one_token in (True, False):
                    key = (chunk, one_row, one_token)
                    args = self._example(chunk, 1 if one_row else 2, 1 if one_token else 3, vocab,
                                         self.cache.scratch_slot)
                    entry = compile_class(f"{self.name} greedy run {key}", self.compiled[chunk], self.eager[chunk],
                                          args, measure)
                    if entry is not None:
                        self.report[key] = entry
                        if entry["used"]:
                            self.enabled.add(key)

    @torch.inference_mode()  # as every call's tensors: a compiled call is specialised on it
    def _example(self, chunk: int, batch: int, width: int, vocab: int, scratch: int) -> tuple:
        d = self.device
        pos = (16 + torch.arange(width, device=d))[None, :].repeat(batch, 1)
        args = (torch.zeros(batch, width, dtype=torch.long, device=d), pos,
                torch.full((batch, width), scratch, dtype=torch.long, device=d),
                torch.full((batch,), width - 1, dtype=torch.long, device=d),
                torch.full((batch,), scratch, dtype=torch.long, device=d),
                torch.arange(16 + width + chunk, device=d), vocab)
        torch._dynamo.mark_dynamic(args[5], 0)
        if batch > 1:
            for t in args[:5]:
                torch._dynamo.mark_dynamic(t, 0)
        if width > 1:
            for t in args[:3]:
                torch._dynamo.mark_dynamic(t, 1)
        return args
