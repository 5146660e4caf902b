"""Passes whose shapes repeat: compiled on the CPU, captured as CUDA graphs on a GPU.

A pass is a pure function of tensors (``PassFunction``): tokens, positions, where each new
token's KV goes, which slots are read and the mask -> hidden states, with the slot cache's
storage written in place. Nothing in it reads a tensor's value on the host or branches on data
(tests/test_fast_pass.py traces it with ``torch.compile(fullgraph=True)``: no graph break), so

- on the CPU (``--compile``) ``torch.compile`` turns it into a few fused kernels around the
  matrix products; one graph per shape class (one batch row or more, one token per row or more)
  serves every batch size, tokens per row and rows read, which are left dynamic;
- on CUDA (``--cuda-graphs``) each bucket of shapes is captured once as a CUDA graph and replayed:
  batch rows, tokens per row and rows read are rounded up to buckets, and padding rows write to
  the scratch slot and see one key, so the padded pass computes the real rows exactly.

Large passes (prefill chunks) stay eager: they are rare and their per-op overhead is amortised.
Which is faster is measured, not assumed: ``--compile auto`` compiles in the background and
switches a shape class over only once it has timed faster than the eager pass.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from typing import Callable

import torch

from hedgerow.server.engine.kv_cache import SlotKVCache
from hedgerow.server.models.attention import Backend, ForwardPlan, TreeKernelPlan
from hedgerow.verify.flatten import FlatBatch

log = logging.getLogger("hedgerow.fast_pass")

MAX_NODES = 64  # tokens per row beyond which a pass stays eager (prefill chunks)
NODE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_KV_BUCKET = 128
# graphs dynamo keeps per code object: every runner's pass is the same code (PassFunction.__call__),
# 4 shape classes per runner, so the default 8 leaves no room for a second look at any of them
RECOMPILE_LIMIT = 64


class SlotAttention:
    """The ``attend(layer, q, k, v)`` of one pass: write k, v to the slots, attend as planned."""

    def __init__(self, cache: SlotKVCache, plan: ForwardPlan, backend: Backend):
        self.cache, self.plan, self.backend = cache, plan, backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
        """q [B, N, Hq, D], k/v [B, N, Hkv, D] -> [B, N, Hq, D]."""
        self.cache.write(layer, k, v, self.plan)
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        return self.backend(q, self.cache.keys[layer], self.cache.values[layer], self.plan, scale)


class PassFunction:
    """One forward pass as a function of tensors only."""

    def __init__(self, model, cache: SlotKVCache, backend: Backend):
        self.model, self.cache, self.backend = model, cache, backend

    def __call__(self, tokens, positions, write_slots, write_rows, read_slots, mask, tree=None) -> torch.Tensor:
        """tokens/positions/write_slots/write_rows [B, N], read_slots [B], mask [B, 1, N, K],
        tree: the kernel's (prefix_lens, num_nodes, tree_bits) or None -> hidden [B, N, hidden]."""
        plan = ForwardPlan(write_slots, write_rows, read_slots, mask, tree=TreeKernelPlan(*tree) if tree else None)
        return self.model.forward(tokens, positions, SlotAttention(self.cache, plan, self.backend))


def plan_args(plan: ForwardPlan, tokens: torch.Tensor, positions: torch.Tensor) -> tuple:
    tree = (plan.tree.prefix_lens, plan.tree.num_nodes, plan.tree.tree_bits) if plan.tree is not None else None
    return tokens, positions, plan.write_slots, plan.write_rows, plan.read_slots, plan.mask, tree


def bucket(n: int, buckets) -> int:
    return next(b for b in buckets if b >= n)


def kv_bucket(n: int, max_len: int) -> int:
    """Rows read, rounded up to a power of two (at least MIN_KV_BUCKET, at most the slot length)."""
    b = MIN_KV_BUCKET
    while b < n:
        b *= 2
    return min(b, max_len)


class CompiledPasses:
    """CPU: ``torch.compile(fullgraph=True, dynamic=True)`` of the pass function, per shape class
    (one batch row or more, one token per row or more) switched on once compiled (and, with
    ``measure``, once it timed faster than eager)."""

    def __init__(self, fn: PassFunction, name: str, backend: str = "inductor"):
        self.fn = fn
        self.name = name
        allow_recompiles()
        self.compiled = torch.compile(fn, fullgraph=True, backend=backend)
        self.enabled: set[tuple[bool, bool]] = set()
        self.report: dict[tuple[bool, bool], dict] = {}

    @staticmethod
    def shape_class(batch: int, nodes: int) -> tuple[bool, bool]:
        return batch == 1, nodes == 1

    def accepts(self, batch: int, nodes: int) -> bool:
        return nodes <= MAX_NODES and self.shape_class(batch, nodes) in self.enabled

    def prepare(self, examples: dict, measure: bool) -> None:
        """Compile each shape class on its example arguments (a pass in the scratch slot), time it
        against eager when ``measure``, switch it on if it may be used."""
        for cls, args in examples.items():
            _mark_dynamic(args, *cls)
            entry = compile_class(self._label(cls), self.compiled, self.fn, args, measure)
            if entry is not None:
                self.report[cls] = entry
                if entry["used"]:
                    self.enabled.add(cls)

    def __call__(self, *args) -> torch.Tensor:
        # a shape or input the compiled graphs do not cover and cannot be recompiled for: this pass
        # and its shape class run eagerly from now on, never failing a request (a pass writes only
        # its own KV rows, so running it again is safe)
        cls = self.shape_class(*args[0].shape)
        return call_compiled(self._label(cls), self.compiled, self.fn, args, lambda: self.enabled.discard(cls))

    def _label(self, cls: tuple[bool, bool]) -> str:
        return f"{self.name} pass, batch {'1' if cls[0] else '>1'}, tokens {'1' if cls[1] else '>1'}"


