"""The ``emulate`` backend: the package's CUDA kernels, compiled for the CPU and run
one thread at a time.

The ``.cu`` files are compiled unchanged by the system C++ compiler (``$CXX``, which
may carry arguments such as ``"ccache g++"``, else ``c++``, ``g++`` or ``clang++``)
behind ``kernels/cpu_shim.h``, which spells CUDA's keywords and built-in indices as
C++ and turns ``__syncthreads``, ``__shared__``, atomics and warp shuffles into
compile errors. A launch then runs every thread of every block in a loop. The
package's kernels never let threads share data, so that order gives exactly what the
GPU computes, up to the last bits of ``exp`` and of summation order.

The backend counts as available (:func:`status`) once the compiler has built the
package's two kernel files, so a compiler that fails or produces nothing is reported
with its exit status and output, before any op runs.

Compiled libraries are cached on disk (``$DMOE_EDU_CACHE``, else
``$XDG_CACHE_HOME/dmoe_edu``, else ``~/.cache/dmoe_edu``; ``~`` is expanded), keyed by
the sources, the compiler and its flags: the first use costs a second or two, later
ones nothing. A library is stored with the SHA-256 of its bytes beside it, checked
before every load: a damaged one is rebuilt, with a warning. When the cache folder
cannot be written (a read-only mount, another user's folder), the libraries go to a
private temporary folder of this process instead (``tempfile.mkdtemp``, mode 0700,
removed at exit), with a warning that names the folder and the reason;
:func:`cache_dir` says which folder is in use.

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

What a kernel may use is kept close to NVRTC's device environment: the shim includes
no standard header, so host-only names (``INFINITY``, ``HUGE_VALF``, ``M_PI``,
``std::exp``, ``int64_t``) fail to compile here as they fail under NVRTC, while what
NVRTC offers without headers is declared: the math library in float and double with
CUDA's float overloads (``exp(1.0f)`` is a float), ``min``/``max`` with CUDA's
overloads, ``umin``/``llmin``..., ``rsqrtf``, the fast intrinsics (``__expf``,
``__logf``, ``__fdividef``, ``__saturatef``...), bit casts (``__int_as_float``...),
rounding conversions (``__float2int_rn``...), integer intrinsics (``__popc``,
``__clz``, ``__brev``...), ``__ldg``, ``warpSize``, vector types (``float4``,
``make_float4``...), ``printf`` (to the process's standard output, flushed after each
launch), ``assert`` and ``__trap()`` (both raise a ``RuntimeError`` naming the block
and thread). A test compiles a list of snippets with both compilers and checks that
they agree.

Limitations: slow (one simulated thread after another, single core): fine for the
course's sizes, far from the reference backend's speed on big tensors. Kernels that
need threads to cooperate (shared memory, barriers, warp shuffles and votes, atomics)
do not compile here, by design. Differences from NVRTC that remain: the fast
intrinsics (``__expf``...) are the accurate functions, so their last bits differ from
a GPU's; only round-to-nearest versions of the rounded arithmetic (``__fadd_rn``...)
exist; ``clock()``/``clock64()``, rare special functions (``erfinvf``,
``normcdfinvf``, Bessel functions), ``__half``/``__nv_bfloat16`` and
``__CUDA_ARCH__``/``__CUDACC_RTC__`` are missing; g++ may accept a GNU extension that
NVRTC rejects (variable-length arrays are made an error).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .contract import check_combine, check_softmax_gate
from .kernels import (
    KERNEL_FILES,
    Kernel,
    KernelBackend,
    Param,
    RawModuleBase,
    kernel_combine,
    kernel_dir,
    kernel_softmax_gate,
    kernel_source,
    warn_user,
)

logger = logging.getLogger(__name__)

# -pedantic-errors: g++ accepts GNU extensions (variable-length arrays, __int128,
# overloads ISO C++ calls ambiguous) that NVRTC rejects.
CXX_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-ffp-contract=off",
             "-pedantic-errors")

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
    """The C++ compiler rejected a kernel source, or produced no library; the message
    holds its exit status and output."""


# --------------------------------------------------------------------------- compiler


def compiler_command() -> list[str]:
    """The command line that runs the C++ compiler: its path, then any arguments.

    ``$CXX`` if set (split like a shell would: ``"ccache g++"`` or ``"g++ -O1"``), else
    the first of ``c++``, ``g++``, ``clang++`` on the ``PATH``.

    Raises:
        CompilerNotFoundError: if ``$CXX`` names no executable, or none is found.
    """
    return list(_resolve_compiler(os.environ.get("CXX", ""), os.environ.get("PATH")))


@functools.lru_cache(maxsize=16)
def _resolve_compiler(wanted: str, path: str | None) -> tuple[str, ...]:
    # Cached per ($CXX, $PATH): every launch asks for the compiler's modules.
    start = "the emulate backend compiles the CUDA kernels with a C++ compiler"
    if wanted.strip():
        try:
            words = shlex.split(wanted)
        except ValueError as exc:
            raise CompilerNotFoundError(
                f"{start}, and $CXX={wanted!r} cannot be read as a command ({exc}). "
                "Fix CXX, or unset it to use c++, g++ or clang++ from the PATH."
            ) from None
        found = shutil.which(words[0], path=path)
        if found is None:
            raise CompilerNotFoundError(
                f"{start}, and $CXX={wanted!r} is not an executable ({words[0]!r} is "
                "not found). Fix CXX, or unset it to use c++, g++ or clang++ from the "
                "PATH (Debian/Ubuntu: apt-get install g++; macOS: xcode-select "
                "--install), or use the 'reference' backend."
            )
        return (found, *words[1:])
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name, path=path)
        if found:
            return (found,)
    raise CompilerNotFoundError(
        f"{start}, and none of c++, g++, clang++ is on the PATH. Install one "
        "(Debian/Ubuntu: apt-get install g++; macOS: xcode-select --install), or set "
        "CXX, or use the 'reference' backend."
    )


def find_compiler() -> str:
    """The C++ compiler the emulation uses, as a command line (see
    :func:`compiler_command`).

    Raises:
        CompilerNotFoundError: if none is found.
    """
    return shlex.join(compiler_command())


@functools.cache
def _compiler_version(command: tuple[str, ...]) -> str:
    # The first line of --version, or "" when the command does not answer it.
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True,
                              check=False, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = (done.stdout or done.stderr).splitlines()
    return lines[0] if done.returncode == 0 and lines else ""


# --------------------------------------------------------------------------- the cache

_cache_lock = threading.Lock()
_unwritable: dict[Path, str] = {}  # cache folder -> why it could not be written
_writable: set[Path] = set()
_fallback: Path | None = None


def configured_cache_dir() -> Path:
    """The cache folder the settings ask for, absolute, whether or not it can be
    written: ``$DMOE_EDU_CACHE/emulate``, else ``$XDG_CACHE_HOME/dmoe_edu/emulate``,
    else ``~/.cache/dmoe_edu/emulate``."""
    if os.environ.get("DMOE_EDU_CACHE"):
        root = Path(os.environ["DMOE_EDU_CACHE"]).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        root = Path(base).expanduser() / "dmoe_edu"
    return Path(os.path.abspath(root / "emulate"))


def cache_dir() -> Path:
    """The folder compiled kernel libraries are written to: the configured one if it
    can be written (it is created if missing), else this process's private fallback
    (with a warning naming the folder and the reason)."""
    folder = configured_cache_dir()
    reason = _write_problem(folder)
    return folder if reason is None else _fall_back(folder, reason)


def _write_problem(folder: Path) -> str | None:
    # Why a file cannot be created in folder, or None; tried once per folder.
    with _cache_lock:
        if folder in _unwritable:
            return _unwritable[folder]
        if folder in _writable:
            return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as exc:
        return str(exc)
    with _cache_lock:
        _writable.add(folder)
    return None


def _fall_back(folder: Path, reason: str) -> Path:
    # This process's private folder (made once, removed at exit), with one warning
    # per unwritable cache folder.
    global _fallback
    with _cache_lock:
        first = folder not in _unwritable
        _unwritable[folder] = reason
        if _fallback is None:
            _fallback = Path(tempfile.mkdtemp(prefix="dmoe_edu-emulate-"))
            atexit.register(shutil.rmtree, _fallback, ignore_errors=True)
        fallback = _fallback
    if first:
        warn_user(
            f"the kernel cache {folder} cannot be written ({reason}); compiled kernels "
            f"go to {fallback} instead, a private folder of this process removed at "
            f"exit (set DMOE_EDU_CACHE to a writable folder to keep them)"
        )
    return fallback


def _write_atomically(target: Path, data: bytes) -> None:
    # Write under a unique temporary name, then rename: a crash or a second process
    # never leaves a half-written file under the final name.
    partial = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _store(data: bytes, name: str) -> Path:
    """Put a library into the cache, with its digest; fall back when the configured
    folder cannot be written. Returns the library's path."""
    folder = cache_dir()
    try:
        return _write_library(folder, name, data)
    except OSError as exc:
        if folder != configured_cache_dir():
            raise  # the private fallback itself failed: nothing left to try
        with _cache_lock:
            _writable.discard(folder)
        return _write_library(_fall_back(folder, str(exc)), name, data)


