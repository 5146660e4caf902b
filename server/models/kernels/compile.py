"""Finding the .cu sources and compiling them to cubin with NVRTC, cached in-process and on disk.

Needs cuda-python and its NVRTC library, no GPU: the kernels can be compile-checked anywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from pathlib import Path

import torch

_INSTALL_HINT = 'pip install cuda-python "cuda-toolkit[nvrtc]==13.*"'


class CudaKernelsUnavailable(RuntimeError):
    """cuda-python / NVRTC or a CUDA device is missing."""


def _source_dir() -> Path:
    """The .cu sources: ``hedgerow.cuda``, package data of the installed wheel (the repository's
    cuda/ folder in an editable install); HEDGEROW_CUDA_SRC overrides."""
    if os.environ.get("HEDGEROW_CUDA_SRC"):
        return Path(os.environ["HEDGEROW_CUDA_SRC"])
    spec = importlib.util.find_spec("hedgerow.cuda")
    return Path(next(iter(spec.submodule_search_locations)))


CUDA_SRC_DIR = _source_dir()
# Kernel modules (one cubin each) and their source files in CUDA_SRC_DIR.
SOURCES = {"tree_attention": "tree_attention.cu"}

DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32"}
HEAD_DIMS = (64, 128)
# The extern "C" entry points of each module.
KERNEL_NAMES: dict[str, tuple[str, ...]] = {
    "tree_attention": tuple(
        f"hedgerow_tree_attn_{part}_{t}_d{d}"
        for t in DTYPE_NAMES.values()
        for d in HEAD_DIMS
        for part in ("partial", "merge")
    ),
}


def cuda_core():
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
        cuda_core()
        return True
    except CudaKernelsUnavailable:
        return False


def is_available() -> bool:
    """True when torch sees a CUDA device and cuda-python is importable."""
    return torch.cuda.is_available() and _cuda_python_ok()


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
            core = cuda_core()
            _compiled[arch] = {
                module: _compile_one(core, module, _read_source(name), arch)
                for module, name in SOURCES.items()
            }
        return dict(_compiled[arch])
