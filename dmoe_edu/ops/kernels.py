"""The package's CUDA kernels seen from Python: where they are, what they take, how
to launch them, and the autograd Functions the ``cupy`` and ``emulate`` backends share.

The kernels live in ``kernels/*.cu`` (``gating.cu``, ``combine.cu``). Both kernel
backends run the very same source: ``cupy`` compiles it for the GPU with NVRTC,
``emulate`` compiles it for the CPU with the system C++ compiler. They differ only in
how a launch reaches the hardware, so everything else lives here, once:

* :func:`kernel_dir`, :func:`kernel_source` and :func:`parse_kernels` find the sources
  and read each ``extern "C" __global__`` signature;
* :class:`Kernel` checks every argument against that signature before a launch
  (CuPy checks nothing: a wrong dtype or a strided view would be read as garbage);
* :func:`launch_shape` sets the block size and caps the grid, e.g. to show that the
  grid-stride loop covers any amount of work with a tiny grid;
* the autograd Functions turn the kernels into differentiable ops.

Non-contiguous inputs to the ops are copied to contiguous ones first
(``.contiguous()``); :class:`Kernel` itself rejects them, as it rejects wrong dtypes
and devices.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

KERNEL_FILES = ("gating", "combine")

# C parameter types a kernel may declare, and what Python must pass for each.
_SCALAR_TYPES = {
    "int": np.int32,
    "unsigned int": np.uint32,
    "long long": np.int64,
    "long long int": np.int64,
    "unsigned long long": np.uint64,
    "float": np.float32,
    "double": np.float64,
}
_POINTER_DTYPES = {
    "float": (torch.float32,),
    "double": (torch.float64,),
    "int": (torch.int32,),
    "long long": (torch.int64,),
    "unsigned char": (torch.uint8, torch.bool),
}
_QUALIFIERS = {"const", "__restrict__", "volatile"}
_ENTRY_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')

DEFAULT_BLOCK = 256


# --------------------------------------------------------------------------- sources


def kernel_dir() -> Path:
    """The folder holding the ``.cu`` files of the installed package.

    A wheel carries them as ``dmoe_edu/kernels/``; a source checkout (and an editable
    install) keeps them in ``kernels/`` beside the package.
    """
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "kernels", package.parent / "kernels"):
        if (folder / "gating.cu").is_file():
            return folder
    raise FileNotFoundError(
        f"the CUDA sources (gating.cu, combine.cu) are missing: looked in "
        f"{package / 'kernels'} and {package.parent / 'kernels'}"
    )


def kernel_source(name: str) -> str:
    """The text of ``kernels/<name>.cu``; ``name`` is one of :data:`KERNEL_FILES`."""
    if name not in KERNEL_FILES:
        raise ValueError(
            f"unknown kernel file {name!r}; expected one of {KERNEL_FILES}"
        )
    return (kernel_dir() / f"{name}.cu").read_text()


@dataclass(frozen=True)
class Param:
    """One parameter of a kernel: its C type reduced to what a launch must pass."""

    name: str
    base: str  # the C type without qualifiers or '*', e.g. "float", "long long"
    pointer: bool

    def describe(self) -> str:
        return f"{self.base}{'*' if self.pointer else ''} {self.name}"


def parse_kernels(source: str) -> dict[str, tuple[Param, ...]]:
    """Read every ``extern "C" __global__`` kernel of a CUDA source and its parameters.

    Args:
        source: CUDA C source text.

    Returns:
        Kernel name to its parameters, in declaration order.

    Raises:
        ValueError: if a parameter has a type a launch cannot pass (for example a
            struct, or a pointer to pointer).

    Example:
        >>> code = 'extern "C" __global__ void k(const float* x, int n) {}'
        >>> sig = parse_kernels(code)
        >>> [p.describe() for p in sig["k"]]
        ['float* x', 'int n']
    """
    kernels = {}
    for match in _ENTRY_RE.finditer(source):
        name, param_text = match.group(1), match.group(2)
        params = []
        for raw in filter(None, (p.strip() for p in param_text.split(","))):
            params.append(_parse_param(name, raw))
        kernels[name] = tuple(params)
    return kernels


def _parse_param(kernel: str, raw: str) -> Param:
    # "const float* __restrict__ gate_probs" -> base "float", pointer, name "gate_probs"
    stars = raw.count("*")
    words = [w for w in raw.replace("*", " ").split() if w not in _QUALIFIERS]
    if len(words) < 2:
        raise ValueError(f"kernel {kernel}: cannot read parameter {raw!r}")
    base, name = " ".join(words[:-1]), words[-1]
    known = _POINTER_DTYPES if stars == 1 else _SCALAR_TYPES
    if stars > 1 or base not in known:
        raise ValueError(
            f"kernel {kernel}: parameter {raw!r} has a type a launch cannot pass; "
            f"use a pointer to one of {sorted(_POINTER_DTYPES)} or one of "
            f"{sorted(_SCALAR_TYPES)}"
        )
    return Param(name=name, base=base, pointer=stars == 1)


@functools.cache
def package_kernels(name: str) -> dict[str, tuple[Param, ...]]:
    """Signatures of the kernels in the package's ``kernels/<name>.cu``."""
    return parse_kernels(kernel_source(name))


