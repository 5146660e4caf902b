"""The tree-attention kernels run on the CPU, against the PyTorch reference (no GPU).

The reference is first checked against a brute-force softmax loop. Then, with a C++ compiler, the
.cu sources run under a small emulation of the CUDA subset they use (tests/emulator/
cuda_emulator.cpp: fibers for threads, cooperative barriers and shuffles), driven through the same
Python launch code as on the GPU, and are compared with the reference. This checks the kernels'
logic, indexing, split/merge maths and barrier placement; not the PTX conversions, alignment
faults, real concurrency or the cuda.core calls, which tests/test_kernels_gpu.py covers.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import hedgerow.server.models.kernels.compile as kc
from hedgerow.server.models import kernels
from hedgerow.server.models.kernels.tree_attention import _tree_attention
from tests.kernel_problems import DTYPES, TOLERANCE, call_args, make_problem, reference64, rel_err

EMULATOR = Path(__file__).parent / "emulator" / "cuda_emulator.cpp"


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


@pytest.mark.unit
def test_reference_matches_brute_force_softmax():
    p = make_problem(hq=6, hkv=2, d=64, prefix=(11, 0, 25), nodes=(6, 4, 1), n_max=7)
    scale = 0.17
    ref = kernels.tree_attention_reference(**call_args(p), scale=scale, compute_dtype=torch.float64)
    brute = brute_force_attention(p["q"], p["k_cache"], p["v_cache"], p["slots"], p["prefix_lens"],
                                  p["num_nodes"], p["mask"], scale)
    assert rel_err(ref, brute) < 1e-6  # float64 maths, rounded to q's float32
    for b, n in enumerate((6, 4, 1)):  # padding rows are zeros, not NaN
        assert torch.all(ref[b, n:] == 0)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """A launcher that runs the real .cu sources on the CPU (same arguments as cuda.core)."""
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None or sys.platform != "linux":
        pytest.skip("the CPU emulation of the kernels needs g++ or clang++ on Linux")
    folder = tmp_path_factory.mktemp("emu")
    libs = {}
    for module, source in kc.SOURCES.items():
        lib = folder / f"{module}.so"
        kernel_list = " ".join(f"X({n})" for n in kernels.KERNEL_NAMES[module])
        build = subprocess.run(
            [cxx, "-std=c++20", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-w",
             f'-DHEDGEROW_EMU_SOURCE="{kc.CUDA_SRC_DIR / source}"', f"-DHEDGEROW_EMU_KERNELS(X)={kernel_list}",
             str(EMULATOR), "-o", str(lib)],
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


@pytest.mark.slow
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype_name", ["f32", "bf16", "f16"])
def test_emulated_tree_attention_matches_reference(emulator, dtype_name, d):
    dtype = DTYPES[dtype_name]
    # Ragged: a 70-token prefix cut into 32-key splits, an empty prefix, a single node; GQA 3:1.
    p = make_problem(dtype=dtype, d=d, hq=6, hkv=2, prefix=(70, 0, 33), nodes=(9, 5, 1), n_max=10,
                     seed=d + len(dtype_name))
    out = torch.full((3, 10, 6, d), float("nan"), dtype=dtype)
    got = _tree_attention(emulator, **call_args(p), out=out, max_prefix_len=96, num_sms=64,
                          min_chunk=32, poison_workspace=True)
    assert got is out
    ref = reference64(p)
    assert not torch.isnan(out).any()
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{dtype_name} d{d}: relative error {err:.2e}"
    for b, n in enumerate((9, 5, 1)):
        assert torch.all(out[b, n:] == 0), "padding rows must be zeros"


@pytest.mark.slow
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
    p["tree_mask_bits"] = kernels.pack_tree_mask(p["mask"])
    got = _tree_attention(emulator, **call_args(p), scale=0.3, max_prefix_len=64, num_sms=8,
                          min_chunk=32, poison_workspace=True)
    ref = reference64(p, scale=0.3)
    assert not torch.isnan(got).any()
    assert rel_err(got, ref) <= 1e-5
    assert torch.all(got[2] == 0) and torch.all(got[1, 5] == 0)


@pytest.mark.slow
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
    got = _tree_attention(emulator, **call_args(p), max_prefix_len=32, num_sms=8, min_chunk=32,
                          poison_workspace=True)
    assert rel_err(got[0], good[0]) <= 1e-5
    assert torch.all(got[1:] == 0)


@pytest.mark.slow
def test_emulated_tree_attention_default_plan_and_mha(emulator):
    # Plain multi-head attention (G = 1), default split plan from max_len, int64 index tensors.
    p = make_problem(dtype=torch.bfloat16, d=128, hq=2, hkv=2, prefix=(5, 40), nodes=(3, 7), seed=3)
    for key in ("slots", "prefix_lens", "num_nodes"):
        p[key] = p[key].long()
    got = _tree_attention(emulator, **call_args(p), num_sms=132)
    ref = reference64(p)
    assert rel_err(got, ref) <= TOLERANCE[torch.bfloat16]
