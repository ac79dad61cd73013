"""The ``cupy`` backend: the package's CUDA kernels on a GPU, through CuPy RawModules.

Each ``kernels/*.cu`` file is compiled with NVRTC once per GPU and cached (CuPy also
keeps the binary on disk, under ``~/.cupy/kernel_cache``). Tensors cross to the kernel
as their device addresses: no copy, and no CuPy array is made. Every launch goes on
PyTorch's current stream of the tensors' device, so kernels are ordered with the torch
work around them, side streams included. Every argument is checked first
(:class:`dmoe_edu.ops.kernels.Kernel`); an empty input returns before any launch.

:class:`RawModule` compiles a CUDA source of your own the same way and has the
interface of :class:`dmoe_edu.ops.emulate.RawModule`, so one launch line runs a
kernel on the GPU here and on the CPU there.

CuPy is imported only when this backend is first used, so ``import dmoe_edu`` never
needs it. Install it with the package's ``gpu`` extra (``pip install
'dmoe-edu[gpu]'``, CUDA 12 wheels).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .contract import check_combine, check_softmax_gate
from .kernels import (
    Kernel,
    KernelBackend,
    Param,
    RawModuleBase,
    kernel_combine,
    kernel_softmax_gate,
    kernel_source,
    package_kernels,
)

# Blocks per multiprocessor when the work is large: enough to keep every SM busy
# while the grid-stride loop covers the rest.
BLOCKS_PER_SM = 32


@functools.cache
def status() -> str | None:
    """``None`` if the cupy backend can run here, else the reason it cannot.

    Checked once per process: a CUDA device for PyTorch, CuPy, a CUDA device for
    CuPy, and NVRTC (the compiler CuPy builds the kernels with), which a CUDA
    toolkit or the ``nvidia-cuda-nvrtc-cu12`` wheel of the ``gpu`` extra provides.
    """
    return _status()


def _status() -> str | None:
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return (f"CuPy is not installed or does not import ({exc}); "
                "pip install cupy-cuda12x")
    try:
        if not cupy.cuda.is_available():
            return "CuPy sees no CUDA device"
    except Exception as exc:
        return f"CuPy cannot reach the CUDA driver ({exc})"
    return nvrtc_problem()


def nvrtc_problem() -> str | None:
    """Why CuPy cannot load NVRTC, the compiler of the kernels, or ``None`` if it can.

    NVRTC needs no GPU: the tests use it to compile the kernels on any machine.
    """
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as exc:  # not installed, or libnvrtc not found
        return (f"CuPy cannot load NVRTC, the CUDA compiler it builds the kernels "
                f"with ({type(exc).__name__}: {exc}); pip install "
                "nvidia-cuda-nvrtc-cu12 (in the gpu extra) or install a CUDA toolkit")
    return None


class CupyKernel(Kernel):
    """A kernel compiled for one GPU: checked, then run on torch's current stream."""

    def __init__(self, name: str, params: Sequence[Param], function, device_index: int):
        super().__init__(name, params)
        self._function = function
        self.device_index = device_index

    def _check_device(self, param: Param, tensor: Tensor) -> None:
        if tensor.device.type != "cuda" or tensor.device.index != self.device_index:
            raise ValueError(
                f"{self.name}: argument {param.name!r} is on {tensor.device}, but this "
                f"kernel was compiled for cuda:{self.device_index}"
            )

    def _launch(self, grid: int, block: int, args: tuple) -> None:
        import cupy

        # Pointers as fixed-width integers (CuPy passes their 8 bytes as they are),
        # None as a null pointer, numpy scalars unchanged.
        raw = tuple(
            np.uint64(a.data_ptr()) if isinstance(a, Tensor) else a for a in args
        )
        with cupy.cuda.Device(self.device_index), _cupy_stream(self.device_index):
            self._function((grid,), (block,), raw)


_streams: dict[tuple[int, int], object] = {}


def _cupy_stream(device_index: int):
    """PyTorch's current stream on that GPU, as a CuPy stream to launch on."""
    import cupy

    # Wrappers are cached by stream address: torch keeps a small pool of long-lived
    # streams, and each wrapper holds a reference to its torch stream.
    torch_stream = torch.cuda.current_stream(device_index)
    key = (device_index, torch_stream.cuda_stream)
    if key not in _streams:
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy 14 and later
            _streams[key] = cupy.cuda.Stream.from_external(torch_stream)
        else:
            _streams[key] = cupy.cuda.ExternalStream(key[1], device_index)
    return _streams[key]


