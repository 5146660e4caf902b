"""CUDA tree-attention and KV-compaction kernels (cuda/*.cu via verify.cuda_kernels).

Four tiers, by what the machine has:

* always: the mask packing and the PyTorch reference against a brute-force softmax loop;
* cuda-python's NVRTC (no GPU): every kernel variant compiles to cubin for sm_80 and sm_90;
* a C++ compiler (no GPU): the .cu sources run on the CPU under a small emulation of the CUDA
  subset they use (fibers for threads, cooperative barriers and shuffles), driven through the same
  Python launch code as on the GPU, and are compared with the reference. This checks the kernels'
  logic, indexing, split/merge maths and barrier placement; not the PTX conversions, alignment
  faults, real concurrency or the cuda.core calls, which the GPU tests below cover;
* a CUDA GPU: kernels against the reference, with poisoned outputs, ragged batches, CUDA graphs.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import hedgerow.server.models.cuda_kernels as ck

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# ||out - ref|| / ||ref|| against a float64 reference; the output is rounded to its dtype.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# --------------------------------------------------------------------------------------------
# Problem builders shared by every tier
# --------------------------------------------------------------------------------------------

def random_ancestor_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, n] bool ancestor mask (self included) of a random tree with parent[i] < i."""
    mask = torch.zeros((n, n), dtype=torch.bool)
    for i in range(n):
        if i:
            parent = int(torch.randint(0, i, (1,), generator=gen))
            mask[i] = mask[parent]
        mask[i, i] = True
    return mask


