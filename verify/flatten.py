"""Flatten a batch of token trees into the tensors of one forward pass (docs/algorithms.md §3).

Worked example: prefix of L = 5 cached tokens, tree ``parents = [-1, 0, 0, 1]``::

    node   token  parent  depth  position  cache row   ancestor row (tree columns 0..3)
    0      a      -1      0      5         5           1 0 0 0
    1      b       0      1      6         6           1 1 0 0
    2      c       0      1      6         7           1 0 1 0     siblings share a position
    3      d       1      2      7         8           1 1 0 1

Query i sees key columns [0, L) (the prefix) and column L + j where ``ancestor[i, j]``.
Rows of a shorter tree are padding: they attend only to column 0 (never an empty row, which
would be NaN), and the runner sends their KV writes to a scratch slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from hedgerow.verify.tree import DraftTree


@dataclass
class FlatBatch:
    tokens: torch.Tensor  # [B, N] int64, padding 0
    positions: torch.Tensor  # [B, N] int64, prefix_len + depth
    cache_rows: torch.Tensor  # [B, N] int64, prefix_len + node index (the row each node's KV goes to)
    valid: torch.Tensor  # [B, N] bool, False on padding
    ancestors: torch.Tensor  # [B, N, N] bool, ancestors[b, i, j]: node j is i or an ancestor of i
    mask: torch.Tensor  # [B, 1, N, K] bool, K = max(prefix_len + num_nodes): query i may see key k
    prefix_lens: torch.Tensor  # [B] int64
    num_nodes: torch.Tensor  # [B] int64
    depths: torch.Tensor  # [B, N] int64

    @property
    def kv_len(self) -> int:
        return self.mask.shape[-1]

    def to(self, device: torch.device | str) -> "FlatBatch":
        return FlatBatch(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})

    def padded(self, batch: int, nodes: int, kv_len: int) -> "FlatBatch":
        """The same passes in a larger shape (a bucket whose compiled or captured pass is reused):
        padding sequences and nodes are invalid (their KV goes to the scratch slot, they see key 0
        only, as every padding row does), padding keys are masked."""
        b, n = self.tokens.shape
        k = self.kv_len
        if batch < b or nodes < n or kv_len < k:
            raise ValueError(f"cannot pad a [{b}, {n}] x {k} batch to [{batch}, {nodes}] x {kv_len}")

        def grow(t: torch.Tensor, *shape: int, fill=0) -> torch.Tensor:
            out = t.new_full(shape, fill)
            out[tuple(slice(0, d) for d in t.shape)] = t
            return out

        node = torch.arange(nodes)
        valid = grow(self.valid, batch, nodes, fill=False)
        mask = grow(self.mask, batch, 1, nodes, kv_len, fill=False)
        mask[:, 0, :, 0] |= ~valid  # every padding row sees key 0 (never an empty row)
        return FlatBatch(
            tokens=grow(self.tokens, batch, nodes),
            positions=grow(self.positions, batch, nodes),
            cache_rows=torch.where(valid, grow(self.cache_rows, batch, nodes), node[None, :]),
            valid=valid,
            ancestors=grow(self.ancestors, batch, nodes, nodes, fill=False),
            mask=mask,
            prefix_lens=grow(self.prefix_lens, batch),
            num_nodes=grow(self.num_nodes, batch),
            depths=grow(self.depths, batch, nodes),
        )


def tree_depths_and_ancestors(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth [N] and ancestor mask [N, N] of one tree; ``A[i] = A[parent(i)] | onehot(i)``."""
    n = parents.shape[0]
    if n > 1 and torch.equal(parents, torch.arange(n) - 1):  # a chain: the common case, no loop
        return torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril()
    par = parents.tolist()
    depth = [0] * n
    anc = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        depth[i] = depth[par[i]] + 1
        anc[i] |= anc[par[i]]
    return torch.tensor(depth), anc


