"""One markdown file, several benchmark reports: each script owns a marked section.

``bench/RESULTS.md`` holds the report of ``train_step.py`` and that of ``ops.py``.
Each lives between ``<!-- begin KEY -->`` and ``<!-- end KEY -->`` lines, and a
script's ``--out`` rewrites its own section only, leaving every other byte of the
file as it was.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dmoe_edu._atomic import atomic_write

_KEY = re.compile(r"[A-Za-z0-9_.-]+")


def markers(key: str) -> tuple[str, str]:
    """The begin and end lines that delimit the section ``key``."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"section key must match {_KEY.pattern}, got {key!r}")
    return f"<!-- begin {key} -->", f"<!-- end {key} -->"


def write_section(path: str | os.PathLike, key: str, markdown: str) -> None:
    """Put ``markdown`` between the ``key`` markers of the file ``path``.

    The text between the markers is replaced; everything before the begin marker
    and after the end marker is kept byte for byte. A file without the section
    gets it appended (after a blank line); a missing file is created. The write
    is atomic: a temporary file in the same folder, then ``os.replace``.

    Raises:
        ValueError: if ``key`` is not a plain name (letters, digits, ``_.-``), or
            the file holds the section's markers more than once, or only one of
            them, or the end before the begin.
    """
    begin, end = markers(key)
    path = Path(path)
    try:
        # Bytes, decoded without newline translation, so nothing else changes.
        old = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        old = ""
    block = f"{begin}\n{markdown.rstrip()}\n{end}"

    counts = (old.count(begin), old.count(end))
    if counts == (0, 0):
        if old.strip():
            sep = "" if old.endswith("\n") else "\n"
            new = f"{old}{sep}\n{block}\n"
        else:
            new = f"{block}\n"
    elif counts == (1, 1) and old.index(begin) < old.index(end):
        start, stop = old.index(begin), old.index(end) + len(end)
        new = old[:start] + block + old[stop:]
    else:
        raise ValueError(
            f"{path}: expected one {begin!r} line followed by one {end!r} line, "
            f"found {counts[0]} begin and {counts[1]} end marker(s); fix the file "
            "by hand"
        )
    with atomic_write(path, "wb") as f:
        f.write(new.encode("utf-8"))