def make_problem(
    *,
    dtype=torch.float32,
    d=64,
    hq=4,
    hkv=2,
    prefix=(37, 0, 70),
    nodes=(5, 9, 1),
    n_max=None,
    num_slots=None,
    max_len=None,
    seed=0,
    device="cpu",
    transposed_q=True,
):
    """A ragged verify batch. Unused cache rows and padding query rows hold NaN, so any read of
    them by the kernel shows up in the output; slots are assigned out of order."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(prefix)
    n_max = n_max or max(nodes)
    num_slots = num_slots or batch + 2
    max_len = max_len or max(p + n for p, n in zip(prefix, nodes)) + 8
    slots = torch.randperm(num_slots, generator=gen)[:batch].to(torch.int32)
    k_cache = torch.full((num_slots, hkv, max_len, d), float("nan"))
    v_cache = torch.full((num_slots, hkv, max_len, d), float("nan"))
    for b in range(batch):
        rows = prefix[b] + nodes[b]
        k_cache[slots[b], :, :rows] = torch.randn((hkv, rows, d), generator=gen)
        v_cache[slots[b], :, :rows] = torch.randn((hkv, rows, d), generator=gen)
    mask = torch.zeros((batch, n_max, n_max), dtype=torch.bool)
    for b in range(batch):
        mask[b, : nodes[b], : nodes[b]] = random_ancestor_mask(nodes[b], gen)
    q = torch.randn((batch, n_max, hq, d), generator=gen)
    for b in range(batch):
        q[b, nodes[b]:] = float("nan")
    # transformers hands attention a transposed view: [B, Hq, N, D] with strides of [B, N, Hq, D].
    q = q.transpose(1, 2) if transposed_q else q.transpose(1, 2).contiguous()
    return dict(
        q=q.to(device=device, dtype=dtype),
        k_cache=k_cache.to(device=device, dtype=dtype),
        v_cache=v_cache.to(device=device, dtype=dtype),
        slots=slots.to(device),
        prefix_lens=torch.tensor(prefix, dtype=torch.int32, device=device),
        num_nodes=torch.tensor(nodes, dtype=torch.int32, device=device),
        tree_mask_bits=ck.pack_tree_mask(mask.to(device)),
        mask=mask,
    )


def brute_force_attention(q, k_cache, v_cache, slots, prefix_lens, num_nodes, mask, scale):
    """float64 per-query softmax loop: out[b, i, h] = sum_j softmax(q.k_j * scale) v_j."""
    batch, hq, n_max, d = q.shape
    group = hq // k_cache.shape[1]
    out = torch.zeros((batch, n_max, hq, d), dtype=torch.float64)
    for b in range(batch):
        slot, plen, n = int(slots[b]), int(prefix_lens[b]), int(num_nodes[b])
        for i in range(n):
            keys = list(range(plen)) + [plen + j for j in range(n) if mask[b, i, j]]
            for h in range(hq):
                qv = q[b, h, i].double()
                k = k_cache[slot, h // group, keys].double()
                v = v_cache[slot, h // group, keys].double()
                scores = [float(qv @ k[t]) * scale for t in range(len(keys))]
                top = max(scores)
                w = [math.exp(s - top) for s in scores]
                total = sum(w)
                out[b, i, h] = sum(wt / total * v[t] for t, wt in enumerate(w))
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def call_args(p):
    return {k: v for k, v in p.items() if k != "mask"}


def reference64(p, **kw):
    """The reference on float64 copies of q and the caches: unrounded ground truth."""
    args = call_args(p)
    for key in ("q", "k_cache", "v_cache"):
        args[key] = args[key].double()
    return ck.tree_attention_reference(**args, **kw, compute_dtype=torch.float64)


def compact_reference(caches, slots, src_rows, dst_start, counts):
    """Gather every source row first, then scatter: the overlap-proof definition."""
    for cache in caches:
        for b in range(len(slots)):
            c = int(counts[b])
            if c <= 0:
                continue
            rows = cache[int(slots[b]), :, src_rows[b, :c].long()].clone()
            cache[int(slots[b]), :, int(dst_start[b]) : int(dst_start[b]) + c] = rows


def make_compact_problem(*, dtype, d, layers=3, hkv=2, max_len=96, device="cpu", seed=0):
    """Accepted paths with overlapping ranges: node i of the tree sits at row L + i and the path
    [0, i_1, ...] moves down to rows L, L+1, ...; one sequence is a chain already in place, one
    accepts nothing, one has a 40-row path (two copy chunks for fp32 heads of 128)."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = 6
    k = [torch.randn((num_slots, hkv, max_len, d), generator=gen).to(device=device, dtype=dtype) for _ in range(layers)]
    v = [torch.randn((num_slots, hkv, max_len, d), generator=gen).to(device=device, dtype=dtype) for _ in range(layers)]
    plens = [10, 3, 0, 20]
    paths = [
        [0, 2, 5, 6, 11],              # a tree path: rows move down and overlap
        [0, 1, 2, 3],                  # a chain: already in place, nothing moves
        [],                            # nothing accepted
        sorted({0, *torch.randperm(75, generator=gen)[:39].tolist()}),  # long, sparse
    ]
    max_count = max(len(p) for p in paths)
    src = torch.zeros((len(paths), max_count), dtype=torch.int32)
    for b, path in enumerate(paths):
        src[b, : len(path)] = torch.tensor([plens[b] + i for i in path], dtype=torch.int32)
    slots = torch.tensor([4, 0, 2, 5], dtype=torch.int32)
    return dict(
        k_caches=k, v_caches=v, slots=slots.to(device), src_rows=src.to(device),
        dst_start=torch.tensor(plens, dtype=torch.int32, device=device),
        counts=torch.tensor([len(p) for p in paths], dtype=torch.int32, device=device),
    )


# --------------------------------------------------------------------------------------------
# Always: mask packing, split plan, reference, optional import
# --------------------------------------------------------------------------------------------

