"""CUDA tree attention and KV compaction, compiled at run time by NVRTC through cuda-python.

The kernels live in ``cuda/tree_attention.cu`` and ``cuda/kv_compact.cu``, installed as package data
of ``hedgerow.cuda`` (no ``__init__.py``: only data lives there). They are compiled
to cubin for the GPU's architecture, cached in-process and on disk, loaded with ``cuda.core`` and
launched on torch's current stream. Importing this module needs neither cuda-python nor a GPU;
the functions that do need them raise :class:`CudaKernelsUnavailable` with the fix.

Glossary
--------
B batch · Hq query heads · Hkv kv heads (Hq % Hkv == 0; q head h reads kv head h // (Hq // Hkv))
· D head dim (64 or 128) · Nmax padded tree size · L_b cached prefix rows of sequence b ·
N_b tree nodes of sequence b · slot: the cache index a sequence owns.

KV cache layout (fixed): per layer ``k_cache``, ``v_cache`` of shape ``[num_slots, Hkv, max_len, D]``,
contiguous, fp16 / bf16 / fp32. Sequence b's prefix is rows ``0..L_b-1`` of slot ``slots[b]`` and
its tree nodes' keys/values are already in rows ``L_b..L_b+N_b-1`` when attention runs.

Tree mask: ``tree_mask_bits[b, i, j // 32]`` bit ``j % 32`` set <=> node i sees tree node j
(j an ancestor of i, or i itself); int32 (or uint32) ``[B, Nmax, ceil(Nmax / 32)]``; see
:func:`pack_tree_mask`. The prefix is visible to every node.

Main entry points: :func:`tree_attention` (and its PyTorch reference
:func:`tree_attention_reference`), :func:`kv_compact`, :func:`pack_tree_mask`,
:func:`compile_kernels`, :func:`is_available`, :func:`load`.

CUDA graphs: both launches do no host synchronisation and allocate only through torch's caching
allocator, so they can be captured. Call :func:`load` (or run each function once) before capture:
compiling, module loading and the first upload of a :func:`kv_compact` pointer table cannot
happen inside a capture. Pass index tensors as int32 on the GPU (other dtypes are converted by a
small device kernel; CPU tensors would need a host-to-device copy).

Validation status: the kernels are compile-checked through NVRTC for sm_80/sm_90 and their logic
runs on the CPU through a host emulation (tests/test_cuda_kernels.py); the GPU tests in that file
compare against :func:`tree_attention_reference` wherever CUDA is present.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "CudaKernelsUnavailable",
    "KERNEL_NAMES",
    "compile_kernels",
    "is_available",
    "kv_compact",
    "load",
    "pack_tree_mask",
    "plan_prefix_splits",
    "tree_attention",
    "tree_attention_reference",
    "unpack_tree_mask",
]



def _source_dir() -> Path:
    """The .cu sources: ``hedgerow.cuda``, package data of the installed wheel (the repository's
    cuda/ folder in an editable install); HEDGEROW_CUDA_SRC overrides."""
    if os.environ.get("HEDGEROW_CUDA_SRC"):
        return Path(os.environ["HEDGEROW_CUDA_SRC"])
    spec = importlib.util.find_spec("hedgerow.cuda")
    return Path(next(iter(spec.submodule_search_locations)))


CUDA_SRC_DIR = _source_dir()
SOURCES = {"tree_attention": "tree_attention.cu", "kv_compact": "kv_compact.cu"}

_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
HEAD_DIMS = (64, 128)
KERNEL_NAMES: dict[str, tuple[str, ...]] = {
    "tree_attention": tuple(
        f"hedgerow_tree_attn_{part}_{t}_d{d}"
        for t in _DTYPE_NAMES.values()
        for d in HEAD_DIMS
        for part in ("partial", "merge")
    ),
    "kv_compact": ("hedgerow_kv_compact",),
}

# Launch geometry shared with the .cu sources (hedgerow_tree_attn::kThreads / kRowsPerBlock,
# hedgerow_kv::kThreads / kUnits).
_ATTN_THREADS = 128
_ATTN_ROWS_PER_BLOCK = 16
_ATTN_WARPS = _ATTN_THREADS // 32
_KEY_TILE = 32
_COMPACT_THREADS = 256
_COMPACT_UNITS = 1024
_LOG2E = 1.4426950408889634

# A launcher runs one kernel: (module, kernel name, grid (x, y, z), block threads, arguments).
# Arguments are Python ints for pointers and numpy scalars (np.int32 / np.int64 / np.float32) for
# values, as cuda.core expects. The tests pass a CPU-emulation launcher instead of the CUDA one.
Launcher = Callable[[str, str, tuple, int, Sequence[Any]], None]

_INSTALL_HINT = 'pip install cuda-python "cuda-toolkit[nvrtc]==13.*"'


class CudaKernelsUnavailable(RuntimeError):
    """cuda-python / NVRTC or a CUDA device is missing."""


def _core():
    """cuda.core, imported on first use (older releases kept the API under .experimental)."""
    try:
        import cuda.core as core

        core.Program  # noqa: B018  (an empty `cuda` namespace imports without it)
        return core
    except (ImportError, AttributeError):
        pass
    try:
        import cuda.core.experimental as core

        return core
    except ImportError as e:
        raise CudaKernelsUnavailable(
            f"cuda-python is not installed; the CUDA kernels need it: {_INSTALL_HINT}"
        ) from e


def _nvrtc_version() -> str:
    try:
        from cuda.bindings import nvrtc
    except ImportError:
        return "unknown"
    try:
        err, major, minor = nvrtc.nvrtcVersion()
        return f"{major}.{minor}" if int(err) == 0 else "unknown"
    except Exception:  # NVRTC library missing: the compile itself will say so
        return "unknown"


def _cuda_python_ok() -> bool:
    try:
        _core()
        return True
    except CudaKernelsUnavailable:
        return False


def is_available() -> bool:
    """True when torch sees a CUDA device and cuda-python is importable."""
    return torch.cuda.is_available() and _cuda_python_ok()


# ---------------------------------------------------------------------------------------------
# Compilation and loading
# ---------------------------------------------------------------------------------------------

_compiled: dict[str, dict[str, bytes]] = {}
_compile_lock = threading.Lock()


def _normalise_arch(arch: str) -> str:
    a = str(arch).strip().lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
    if not a[:2].isdigit():
        raise ValueError(f"architecture {arch!r}: expected e.g. 'sm_90', '90' or '9.0'")
    return f"sm_{a}"


def _cache_dir() -> Path:
    env = os.environ.get("HEDGEROW_KERNEL_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hedgerow" / "kernels"


def _compile_one(core, module: str, source: str, arch: str) -> bytes:
    options = dict(arch=arch, std="c++17", name=module)
    key_text = "\0".join(
        [source, repr(sorted(options.items())), _nvrtc_version(), getattr(core, "__version__", "?")]
    )
    digest = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    path = _cache_dir() / arch / f"{module}-{digest}.cubin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    try:
        program = core.Program(source, code_type="c++", options=core.ProgramOptions(**options))
        cubin = bytes(program.compile("cubin").code)
    except Exception as e:  # NVRTC missing, or a compile error (the message holds the log)
        raise CudaKernelsUnavailable(
            f"NVRTC could not compile {SOURCES[module]} for {arch}: {e}\n"
            f"(NVRTC comes with: {_INSTALL_HINT})"
        ) from e
    try:  # best effort: a read-only home only costs a recompile next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)
    except OSError:
        pass
    return cubin


def _read_source(name: str) -> str:
    try:
        return (CUDA_SRC_DIR / name).read_text()
    except OSError as e:
        raise CudaKernelsUnavailable(
            f"kernel source {name} not found in {CUDA_SRC_DIR} (a broken install?); set "
            "HEDGEROW_CUDA_SRC to a folder holding the cuda/*.cu sources"
        ) from e


def compile_kernels(arch: str) -> dict[str, bytes]:
    """Cubins of every kernel module for ``arch`` ('sm_90', '90', '9.0'), keyed by module name.

    Needs cuda-python's NVRTC, no GPU. Cached in-process and on disk under
    ``$HEDGEROW_KERNEL_CACHE`` (default ``~/.cache/hedgerow/kernels``)/<arch>/<module>-<hash>.cubin,
    the hash covering the source, the options and the NVRTC version.
    """
    arch = _normalise_arch(arch)
    with _compile_lock:
        if arch not in _compiled:
            core = _core()
            _compiled[arch] = {
                module: _compile_one(core, module, _read_source(name), arch)
                for module, name in SOURCES.items()
            }
        return dict(_compiled[arch])


class _CudaLauncher:
    """Kernels of one device, launched on torch's current stream of that device.

    torch's runtime and cuda.core both use the device's primary context. Launches run under
    torch's device guard (so another current device in the calling thread is fine) and make the
    primary context current once per thread (an engine thread may not have touched CUDA yet).
    """

    def __init__(self, index: int):
        core = _core()
        self._core = core
        self.index = index
        self._thread = threading.local()
        major, minor = torch.cuda.get_device_capability(index)
        cubins = compile_kernels(f"sm_{major}{minor}")
        with torch.cuda.device(index):
            self._ensure_context()
            self.kernels = {}
            for module, cubin in cubins.items():
                obj = core.ObjectCode.from_cubin(cubin, name=module)
                for name in KERNEL_NAMES[module]:
                    self.kernels[name] = obj.get_kernel(name)
        self._stream_direct = True  # cuda.core takes objects with __cuda_stream__ (torch streams)

    def _ensure_context(self) -> None:
        if not getattr(self._thread, "ready", False):
            self._core.Device(self.index).set_current()
            self._thread.ready = True

    def __call__(self, module: str, name: str, grid: tuple, block: int, args: Sequence[Any]) -> None:
        if torch.cuda.current_device() != self.index:
            with torch.cuda.device(self.index):
                return self(module, name, grid, block, args)
        self._ensure_context()
        config = self._core.LaunchConfig(grid=grid, block=block)
        stream = torch.cuda.current_stream(self.index)
        if self._stream_direct:
            try:
                self._core.launch(stream, config, self.kernels[name], *args)
                return
            except TypeError:  # an older cuda.core that wants its own Stream object
                self._stream_direct = False
        self._core.launch(
            self._core.Stream.from_handle(stream.cuda_stream), config, self.kernels[name], *args
        )


_launchers: dict[int, _CudaLauncher] = {}
_launcher_lock = threading.Lock()


def load(device: torch.device | str | int | None = None) -> None:
    """Compile (or read from cache) and load the kernels for ``device``; do this before capturing
    a CUDA graph. Raises CudaKernelsUnavailable without CUDA or cuda-python."""
    if device is None or isinstance(device, int):
        device = torch.device("cuda", torch.cuda.current_device() if device is None else device)
    _launcher_for(torch.device(device))


def _launcher_for(device: torch.device) -> _CudaLauncher:
    if device.type != "cuda":
        raise CudaKernelsUnavailable(f"the CUDA kernels need CUDA tensors, got device {device}")
    if not torch.cuda.is_available():
        raise CudaKernelsUnavailable("torch sees no CUDA device")
    index = device.index if device.index is not None else torch.cuda.current_device()
    launcher = _launchers.get(index)
    if launcher is None:
        with _launcher_lock:
            launcher = _launchers.get(index)
            if launcher is None:
                launcher = _launchers[index] = _CudaLauncher(index)
    return launcher


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------
# Tree mask packing
# ---------------------------------------------------------------------------------------------

def pack_tree_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool ``[B, N, N]`` ancestor mask -> int32 ``[B, N, ceil(N/32)]``; bit j%32 of word j//32.

    Runs on the mask's device without a host sync. Example: node 2 with parent 0 has row
    ``[1, 0, 1]``, packed as word ``0b101 = 5``.
    """
    if mask.dim() != 3 or mask.shape[1] != mask.shape[2]:
        raise ValueError(f"tree mask must be [B, N, N], got {tuple(mask.shape)}")
    b, n, _ = mask.shape
    words = max(1, -(-n // 32))
    padded = torch.zeros((b, n, words * 32), dtype=torch.int64, device=mask.device)
    padded[..., :n] = mask.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=mask.device),
        torch.arange(32, dtype=torch.int64, device=mask.device),
    )
    packed = (padded.view(b, n, words, 32) * weights).sum(-1)  # [B, N, W], 0 .. 2**32-1
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_tree_mask(bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_tree_mask`: int32/uint32 ``[B, N, W]`` -> bool ``[B, N, n]``."""
    words = bits.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64, device=bits.device)
    flat = ((words.unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [B, N, W*32]
    return flat[..., :n].bool()


# ---------------------------------------------------------------------------------------------
# Tree attention
# ---------------------------------------------------------------------------------------------

def plan_prefix_splits(
    max_prefix: int, base_blocks: int, num_sms: int, min_chunk: int = 256
) -> tuple[int, int]:
    """(chunk, num_prefix_splits) for the split-K prefix part.

    ``base_blocks`` blocks exist per split (row tiles x B x Hkv); aim for about two blocks per
    SM but never fewer than ``min_chunk`` keys per split. Depends only on host-known bounds, so
    the plan, the grid and the workspace are fixed for a CUDA-graph bucket. The kernel's last
    split runs to the true prefix length, so a too-small ``max_prefix`` is still correct.
    """
    if max_prefix <= 0:
        return _KEY_TILE, 1
    want = max(1, -(-2 * num_sms // max(1, base_blocks)))
    chunk = max(min_chunk, -(-max_prefix // want))
    chunk = -(-chunk // _KEY_TILE) * _KEY_TILE
    return chunk, -(-max_prefix // chunk)


def _as_index(t: torch.Tensor, device: torch.device, name: str, shape: tuple) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.int32).contiguous()


def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        (s * size) % 16 == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1
    )


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    scale: float | None = None,
    *,
    max_prefix_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of every tree node over its sequence's prefix and its tree ancestors (CUDA).

    q ``[B, Hq, Nmax, D]`` (any strides, unit stride on D), caches ``[slots, Hkv, max_len, D]``,
    ``slots``/``prefix_lens``/``num_nodes`` ``[B]`` (int32 on the GPU preferred),
    ``tree_mask_bits`` ``[B, Nmax, ceil(Nmax/32)]`` int32. Returns ``[B, Nmax, Hq, D]`` in q's
    dtype (fp32 accumulation); padding rows (node >= N_b) are zeros. ``scale`` defaults to
    1/sqrt(D). ``max_prefix_len`` is a host-side upper bound on the prefix lengths used to split
    the prefix across blocks (default: max_len, correct but coarse; pass the bucket's bound).
    ``out`` may be given (contiguous, right shape and dtype), e.g. for CUDA graphs.
    """
    return _tree_attention(
        _launcher_for(q.device), q, k_cache, v_cache, slots, prefix_lens, num_nodes,
        tree_mask_bits, scale, max_prefix_len=max_prefix_len, out=out, num_sms=_num_sms(q.device),
    )


def _tree_attention(
    launch: Launcher,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    scale: float | None = None,
    *,
    max_prefix_len: int | None = None,
    out: torch.Tensor | None = None,
    num_sms: int = 132,
    min_chunk: int = 256,
    poison_workspace: bool = False,
) -> torch.Tensor:
    """tree_attention with an explicit launcher (the tests use a CPU emulation of the kernels)."""
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError("q must be [B, Hq, Nmax, D] and k_cache [num_slots, Hkv, max_len, D]")
    batch, hq, n_max, d = q.shape
    num_slots, hkv, max_len, dk = k_cache.shape
    if q.dtype not in _DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {q.dtype}; use one of {list(_DTYPE_NAMES)}")
    if d not in HEAD_DIMS:
        raise ValueError(f"head dim {d} unsupported; compiled for {HEAD_DIMS}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes differ: {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if dk != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}, {tuple(v_cache.shape)} do not fit q {tuple(q.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and _aligned(k_cache) and _aligned(v_cache)):
        raise ValueError("k_cache and v_cache must be contiguous and 16-byte aligned")
    if not (k_cache.device == v_cache.device == q.device):
        raise ValueError("q and the caches must be on one device")
    words = max(1, -(-n_max // 32))
    if tree_mask_bits.shape != (batch, n_max, words) or tree_mask_bits.dtype not in (torch.int32, torch.uint32):
        raise ValueError(
            f"tree_mask_bits must be int32 [B, Nmax, ceil(Nmax/32)] = {(batch, n_max, words)}, "
            f"got {tree_mask_bits.dtype} {tuple(tree_mask_bits.shape)} (see pack_tree_mask)"
        )
    device = q.device
    if out is None:
        out = torch.empty((batch, n_max, hq, d), dtype=q.dtype, device=device)
    elif out.shape != (batch, n_max, hq, d) or out.dtype != q.dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {(batch, n_max, hq, d)} on {device}")
    if batch == 0 or n_max == 0 or hq == 0:
        return out
    if q.stride(-1) != 1 or not _aligned(q):
        q = q.contiguous()
    slots_i = _as_index(slots, device, "slots", (batch,))
    prefix_i = _as_index(prefix_lens, device, "prefix_lens", (batch,))
    nodes_i = _as_index(num_nodes, device, "num_nodes", (batch,))
    bits = tree_mask_bits.to(device).contiguous()

    group = hq // hkv
    row_tiles = -(-group * n_max // _ATTN_ROWS_PER_BLOCK)
    bound = max_len if max_prefix_len is None else min(int(max_prefix_len), max_len)
    chunk, n_prefix = plan_prefix_splits(bound, row_tiles * batch * hkv, num_sms, min_chunk)
    s_tot = n_prefix + 1
    if batch * hkv > 65535 or s_tot > 65535:
        raise ValueError("batch * kv heads and the split count must fit a grid dimension (65535)")
    o_part = torch.empty((batch, hq, n_max, s_tot, d), dtype=torch.float32, device=device)
    lse_part = torch.empty((batch, hq, n_max, s_tot), dtype=torch.float32, device=device)
    if poison_workspace:  # tests: the merge must never read a partial that no block wrote
        o_part.fill_(float("nan"))
        lse_part.fill_(float("nan"))
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)

    i32, i64 = np.int32, np.int64
    tname = _DTYPE_NAMES[q.dtype]
    launch(
        "tree_attention",
        f"hedgerow_tree_attn_partial_{tname}_d{d}",
        (row_tiles, s_tot, batch * hkv),
        _ATTN_THREADS,
        [
            q.data_ptr(), i64(q.stride(0)), i64(q.stride(1)), i64(q.stride(2)),
            k_cache.data_ptr(), v_cache.data_ptr(),
            slots_i.data_ptr(), prefix_i.data_ptr(), nodes_i.data_ptr(), bits.data_ptr(),
            o_part.data_ptr(), lse_part.data_ptr(),
            i32(num_slots), i32(hq), i32(hkv), i32(max_len), i32(n_max), i32(words),
            i32(chunk), i32(n_prefix), np.float32(scale * _LOG2E),
        ],
    )
    launch(
        "tree_attention",
        f"hedgerow_tree_attn_merge_{tname}_d{d}",
        (-(-n_max * hq // _ATTN_WARPS), batch, 1),
        _ATTN_THREADS,
        [
            o_part.data_ptr(), lse_part.data_ptr(), out.data_ptr(),
            slots_i.data_ptr(), prefix_i.data_ptr(), nodes_i.data_ptr(),
            i32(num_slots), i32(hq), i32(max_len), i32(n_max), i32(chunk), i32(n_prefix),
        ],
    )
    return out


def tree_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    prefix_lens: torch.Tensor,
    num_nodes: torch.Tensor,
    tree_mask_bits: torch.Tensor,
    scale: float | None = None,
    *,
    compute_dtype: torch.dtype = torch.float32,
    **_ignored: Any,
) -> torch.Tensor:
    """PyTorch reference of :func:`tree_attention` (same arguments, any device; syncs).

    Per sequence: gather the slot's rows 0..L+N-1, build the dense ``[N, L+N]`` bool mask
    (prefix columns all visible, tree columns from the bitmask) and run SDPA in
    ``compute_dtype``. Padding rows, and rows that see no key at all, are zeros (as in the kernel).
    """
    batch, hq, n_max, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    mask = unpack_tree_mask(tree_mask_bits, n_max)  # [B, Nmax, Nmax]
    out = torch.zeros((batch, n_max, hq, d), dtype=q.dtype, device=q.device)
    for b, (slot, plen, n) in enumerate(zip(slots.tolist(), prefix_lens.tolist(), num_nodes.tolist())):
        if n <= 0:
            continue
        if not (0 <= slot < k_cache.shape[0] and n <= n_max and 0 <= plen and plen + n <= k_cache.shape[2]):
            raise ValueError(f"sequence {b}: slot {slot}, prefix {plen}, nodes {n} do not fit the cache")
        keys = k_cache[slot, :, : plen + n].to(compute_dtype).repeat_interleave(group, 0)  # [Hq, L+N, D]
        vals = v_cache[slot, :, : plen + n].to(compute_dtype).repeat_interleave(group, 0)
        visible = torch.ones((n, plen + n), dtype=torch.bool, device=q.device)
        visible[:, plen:] = mask[b, :n, :n]
        o = F.scaled_dot_product_attention(
            q[b, :, :n].to(compute_dtype), keys, vals, attn_mask=visible, scale=scale
        )  # [Hq, N, D]
        o = torch.where(visible.any(-1)[None, :, None], o, torch.zeros((), dtype=o.dtype, device=o.device))
        out[b, :n] = o.transpose(0, 1).to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# KV compaction
# ---------------------------------------------------------------------------------------------

_pointer_tables: dict[tuple, torch.Tensor] = {}
_POINTER_TABLES_KEPT = 16


def _pointer_table(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Device int64 tensor of the tensors' base addresses, built once per set of tensors."""
    device = tensors[0].device
    key = (str(device), tuple(t.data_ptr() for t in tensors))
    table = _pointer_tables.get(key)
    if table is None:
        if len(_pointer_tables) >= _POINTER_TABLES_KEPT:
            _pointer_tables.pop(next(iter(_pointer_tables)))
        table = torch.tensor(list(key[1]), dtype=torch.int64, device=device)
        _pointer_tables[key] = table
    return table


def kv_compact(
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    src_rows: torch.Tensor,
    dst_start: torch.Tensor,
    counts: torch.Tensor,
) -> None:
    """Keep accepted rows, in order, in every layer at once (one launch), in place.

    For sequence b and every layer/kv head: rows ``src_rows[b, j]`` -> ``dst_start[b] + j`` for
    ``j < counts[b]`` in slot ``slots[b]``. ``src_rows`` is int32 ``[B, C]`` of absolute rows
    (typically ``L_b + accepted node index``), strictly increasing with
    ``src_rows[b, j] >= dst_start[b] + j``: then overlapping ranges are safe (see
    cuda/kv_compact.cu). All caches share one shape ``[num_slots, Hkv, max_len, D]`` and dtype.
    The kernel gets a device table of the caches' base addresses, built on first use and cached.
    """
    tensors = list(k_caches) + list(v_caches)
    if tensors:
        launch = _launcher_for(tensors[0].device)
        _kv_compact(launch, k_caches, v_caches, slots, src_rows, dst_start, counts)


def _kv_compact(
    launch: Launcher,
    k_caches: Sequence[torch.Tensor],
    v_caches: Sequence[torch.Tensor],
    slots: torch.Tensor,
    src_rows: torch.Tensor,
    dst_start: torch.Tensor,
    counts: torch.Tensor,
) -> None:
    tensors = list(k_caches) + list(v_caches)
    if not tensors:
        return
    first = tensors[0]
    if first.dim() != 4:
        raise ValueError("caches must be [num_slots, Hkv, max_len, D]")
    for t in tensors:
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError("all caches must share one shape, dtype and device")
        if not (t.is_contiguous() and _aligned(t)):
            raise ValueError("caches must be contiguous and 16-byte aligned")
    num_slots, hkv, max_len, d = first.shape
    row_bytes = d * first.element_size()
    if row_bytes % 16 or row_bytes // 16 > _COMPACT_UNITS:
        raise ValueError(f"a cache row ({row_bytes} bytes) must be a multiple of 16 bytes, at most {16 * _COMPACT_UNITS}")
    if src_rows.dim() != 2:
        raise ValueError("src_rows must be [B, max_count]")
    batch, max_count = src_rows.shape
    if batch == 0 or max_count == 0:
        return
    if batch > 2**31 - 1 or hkv > 65535 or len(tensors) > 65535:
        raise ValueError("too many kv heads or cache tensors for one launch")
    device = first.device
    slots_i = _as_index(slots, device, "slots", (batch,))
    src_i = src_rows.to(device=device, dtype=torch.int32).contiguous()
    dst_i = _as_index(dst_start, device, "dst_start", (batch,))
    counts_i = _as_index(counts, device, "counts", (batch,))
    table = _pointer_table(tensors)
    i32 = np.int32
    launch(
        "kv_compact",
        "hedgerow_kv_compact",
        (batch, hkv, len(tensors)),
        _COMPACT_THREADS,
        [
            table.data_ptr(), slots_i.data_ptr(), src_i.data_ptr(), dst_i.data_ptr(), counts_i.data_ptr(),
            i32(max_count), i32(num_slots), i32(hkv), i32(max_len), i32(row_bytes // 16),
        ],
    )