def _write_library(folder: Path, name: str, data: bytes) -> Path:
    # The digest first: a reader that finds the new library always finds its digest.
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / f"{name}.sha256",
                      hashlib.sha256(data).hexdigest().encode())
    _write_atomically(folder / name, data)
    return folder / name


def _intact(path: Path) -> bool:
    # The library's bytes match the digest stored beside it (a truncated or damaged
    # file does not; loading one can crash the process with a bus error).
    try:
        digest = (path.parent / f"{path.name}.sha256").read_text().strip()
        return hashlib.sha256(path.read_bytes()).hexdigest() == digest
    except OSError:
        return False


def _cached(name: str) -> Path | None:
    # A stored library under that name: in the fallback (which holds what this process
    # had to rebuild), else in the configured folder.
    with _cache_lock:
        fallback = _fallback
    for folder in (fallback, configured_cache_dir()):
        if folder is not None and (folder / name).is_file():
            return folder / name
    return None


# --------------------------------------------------------------------------- building


def _translation_unit(source_name: str, kernels: Sequence[str]) -> str:
    # The shim, the unchanged .cu file, then one C entry point per kernel that runs
    # blocks first .. last - 1 of the grid, emu_<kernel>(grid, block, first, last,
    # args), and returns 0, or 1 after a failed assert.
    lines = ['#include "cpu_shim.h"', f'#include "{source_name}"', ""]
    for name in kernels:
        lines.append(
            f'extern "C" int emu_{name}(unsigned int grid, unsigned int block, '
            f"unsigned int first, unsigned int last, void** args) "
            f"{{ return emu::launch({name}, grid, block, first, last, args); }}"
        )
    lines.append('extern "C" const char* emu_last_error() { return emu::last_error; }')
    return "\n".join(lines) + "\n"


