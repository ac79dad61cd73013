"""Generate the student version of each assignment from its solution version.

An assignment is written once, as ``notebooks/assignments/NN_name_solution.py``
(jupytext percent format). This script writes ``NN_name.py`` beside it, the
version students get, by these rules on the solution's cells:

- a cell tagged ``solution`` keeps its text outside ``BEGIN SOLUTION`` /
  ``END SOLUTION`` marker lines; what lies between two markers is replaced by
  one placeholder line at the marker's indentation: ``raise
  NotImplementedError("your code here")`` after an indented ``#`` marker (the
  body of a function), ``# your answer here`` after one at the top level of the
  cell (which must then leave a placeholder value of its own above the block),
  ``// TODO: your code here`` after a ``//`` marker (CUDA inside a string). A tagged
  cell without markers is replaced whole: ``*Your answer here.*`` for markdown,
  ``# your code here`` for code. The tag becomes ``exercise``.
- a cell tagged ``solution-only`` (an assertion that the answer is right, a
  note for instructors) is left out.
- every other cell is copied unchanged.

The solution's title line loses its `` (solution)`` suffix. Run ``make
notebooks`` afterwards to execute both versions into their ``.ipynb`` files.

Usage::

    python tools/make_assignments.py            # every assignment
    python tools/make_assignments.py --check    # exit 1 if a student file is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import jupytext
import nbformat

ROOT = Path(__file__).resolve().parents[1]
ASSIGNMENTS = ROOT / "notebooks" / "assignments"
SUFFIX = "_solution"
PLACEHOLDER = {"#": 'raise NotImplementedError("your code here")',
               "//": "// TODO: your code here"}
# At the top level of a cell a raise would stop the student's notebook there.
TOP_LEVEL_PLACEHOLDER = "# your answer here"
_MARKER = re.compile(
    r"^(?P<indent>\s*)(?P<prefix>#|//)\s*(?P<word>BEGIN|END) SOLUTION\b")


def solution_sources(root: Path = ASSIGNMENTS) -> list[Path]:
    """Every ``NN_name_solution.py`` under ``root``, sorted."""
    return sorted(root.glob(f"[0-9][0-9]_*{SUFFIX}.py"))


def student_path(solution: Path) -> Path:
    """``NN_name_solution.py`` -> ``NN_name.py``."""
    return solution.with_name(solution.name.replace(f"{SUFFIX}.py", ".py"))


def strip_solution(source: str, where: str = "cell") -> str:
    """Replace every ``BEGIN SOLUTION`` .. ``END SOLUTION`` block by its placeholder.

    Raises:
        ValueError: for an unmatched or nested marker (``where`` names the cell).
    """
    out, inside = [], None
    for line in source.splitlines():
        marker = _MARKER.match(line)
        if marker and marker["word"] == "BEGIN":
            if inside is not None:
                raise ValueError(f"{where}: BEGIN SOLUTION inside another block")
            inside = marker
            top_level = marker["prefix"] == "#" and not marker["indent"]
            out.append(TOP_LEVEL_PLACEHOLDER if top_level
                       else marker["indent"] + PLACEHOLDER[marker["prefix"]])
        elif marker:
            if inside is None:
                raise ValueError(f"{where}: END SOLUTION without a BEGIN")
            inside = None
        elif inside is None:
            out.append(line)
    if inside is not None:
        raise ValueError(f"{where}: BEGIN SOLUTION without an END")
    return "\n".join(out)


def student_notebook(solution: nbformat.NotebookNode,
                     name: str = "notebook") -> nbformat.NotebookNode:
    """The student version of a solution notebook (see the module's rules)."""
    nb = nbformat.from_dict(solution)
    cells = []
    for i, cell in enumerate(nb.cells):
        tags = list(cell.metadata.get("tags", []))
        if "solution-only" in tags:
            continue
        if "solution" in tags:
            where = f"{name}, cell {i}"
            if any(_MARKER.match(line) for line in cell.source.splitlines()):
                cell.source = strip_solution(cell.source, where)
            elif cell.cell_type == "markdown":
                cell.source = "*Your answer here.*"
            else:
                cell.source = "# your code here"
            cell.metadata["tags"] = ["exercise" if t == "solution" else t
                                     for t in tags]
        cells.append(cell)
    nb.cells = cells
    first = nb.cells[0]
    if first.cell_type == "markdown":
        lines = first.source.splitlines()
        lines[0] = lines[0].replace(" (solution)", "")
        first.source = "\n".join(lines)
    return nb


def render(solution: Path) -> str:
    """The text of the student ``.py`` for ``solution``."""
    nb = student_notebook(jupytext.read(solution), solution.name)
    return jupytext.writes(nb, fmt="py:percent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a student file is stale")
    args = parser.parse_args(argv)
    stale = 0
    for solution in solution_sources():
        target, text = student_path(solution), render(solution)
        if args.check:
            if not target.is_file() or target.read_text() != text:
                print(f"{target.relative_to(ROOT)} is stale: run "
                      f"python tools/make_assignments.py", file=sys.stderr)
                stale += 1
            continue
        target.write_text(text)
        print(f"{target.relative_to(ROOT)} <- {solution.name}")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