def test_pack_tree_mask_worked_example_and_round_trip():
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    assert ck.pack_tree_mask(mask).tolist() == [[[1], [3], [5]]]
    gen = torch.Generator().manual_seed(1)
    for n in (1, 31, 32, 33, 64, 70):
        m = torch.rand((2, n, n), generator=gen) > 0.5
        bits = ck.pack_tree_mask(m)
        assert bits.shape == (2, n, -(-n // 32)) and bits.dtype == torch.int32
        assert torch.equal(ck.unpack_tree_mask(bits, n), m)
        for i, j in [(0, 0), (n - 1, n - 1), (n // 2, n - 1)]:  # bit j%32 of word j//32
            assert ((int(bits[1, i, j // 32]) >> (j % 32)) & 1) == int(m[1, i, j])
    full = torch.ones((1, 32, 32), dtype=torch.bool)
    assert ck.pack_tree_mask(full)[0, 0, 0] == -1  # bit 31 set: the int32 word is negative


def test_plan_prefix_splits_covers_the_prefix():
    for max_prefix in (0, 1, 31, 256, 1000, 5000, 70000):
        for base_blocks in (1, 7, 64, 5000):
            chunk, splits = ck.plan_prefix_splits(max_prefix, base_blocks, num_sms=132)
            assert chunk % 32 == 0 and splits >= 1
            assert chunk * splits >= max_prefix and (splits == 1 or chunk * (splits - 1) < max_prefix)
            assert chunk >= 256 or max_prefix == 0


def test_reference_matches_brute_force_softmax():
    p = make_problem(hq=6, hkv=2, d=64, prefix=(11, 0, 25), nodes=(6, 4, 1), n_max=7)
    scale = 0.17
    ref = ck.tree_attention_reference(**call_args(p), scale=scale, compute_dtype=torch.float64)
    brute = brute_force_attention(p["q"], p["k_cache"], p["v_cache"], p["slots"], p["prefix_lens"],
                                  p["num_nodes"], p["mask"], scale)
    assert rel_err(ref, brute) < 1e-6  # float64 maths, rounded to q's float32
    for b, n in enumerate((6, 4, 1)):  # padding rows are zeros, not NaN
        assert torch.all(ref[b, n:] == 0)


def test_import_and_errors_without_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.core", None)
    monkeypatch.setitem(sys.modules, "cuda.core.experimental", None)
    monkeypatch.setattr(ck, "_compiled", {})
    assert not ck._cuda_python_ok() and not ck.is_available()
    with pytest.raises(ck.CudaKernelsUnavailable, match="pip install"):
        ck.compile_kernels("sm_90")


def test_tree_attention_needs_cuda_tensors():
    p = make_problem()
    with pytest.raises(ck.CudaKernelsUnavailable):
        ck.tree_attention(**call_args(p))


# --------------------------------------------------------------------------------------------
# NVRTC: every variant compiles for Ampere and Hopper (no GPU needed)
# --------------------------------------------------------------------------------------------

def _nvrtc_or_skip():
    pytest.importorskip("cuda.core", reason='needs cuda-python: pip install cuda-python "cuda-toolkit[nvrtc]==13.*"')
    try:
        from cuda.bindings import nvrtc

        err, *_ = nvrtc.nvrtcVersion()
        assert int(err) == 0
    except Exception as e:  # the NVRTC shared library itself is missing
        pytest.skip(f'NVRTC not loadable ({e}): pip install "cuda-toolkit[nvrtc]==13.*"')


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Cubins for sm_80 and sm_90, compiled once into a fresh cache folder."""
    _nvrtc_or_skip()
    mp = pytest.MonkeyPatch()
    mp.setenv("HEDGEROW_KERNEL_CACHE", str(tmp_path_factory.mktemp("kernels")))
    mp.setattr(ck, "_compiled", {})
    try:
        yield {arch: ck.compile_kernels(arch) for arch in ("sm_80", "sm_90")}
    finally:
        mp.undo()


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_variant_compiles(compiled, arch):
    cubins = compiled[arch]
    assert set(cubins) == set(ck.KERNEL_NAMES)
    for module, names in ck.KERNEL_NAMES.items():
        assert cubins[module][:4] == b"\x7fELF", f"{module} for {arch} is not a cubin"
        for name in names:
            assert name.encode() in cubins[module], f"{name} missing from the {arch} cubin"
    attn = ck.KERNEL_NAMES["tree_attention"]
    for t in ("f16", "bf16", "f32"):
        for d in (64, 128):
            assert f"hedgerow_tree_attn_partial_{t}_d{d}" in attn and f"hedgerow_tree_attn_merge_{t}_d{d}" in attn


def test_compiled_kernels_are_cached_on_disk(compiled, monkeypatch, tmp_path):
    monkeypatch.setenv("HEDGEROW_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(ck, "_compiled", {})
    first = ck.compile_kernels("90")  # compiles into tmp_path/sm_90
    files = sorted(p.name for p in (tmp_path / "sm_90").iterdir())
    assert len(files) == 2 and all(f.endswith(".cubin") for f in files), files

    class NoCompile:
        def __init__(self, *a, **k):
            raise AssertionError("compiled although the disk cache holds the cubin")

    import cuda.core

    monkeypatch.setattr(ck, "_compiled", {})
    monkeypatch.setattr(cuda.core, "Program", NoCompile)
    assert ck.compile_kernels("sm_90") == first  # read back from disk, byte for byte


# --------------------------------------------------------------------------------------------
# CPU emulation of the kernels (needs a C++ compiler; no GPU)
# --------------------------------------------------------------------------------------------

EMULATION_SHIM = r"""
// Host emulation of the CUDA subset that cuda/*.cu use: every CUDA thread of a block is a fiber
// (ucontext) on one OS thread, blocks run one after another, __shared__ is a static, barriers and
// warp shuffles are cooperative. A barrier that cannot complete (divergent __syncthreads, a shuffle
// with exited lanes) is reported as a deadlock instead of hanging.
#define HEDGEROW_HOST_EMULATION 1
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <ucontext.h>
#include <utility>
#include <vector>
#include <string>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct hr_dim3 { unsigned x, y, z; };
static hr_dim3 threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __int_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float hr_f16_to_f32(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short hr_f32_to_f16(float f) { _Float16 x = (_Float16)f; unsigned short h; std::memcpy(&h, &x, 2); return h; }

namespace emu {
constexpr int kMaxThreads = 1024;
constexpr size_t kStack = 256 * 1024;
struct Fiber { ucontext_t ctx; std::vector<char> stack; bool done; };
static ucontext_t g_sched;
static Fiber* g_fibers;
static int g_nthreads, g_cur;
static unsigned long long g_progress;
static int g_arrived[kMaxThreads / 32 + 2];         // [0..31] warps, [32] __syncthreads, [33] block end
static unsigned long long g_gen[kMaxThreads / 32 + 2];
static unsigned long long g_xchg[kMaxThreads / 32][32];
static void (*g_body)(void**);
static void** g_args;

inline void yield() { swapcontext(&g_fibers[g_cur].ctx, &g_sched); }
inline void barrier(int id, int size) {
  ++g_progress;
  if (++g_arrived[id] == size) { g_arrived[id] = 0; ++g_gen[id]; return; }
  const unsigned long long gen = g_gen[id];
  const unsigned tid = threadIdx.x;
  while (g_gen[id] == gen) yield();
  threadIdx.x = tid;
}
static void fiber_main() {
  const int tid = g_cur;
  for (unsigned z = 0; z < gridDim.z; ++z)
    for (unsigned y = 0; y < gridDim.y; ++y)
      for (unsigned x = 0; x < gridDim.x; ++x) {
        blockIdx = {x, y, z};
        threadIdx = {(unsigned)tid, 0, 0};
        g_body(g_args);
        barrier(kMaxThreads / 32 + 1, g_nthreads);   // block end (its own counter)
      }
  ++g_progress;
  g_fibers[tid].done = true;
}
// Runs the grid; returns 0, or -1 on deadlock.
inline int run(void (*body)(void**), void** args, hr_dim3 grid, int block) {
  if (block <= 0 || block > kMaxThreads || block % 32) return -2;
  g_body = body; g_args = args; gridDim = grid; blockDim = {(unsigned)block, 1, 1}; g_nthreads = block;
  std::memset(g_arrived, 0, sizeof g_arrived);
  std::vector<Fiber> fibers(block);
  g_fibers = fibers.data();
  for (int i = 0; i < block; ++i) {
    Fiber& f = fibers[i];
    f.stack.resize(kStack); f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data(); f.ctx.uc_stack.ss_size = kStack; f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (;;) {
    bool all_done = true;
    const unsigned long long before = g_progress;
    for (int i = 0; i < block; ++i) {
      if (fibers[i].done) continue;
      all_done = false;
      g_cur = i;
      threadIdx = {(unsigned)i, 0, 0};
      swapcontext(&g_sched, &fibers[i].ctx);
    }
    if (all_done) return 0;
    if (g_progress == before) {
      std::fprintf(stderr, "emulation deadlock in block (%u,%u,%u)\n", blockIdx.x, blockIdx.y, blockIdx.z);
      return -1;
    }
  }
}
template <typename F> struct Invoker;
template <typename... A> struct Invoker<void (*)(A...)> {
  template <size_t... I> static void call(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<A*>(a[I])...);
  }
};
}  // namespace emu

inline void __syncthreads() { emu::barrier(emu::kMaxThreads / 32, blockDim.x); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::barrier(threadIdx.x >> 5, 32); }
template <typename T> inline T hr_shfl(T v, int src_lane) {
  const unsigned w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::g_xchg[w][lane] = bits;
  __syncwarp();
  bits = emu::g_xchg[w][src_lane & 31];
  __syncwarp();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int m) { return hr_shfl(v, (threadIdx.x & 31) ^ m); }
template <typename T> inline T __shfl_sync(unsigned, T v, int s) { return hr_shfl(v, s); }
"""

EMULATION_TAIL = r"""
namespace emu {
template <auto F> struct Body;
template <typename... A, void (*F)(A...)> struct Body<F> {
  template <size_t... I> static void call(void** a, std::index_sequence<I...>) { F(*static_cast<A*>(a[I])...); }
  static void run(void** a) { call(a, std::index_sequence_for<A...>{}); }
};
struct Entry { const char* name; void (*run)(void**); };
}  // namespace emu
static const emu::Entry kEntries[] = { @@ENTRIES@@ };
extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, int block, void** args) {
  for (const emu::Entry& e : kEntries)
    if (std::strcmp(e.name, name) == 0) return emu::run(e.run, args, hr_dim3{gx, gy, gz}, block);
  return -3;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """A launcher that runs the real .cu sources on the CPU (same arguments as cuda.core)."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None or sys.platform != "linux":
        pytest.skip("the CPU emulation of the kernels needs g++ or clang++ on Linux")
    folder = tmp_path_factory.mktemp("emu")
    libs = {}
    for module, source in ck.SOURCES.items():
        entries = ", ".join(f'{{"{n}", &emu::Body<&{n}>::run}}' for n in ck.KERNEL_NAMES[module])
        text = (EMULATION_SHIM + f'\n#include "{ck.CUDA_SRC_DIR / source}"\n'
                + EMULATION_TAIL.replace("@@ENTRIES@@", entries))
        cpp = folder / f"{module}.cpp"
        cpp.write_text(text)
        lib = folder / f"{module}.so"
        build = subprocess.run(
            [cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-w", str(cpp), "-o", str(lib)],
            capture_output=True, text=True,
        )
        if build.returncode:
            if "_Float16" in build.stderr:
                pytest.skip(f"{cxx} lacks _Float16, needed by the emulation")
            pytest.fail(f"emulation build of {source} failed:\n{build.stderr[-4000:]}")
        libs[module] = ctypes.CDLL(str(lib))
        libs[module].emu_launch.restype = ctypes.c_int

    def launch(module, name, grid, block, args):
        holders = []
        for a in args:
            if isinstance(a, np.int32):
                holders.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.int64):
                holders.append(ctypes.c_int64(int(a)))
            elif isinstance(a, np.float32):
                holders.append(ctypes.c_float(float(a)))
            elif isinstance(a, int):  # a pointer, as cuda.core treats Python ints
                holders.append(ctypes.c_void_p(a))
            else:
                raise TypeError(f"unexpected kernel argument {a!r}")
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        gx, gy, gz = (tuple(grid) + (1, 1))[:3]
        rc = libs[module].emu_launch(name.encode(), gx, gy, gz, block, argv)
        assert rc == 0, f"emulated launch of {name} failed ({'deadlock' if rc == -1 else rc})"

    return launch


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype_name", ["f32", "bf16", "f16"])
def test_emulated_tree_attention_matches_reference(emulator, dtype_name, d):
    dtype = DTYPES[dtype_name]
    # Ragged: a 70-token prefix cut into 32-key splits, an empty prefix, a single node; GQA 3:1.
    p = make_problem(dtype=dtype, d=d, hq=6, hkv=2, prefix=(70, 0, 33), nodes=(9, 5, 1), n_max=10,
                     seed=d + len(dtype_name))
    out = torch.full((3, 10, 6, d), float("nan"), dtype=dtype)
    got = ck._tree_attention(emulator, **call_args(p), out=out, max_prefix_len=96, num_sms=64,
                             min_chunk=32, poison_workspace=True)
    assert got is out
    ref = reference64(p)
    assert not torch.isnan(out).any()
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{dtype_name} d{d}: relative error {err:.2e}"
    for b, n in enumerate((9, 5, 1)):
        assert torch.all(out[b, n:] == 0), "padding rows must be zeros"


def test_emulated_tree_attention_edge_cases(emulator):
    # A prefix longer than the host bound (the last split must run to L), a tree wider than one
    # 32-key tile (two mask words), a sequence with no nodes, contiguous q, explicit scale.
    p = make_problem(dtype=torch.float32, d=64, hq=2, hkv=1, prefix=(150, 4, 0), nodes=(40, 33, 0),
                     n_max=40, seed=7, transposed_q=False)
    # Rows that see no tree key (a malformed mask row without its diagonal): with a prefix they
    # attend to the prefix only; without one (sequence 1 after zeroing its prefix) both segments
    # are empty and the merge must give zeros, not NaN.
    p["prefix_lens"][1] = 0
    p["mask"][0, 3] = False
    p["mask"][1, 5] = False
    p["tree_mask_bits"] = ck.pack_tree_mask(p["mask"])
    got = ck._tree_attention(emulator, **call_args(p), scale=0.3, max_prefix_len=64, num_sms=8,
                             min_chunk=32, poison_workspace=True)
    ref = reference64(p, scale=0.3)
    assert not torch.isnan(got).any()
    assert rel_err(got, ref) <= 1e-5
    assert torch.all(got[2] == 0) and torch.all(got[1, 5] == 0)


def test_emulated_tree_attention_clamps_bad_indices(emulator):
    # The kernels never read or write out of bounds, whatever the index tensors hold: a node count
    # above Nmax is cut to Nmax; an invalid slot or a prefix reaching max_len gives zeros.
    p = make_problem(dtype=torch.float32, d=64, hq=4, hkv=2, prefix=(20, 30, 5, 10), nodes=(6, 4, 3, 2),
                     n_max=6, num_slots=5, seed=11)
    good = reference64(p)
    p["num_nodes"][0] = 9
    p["slots"][1] = -1
    p["prefix_lens"][2] = p["k_cache"].shape[2]
    p["slots"][3] = 5
    got = ck._tree_attention(emulator, **call_args(p), max_prefix_len=32, num_sms=8, min_chunk=32,
                             poison_workspace=True)
    assert rel_err(got[0], good[0]) <= 1e-5
    assert torch.all(got[1:] == 0)


def test_emulated_tree_attention_default_plan_and_mha(emulator):
    # Plain multi-head attention (G = 1), default split plan from max_len, int64 index tensors.
    p = make_problem(dtype=torch.bfloat16, d=128, hq=2, hkv=2, prefix=(5, 40), nodes=(3, 7), seed=3)
    for key in ("slots", "prefix_lens", "num_nodes"):
        p[key] = p[key].long()
    got = ck._tree_attention(emulator, **call_args(p), num_sms=132)
    ref = reference64(p)
    assert rel_err(got, ref) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float32, 128), (torch.float16, 64)])
def test_emulated_kv_compact_matches_gather_then_scatter(emulator, dtype, d):
    p = make_compact_problem(dtype=dtype, d=d)
    expect_k = [t.clone() for t in p["k_caches"]]
    expect_v = [t.clone() for t in p["v_caches"]]
    compact_reference(expect_k + expect_v, p["slots"], p["src_rows"], p["dst_start"], p["counts"])
    ck._kv_compact(emulator, **p)
    for got, want in zip(p["k_caches"] + p["v_caches"], expect_k + expect_v):
        assert torch.equal(got, want)  # a copy: bit-exact, and nothing else touched


# --------------------------------------------------------------------------------------------
# GPU: the real kernels (skipped without CUDA)
# --------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not ck.is_available(), reason="needs a CUDA GPU and cuda-python")


@gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype_name", ["f32", "bf16", "f16"])
def test_gpu_tree_attention_matches_reference(dtype_name, d):
    dtype = DTYPES[dtype_name]
    for seed, (prefix, nodes) in enumerate([((37, 0, 70, 300), (5, 9, 1, 64)),
                                           ((1000, 3, 2500), (33, 60, 17))]):
        p = make_problem(dtype=dtype, d=d, hq=8, hkv=2, prefix=prefix, nodes=nodes, seed=seed, device="cuda")
        out = torch.full((len(prefix), max(nodes), 8, d), float("nan"), dtype=dtype, device="cuda")
        ck.tree_attention(**call_args(p), out=out, max_prefix_len=max(prefix))
        ref = reference64(p)
        assert not torch.isnan(out).any()
        err = rel_err(out, ref)
        assert err <= TOLERANCE[dtype], f"{dtype_name} d{d} seed {seed}: relative error {err:.2e}"


@gpu
def test_gpu_tree_attention_long_prefix_default_plan():
    p = make_problem(dtype=torch.bfloat16, d=128, hq=32, hkv=8, prefix=(4000, 17), nodes=(16, 16),
                     seed=5, device="cuda")
    got = ck.tree_attention(**call_args(p))  # max_prefix_len defaults to max_len
    ref = reference64(p)
    assert rel_err(got, ref) <= 1e-2


@gpu
def test_gpu_tree_attention_in_cuda_graph():
    p = make_problem(dtype=torch.bfloat16, d=128, hq=8, hkv=2, prefix=(100, 400), nodes=(12, 7),
                     seed=9, device="cuda")
    args = call_args(p)
    ck.load()
    out = torch.full((2, 12, 8, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ck.tree_attention(**args, out=out, max_prefix_len=512)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ck.tree_attention(**args, out=out, max_prefix_len=512)
    out.fill_(float("nan"))
    args["q"].copy_(torch.randn_like(args["q"]))  # new queries, same buffers
    graph.replay()
    torch.cuda.synchronize()
    ref = reference64({**args, "mask": None})
    assert rel_err(out, ref) <= 1e-2


@gpu
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float16, 64), (torch.float32, 128)])
def test_gpu_kv_compact_matches_gather_then_scatter(dtype, d):
    p = make_compact_problem(dtype=dtype, d=d, device="cuda")
    expect_k = [t.clone() for t in p["k_caches"]]
    expect_v = [t.clone() for t in p["v_caches"]]
    compact_reference(expect_k + expect_v, p["slots"].cpu(), p["src_rows"].cpu(), p["dst_start"].cpu(), p["counts"].cpu())
    ck.kv_compact(**p)
    torch.cuda.synchronize()
    for got, want in zip(p["k_caches"] + p["v_caches"], expect_k + expect_v):
        assert torch.equal(got, want)


# --- the backend inside the engine -----------------------------------------------------------------
def test_auto_backend_stays_on_reference_until_validated():
    from hedgerow.server.models.attention import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_greedy_output_is_unchanged_with_the_cuda_backend():
    """End to end: greedy chain and tree output with the kernels equals the reference backend's."""
    from hedgerow.server.engine.engine import Engine, EngineConfig
    from hedgerow.server.engine.runner import ModelRunner
    from hedgerow.server.engine.sequence import SpecMode, SpecParams
    from tests.tiny import EOS, request, tiny_model

    target = tiny_model("llama", seed=0, hidden=256, dtype=torch.float32).cuda()
    draft = tiny_model("llama", seed=1, layers=1, hidden=256, dtype=torch.float32).cuda()  # head dim 64
    prompts = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [40]]
    outs = {}
    for backend in ("reference", "cuda"):
        runners = [ModelRunner(m, num_slots=4, max_len=128, backend=backend) for m in (target, draft)]
        for mode in (SpecMode.CHAIN, SpecMode.TREE):
            engine = Engine(*runners, eos_token_ids=[EOS], config=EngineConfig(
                max_model_len=128, max_batch_size=4, adaptive="none", spec=SpecParams(mode=mode)))
            res = engine.generate(request(str(i), p, 24) for i, p in enumerate(prompts))
            outs[backend, mode] = [res[str(i)].generated for i in range(len(prompts))]
    for mode in (SpecMode.CHAIN, SpecMode.TREE):
        assert outs["cuda", mode] == outs["reference", mode]
