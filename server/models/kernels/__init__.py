"""CUDA tree attention, compiled at run time by NVRTC through cuda-python.

The kernels live in ``cuda/tree_attention.cu``, installed as package data of ``hedgerow.cuda``
(no ``__init__.py``: only data lives there). They are compiled to cubin for the GPU's
architecture, cached in-process and on disk, loaded with ``cuda.core`` and launched on torch's
current stream. Importing this package needs neither cuda-python nor a GPU; the functions that do
need them raise :class:`CudaKernelsUnavailable` with the fix.

Modules: ``compile`` (sources, NVRTC, the cubin cache, :func:`is_available`), ``launch``
(per-device loading and launching, :func:`load`), ``tree_attention`` (:func:`tree_attention`, its
split plan and its PyTorch reference :func:`tree_attention_reference`), ``masks``
(:func:`pack_tree_mask` / :func:`unpack_tree_mask`).

CUDA graphs: a :func:`tree_attention` launch does no host synchronisation and allocates only
through torch's caching allocator, so it can be captured. Call :func:`load` (or run it once)
before capture: compiling and module loading cannot happen inside a capture. Pass index tensors
as int32 on the GPU (other dtypes are converted by a small device kernel; CPU tensors would need a
host-to-device copy).

Validation status: the kernels are compile-checked through NVRTC for sm_80/sm_90
(tests/test_kernels_compile.py) and their logic runs on the CPU through a host emulation
(tests/test_kernels_emulated.py); tests/test_kernels_gpu.py compares them with
:func:`tree_attention_reference` wherever CUDA is present.
"""

from .compile import KERNEL_NAMES, CudaKernelsUnavailable, compile_kernels, is_available
from .launch import load
from .masks import pack_tree_mask, unpack_tree_mask
from .tree_attention import plan_prefix_splits, tree_attention, tree_attention_reference

__all__ = [
    "CudaKernelsUnavailable",
    "KERNEL_NAMES",
    "compile_kernels",
    "is_available",
    "load",
    "pack_tree_mask",
    "plan_prefix_splits",
    "tree_attention",
    "tree_attention_reference",
    "unpack_tree_mask",
]
