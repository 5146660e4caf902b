"""The per-level torch work of the tree proposer (drafting/tree.py): children of a whole frontier
at once, the packed draft pass of one tree level, and the child table of a static shape.

Every helper computes, bit for bit, what the same work done one node at a time computes
(tests/test_tree_build.py checks whole trees against the per-node construction): the same torch
ops on rows holding the same values (``log_softmax``, ``softmax``, ``sort``, ``cumsum`` and
``topk`` work row by row, elementwise ops element by element). Two things need care:

- the Gumbel noise: one ``exponential_`` call of one row per node, in node order, so a sequence's
  ``draft`` generator yields exactly the draws it did per node (one [n, vocab] call need not make
  the same draws: on CUDA the Philox offset advances per call, by a rounded amount);
- ``topk`` among tied values: which tied entry it returns may depend on k and on the algorithm,
  so an answer is only ever taken from another call than ``x.topk(k)`` where it is unique.

On the CPU a vocabulary-wide ``topk`` costs more than the rest of a level's bookkeeping, so
``exact_topk`` first looks only at the best chunks of each row.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from hedgerow.verify.flatten import FlatBatch
from hedgerow.verify.sampling import SamplingParams, warp_probs


CHUNK = 128  # columns per chunk of a row in exact_topk


def exact_topk(x: torch.Tensor, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """``x.topk(k)`` of rows x [n, vocab], as lists, through the ``k + 1`` chunks of each row with
    the largest maxima (on the CPU, for rows of whole chunks).

    Any entry outside those chunks is at most the (k + 1)-th largest candidate w: the chunks'
    k + 1 maxima are candidates at least as large. So where the k + 1 largest candidates of every
    row are strictly decreasing, the row's k largest entries are exactly the first k of them, with
    no tie inside or at the boundary, and ``topk`` can answer nothing else. Otherwise (ties, NaN)
    it is asked.
    """
    rows, vocab = x.shape
    if x.device.type == "cpu" and vocab % CHUNK == 0 and vocab // CHUNK > k + 1:
        chunks = x.reshape(rows, vocab // CHUNK, CHUNK)
        best = chunks.amax(-1).topk(k + 1).indices  # [n, k + 1] chunk numbers
        cand = chunks.gather(1, best[:, :, None].expand(rows, k + 1, CHUNK)).reshape(rows, -1)  # [n, (k + 1) * CHUNK]
        val, pos = cand.topk(k + 1)  # [n, k + 1]
        val, pos, best = val.tolist(), pos.tolist(), best.tolist()
        if all(v[i] > v[i + 1] for v in val for i in range(k)):
            idx = [[b[p // CHUNK] * CHUNK + p % CHUNK for p in ps[:k]] for b, ps in zip(best, pos)]
            return [v[:k] for v in val], idx
    val, idx = x.topk(k)
    return val.tolist(), idx.tolist()


def ragged_topk(x: torch.Tensor, ks: Sequence[int]) -> tuple[list[float], list[int]]:
    """Row j's ``ks[j]`` largest entries of x [n, vocab] and their indices, row after row.

    A row whose answer is unique (its ks[j] + 1 largest entries strictly decreasing) takes the
    first ks[j] of one wider ``topk``; if any row's is not, each k gets its own ``topk(k)``.
    """
    width = max(ks)
    val, idx = exact_topk(x, width)
    if len(set(ks)) > 1 and not all(row[i] > row[i + 1] for row, k in zip(val, ks) if k < width for i in range(k)):
        for k in set(ks) - {0, width}:
            rows = [j for j, kj in enumerate(ks) if kj == k]
            for j, v, i in zip(rows, *exact_topk(x[rows], k)):
                val[j], idx[j] = v, i
    return [v for row, k in zip(val, ks) for v in row[:k]], [i for row, k in zip(idx, ks) for i in row[:k]]


def top_children(logits: torch.Tensor, ks: Sequence[int]) -> tuple[list[int], list[float]]:
    """Deterministic children of a frontier: row j's ``ks[j]`` most probable tokens.

    logits [n, vocab]; returns tokens and their draft log-probabilities (fp32 values), sum(ks) of
    each, node by node, best first.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab], row by row
    val, idx = ragged_topk(logp, ks)
    return idx, val


@dataclass
class Draws:
    """Children drawn for a frontier (Gumbel-top-k, without replacement, in draw order)."""

    tokens: list[int]  # sum(counts) children, node by node
    logq: list[float]  # the (fp32) log q of each
    counts: list[int]  # children per frontier node
    drawn: list[int]  # the frontier nodes that drew (their q rows are kept)
    q: torch.Tensor  # [len(drawn), vocab] the warped draft distribution of each node that drew


