"""Atomic file writes: a crash never leaves a half-written file under its name."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb",
                 encoding: str | None = None) -> Iterator[IO]:
    """Write through a temporary file beside ``path``, renamed onto it on success.

    The temporary file (``.NAME.*.part``) lives in the target's directory, so
    the final ``os.replace`` is atomic; it gets the permissions an ordinary
    ``open`` would give. If the block raises, the temporary file is removed and
    ``path`` is left as it was. The yielded file's ``name`` is the temporary
    path, so a caller may verify the bytes before the block ends.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
