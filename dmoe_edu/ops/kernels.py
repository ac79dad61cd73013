"""The package's CUDA kernels seen from Python: where they are, what they take, how
to launch them, and the autograd Functions the ``cupy`` and ``emulate`` backends share.

The kernels live in ``kernels/*.cu`` (``gating.cu``, ``combine.cu``). Both kernel
backends run the very same source: ``cupy`` compiles it for the GPU with NVRTC,
``emulate`` compiles it for the CPU with the system C++ compiler. They differ only in
how a launch reaches the hardware, so everything else lives here, once:

* :func:`kernel_dir`, :func:`kernel_source` and :func:`parse_kernels` find the sources
  and read each ``extern "C" __global__`` signature; :func:`kernel_header` and
  :func:`kernel_function` cut a file's opening comment or one function out of it;
* :class:`Kernel` checks every argument against that signature before a launch
  (CuPy checks nothing: a wrong dtype or a strided view would be read as garbage);
* :func:`launch_shape` sets the block size and caps the grid, e.g. to show that the
  grid-stride loop covers any amount of work with a tiny grid;
* the autograd Functions turn the kernels into differentiable ops.

Non-contiguous inputs to the ops are copied to contiguous ones first
(``.contiguous()``); :class:`Kernel` itself rejects them, as it rejects wrong dtypes
and devices.

The ops' backward is first order only: a second derivative through a kernel backend
(``create_graph=True`` followed by another backward, ``gradgradcheck``) raises a
``RuntimeError`` that says so. Under ``torch.compile`` the kernel calls run eagerly
(a graph break), as Dynamo cannot trace a ctypes or CuPy launch.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

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
    "unsigned int": (torch.uint32,),
    "unsigned long long": (torch.uint64,),
    "unsigned char": (torch.uint8, torch.bool),
    "bool": (torch.bool,),
}
_QUALIFIERS = {"const", "__restrict__", "volatile"}

# Other spellings of those types, as CUDA on a 64-bit Linux or Windows host reads them
# (long and size_t are 64 bits wide under nvcc's LP64 and the emulation's g++ alike; on
# a Windows host long is 32 bits, so a kernel meant for both should say long long).
_SYNONYMS = {
    "signed": "int",
    "signed int": "int",
    "unsigned": "unsigned int",
    "long": "long long",
    "long int": "long long",
    "signed long long": "long long",
    "long long int": "long long",
    "signed long long int": "long long",
    "unsigned long": "unsigned long long",
    "unsigned long int": "unsigned long long",
    "unsigned long long int": "unsigned long long",
    "size_t": "unsigned long long",
    "unsigned char": "unsigned char",
    "bool": "bool",
}

# Comments, and string or character literals (kept, so that "//" inside one stays text).
_COMMENT_OR_LITERAL_RE = re.compile(
    r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'', re.S
)
# Attributes such as __launch_bounds__(256, 2) or __noinline__, up to one nesting level.
_ATTRIBUTES = r"(?:__\w+__\s*(?:\((?:[^()]|\([^()]*\))*\)\s*)?)*"
# __global__ void NAME(, with attributes on either side of the return type.
_KERNEL_RE = re.compile(
    rf"\b__global__\s+{_ATTRIBUTES}void\s+{_ATTRIBUTES}(?P<name>\w+)\s*\("
)
_EXTERN_C_BLOCK_RE = re.compile(r'\bextern\s+"C"\s*\{')
_EXTERN_C_RE = re.compile(r'\bextern\s+"C"')
_ARRAY_RE = re.compile(r"^(?P<head>.*?\w)\s*(?P<dims>(?:\[[^\]]*\]\s*)+)$", re.S)

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


def kernel_header(name: str, section: str | None = None) -> str:
    """The comment that opens ``kernels/<name>.cu``, or one titled section of it.

    Each ``.cu`` file opens with a block of ``//`` lines: a title line, then
    sections such as ``What it computes``, ``Thread mapping``, ``Layout``,
    ``Types`` and ``Limits``, each a line ``// Title`` followed by indented
    lines. The kernels notebook prints them from the files, so what a student
    reads is always what the compiler reads.

    Args:
        name: one of :data:`KERNEL_FILES`.
        section: the title of one section, or ``None`` for the whole header.
            Default: ``None``.

    Returns:
        The comment lines, ``//`` included, joined by newlines.

    Raises:
        ValueError: if ``name`` or ``section`` is unknown (the message lists
            the sections there are).

    Example:
        >>> print(kernel_header("combine", "Layout").splitlines()[0])
        // Layout
    """
    header = []
    for line in kernel_source(name).splitlines():
        if not line.startswith("//"):
            break
        header.append(line)
    if section is None:
        return "\n".join(header)

    # A section runs from its "// Title" line to the next blank "//" or title.
    titles = {}
    for number, line in enumerate(header[1:], start=1):
        text = line[2:]
        if text.startswith(" ") and not text.startswith("  ") and text.strip():
            titles[text.strip()] = number
    if section not in titles:
        raise ValueError(
            f"{name}.cu has no header section {section!r}; sections: {list(titles)}"
        )
    start = end = titles[section]
    while end + 1 < len(header) and header[end + 1].startswith("//  "):
        end += 1
    return "\n".join(header[start:end + 1])


_FUNCTION_RE = re.compile(
    r"^(?:template\s*<[^>\n]*>\s*\n)?[^\n;]*\b(?:__device__|__global__)\b"
    r"[^\n;(]*?\b(\w+)\s*\(",
    re.M,
)


def kernel_function(name: str, function: str) -> str:
    """The definition of one function of ``kernels/<name>.cu``, as the file has it.

    From its ``template`` line (if any) to its closing brace: a ``__device__``
    helper such as ``softmax_gate_forward``, or an ``extern "C" __global__``
    entry point such as ``softmax_gate_fwd_f32``.

    Args:
        name: one of :data:`KERNEL_FILES`.
        function: the function's name.

    Returns:
        The function's source text.

    Raises:
        ValueError: if ``name`` or ``function`` is unknown (the message lists
            the functions the file defines).

    Example:
        >>> print(kernel_function("gating", "exp_of").splitlines()[0])
        __device__ __forceinline__ float exp_of(float x) { return expf(x); }
    """
    source = kernel_source(name)
    for match in _FUNCTION_RE.finditer(source):
        if match.group(1) == function:
            return source[match.start():_closing_brace(source, match.end())]
    found = list(dict.fromkeys(m.group(1) for m in _FUNCTION_RE.finditer(source)))
    raise ValueError(
        f"{name}.cu defines no function {function!r}; functions: {found}"
    )


def _closing_brace(source: str, start: int) -> int:
    # The index just past the brace that closes the first "{" after start; "//"
    # comments are skipped (the kernels hold no string literals).
    depth, index = 0, start
    while index < len(source):
        if source.startswith("//", index):
            index = source.find("\n", index)
            if index < 0:
                break
            continue
        char = source[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    raise ValueError(f"unbalanced braces after offset {start}")


@dataclass(frozen=True)
class Param:
    """One parameter of a kernel: its C type reduced to what a launch must pass."""

    name: str
    base: str  # the C type without qualifiers or '*', e.g. "float", "long long"
    pointer: bool

    def describe(self) -> str:
        return f"{self.base}{'*' if self.pointer else ''} {self.name}"


def parse_kernels(source: str | bytes) -> dict[str, tuple[Param, ...]]:
    """Read every ``extern "C" __global__`` kernel of a CUDA source and its parameters.

    Kernels count when declared ``extern "C" __global__ void name(...)`` or inside an
    ``extern "C" { ... }`` block; comments, ``__launch_bounds__(...)`` and other
    ``__attribute__``-style words around ``void`` are skipped. A parameter ``float x[]``
    is a pointer, as C reads it; ``k(void)`` takes no parameter.

    Args:
        source: CUDA C source text (``bytes`` are read as UTF-8).

    Returns:
        Kernel name to its parameters, in declaration order.

    Raises:
        TypeError: if ``source`` is neither ``str`` nor ``bytes``.
        ValueError: if a parameter has a type a launch cannot pass (for example a
            struct, or a pointer to pointer).

    Example:
        >>> code = 'extern "C" __global__ void k(const float* x, int n) {}'
        >>> sig = parse_kernels(code)
        >>> [p.describe() for p in sig["k"]]
        ['float* x', 'int n']
    """
    code = _strip_comments(_as_text(source))
    blocks = _extern_c_blocks(code)
    kernels = {}
    for match in _KERNEL_RE.finditer(code):
        if not _is_extern_c(code, match.start(), blocks):
            continue  # C++ linkage: a mangled name no launcher can find
        name = match.group("name")
        param_text = _balanced(code, match.end() - 1)
        if param_text is None:
            raise ValueError(f"kernel {name}: its parameter list is not closed")
        raw_params = [p.strip() for p in _split_top_level(param_text)]
        if raw_params in ([""], ["void"]):
            raw_params = []
        kernels[name] = tuple(_parse_param(name, raw) for raw in raw_params)
    return kernels


def _as_text(source) -> str:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source).decode("utf-8")
    if not isinstance(source, str):
        raise TypeError(
            f"CUDA source must be str or bytes, got {type(source).__name__}"
        )
    return source


def _strip_comments(code: str) -> str:
    # Comments become a space; a literal keeps its quotes and word characters only, so
    # that braces or parentheses inside it cannot confuse the scans below.
    def replace(match: re.Match) -> str:
        text = match.group()
        if text.startswith("/"):
            return " " + "\n" * text.count("\n")
        return text[0] + re.sub(r"\W", "_", text[1:-1]) + text[-1]

    return _COMMENT_OR_LITERAL_RE.sub(replace, code)


def _balanced(code: str, open_at: int) -> str | None:
    # The text between the parenthesis at open_at and its matching close.
    depth = 0
    for i in range(open_at, len(code)):
        depth += {"(": 1, ")": -1}.get(code[i], 0)
        if depth == 0:
            return code[open_at + 1 : i]
    return None


def _split_top_level(text: str) -> list[str]:
    # Split at commas outside any parentheses or brackets.
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _extern_c_blocks(code: str) -> list[tuple[int, int]]:
    # (start, end) of every extern "C" { ... } block.
    blocks = []
    for match in _EXTERN_C_BLOCK_RE.finditer(code):
        depth = 0
        for i in range(match.end() - 1, len(code)):
            depth += {"{": 1, "}": -1}.get(code[i], 0)
            if depth == 0:
                blocks.append((match.end(), i))
                break
    return blocks


def _is_extern_c(code: str, at: int, blocks: list[tuple[int, int]]) -> bool:
    if any(start <= at < end for start, end in blocks):
        return True
    # Else extern "C" must open this declaration: after the last ; { or } before it.
    start = max(code.rfind(c, 0, at) for c in ";{}") + 1
    return bool(_EXTERN_C_RE.search(code, start, at))


def _parse_param(kernel: str, raw: str) -> Param:
    # "const float* __restrict__ probs" -> base "float", pointer, name "probs";
    # "float x[]" and "float x[8]" are pointers too, as C reads a parameter.
    stars = raw.count("*")
    declarator = raw
    array = _ARRAY_RE.match(raw)
    if array:
        stars += array.group("dims").count("[")
        declarator = array.group("head")
    words = [w for w in declarator.replace("*", " ").split() if w not in _QUALIFIERS]
    if len(words) < 2 or words[-1] in _TYPE_WORDS:
        raise ValueError(
            f"kernel {kernel}: cannot read parameter {raw!r}; expected a type and a "
            f"name, like 'const float* x' or 'long long n' (every parameter needs a "
            f"name)"
        )
    base, name = " ".join(words[:-1]), words[-1]
    base = _SYNONYMS.get(base, base)
    known = _POINTER_DTYPES if stars == 1 else _SCALAR_TYPES
    if stars > 1 or base not in known:
        raise ValueError(
            f"kernel {kernel}: parameter {raw!r} has a type a launch cannot pass; "
            f"use a pointer to one of {sorted(_POINTER_DTYPES)} or one of "
            f"{sorted(_SCALAR_TYPES)}"
        )
    return Param(name=name, base=base, pointer=stars == 1)


_TYPE_WORDS = {"int", "unsigned", "signed", "long", "short", "char", "float", "double",
               "bool", "size_t", "void"}


_SOURCE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


def check_source_name(name: str) -> str:
    """Check that ``name`` can name a kernel source file; return it.

    Raises:
        ValueError: unless it is a plain file name (letters, digits, ``.``, ``_``,
            ``-``; no folder, quote or space), such as ``"mine.cu"``.
    """
    if not isinstance(name, str) or not _SOURCE_NAME_RE.fullmatch(name):
        raise ValueError(
            f"name must be a plain file name such as 'mine.cu' (letters, digits, "
            f"'.', '_', '-'; no folders), got {name!r}"
        )
    return name


@functools.cache
def package_kernels(name: str) -> dict[str, tuple[Param, ...]]:
    """Signatures of the kernels in the package's ``kernels/<name>.cu``."""
    return parse_kernels(kernel_source(name))