# --------------------------------------------------------------------------- launches


@dataclass
class _LaunchShape:
    block: int = DEFAULT_BLOCK
    max_blocks: int | None = None


_shape = _LaunchShape()


@contextlib.contextmanager
def launch_shape(block: int = DEFAULT_BLOCK, max_blocks: int | None = None) -> Iterator:
    """Launch the package's kernels with ``block`` threads a block and at most
    ``max_blocks`` blocks, inside a ``with`` block.

    The grid-stride loop of every kernel makes the result independent of both; tests
    and the kernels notebook use this to show it. Outside the block, launches use
    256 threads and as many blocks as the work needs (capped per backend).

    Args:
        block: threads per block, 1 to 1024. Default: 256.
        max_blocks: cap on the number of blocks; ``None`` for the backend's default.

    Example:
        >>> with launch_shape(block=32, max_blocks=2):
        ...     pass  # 64 threads in all, however large the tensors
    """
    if not 1 <= int(block) <= 1024:
        raise ValueError(f"block must be 1 to 1024 threads, got {block}")
    if max_blocks is not None and int(max_blocks) < 1:
        raise ValueError(f"max_blocks must be >= 1 or None, got {max_blocks}")
    global _shape
    previous = _shape
    _shape = _LaunchShape(int(block), None if max_blocks is None else int(max_blocks))
    try:
        yield
    finally:
        _shape = previous


