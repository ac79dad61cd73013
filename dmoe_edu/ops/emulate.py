"""The ``emulate`` backend: the package's CUDA kernels, compiled for the CPU and run
one thread at a time.

The ``.cu`` files are compiled unchanged by the system C++ compiler (``$CXX``, else
``c++``, ``g++`` or ``clang++``) behind ``kernels/cpu_shim.h``, which spells CUDA's
keywords and built-in indices as C++ and turns ``__syncthreads`` and ``__shared__``
into compile errors. A launch then runs every thread of every block in a loop. The
package's kernels never let threads share data, so that order gives exactly what the
GPU computes, up to the last bits of ``exp`` and of summation order.

Compiled libraries are cached on disk (``$DMOE_EDU_CACHE``, else
``$XDG_CACHE_HOME/dmoe_edu``, else ``~/.cache/dmoe_edu``), keyed by the sources, the
compiler and its flags: the first use costs a second or two, later ones nothing.

:class:`RawModule` mirrors ``cupy.RawModule``, so the same few lines launch a kernel
of your own on the CPU here and on a GPU through CuPy:

>>> code = '''
... extern "C" __global__ void scale(const float* x, float* y, float a, long long n) {
...     long long step = (long long)gridDim.x * blockDim.x;
...     for (long long i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += step)
...         y[i] = a * x[i];
... }'''
>>> x = torch.arange(5.0)
>>> y = torch.empty(5)
>>> scale = RawModule(code).get_function("scale")
>>> scale((2,), (2,), (x, y, np.float32(3), np.int64(5)))
>>> y
tensor([ 0.,  3.,  6.,  9., 12.])

Limitations: slow (one simulated thread after another, single core): fine for the
course's sizes, far from the reference backend's speed on big tensors. Kernels that
need threads to cooperate (shared memory, barriers, warp shuffles, atomics) do not
compile here.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .kernels import (
    Kernel,
    KernelBackend,
    Param,
    kernel_combine,
    kernel_dir,
    kernel_softmax_gate,
    kernel_source,
    parse_kernels,
)

logger = logging.getLogger(__name__)

CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off")

# The C type of each scalar parameter, as ctypes stores it.
_CTYPES = {
    "int": ctypes.c_int32,
    "unsigned int": ctypes.c_uint32,
    "long long": ctypes.c_int64,
    "long long int": ctypes.c_int64,
    "unsigned long long": ctypes.c_uint64,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
}


class CompilerNotFoundError(RuntimeError):
    """No C++ compiler was found for the emulate backend."""


class KernelCompileError(RuntimeError):
    """The C++ compiler rejected a kernel source; the message holds its output."""


def find_compiler() -> str:
    """Path of the C++ compiler the emulation uses.

    ``$CXX`` if set, else the first of ``c++``, ``g++``, ``clang++`` on the ``PATH``.

    Raises:
        CompilerNotFoundError: if none is found.
    """
    wanted = os.environ.get("CXX")
    candidates = [wanted] if wanted else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    where = f"$CXX={wanted!r} is not an executable" if wanted else (
        "none of c++, g++, clang++ is on the PATH")
    raise CompilerNotFoundError(
        f"the emulate backend compiles the CUDA kernels with a C++ compiler, and "
        f"{where}. "
        "Install one (Debian/Ubuntu: apt-get install g++; macOS: xcode-select "
        "--install), or set CXX, or use the 'reference' backend."
    )


@functools.cache
def _compiler_version(path: str) -> str:
    done = subprocess.run([path, "--version"], capture_output=True, text=True,
                          check=False)
    return (done.stdout or done.stderr).splitlines()[0] if done.returncode == 0 else ""


def cache_dir() -> Path:
    """Where compiled kernel libraries are kept (created on first use)."""
    if os.environ.get("DMOE_EDU_CACHE"):
        root = Path(os.environ["DMOE_EDU_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(base) / "dmoe_edu"
    return root / "emulate"


def _translation_unit(source_name: str, kernels: Sequence[str]) -> str:
    # The shim, the unchanged .cu file, then one C entry point per kernel that runs
    # the whole grid: emu_<kernel>(grid, block, args).
    lines = ['#include "cpu_shim.h"', f'#include "{source_name}"', ""]
    for name in kernels:
        lines.append(
            f'extern "C" void emu_{name}(unsigned int grid, unsigned int block, '
            f"void** args) {{ emu::launch({name}, grid, block, args); }}"
        )
    return "\n".join(lines) + "\n"


def _build(code: str, source_name: str, kernels: Sequence[str]) -> Path:
    """Compile ``code`` behind the shim into a shared library; reuse a cached one."""
    compiler = find_compiler()
    shim = (kernel_dir() / "cpu_shim.h").read_text()
    unit = _translation_unit(source_name, kernels)

    # The library's name hashes everything that could change what it contains.
    key = hashlib.sha256()
    for part in (shim, code, unit, compiler, _compiler_version(compiler), *CXX_FLAGS):
        key.update(part.encode() + b"\0")
    target = cache_dir() / f"{Path(source_name).stem}-{key.hexdigest()[:20]}.so"
    if target.is_file():
        return target

    # Compile in a scratch folder, then rename into the cache: a crash or a second
    # process never leaves a half-written library under the final name.
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / f"dmoe_edu-{os.getuid()}" / "emulate"
        warnings.warn(f"cannot create the kernel cache {target.parent} ({exc}); "
                      f"using {fallback} (set DMOE_EDU_CACHE to choose)", stacklevel=3)
        target = fallback / target.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_file():
            return target
    with tempfile.TemporaryDirectory(prefix="dmoe-emulate-") as scratch:
        scratch = Path(scratch)
        (scratch / "cpu_shim.h").write_text(shim)
        (scratch / source_name).write_text(code)
        (scratch / "launch.cpp").write_text(unit)
        built = scratch / "kernels.so"
        command = [compiler, *CXX_FLAGS, "-o", str(built), "launch.cpp"]
        logger.info("compiling %s for the CPU emulation: %s", source_name,
                    " ".join(command))
        done = subprocess.run(command, cwd=scratch, capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            raise KernelCompileError(
                f"{Path(compiler).name} could not compile {source_name} for the CPU "
                f"emulation:\n{done.stderr.strip()}"
            )
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(built, partial)
        os.replace(partial, target)
    return target


class RawModule:
    """A CUDA C source compiled for the CPU; ``cupy.RawModule``'s interface.

    Args:
        code: CUDA C source with one or more ``extern "C" __global__`` kernels that
            follow the emulation's rules (no shared memory, barriers, shuffles or
            atomics; one-dimensional grids).
        name: file name used in compiler messages. Default: ``"module.cu"``.

    Raises:
        CompilerNotFoundError: if no C++ compiler is found.
        KernelCompileError: if the source does not compile; the message carries the
            compiler's output, with line numbers in ``name``.
        ValueError: if the source declares no ``extern "C" __global__`` kernel.
    """

    def __init__(self, code: str, name: str = "module.cu"):
        self.signatures = parse_kernels(code)
        if not self.signatures:
            raise ValueError(
                f'{name} declares no kernel: expected at least one line like '
                f'extern "C" __global__ void my_kernel(...)'
            )
        self.path = _build(code, name, list(self.signatures))
        self._library = ctypes.CDLL(str(self.path))
        self._kernels: dict[str, EmulatedKernel] = {}

    def get_function(self, name: str) -> EmulatedKernel:
        """The kernel ``name``, ready to call as ``kernel((grid,), (block,), args)``."""
        if name not in self.signatures:
            raise KeyError(
                f"no kernel {name!r} here; kernels: {sorted(self.signatures)}"
            )
        if name not in self._kernels:
            entry = getattr(self._library, f"emu_{name}")
            args = ctypes.POINTER(ctypes.c_void_p)
            entry.argtypes = [ctypes.c_uint, ctypes.c_uint, args]
            entry.restype = None
            self._kernels[name] = EmulatedKernel(name, self.signatures[name], entry)
        return self._kernels[name]


class EmulatedKernel(Kernel):
    """A kernel of a :class:`RawModule`: every argument checked, then run on the CPU."""

    def __init__(self, name: str, params: Sequence[Param], entry):
        super().__init__(name, params)
        self._entry = entry

    def _check_device(self, param: Param, tensor: Tensor) -> None:
        if tensor.device.type != "cpu":
            raise ValueError(
                f"{self.name}: argument {param.name!r} is on {tensor.device}; the CPU "
                "emulation reads host memory only (use the 'cupy' backend on a GPU)"
            )

    def _launch(self, grid: int, block: int, args: tuple) -> None:
        # Like cuLaunchKernel: an array holding the address of each argument's value.
        values = []
        for param, arg in zip(self.params, args):
            if param.pointer:
                values.append(ctypes.c_void_p(None if arg is None else arg.data_ptr()))
            else:
                values.append(_CTYPES[param.base](arg.item()))
        addresses = (ctypes.c_void_p * len(values))(*map(ctypes.addressof, values))
        self._entry(grid, block, addresses)


class EmulateBackend(KernelBackend):
    """The package's ``kernels/*.cu``, compiled once per process and run on the CPU."""

    name = "emulate"
    default_max_blocks = 4096

    def __init__(self):
        self._modules: dict[str, RawModule] = {}
        self._lock = threading.Lock()

    def module(self, file: str) -> RawModule:
        """The compiled ``kernels/<file>.cu``."""
        with self._lock:
            if file not in self._modules:
                self._modules[file] = RawModule(kernel_source(file), f"{file}.cu")
            return self._modules[file]

    def kernel(self, file: str, name: str, device: torch.device) -> Kernel:
        return self.module(file).get_function(name)

    def max_blocks(self, device: torch.device) -> int:
        return self.default_max_blocks


_backend = EmulateBackend()


def _require_cpu(*tensors: Tensor) -> None:
    for tensor in tensors:
        if tensor.device.type != "cpu":
            raise ValueError(
                f"the emulate backend runs on CPU tensors, got one on {tensor.device}; "
                "use the 'cupy' or 'reference' backend for CUDA tensors"
            )


def softmax_gate(gate_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Emulate backend of :func:`dmoe_edu.ops.softmax_gate` (inputs checked)."""
    _require_cpu(gate_logits)
    return kernel_softmax_gate(_backend, gate_logits, mask)


def combine(gate_probs: Tensor, expert_out: Tensor) -> Tensor:
    """Emulate backend of :func:`dmoe_edu.ops.combine` (inputs checked)."""
    _require_cpu(gate_probs, expert_out)
    return kernel_combine(_backend, gate_probs, expert_out)


def status() -> str | None:
    """``None`` if the emulate backend can run here, else the reason it cannot."""
    try:
        find_compiler()
    except CompilerNotFoundError as exc:
        return str(exc)
    return None