# --------------------------------------------------------------------------- launches


class RawModuleBase:
    """What both backends' ``RawModule`` share: the source's kernels, read and
    checked, and :meth:`get_function`, which builds each kernel once.

    A subclass calls :meth:`_read_source` first in its ``__init__`` and provides
    ``_make_kernel(name)``.
    """

    signatures: dict[str, tuple[Param, ...]]

    def _read_source(self, code: str | bytes, name: str) -> str:
        """``code`` as text, with :attr:`signatures` read from it.

        Raises:
            ValueError: if ``name`` is not a plain file name, or the source
                declares no ``extern "C" __global__`` kernel.
        """
        if isinstance(code, (bytes, bytearray)):
            code = bytes(code).decode("utf-8")
        check_source_name(name)
        self.signatures = parse_kernels(code)
        if not self.signatures:
            raise ValueError(
                f'{name} declares no kernel: expected at least one line like '
                f'extern "C" __global__ void my_kernel(...)'
            )
        self._kernels: dict[str, Kernel] = {}
        return code

    def _make_kernel(self, name: str) -> Kernel:
        raise NotImplementedError

    def get_function(self, name: str) -> Kernel:
        """The kernel ``name``, ready to call as ``kernel((grid,), (block,), args)``."""
        if name not in self.signatures:
            raise KeyError(
                f"no kernel {name!r} here; kernels: {sorted(self.signatures)}"
            )
        if name not in self._kernels:
            self._kernels[name] = self._make_kernel(name)
        return self._kernels[name]


