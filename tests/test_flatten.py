"""verify.flatten against a brute-force builder that walks each node's path to the root."""

import random

import pytest
import torch

from hedgerow.verify.flatten import flatten, tree_depths_and_ancestors
from hedgerow.verify.tree import DraftTree

pytestmark = pytest.mark.unit


def random_parents(n: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def path_to_root(parents: list[int], i: int) -> list[int]:
    path = [i]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path


def test_worked_example_from_the_docstring():
    flat = flatten([DraftTree(torch.tensor([10, 11, 12, 13]), torch.tensor([-1, 0, 0, 1]))], [5])
    assert flat.positions.tolist() == [[5, 6, 6, 7]]
    assert flat.cache_rows.tolist() == [[5, 6, 7, 8]]
    assert flat.ancestors[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


def test_flatten_matches_brute_force_on_random_batches():
    rng = random.Random(0)
    for _ in range(30):
        b = rng.randint(1, 4)
        trees, lens = [], []
        for _ in range(b):
            n = rng.randint(1, 12)
            parents = random_parents(n, rng)
            trees.append(DraftTree(torch.tensor([rng.randrange(100) for _ in range(n)]), torch.tensor(parents)))
            lens.append(rng.randint(0, 9))
        flat = flatten(trees, lens)
        kv = max(l + t.tokens.shape[0] for l, t in zip(lens, trees))
        assert flat.mask.shape[-1] == kv
        for bi, (tree, L) in enumerate(zip(trees, lens)):
            parents = tree.parents.tolist()
            n = len(parents)
            for i in range(flat.tokens.shape[1]):
                row = flat.mask[bi, 0, i]
                if i >= n:  # padding attends column 0 only
                    assert not flat.valid[bi, i] and row.tolist() == [c == 0 for c in range(kv)]
                    continue
                path = path_to_root(parents, i)
                want = [c < L or (c - L) in path for c in range(kv)]
                assert row.tolist() == want
                assert flat.positions[bi, i] == L + len(path) - 1
                assert flat.cache_rows[bi, i] == L + i
                assert flat.tokens[bi, i] == tree.tokens[i]


def test_chain_fast_path_equals_general_construction():
    parents = torch.arange(7) - 1
    depth, anc = tree_depths_and_ancestors(parents)
    assert depth.tolist() == list(range(7))
    assert torch.equal(anc, torch.ones(7, 7, dtype=torch.bool).tril())


def test_chains_flatten_as_the_general_trees_do():
    import random

    from hedgerow.verify.flatten import flatten_chains, pack

    rng = random.Random(0)
    for _ in range(50):
        runs = [[rng.randrange(100) for _ in range(rng.randint(1, 6))] for _ in range(rng.randint(1, 4))]
        lens = [rng.randint(0, 9) for _ in runs]
        fast = flatten_chains(runs, lens)
        shapes = [tree_depths_and_ancestors(torch.arange(len(r)) - 1) for r in runs]
        general = pack([torch.tensor(r) for r in runs], [d for d, _ in shapes], lens, [a for _, a in shapes])
        for name, value in vars(general).items():
            assert torch.equal(getattr(fast, name), value), name
