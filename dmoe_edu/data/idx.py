"""Read and write IDX files, the container format MNIST is distributed in.

An IDX file is a tiny header followed by a flat array in C (row-major) order::

    bytes 0-1   0x00 0x00          (magic, always zero)
    byte  2     dtype code         (0x08 = uint8, 0x09 = int8, 0x0B = int16, ...)
    byte  3     ndim               (1 for labels, 3 for images)
    4 * ndim    big-endian uint32  (the size of each dimension)
    the rest    the items          (big-endian for multi-byte dtypes)

Files whose name ends in ``.gz`` are gzip-compressed; anything else is read
raw. Every defect (bad magic, unknown dtype, truncated or overlong payload,
corrupt gzip) raises :class:`IdxFormatError` naming the file.
"""

from __future__ import annotations

import gzip
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .._atomic import atomic_write

__all__ = ["IdxFormatError", "read_idx", "write_idx"]

logger = logging.getLogger(__name__)

# IDX dtype codes -> numpy dtypes; multi-byte types are big-endian on disk.
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Read in slices this large so a bad file cannot make us allocate unboundedly
# while we count trailing bytes.
_CHUNK = 1 << 20


class IdxFormatError(ValueError):
    """An IDX file is malformed: bad magic, unknown dtype, or wrong length."""


def _open(path: Path) -> BinaryIO:
    # gzip.open defers decompression, so corrupt data surfaces while reading.
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes, looping because short reads are legal."""
    parts = []
    while n > 0:
        chunk = f.read(min(n, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _readinto_exact(f: BinaryIO, buf: memoryview) -> int:
    """Fill ``buf`` from ``f``; return how many bytes were actually read."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:got + _CHUNK])
        if not n:
            break
        got += n
    return got


def _count_rest(f: BinaryIO) -> int:
    """Count the bytes left in ``f`` without keeping them."""
    total = 0
    while chunk := f.read(_CHUNK):
        total += len(chunk)
    return total


def _parse(path: Path, f: BinaryIO) -> np.ndarray:
    # Magic: two zero bytes, a dtype code, the number of dimensions.
    magic = _read_exact(f, 4)
    if len(magic) < 4:
        raise IdxFormatError(
            f"{path}: expected a 4-byte IDX magic number, "
            f"but the file has only {len(magic)} bytes"
        )
    if magic[0] != 0 or magic[1] != 0:
        raise IdxFormatError(
            f"{path}: not an IDX file: the magic number must start with "
            f"bytes 00 00, got {magic[0]:02x} {magic[1]:02x}"
        )
    code, ndim = magic[2], magic[3]
    if code not in _DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _DTYPES)
        raise IdxFormatError(
            f"{path}: unsupported IDX dtype code 0x{code:02X} "
            f"(supported: {known})"
        )
    if ndim == 0:
        raise IdxFormatError(f"{path}: IDX header declares 0 dimensions")

    # Dimensions: ndim big-endian uint32 values.
    raw_dims = _read_exact(f, 4 * ndim)
    if len(raw_dims) < 4 * ndim:
        raise IdxFormatError(
            f"{path}: header declares {ndim} dimensions "
            f"({4 * ndim} bytes of sizes), but only {len(raw_dims)} bytes follow"
        )
    dims = struct.unpack(f">{ndim}I", raw_dims)

    # Payload: read straight into the output array, then insist on EOF.
    dtype = _DTYPES[code]
    header = 4 + 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    out = np.empty(dims, dtype=dtype)
    got = _readinto_exact(f, memoryview(out.reshape(-1).view(np.uint8)))
    if got < expected:
        raise IdxFormatError(
            f"{path}: truncated IDX payload: header says shape {dims} of "
            f"{dtype.name}, so expected {expected} bytes after the "
            f"{header}-byte header, got {got}"
        )
    extra = _count_rest(f)
    if extra:
        raise IdxFormatError(
            f"{path}: IDX payload too long: header says shape {dims} of "
            f"{dtype.name}, so expected {expected} bytes after the "
            f"{header}-byte header, got {expected + extra} "
            f"({extra} trailing bytes)"
        )

    # Hand back native byte order so downstream arithmetic is not surprised.
    return out.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    r"""Read an IDX file into a numpy array.

    Args:
        path: the file. Names ending in ``.gz`` are decompressed with gzip;
            any other name is read as raw IDX bytes.

    Shape:
        - Output: the dimensions stored in the header, e.g. ``(N, 28, 28)``
          for MNIST images and ``(N,)`` for labels.

    Returns:
        np.ndarray: a writable array in native byte order. Dtype codes
        0x08 (uint8), 0x09 (int8), 0x0B (int16), 0x0C (int32), 0x0D (float32)
        and 0x0E (float64) are supported.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        IdxFormatError: on a bad magic number, an unsupported dtype code,
            a payload shorter or longer than the header promises, or a
            corrupt gzip stream. The message names the file.

    Example::

        >>> import pathlib, tempfile
        >>> tmp = pathlib.Path(tempfile.mkdtemp())
        >>> write_idx(tmp / "x.idx.gz", np.zeros((2, 3), np.uint8))
        >>> read_idx(tmp / "x.idx.gz").shape
        (2, 3)
    """
    path = Path(path)
    with _open(path) as f:
        try:
            return _parse(path, f)
        except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
            # EOFError: the gzip stream stopped before its end marker.
            raise IdxFormatError(f"{path}: corrupt gzip data: {exc}") from exc


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    r"""Write a uint8 array as an IDX file, atomically.

    The bytes go to a temporary file in the destination directory, which is
    then renamed over ``path``: a reader never sees a half-written file.

    Args:
        path: the destination. Names ending in ``.gz`` are gzip-compressed
            (with a zero timestamp, so equal arrays give equal files).
        array: the data; dtype must be ``uint8``, with 1 to 4 dimensions.

    Shape:
        - array: any shape with 1 to 4 dimensions, e.g. ``(N, 28, 28)``.

    Returns:
        None

    Raises:
        ValueError: if the dtype is not uint8 or the rank is not 1 to 4.

    Example::

        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
        >>> write_idx(path, np.arange(10, dtype=np.uint8))
        >>> read_idx(path)[:3]
        array([0, 1, 2], dtype=uint8)
    """
    path = Path(path)
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"write_idx expects a uint8 array, got dtype {array.dtype}")
    if not 1 <= array.ndim <= 4:
        raise ValueError(
            f"write_idx expects an array with 1 to 4 dimensions, "
            f"got {array.ndim} (shape {array.shape})"
        )
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = np.ascontiguousarray(array).tobytes()

    # Through a temporary file, so a crash leaves no half-written IDX file.
    with atomic_write(path) as f:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(filename=path.name[:-3], fileobj=f, mode="wb",
                               mtime=0) as gz:
                gz.write(header)
                gz.write(payload)
        else:
            f.write(header)
            f.write(payload)
    logger.debug("wrote %s: shape %s", path, array.shape)