@dataclass(frozen=True)
class LaunchShape:
    """Threads per block and the cap on blocks that the package's launches use."""

    block: int = DEFAULT_BLOCK
    max_blocks: int | None = None


# Context-local, like the backend choice: a launch_shape block in one thread (or asyncio
# task) leaves every other one alone.
_shape: contextvars.ContextVar[LaunchShape | None] = contextvars.ContextVar(
    "dmoe_edu_launch_shape", default=None
)
_DEFAULT_SHAPE = LaunchShape()


def current_launch_shape() -> LaunchShape:
    """The :class:`LaunchShape` in effect here (set by :func:`launch_shape`)."""
    return _shape.get() or _DEFAULT_SHAPE


@contextlib.contextmanager
def launch_shape(block: int = DEFAULT_BLOCK, max_blocks: int | None = None) -> Iterator:
    """Launch the package's kernels with ``block`` threads a block and at most
    ``max_blocks`` blocks, inside a ``with`` block.

    The grid-stride loop of every kernel makes the result independent of both; tests
    and the kernels notebook use this to show it. Outside the block, launches use
    256 threads and as many blocks as the work needs (capped per backend).

    The setting is context-local: it holds in this thread (and asyncio task) only,
    other threads keep theirs. An op's backward launches with the shape that was in
    effect at its forward, wherever autograd runs it.

    Args:
        block: threads per block, an integer from 1 to 1024. Default: 256.
        max_blocks: cap on the number of blocks, an integer >= 1; ``None`` for the
            backend's default.

    Raises:
        TypeError: if ``block`` or ``max_blocks`` is not an integer.
        ValueError: if either is out of range.

    Example:
        >>> with launch_shape(block=32, max_blocks=2):
        ...     pass  # 64 threads in all, however large the tensors
    """
    block = _integer("launch_shape: block", block)
    if not 1 <= block <= 1024:
        raise ValueError(f"launch_shape: block must be 1 to 1024 threads, got {block}")
    if max_blocks is not None:
        max_blocks = _integer("launch_shape: max_blocks", max_blocks)
        if max_blocks < 1:
            raise ValueError(
                f"launch_shape: max_blocks must be >= 1 or None, got {max_blocks}"
            )
    token = _shape.set(LaunchShape(block, max_blocks))
    try:
        yield
    finally:
        _shape.reset(token)