def _library_name(code: str, source_name: str, kernels: Sequence[str],
                  command: tuple[str, ...]) -> str:
    # The library's name hashes everything that could change what it contains.
    shim = (kernel_dir() / "cpu_shim.h").read_text()
    key = hashlib.sha256()
    for part in (shim, code, _translation_unit(source_name, kernels), *command,
                 _compiler_version(command), *CXX_FLAGS):
        key.update(part.encode() + b"\0")
    return f"{Path(source_name).stem}-{key.hexdigest()[:20]}.so"


def _compile(code: str, source_name: str, kernels: Sequence[str],
             command: tuple[str, ...]) -> bytes:
    """Compile ``code`` behind the shim in a scratch folder; the library's bytes."""
    with tempfile.TemporaryDirectory(prefix="dmoe-emulate-") as scratch:
        scratch = Path(scratch)
        (scratch / "cpu_shim.h").write_text((kernel_dir() / "cpu_shim.h").read_text())
        (scratch / source_name).write_text(code)
        (scratch / "launch.cpp").write_text(_translation_unit(source_name, kernels))
        built = scratch / "kernels.so"
        argv = [*command, *CXX_FLAGS, "-o", str(built), "launch.cpp"]
        logger.info("compiling %s for the CPU emulation: %s", source_name,
                    shlex.join(argv))
        try:
            done = subprocess.run(argv, cwd=scratch, capture_output=True, text=True,
                                  check=False)
        except OSError as exc:
            raise KernelCompileError(
                f"{shlex.join(command)} could not be run to compile {source_name} for "
                f"the CPU emulation: {exc}"
            ) from None
        output = "\n".join(filter(None, (done.stderr.strip(), done.stdout.strip())))
        if done.returncode != 0:
            raise KernelCompileError(
                f"{shlex.join(command)} could not compile {source_name} for the CPU "
                f"emulation (exit status {done.returncode}):\n"
                f"{output or '(no output)'}"
            )
        if not built.is_file() or not built.stat().st_size:
            raise KernelCompileError(
                f"{shlex.join(command)} exited with status 0 but produced no library "
                f"for {source_name} (is it a C++ compiler?); its output: "
                f"{output or '(none)'}"
            )
        return built.read_bytes()