def grid_for(work: int, default_max_blocks: int) -> tuple[int, int]:
    """``(grid, block)`` for ``work`` output elements under :func:`launch_shape`.

    Example:
        >>> grid_for(1000, default_max_blocks=2)
        (2, 256)
    """
    block = _shape.block
    cap = _shape.max_blocks or default_max_blocks
    return max(1, min(-(-work // block), cap)), block


class Kernel:
    """One compiled kernel with its signature; calling it checks, then launches.

    Backends subclass it and implement ``_launch``; the call signature mirrors
    ``cupy.RawKernel``: ``kernel((grid,), (block,), args)``.

    Args:
        name: the kernel's ``extern "C"`` name.
        params: its parameters, from :func:`parse_kernels`.

    Every argument is checked against its parameter before the launch:

    * a pointer parameter takes a contiguous tensor whose dtype matches the C type
      (``float`` - float32, ``double`` - float64, ``unsigned char`` - uint8 or bool,
      ``int`` - int32, ``long long`` - int64) on the backend's device, or ``None`` for
      a null pointer;
    * a scalar parameter takes the numpy scalar of exactly its width (``long long`` -
      ``np.int64``, ``int`` - ``np.int32``, ``float`` - ``np.float32``, ...), never a
      Python number, whose width the kernel could not know.
    """

    def __init__(self, name: str, params: Sequence[Param]):
        self.name = name
        self.params = tuple(params)

    def __repr__(self) -> str:
        args = ", ".join(p.describe() for p in self.params)
        return f"{type(self).__name__}({self.name}({args}))"

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: Sequence):
        grid_x, block_x = _check_dims(self.name, grid, block)
        self._check_args(args)
        self._launch(grid_x, block_x, tuple(args))

    def _check_device(self, param: Param, tensor: Tensor) -> None:
        raise NotImplementedError

    def _launch(self, grid: int, block: int, args: tuple) -> None:
        raise NotImplementedError

    def _check_args(self, args: Sequence) -> None:
        if len(args) != len(self.params):
            raise TypeError(
                f"{self.name} takes {len(self.params)} arguments "
                f"({', '.join(p.describe() for p in self.params)}), got {len(args)}"
            )
        for param, value in zip(self.params, args):
            where = f"{self.name}: argument {param.name!r} ({param.describe()})"
            if param.pointer:
                if value is None:
                    continue
                if not isinstance(value, Tensor):
                    raise TypeError(f"{where} must be a tensor or None, got "
                                    f"{type(value).__name__}")
                allowed = _POINTER_DTYPES[param.base]
                if value.dtype not in allowed:
                    names = " or ".join(map(str, allowed))
                    raise TypeError(f"{where} must have dtype {names}, "
                                    f"got {value.dtype}")
                if not value.is_contiguous():
                    raise ValueError(f"{where} must be contiguous, got strides "
                                     f"{value.stride()} for shape {tuple(value.shape)}")
                self._check_device(param, value)
            else:
                expected = _SCALAR_TYPES[param.base]
                if type(value) is not expected:
                    raise TypeError(f"{where} must be np.{expected.__name__}, got "
                                    f"{type(value).__name__} {value!r}")


def _check_dims(name: str, grid, block) -> tuple[int, int]:
    # One-dimensional grids and blocks only: the package's kernels index with .x alone.
    dims = []
    for label, dim, limit in (("grid", grid, 2**31 - 1), ("block", block, 1024)):
        dim = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if not dim or any(int(d) != 1 for d in dim[1:]):
            raise ValueError(f"{name}: {label} must be one-dimensional, like (n,), "
                             f"got {dim}")
        if not 1 <= int(dim[0]) <= limit:
            raise ValueError(f"{name}: {label} size must be 1 to {limit}, got {dim[0]}")
        dims.append(int(dim[0]))
    return dims[0], dims[1]


# --------------------------------------------------------------------------- the ops


class KernelBackend:
    """What the autograd Functions need from a backend: a kernel by file and name,
    and the default cap on the number of blocks for a tensor's device."""

    name = "kernels"

    def kernel(self, file: str, name: str, device: torch.device) -> Kernel:
        raise NotImplementedError

    def max_blocks(self, device: torch.device) -> int:
        raise NotImplementedError

    def launch(self, file: str, name: str, work: int, args: Sequence) -> None:
        """Launch ``file``'s kernel ``name`` over ``work`` output elements."""
        device = next(a.device for a in args if isinstance(a, Tensor))
        grid, block = grid_for(work, self.max_blocks(device))
        self.kernel(file, name, device)((grid,), (block,), args)


def _suffix(dtype: torch.dtype) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[dtype]


def _mask_operand(mask: Tensor | None, num_experts: int) -> tuple[Tensor | None, int]:
    # The kernel reads mask[b * row_stride + e]: a row broadcast over the batch (stride
    # 0 in its first dimension, as expand() makes) is passed once with row_stride 0.
    if mask is None:
        return None, 0
    if mask.dim() == 1:
        return mask.contiguous(), 0
    if len(mask) and mask.stride(0) == 0:
        return mask[0].contiguous(), 0
    return mask.contiguous(), num_experts


class _KernelSoftmaxGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_logits: Tensor, mask: Tensor | None, backend: KernelBackend):
        B, E = gate_logits.shape
        gate_logits = gate_logits.contiguous()
        gate_probs = gate_logits.new_empty((B, E))
        mask_bytes, mask_row_stride = _mask_operand(mask, E)

        # One thread per (b, e); nothing to launch for an empty batch.
        if B * E:
            backend.launch(
                "gating", f"softmax_gate_fwd_{_suffix(gate_logits.dtype)}", B * E,
                (gate_logits, mask_bytes, np.int64(mask_row_stride), gate_probs,
                 np.int64(B), np.int64(E)),
            )
        ctx.backend = backend
        ctx.save_for_backward(gate_probs)
        return gate_probs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_probs: Tensor):
        (gate_probs,) = ctx.saved_tensors
        B, E = gate_probs.shape
        grad_probs = grad_probs.contiguous()
        grad_logits = gate_probs.new_empty((B, E))
        if B * E:
            ctx.backend.launch(
                "gating", f"softmax_gate_bwd_{_suffix(gate_probs.dtype)}", B * E,
                (gate_probs, grad_probs, grad_logits, np.int64(B), np.int64(E)),
            )
        return grad_logits, None, None