def grid_for(work: int, default_max_blocks: int,
             shape: LaunchShape | None = None) -> tuple[int, int]:
    """``(grid, block)`` for ``work`` output elements under :func:`launch_shape`.

    Args:
        work: number of output elements, one per thread.
        default_max_blocks: the backend's cap when ``launch_shape`` sets none.
        shape: the launch shape to use. Default: the one in effect here.

    Example:
        >>> grid_for(1000, default_max_blocks=2)
        (2, 256)
    """
    shape = shape or current_launch_shape()
    cap = shape.max_blocks or default_max_blocks
    return max(1, min(-(-work // shape.block), cap)), shape.block


def _integer(what: str, value) -> int:
    # An int or a NumPy integer; never a bool, a float (2.5) or a string ("2").
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__} "
                        f"{value!r}")
    return int(value)


def _describe(value) -> str:
    # "int 10", or "np.longdouble 2.0 (float128)" for a NumPy scalar.
    if isinstance(value, np.generic):
        return f"np.{type(value).__name__} {value.item()!r} ({value.dtype})"
    return f"{type(value).__name__} {value!r}"


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
    * a scalar parameter takes a NumPy scalar of exactly its width and signedness
      (``long long`` - ``np.int64`` or ``np.longlong``, ``int`` - ``np.int32`` or
      ``np.intc``, ``float`` - ``np.float32``, ...), never a Python number, whose
      width the kernel could not know;
    * grid and block sizes are integers (``int`` or NumPy), one-dimensional:
      ``(n,)``, ``n`` or ``(n, 1, 1)``.
    """

    def __init__(self, name: str, params: Sequence[Param]):
        self.name = name
        self.params = tuple(params)

    def __repr__(self) -> str:
        args = ", ".join(p.describe() for p in self.params)
        return f"{type(self).__name__}({self.name}({args}))"

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: Sequence):
        grid_x, block_x = _check_dims(self.name, grid, block)
        self._launch(grid_x, block_x, self._check_args(args))

    def _check_device(self, param: Param, tensor: Tensor) -> None:
        raise NotImplementedError

    def _launch(self, grid: int, block: int, args: tuple) -> None:
        raise NotImplementedError

    def _check_args(self, args: Sequence) -> tuple:
        # The checked arguments, scalars converted to the canonical NumPy type of their
        # C type (np.longlong(10) -> np.int64(10)): what every backend's launch expects.
        if not isinstance(args, (tuple, list)):
            raise TypeError(f"{self.name}: args must be a tuple or list, got "
                            f"{type(args).__name__}")
        if len(args) != len(self.params):
            raise TypeError(
                f"{self.name} takes {len(self.params)} arguments "
                f"({', '.join(p.describe() for p in self.params)}), got {len(args)}"
            )
        checked = []
        for param, value in zip(self.params, args):
            where = f"{self.name}: argument {param.name!r} ({param.describe()})"
            if param.pointer:
                if value is not None:
                    self._check_pointer(where, param, value)
                checked.append(value)
                continue
            expected = np.dtype(_SCALAR_TYPES[param.base])
            if not (isinstance(value, np.generic) and value.dtype == expected):
                raise TypeError(
                    f"{where} must be a NumPy scalar of {expected.itemsize * 8}-bit "
                    f"{_KIND_NAMES[expected.kind]} type, like np.{expected.name}(...); "
                    f"got {_describe(value)}"
                )
            checked.append(expected.type(value))
        return tuple(checked)

    def _check_pointer(self, where: str, param: Param, value) -> None:
        if not isinstance(value, Tensor):
            raise TypeError(f"{where} must be a tensor or None, got "
                            f"{type(value).__name__}")
        allowed = _POINTER_DTYPES[param.base]
        if value.dtype not in allowed:
            names = " or ".join(map(str, allowed))
            raise TypeError(f"{where} must have dtype {names}, got {value.dtype}")
        if not value.is_contiguous():
            raise ValueError(f"{where} must be contiguous, got strides "
                             f"{value.stride()} for shape {tuple(value.shape)}")
        self._check_device(param, value)


_KIND_NAMES = {"i": "signed integer", "u": "unsigned integer", "f": "floating-point"}


def _check_dims(name: str, grid, block) -> tuple[int, int]:
    # One-dimensional grids and blocks only: the package's kernels index with .x alone.
    dims = []
    for label, dim, limit in (("grid", grid, 2**31 - 1), ("block", block, 1024)):
        dim = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        sizes = [_integer(f"{name}: every {label} size", d) for d in dim]
        if not sizes or any(d != 1 for d in sizes[1:]):
            raise ValueError(f"{name}: {label} must be one-dimensional, like (n,), "
                             f"got {dim}")
        if not 1 <= sizes[0] <= limit:
            raise ValueError(f"{name}: {label} size must be 1 to {limit}, "
                             f"got {sizes[0]}")
        dims.append(sizes[0])
    return dims[0], dims[1]


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn``, attributed to the first caller outside this package (and
    outside torch and contextlib), so that the warning points at the user's code."""
    skip = (str(Path(__file__).resolve().parent.parent),
            str(Path(torch.__file__).parent), contextlib.__file__)
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


# --------------------------------------------------------------------------- the ops


class KernelBackend:
    """What the autograd Functions need from a backend: a kernel by file and name,
    and the default cap on the number of blocks for a tensor's device."""

    name = "kernels"

    def kernel(self, file: str, name: str, device: torch.device) -> Kernel:
        raise NotImplementedError

    def max_blocks(self, device: torch.device) -> int:
        raise NotImplementedError

    def launch(self, file: str, name: str, work: int, args: Sequence,
               shape: LaunchShape | None = None) -> None:
        """Launch ``file``'s kernel ``name`` over ``work`` output elements."""
        device = next(a.device for a in args if isinstance(a, Tensor))
        grid, block = grid_for(work, self.max_blocks(device), shape)
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


def _no_second_derivative(backend: str, op: str):
    return RuntimeError(
        f"the {backend} backend's backward of {op} is first order only: a second "
        f"derivative (create_graph=True then another backward, gradgradcheck, a "
        f"Hessian) needs the 'reference' backend, e.g. inside "
        f"ops.use_backend('reference')"
    )


# Each op is two autograd Functions: the op, whose backward calls the second, and that
# backward as a Function of its own, whose backward raises. (once_differentiable is not
# enough: its error node hangs off detached copies, so torch.autograd.grad with explicit
# inputs, as gradgradcheck calls it, never reaches it and returns zeros silently.)


class _KernelSoftmaxGate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_logits: Tensor, mask: Tensor | None, backend: KernelBackend):
        B, E = gate_logits.shape
        gate_logits = gate_logits.contiguous()
        gate_probs = gate_logits.new_empty((B, E))
        mask_bytes, mask_row_stride = _mask_operand(mask, E)
        shape = current_launch_shape()

        # One thread per (b, e); nothing to launch for an empty batch.
        if B * E:
            backend.launch(
                "gating", f"softmax_gate_fwd_{_suffix(gate_logits.dtype)}", B * E,
                (gate_logits, mask_bytes, np.int64(mask_row_stride), gate_probs,
                 np.int64(B), np.int64(E)), shape,
            )
        ctx.backend, ctx.shape = backend, shape
        ctx.save_for_backward(gate_probs)
        return gate_probs

    @staticmethod
    def backward(ctx, grad_probs: Tensor):
        (gate_probs,) = ctx.saved_tensors
        grad_logits = _KernelSoftmaxGateBackward.apply(gate_probs, grad_probs,
                                                       ctx.backend, ctx.shape)
        return grad_logits, None, None