def _build(code: str, source_name: str, kernels: Sequence[str],
           command: tuple[str, ...], rebuild: bool = False) -> Path:
    """The path of ``code``'s library: a cached one, or one compiled now."""
    name = _library_name(code, source_name, kernels, command)
    cached = None if rebuild else _cached(name)
    if cached is not None:
        return cached
    return _store(_compile(code, source_name, kernels, command), name)


def _load(path: Path, kernels: Sequence[str]) -> ctypes.CDLL:
    # Raises OSError for a library that is damaged or lacks an entry point.
    if not _intact(path):
        raise OSError(f"{path} does not match the SHA-256 stored beside it")
    library = ctypes.CDLL(str(path))
    for name in (*(f"emu_{k}" for k in kernels), "emu_last_error"):
        if not hasattr(library, name):
            raise OSError(f"{path} has no entry point {name}")
    return library


class RawModule(RawModuleBase):
    """A CUDA C source compiled for the CPU; ``cupy.RawModule``'s interface.

    Args:
        code: CUDA C source (``str``, or ``bytes`` read as UTF-8) with one or more
            ``extern "C" __global__`` kernels that follow the emulation's rules (no
            shared memory, barriers, shuffles or atomics; one-dimensional grids).
        name: file name used in compiler messages: a plain name such as
            ``"mine.cu"`` (letters, digits, ``.``, ``_``, ``-``; no folders).
            Default: ``"module.cu"``.
        compiler: the compiler command line. Default: :func:`compiler_command`.

    Raises:
        CompilerNotFoundError: if no C++ compiler is found.
        KernelCompileError: if the source does not compile (the message carries the
            compiler's exit status and output, with line numbers in ``name``), or the
            compiler produced no library.
        TypeError: if ``code`` is neither ``str`` nor ``bytes``.
        ValueError: if the source declares no ``extern "C" __global__`` kernel, or
            ``name`` is not a plain file name.

    Kernels are found by reading their declarations as text, before the
    preprocessor runs: a kernel inside ``#if 0`` still counts (and fails to
    link), and one declared through a macro is not found. Write each kernel's
    ``extern "C" __global__ void name(...)`` out in full.
    """

    def __init__(self, code: str | bytes, name: str = "module.cu",
                 compiler: Sequence[str] | None = None):
        code = self._read_source(code, name)
        command = tuple(compiler) if compiler else tuple(compiler_command())
        kernels = list(self.signatures)
        self.path = _build(code, name, kernels, command)
        try:
            self._library = _load(self.path, kernels)
        except OSError as exc:
            warn_user(f"the cached kernel library {self.path} cannot be used ({exc}); "
                      f"compiling {name} again")
            self.path = _build(code, name, kernels, command, rebuild=True)
            self._library = _load(self.path, kernels)
        self._library.emu_last_error.restype = ctypes.c_char_p

    def _make_kernel(self, name: str) -> EmulatedKernel:
        # The library's entry point for this kernel: grid, block, first, last, args.
        entry = getattr(self._library, f"emu_{name}")
        entry.argtypes = [ctypes.c_uint] * 4 + [ctypes.POINTER(ctypes.c_void_p)]
        entry.restype = ctypes.c_int
        return EmulatedKernel(name, self.signatures[name], entry,
                              self._library.emu_last_error)


LAUNCH_CHUNK_THREADS = 1 << 20
"""Threads an emulated launch runs between two chances for Python to stop it."""