def sampled_children(
    logits: torch.Tensor, wanted: Sequence[int], params: SamplingParams, generator: torch.Generator, left: int | None
) -> Draws:
    """Draws without replacement from the warped draft distribution q of each frontier row.

    logits [n, vocab]; ``wanted[j]``: the children node j asks for. A node asking for none draws
    nothing (and consumes no noise); one that asks draws a full row of noise and keeps at most as
    many children as its q has non-zero tokens. ``left``: the budget still to give out, in node
    order (None: no budget, static shapes), each node asking for no more than what is left.
    """
    q = warp_probs(logits, params)  # [n, vocab]
    nonzero = (q > 0).sum(-1).tolist()
    counts, drawn = [], []
    for j, (want, nz) in enumerate(zip(wanted, nonzero)):
        k = want if left is None else min(want, left)
        counts.append(min(k, nz) if k > 0 else 0)
        if k > 0:
            drawn.append(j)
        if left is not None:
            left -= counts[-1]
    if len(drawn) < len(counts):
        q = q[drawn]  # [d, vocab]
    if not drawn:
        return Draws([], [], counts, drawn, q)
    noise = torch.empty_like(q)
    for j in range(len(drawn)):  # one call per row: the generator's stream (module docstring)
        noise[j].exponential_(generator=generator)
    logq = torch.log(q)
    keys = (logq - torch.log(noise)).masked_fill(q <= 0, float("-inf"))  # [d, vocab]: log q + Gumbel
    ks = [counts[j] for j in drawn]
    _, idx = ragged_topk(keys, ks)
    return Draws(idx, logq[[j for j, k in enumerate(ks) for _ in range(k)], idx].tolist(), counts, drawn, q)


@torch.inference_mode()  # as every pass's tensors (verify/flatten.py): a compiled pass is specialised on it
def level_batch(
    tokens: Sequence[torch.Tensor], depths: Sequence[int], prefix_lens: Sequence[int], visible: Sequence[torch.Tensor]
) -> FlatBatch:
    """One tree level of every sequence as one draft pass: what ``verify.flatten.pack`` builds for
    ``pack(tokens, [depth] * n, prefix_lens, visible, [P - 1])``, without its general gathers.

    tokens[b]: [n] the level's nodes, all at depth ``depths[b]`` below the root, which is cached
    at row P - 1 (P = ``prefix_lens[b]``); visible[b]: [n, E + n] bool over the E tree rows fed by
    earlier levels and the level itself.
    """
    if len(tokens) == 1:  # nothing to pad: a few constructors, no list of lists
        k, p, d, w = tokens[0].shape[0], prefix_lens[0], depths[0], prefix_lens[0] + visible[0].shape[1]
        return FlatBatch(
            tokens=tokens[0][None],
            positions=torch.full((1, k), p - 1 + d, dtype=torch.long),
            cache_rows=torch.arange(w - k, w)[None],
            valid=torch.ones(1, k, dtype=torch.bool),
            ancestors=visible[0][None, :, -k:].contiguous(),
            mask=torch.cat([torch.ones(k, p, dtype=torch.bool), visible[0]], 1)[None, None],
            prefix_lens=torch.full((1,), p, dtype=torch.long),
            num_nodes=torch.full((1,), k, dtype=torch.long),
            depths=torch.full((1, k), d, dtype=torch.long),
        )
    b = len(tokens)
    sizes = [int(t.shape[0]) for t in tokens]
    widths = [p + int(v.shape[1]) for p, v in zip(prefix_lens, visible)]  # P + E + n
    n = max(sizes)
    cols = range(n)
    tok = torch.zeros(b, n, dtype=torch.long)
    anc = torch.zeros(b, n, n, dtype=torch.bool)
    mask = torch.zeros(b, n, max(widths), dtype=torch.bool)
    for i, (k, p, w) in enumerate(zip(sizes, prefix_lens, widths)):
        tok[i, :k] = tokens[i]
        anc[i, :k, :k] = visible[i][:, -k:]
        mask[i, :k, :p] = True  # the committed rows, the root's included
        mask[i, :k, p:w] = visible[i]
        mask[i, k:, 0] = True  # padding rows see column 0 only
    depth = [[d if j < k else 0 for j in cols] for d, k in zip(depths, sizes)]
    return FlatBatch(
        tokens=tok,
        positions=torch.tensor([[p - 1 + d for d in row] for p, row in zip(prefix_lens, depth)]),
        cache_rows=torch.tensor([[w - k + j for j in cols] for w, k in zip(widths, sizes)]),
        valid=torch.tensor([[j < k for j in cols] for k in sizes]),
        ancestors=anc,
        mask=mask[:, None],
        prefix_lens=torch.tensor(list(prefix_lens), dtype=torch.long),
        num_nodes=torch.tensor(sizes, dtype=torch.long),
        depths=torch.tensor(depth),
    )


@dataclass(frozen=True)
class StaticTable:
    """A static shape as ids: id 0 is the root's empty rank path, then every path of the shape and
    every prefix of one; the last id stands for any path outside the shape."""

    count: list[int]  # [T + 1] children the shape gives the path (paths of one more rank under it)
    child: list[list[int]]  # [T + 1][R] id of path + (r,), the last id where that is outside the shape


@functools.lru_cache(maxsize=256)
def static_table(paths: tuple[tuple[int, ...], ...]) -> StaticTable:
    """The shapes repeat every step; the table of each is built once."""
    ids = {(): 0}
    for p in paths:
        for d in range(1, len(p) + 1):
            ids.setdefault(p[:d], len(ids))
    outside = len(ids)
    count = [0] * (outside + 1)
    for p in paths:
        if p:
            count[ids[p[:-1]]] += 1
    child = [[outside] * max(1, max(count)) for _ in range(outside + 1)]
    for path, i in ids.items():
        if path and path[-1] < len(child[0]):
            child[ids[path[:-1]]][path[-1]] = i
    return StaticTable(count, child)