class _KernelSoftmaxGateBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_probs: Tensor, grad_probs: Tensor, backend: KernelBackend,
                shape: LaunchShape):
        B, E = gate_probs.shape
        grad_probs = grad_probs.contiguous()
        grad_logits = gate_probs.new_empty((B, E))
        if B * E:
            backend.launch(
                "gating", f"softmax_gate_bwd_{_suffix(gate_probs.dtype)}", B * E,
                (gate_probs, grad_probs, grad_logits, np.int64(B), np.int64(E)), shape,
            )
        ctx.backend_name = backend.name
        return grad_logits

    @staticmethod
    def backward(ctx, grad_grad_logits: Tensor):
        raise _no_second_derivative(ctx.backend_name, "softmax_gate")


class _KernelCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_probs: Tensor, expert_out: Tensor, backend: KernelBackend):
        B, E, H = expert_out.shape
        gate_probs = gate_probs.contiguous()
        expert_out = expert_out.contiguous()
        mixed = expert_out.new_empty((B, H))
        shape = current_launch_shape()

        # One thread per (b, h); an empty expert count mixes nothing into zeros.
        if B * H and not E:
            mixed.zero_()
        elif B * H:
            backend.launch(
                "combine", f"combine_fwd_{_suffix(mixed.dtype)}", B * H,
                (gate_probs, expert_out, mixed, np.int64(B), np.int64(E), np.int64(H)),
                shape,
            )
        ctx.backend, ctx.shape = backend, shape
        ctx.save_for_backward(gate_probs, expert_out)
        return mixed

    @staticmethod
    def backward(ctx, grad_mixed: Tensor):
        gate_probs, expert_out = ctx.saved_tensors
        grad_gates, grad_expert = _KernelCombineBackward.apply(
            gate_probs, expert_out, grad_mixed, ctx.needs_input_grad[:2], ctx.backend,
            ctx.shape,
        )
        return grad_gates, grad_expert, None