class EmulatedKernel(Kernel):
    """A kernel of a :class:`RawModule`: every argument checked, then run on the CPU.

    A failed ``assert`` or a ``__trap()`` in the kernel stops the launch and raises a
    ``RuntimeError`` naming the condition, the block and the thread.
    """

    def __init__(self, name: str, params: Sequence[Param], entry, last_error=None):
        super().__init__(name, params)
        self._entry = entry
        self._last_error = last_error

    def _check_device(self, param: Param, tensor: Tensor) -> None:
        if tensor.device.type != "cpu":
            hint = (" (use the 'cupy' backend on a GPU)"
                    if tensor.device.type == "cuda" else "")
            raise ValueError(
                f"{self.name}: argument {param.name!r} is on {tensor.device}; the CPU "
                f"emulation reads host memory only{hint}"
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

        # Chunks of about LAUNCH_CHUNK_THREADS threads: between two of them Python
        # runs its signal handlers, so Ctrl-C stops a runaway launch.
        chunk = max(1, LAUNCH_CHUNK_THREADS // block)
        for first in range(0, grid, chunk):
            last = min(grid, first + chunk)
            if self._entry(grid, block, first, last, addresses):
                message = (self._last_error().decode(errors="replace")
                           if self._last_error is not None else "the launch failed")
                raise RuntimeError(f"{self.name}: {message}")


class EmulateBackend(KernelBackend):
    """The package's ``kernels/*.cu``, compiled once per process and compiler and run
    on the CPU."""

    name = "emulate"
    default_max_blocks = 4096

    def __init__(self):
        self._modules: dict[tuple[tuple[str, ...], str], RawModule] = {}
        self._lock = threading.Lock()

    def module(self, file: str, command: Sequence[str] | None = None) -> RawModule:
        """The compiled ``kernels/<file>.cu`` (by ``command``, default the compiler of
        :func:`compiler_command`)."""
        command = tuple(command) if command else tuple(compiler_command())
        with self._lock:
            key = (command, file)
            if key not in self._modules:
                self._modules[key] = RawModule(kernel_source(file), f"{file}.cu",
                                               compiler=command)
            return self._modules[key]

    def kernel(self, file: str, name: str, device: torch.device) -> Kernel:
        return self.module(file).get_function(name)

    def max_blocks(self, device: torch.device) -> int:
        return self.default_max_blocks


_backend = EmulateBackend()


def _require_cpu(*tensors: Tensor) -> None:
    for tensor in tensors:
        if tensor.device.type != "cpu":
            hint = ("use the 'cupy' or 'reference' backend for CUDA tensors"
                    if tensor.device.type == "cuda"
                    else "use the 'reference' backend for other devices")
            raise ValueError(
                f"the emulate backend runs on CPU tensors, got one on {tensor.device}; "
                f"{hint}"
            )


def softmax_gate(gate_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Emulate backend of :func:`dmoe_edu.ops.softmax_gate` (inputs checked)."""
    mask = check_softmax_gate(gate_logits, mask)
    _require_cpu(gate_logits)
    return kernel_softmax_gate(_backend, gate_logits, mask)


def combine(gate_probs: Tensor, expert_out: Tensor) -> Tensor:
    """Emulate backend of :func:`dmoe_edu.ops.combine` (inputs checked)."""
    check_combine(gate_probs, expert_out)
    _require_cpu(gate_probs, expert_out)
    return kernel_combine(_backend, gate_probs, expert_out)


_statuses: dict[tuple[str, ...], str | None] = {}
_status_lock = threading.Lock()


def status() -> str | None:
    """``None`` if the emulate backend can run here, else the reason it cannot.

    Runs the compiler once per compiler command and process: it builds the package's
    kernels (or finds them in the cache), so a compiler that fails or produces no
    library is reported here, with its exit status and output.
    """
    try:
        command = tuple(compiler_command())
    except CompilerNotFoundError as exc:
        return str(exc)
    with _status_lock:
        if command not in _statuses:
            _statuses[command] = _try_compiler(command)
        return _statuses[command]


def _try_compiler(command: tuple[str, ...]) -> str | None:
    origin = "from $CXX" if os.environ.get("CXX", "").strip() else "found on the PATH"
    advice = ("fix CXX or unset it" if origin == "from $CXX"
              else "install a working g++ or clang++, or set CXX")
    try:
        for file in KERNEL_FILES:
            _backend.module(file, command)
    except (KernelCompileError, OSError) as exc:
        return (f"the C++ compiler {shlex.join(command)} ({origin}) cannot build the "
                f"kernels: {exc}\n({advice}, or use the 'reference' backend)")
    return None


__all__ = [
    "CXX_FLAGS",
    "CompilerNotFoundError",
    "EmulatedKernel",
    "KernelCompileError",
    "RawModule",
    "cache_dir",
    "combine",
    "compiler_command",
    "configured_cache_dir",
    "find_compiler",
    "softmax_gate",
    "status",
]