def allow_recompiles() -> None:
    """Raise dynamo's recompile limit to RECOMPILE_LIMIT in the calling thread: dynamo's settings
    are per thread, and ``--compile auto`` compiles in another thread than the one that runs passes."""
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT


def compile_class(label: str, compiled: Callable, eager: Callable, args: tuple, measure: bool) -> dict | None:
    """Compile ``compiled`` on example ``args`` (in inference mode, as every pass runs), time it
    against ``eager`` when ``measure``: the class's report entry, whose ``used`` says whether to
    switch it on; None (logged) when compiling failed and the class stays eager."""
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            compiled(*args)
    except Exception:
        log.exception("%s: compiling failed; it stays eager", label)
        return None
    entry = {"compile_seconds": round(time.perf_counter() - t0, 2)}
    if measure:
        with torch.inference_mode():
            entry["eager_ms"] = median_ms(lambda: eager(*args))
            entry["compiled_ms"] = median_ms(lambda: compiled(*args))
        entry["used"] = entry["compiled_ms"] < entry["eager_ms"]
    else:
        entry["used"] = True
    log.info("%s: %s", label, entry)
    return entry


def call_compiled(label: str, compiled: Callable, eager: Callable, args: tuple, disable: Callable[[], None]):
    """``compiled(*args)``; where dynamo fails it (a guard it cannot recompile for, its recompile
    limit), ``disable()`` switches the class off and the call runs eagerly."""
    allow_recompiles()
    try:
        return compiled(*args)
    except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit):
        disable()
        log.warning("%s: the compiled call failed; eager from now on", label, exc_info=True)
        return eager(*args)


def _mark_dynamic(args: tuple, one_row: bool, one_token: bool) -> None:
    """The sizes a shape class leaves free: rows read always, batch rows and tokens per row where
    the class has more than one. Model sizes (heads, widths) stay static."""
    tokens, positions, write_slots, write_rows, read_slots, mask, tree = args
    torch._dynamo.mark_dynamic(mask, 3)
    if not one_row:
        for t in (tokens, positions, write_slots, write_rows, read_slots, mask, *(tree or ())):
            torch._dynamo.mark_dynamic(t, 0)
    if not one_token:
        for t in (tokens, positions, write_slots, write_rows):
            torch._dynamo.mark_dynamic(t, 1)
        torch._dynamo.mark_dynamic(mask, 2)


def median_ms(fn: Callable[[], object], runs: int = 15) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: tuple, out: torch.Tensor):
        self.graph, self.inputs, self.out = graph, inputs, out


class CudaGraphPasses:
    """CUDA: one captured graph per bucket (batch rows, tokens per row, rows read, kernel or not),
    captured at its first use and replayed after. The graphs share one memory pool."""

    def __init__(self, fn: PassFunction, cache: SlotKVCache, max_batch: int, name: str):
        self.fn, self.cache, self.name = fn, cache, name
        self.batch_buckets = tuple(sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)}))
        self.graphs: dict[tuple, _Captured] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def accepts(self, batch: int, nodes: int) -> bool:
        return nodes <= MAX_NODES and batch <= self.batch_buckets[-1]

    def shape(self, flat: FlatBatch) -> tuple[int, int, int]:
        b, n = flat.tokens.shape
        return bucket(b, self.batch_buckets), bucket(n, NODE_BUCKETS), kv_bucket(flat.kv_len, self.cache.max_len)

    def __call__(self, key: tuple, args: tuple, batch: int, nodes: int) -> torch.Tensor:
        captured = self.graphs.get(key)
        if captured is None:
            captured = self.graphs[key] = self._capture(args)
        for static, value in zip(_flat(captured.inputs), _flat(args)):
            static.copy_(value, non_blocking=True)
        captured.graph.replay()
        return captured.out[:batch, :nodes].clone()

    def _capture(self, args: tuple) -> _Captured:
        # the example's KV writes go to the scratch slot: capture runs the pass three times
        inputs = tuple(a.clone() if isinstance(a, torch.Tensor) else _clone(a) for a in args)
        inputs[2].fill_(self.cache.scratch_slot)
        inputs[4].fill_(self.cache.scratch_slot)
        side = torch.cuda.Stream(inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up: lazy initialisation, allocator
                self.fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(*inputs)
        log.info("%s: captured a CUDA graph for batch %d x %d tokens x %d rows", self.name,
                 *inputs[0].shape, inputs[5].shape[-1])
        return _Captured(graph, inputs, out)


def _clone(a):
    return None if a is None else tuple(t.clone() for t in a)


def _flat(args: tuple) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif a is not None:
            out.extend(a)
    return out


_BACKGROUND: list[threading.Thread] = []


def start_background(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    _BACKGROUND.append(thread)
    return thread


def compiling() -> bool:
    """Whether a background compile (``--compile auto``) is still running in this process."""
    return any(t.is_alive() for t in _BACKGROUND)