class _KernelCombineBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_probs: Tensor, expert_out: Tensor, grad_mixed: Tensor,
                needed: tuple[bool, bool], backend: KernelBackend, shape: LaunchShape):
        B, E, H = expert_out.shape
        grad_mixed = grad_mixed.contiguous()
        sizes = (np.int64(B), np.int64(E), np.int64(H))
        suffix = _suffix(expert_out.dtype)
        grad_gates = grad_expert = None

        # d gate_probs: one thread per (b, e), each a dot product over H.
        if needed[0]:
            grad_gates = gate_probs.new_zeros((B, E))
            if B * E and H:
                backend.launch("combine", f"combine_bwd_gates_{suffix}", B * E,
                               (expert_out, grad_mixed, grad_gates, *sizes), shape)

        # d expert_out: one thread per (b, e, h), each a single product.
        if needed[1]:
            grad_expert = expert_out.new_empty((B, E, H))
            if B * E * H:
                backend.launch("combine", f"combine_bwd_expert_{suffix}", B * E * H,
                               (gate_probs, grad_mixed, grad_expert, *sizes), shape)
        ctx.backend_name = backend.name
        return grad_gates, grad_expert

    @staticmethod
    def backward(ctx, *grads):
        raise _no_second_derivative(ctx.backend_name, "combine")


# Dynamo cannot trace a launch (it turns the np.int64 sizes into arrays, and a ctypes or
# CuPy call is opaque to it): under torch.compile these two run eagerly, a graph break.


@torch.compiler.disable
def kernel_softmax_gate(backend: KernelBackend, gate_logits: Tensor,
                        mask: Tensor | None) -> Tensor:
    """:func:`dmoe_edu.ops.softmax_gate` on ``backend``'s kernels, for inputs already
    checked by :func:`dmoe_edu.ops.contract.check_softmax_gate`."""
    return _KernelSoftmaxGate.apply(gate_logits, mask, backend)


@torch.compiler.disable
def kernel_combine(backend: KernelBackend, gate_probs: Tensor,
                   expert_out: Tensor) -> Tensor:
    """:func:`dmoe_edu.ops.combine` on ``backend``'s kernels, for inputs already
    checked by :func:`dmoe_edu.ops.contract.check_combine`."""
    return _KernelCombine.apply(gate_probs, expert_out, backend)
