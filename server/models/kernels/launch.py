"""Loading the cubins with cuda.core and launching kernels on torch's current stream."""

from __future__ import annotations

import threading
from typing import Any, Callable, Sequence

import torch

from .compile import KERNEL_NAMES, CudaKernelsUnavailable, compile_kernels, cuda_core

# A launcher runs one kernel: (module, kernel name, grid (x, y, z), block threads, arguments).
# Arguments are Python ints for pointers and numpy scalars (np.int32 / np.int64 / np.float32) for
# values, as cuda.core expects. The tests pass a CPU-emulation launcher instead of the CUDA one.
Launcher = Callable[[str, str, tuple, int, Sequence[Any]], None]


class _CudaLauncher:
    """Kernels of one device, launched on torch's current stream of that device.

    torch's runtime and cuda.core both use the device's primary context. Launches run under
    torch's device guard (so another current device in the calling thread is fine) and make the
    primary context current once per thread (an engine thread may not have touched CUDA yet).
    """

    def __init__(self, index: int):
        core = cuda_core()
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
    launcher_for(torch.device(device))


def launcher_for(device: torch.device) -> Launcher:
    """The launcher of a CUDA device, created (kernels compiled and loaded) on first use."""
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


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (sizes the split plan)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