@torch.inference_mode()
def pack(
    tokens: Sequence[torch.Tensor],
    depths: Sequence[torch.Tensor],
    prefix_lens: Sequence[int],
    visible: Sequence[torch.Tensor],
    root_positions: Sequence[int] | None = None,
) -> FlatBatch:
    """The general form: per sequence a block of n new tokens after P fully visible rows and E
    earlier rows that are only partly visible (tree nodes fed by an earlier pass).

    tokens[b]: [n]; depths[b]: [n], depth below the tree's root;
    visible[b]: [n, E + n] bool over rows P .. P + E + n - 1 (the earlier rows, then the block);
    root_positions[b]: the root's position (default P: the block starts with the root). A drafter
    feeding the levels of a tree whose root is already cached passes P - 1.
    The block's rows are P + E + i and its positions root_position + depth.
    """
    b = len(tokens)
    sizes = [int(t.shape[0]) for t in tokens]
    extra = [int(v.shape[1]) - n for v, n in zip(visible, sizes)]
    n = max(sizes)
    lens = torch.tensor(list(prefix_lens), dtype=torch.long)
    num = torch.tensor(sizes, dtype=torch.long)
    ext = torch.tensor(extra, dtype=torch.long)

    tok = torch.zeros(b, n, dtype=torch.long)
    dep = torch.zeros(b, n, dtype=torch.long)
    width = max(e + k for e, k in zip(extra, sizes))
    vis = torch.zeros(b, n, width, dtype=torch.bool)
    anc = torch.zeros(b, n, n, dtype=torch.bool)
    for i in range(b):
        k, e = sizes[i], extra[i]
        tok[i, :k] = tokens[i]
        dep[i, :k] = depths[i]
        vis[i, :k, : e + k] = visible[i]
        anc[i, :k, :k] = visible[i][:, e:]

    node = torch.arange(n)
    valid = node[None, :] < num[:, None]  # [B, N]
    base = lens if root_positions is None else torch.tensor(list(root_positions), dtype=torch.long)
    positions = base[:, None] + dep
    cache_rows = lens[:, None] + ext[:, None] + node[None, :]

    kv_len = int((lens + ext + num).max())
    cols = torch.arange(kv_len)
    j = cols[None, :] - lens[:, None]  # [B, K] index into the partly visible region
    in_region = (j >= 0) & (j < (ext + num)[:, None])
    region = vis.gather(2, j.clamp(0, width - 1)[:, None, :].expand(b, n, kv_len))
    mask = (cols[None, None, :] < lens[:, None, None]) | (region & in_region[:, None, :])
    mask = torch.where(valid[:, :, None], mask, cols[None, None, :] == 0)  # padding rows see column 0
    return FlatBatch(
        tokens=tok,
        positions=positions,
        cache_rows=cache_rows,
        valid=valid,
        ancestors=anc,
        mask=mask[:, None],
        prefix_lens=lens,
        num_nodes=num,
        depths=dep,
    )


@torch.inference_mode()
def flatten_chains(runs: Sequence[Sequence[int]], prefix_lens: Sequence[int]) -> FlatBatch:
    """``flatten`` for token runs, each node the child of the one before (decode and catch-up
    passes, chain verification): the same tensors, built without a loop over nodes.

    Row i of a run after L cached rows sits at position and cache row L + i and sees keys
    [0, L + i]; padding rows sit at L, write to L + i and see key 0 only.
    """
    sizes = [len(r) for r in runs]
    n = max(sizes)
    lens = torch.tensor(list(prefix_lens), dtype=torch.long)
    num = torch.tensor(sizes, dtype=torch.long)
    tok = torch.tensor([list(r) + [0] * (n - len(r)) for r in runs], dtype=torch.long)  # [B, N]
    node = torch.arange(n)
    valid = node[None, :] < num[:, None]  # [B, N]
    dep = node[None, :] * valid
    cols = torch.arange(int((lens + num).max()))
    mask = cols[None, None, :] < (lens + 1)[:, None, None] + node[None, :, None]  # [B, N, K]
    mask = torch.where(valid[:, :, None], mask, cols[None, None, :] == 0)
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    return FlatBatch(
        tokens=tok,
        positions=lens[:, None] + dep,
        cache_rows=lens[:, None] + node[None, :],
        valid=valid,
        ancestors=tril[None] & valid[:, :, None] & valid[:, None, :],
        mask=mask[:, None],
        prefix_lens=lens,
        num_nodes=num,
        depths=dep,
    )


@torch.inference_mode()
def flatten(trees: Sequence[DraftTree], prefix_lens: Sequence[int]) -> FlatBatch:
    """Pure function: trees + cached prefix lengths -> the tensors of one batched forward (on CPU).

    Built in inference mode, as every pass runs (a compiled pass is specialised on it)."""
    if len(trees) != len(prefix_lens) or not trees:
        raise ValueError("flatten needs one prefix length per tree and at least one tree")
    if all(t.is_chain for t in trees):
        return flatten_chains([t.tokens.tolist() for t in trees], prefix_lens)
    shapes = [tree_depths_and_ancestors(t.parents) for t in trees]
    return pack([t.tokens for t in trees], [d for d, _ in shapes], prefix_lens, [a for _, a in shapes])
