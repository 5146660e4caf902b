"""The CUDA kernels' host side, and the kernels compiled to cubin (server/models/kernels).

* always: the mask packing, the split plan, the errors without cuda-python or CUDA tensors, the
  engine's backend choice;
* cuda-python's NVRTC (no GPU): every kernel variant compiles to cubin for sm_80 and sm_90, and the
  cubins are cached on disk.
"""

from __future__ import annotations

import sys

import pytest
import torch

import hedgerow.server.models.kernels.compile as kc
from hedgerow.server.models import kernels
from tests.kernel_problems import call_args, make_problem


# --------------------------------------------------------------------------------------------
# Always: mask packing, split plan, optional import
# --------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_pack_tree_mask_worked_example_and_round_trip():
    mask = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)
    assert kernels.pack_tree_mask(mask).tolist() == [[[1], [3], [5]]]
    gen = torch.Generator().manual_seed(1)
    for n in (1, 31, 32, 33, 64, 70):
        m = torch.rand((2, n, n), generator=gen) > 0.5
        bits = kernels.pack_tree_mask(m)
        assert bits.shape == (2, n, -(-n // 32)) and bits.dtype == torch.int32
        assert torch.equal(kernels.unpack_tree_mask(bits, n), m)
        for i, j in [(0, 0), (n - 1, n - 1), (n // 2, n - 1)]:  # bit j%32 of word j//32
            assert ((int(bits[1, i, j // 32]) >> (j % 32)) & 1) == int(m[1, i, j])
    full = torch.ones((1, 32, 32), dtype=torch.bool)
    assert kernels.pack_tree_mask(full)[0, 0, 0] == -1  # bit 31 set: the int32 word is negative


@pytest.mark.unit
def test_plan_prefix_splits_covers_the_prefix():
    for max_prefix in (0, 1, 31, 256, 1000, 5000, 70000):
        for base_blocks in (1, 7, 64, 5000):
            chunk, splits = kernels.plan_prefix_splits(max_prefix, base_blocks, num_sms=132)
            assert chunk % 32 == 0 and splits >= 1
            assert chunk * splits >= max_prefix and (splits == 1 or chunk * (splits - 1) < max_prefix)
            assert chunk >= 256 or max_prefix == 0


@pytest.mark.unit
def test_import_and_errors_without_cuda_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "cuda.core", None)
    monkeypatch.setitem(sys.modules, "cuda.core.experimental", None)
    monkeypatch.setattr(kc, "_compiled", {})
    assert not kc._cuda_python_ok() and not kernels.is_available()
    with pytest.raises(kernels.CudaKernelsUnavailable, match="pip install"):
        kernels.compile_kernels("sm_90")


@pytest.mark.unit
def test_tree_attention_needs_cuda_tensors():
    p = make_problem()
    with pytest.raises(kernels.CudaKernelsUnavailable):
        kernels.tree_attention(**call_args(p))


@pytest.mark.unit
def test_auto_backend_stays_on_reference_until_validated():
    from hedgerow.server.models.attention import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    with pytest.raises(ValueError, match="CUDA device"):
        resolve_backend("cuda", torch.device("cpu"))


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
    mp.setattr(kc, "_compiled", {})
    try:
        yield {arch: kernels.compile_kernels(arch) for arch in ("sm_80", "sm_90")}
    finally:
        mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_variant_compiles(compiled, arch):
    cubins = compiled[arch]
    assert set(cubins) == set(kernels.KERNEL_NAMES)
    for module, names in kernels.KERNEL_NAMES.items():
        assert cubins[module][:4] == b"\x7fELF", f"{module} for {arch} is not a cubin"
        for name in names:
            assert name.encode() in cubins[module], f"{name} missing from the {arch} cubin"
    attn = kernels.KERNEL_NAMES["tree_attention"]
    for t in ("f16", "bf16", "f32"):
        for d in (64, 128):
            assert f"hedgerow_tree_attn_partial_{t}_d{d}" in attn and f"hedgerow_tree_attn_merge_{t}_d{d}" in attn


@pytest.mark.slow
def test_compiled_kernels_are_cached_on_disk(compiled, monkeypatch, tmp_path):
    monkeypatch.setenv("HEDGEROW_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kc, "_compiled", {})
    first = kernels.compile_kernels("90")  # compiles into tmp_path/sm_90
    files = sorted(p.name for p in (tmp_path / "sm_90").iterdir())
    assert len(files) == len(kc.SOURCES) and all(f.endswith(".cubin") for f in files), files

    class NoCompile:
        def __init__(self, *a, **k):
            raise AssertionError("compiled although the disk cache holds the cubin")

    import cuda.core

    monkeypatch.setattr(kc, "_compiled", {})
    monkeypatch.setattr(cuda.core, "Program", NoCompile)
    assert kernels.compile_kernels("sm_90") == first  # read back from disk, byte for byte