class _KernelCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_probs: Tensor, expert_out: Tensor, backend: KernelBackend):
        B, E, H = expert_out.shape
        gate_probs = gate_probs.contiguous()
        expert_out = expert_out.contiguous()
        mixed = expert_out.new_empty((B, H))

        # One thread per (b, h); an empty expert count mixes nothing into zeros.
        if B * H and not E:
            mixed.zero_()
        elif B * H:
            backend.launch(
                "combine", f"combine_fwd_{_suffix(mixed.dtype)}", B * H,
                (gate_probs, expert_out, mixed, np.int64(B), np.int64(E), np.int64(H)),
            )
        ctx.backend = backend
        ctx.save_for_backward(gate_probs, expert_out)
        return mixed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mixed: Tensor):
        gate_probs, expert_out = ctx.saved_tensors
        B, E, H = expert_out.shape
        grad_mixed = grad_mixed.contiguous()
        sizes = (np.int64(B), np.int64(E), np.int64(H))
        suffix = _suffix(expert_out.dtype)
        grad_gates = grad_expert = None

        # d gate_probs: one thread per (b, e), each a dot product over H.
        if ctx.needs_input_grad[0]:
            grad_gates = gate_probs.new_zeros((B, E))
            if B * E and H:
                ctx.backend.launch("combine", f"combine_bwd_gates_{suffix}", B * E,
                                   (expert_out, grad_mixed, grad_gates, *sizes))

        # d expert_out: one thread per (b, e, h), each a single product.
        if ctx.needs_input_grad[1]:
            grad_expert = expert_out.new_empty((B, E, H))
            if B * E * H:
                ctx.backend.launch("combine", f"combine_bwd_expert_{suffix}", B * E * H,
                                   (gate_probs, grad_mixed, grad_expert, *sizes))
        return grad_gates, grad_expert, None


def kernel_softmax_gate(backend: KernelBackend, gate_logits: Tensor,
                        mask: Tensor | None) -> Tensor:
    """:func:`dmoe_edu.ops.softmax_gate` on ``backend``'s kernels (inputs checked)."""
    return _KernelSoftmaxGate.apply(gate_logits, mask, backend)


def kernel_combine(backend: KernelBackend, gate_probs: Tensor,
                   expert_out: Tensor) -> Tensor:
    """:func:`dmoe_edu.ops.combine` through ``backend``'s kernels (inputs checked)."""
    return _KernelCombine.apply(gate_probs, expert_out, backend)