class CupyBackend(KernelBackend):
    """One compiled module per (GPU, ``.cu`` file), built on first use."""

    name = "cupy"

    def __init__(self):
        self._kernels: dict[tuple[int, str, str], CupyKernel] = {}
        self._modules: dict[tuple[int, str], object] = {}
        self._lock = threading.Lock()

    def kernel(self, file: str, name: str, device: torch.device) -> Kernel:
        import cupy

        index = torch.cuda.current_device() if device.index is None else device.index
        key = (index, file, name)
        with self._lock:
            if key not in self._kernels:
                with cupy.cuda.Device(index):
                    module = self._modules.get((index, file))
                    if module is None:
                        module = cupy.RawModule(code=kernel_source(file))
                        self._modules[(index, file)] = module
                    function = module.get_function(name)
                params = package_kernels(file)[name]
                self._kernels[key] = CupyKernel(name, params, function, index)
            return self._kernels[key]

    def max_blocks(self, device: torch.device) -> int:
        return BLOCKS_PER_SM * _multiprocessors(device.index or 0)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


_backend = CupyBackend()


class RawModule(RawModuleBase):
    """A CUDA C source compiled by NVRTC for the current GPU, run on torch's stream.

    The interface of :class:`dmoe_edu.ops.emulate.RawModule` (and of
    ``cupy.RawModule``): ``RawModule(code).get_function(name)((grid,), (block,),
    args)``, with every argument checked against the kernel's C signature first
    (contiguous CUDA tensors of the right dtype on this GPU; fixed-width numpy
    scalars) and the launch queued on PyTorch's current stream.

    Args:
        code: CUDA C source (``str``, or ``bytes`` read as UTF-8) with one or more
            ``extern "C" __global__`` kernels with one-dimensional grids.
        name: file name used in compiler messages. Default: ``"module.cu"``.

    Raises:
        RuntimeError: if the cupy backend cannot run here (the reason is given).
        ValueError: if the source declares no ``extern "C" __global__`` kernel.

    A source that does not compile raises CuPy's ``CompileException`` at the first
    :meth:`get_function`, with NVRTC's log.
    """

    def __init__(self, code: str | bytes, name: str = "module.cu"):
        code = self._read_source(code, name)
        reason = status()
        if reason:
            raise RuntimeError(f"the cupy backend cannot run here: {reason}")
        import cupy

        self.device_index = torch.cuda.current_device()
        with cupy.cuda.Device(self.device_index):
            self._module = cupy.RawModule(code=code)

    def _make_kernel(self, name: str) -> CupyKernel:
        import cupy

        with cupy.cuda.Device(self.device_index):
            function = self._module.get_function(name)
        return CupyKernel(name, self.signatures[name], function, self.device_index)


def _require_cuda(*tensors: Tensor) -> None:
    reason = status()
    if reason:
        raise RuntimeError(f"the cupy backend cannot run here: {reason}")
    devices = {t.device for t in tensors}
    if any(d.type != "cuda" for d in devices) or len(devices) > 1:
        hint = ("use 'reference' or 'emulate' on the CPU"
                if {d.type for d in devices} <= {"cpu", "cuda"}
                else "use 'reference' for other devices")
        raise ValueError(
            "the cupy backend runs on CUDA tensors of one device, got "
            f"{sorted(map(str, devices))}; {hint}"
        )


def softmax_gate(gate_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """CuPy backend of :func:`dmoe_edu.ops.softmax_gate` (inputs checked)."""
    mask = check_softmax_gate(gate_logits, mask)
    _require_cuda(gate_logits)
    return kernel_softmax_gate(_backend, gate_logits, mask)


def combine(gate_probs: Tensor, expert_out: Tensor) -> Tensor:
    """CuPy backend of :func:`dmoe_edu.ops.combine` (inputs checked)."""
    check_combine(gate_probs, expert_out)
    _require_cuda(gate_probs, expert_out)
    return kernel_combine(_backend, gate_probs, expert_out)
