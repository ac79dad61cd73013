"""The committed course notebooks: paired, executed, small, and in the skeleton.

nbval (``pytest --nbval notebooks/``) re-runs them and compares outputs; these
tests check what nbval cannot: it silently skips a cell with no stored output,
it does not care about widget state, sizes or the ``.py`` sources.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
SOURCES = sorted(p for p in NOTEBOOKS.rglob("[0-9][0-9]_*.py")
                 if ".ipynb_checkpoints" not in p.parts)
COURSE = [p for p in SOURCES if p.parent == NOTEBOOKS]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
IGNORE = "# NBVAL_IGNORE_OUTPUT"


def _ids(paths):
    return [str(p.relative_to(NOTEBOOKS)) for p in paths]


def _executed(source: Path):
    path = source.with_suffix(".ipynb")
    assert path.is_file(), f"{path.name} is missing: run `make notebooks`"
    return nbformat.read(path, as_version=4)


def test_the_seven_course_notebooks_are_there():
    numbers = [p.name[:2] for p in COURSE]
    assert numbers == [f"{i:02d}" for i in range(1, 8)], [p.name for p in COURSE]


def test_no_orphan_ipynb():
    for path in NOTEBOOKS.rglob("*.ipynb"):
        if ".ipynb_checkpoints" in path.parts:
            continue
        assert path.with_suffix(".py").is_file(), f"{path} has no .py source"


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_pair_has_the_same_cells(source):
    text_cells = jupytext.read(source).cells
    stored_cells = _executed(source).cells
    text = [(c.cell_type, c.source.strip()) for c in text_cells]
    stored = [(c.cell_type, c.source.strip()) for c in stored_cells]
    assert len(text) == len(stored), (
        f"{source.name} has {len(text)} cells, its .ipynb {len(stored)}: "
        "run `make notebooks`"
    )
    for i, (a, b) in enumerate(zip(text, stored)):
        assert a == b, f"cell {i} of {source.name} differs from its .ipynb"


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_every_code_cell_was_executed(source):
    nb = _executed(source)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.source.strip():
            assert cell.execution_count is not None, (
                f"code cell {i} of {source.name} was never executed "
                "(nbval would skip it silently)"
            )
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, f"cell {i} of {source.name} stored an error"


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_no_widget_state_and_small(source):
    path = source.with_suffix(".ipynb")
    nb = _executed(source)
    assert "widgets" not in nb.metadata, f"{path.name} stores widget state"
    assert path.stat().st_size < 1_000_000, f"{path.name} is over 1 MB"
    assert nb.metadata.kernelspec.name == "python3"
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            assert WIDGET_STATE not in data
            if WIDGET_VIEW in data:
                assert IGNORE in cell.source, (
                    f"cell {i} of {source.name} shows a widget but lacks {IGNORE}"
                )


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_code_fits_79_columns(source):
    for i, cell in enumerate(jupytext.read(source).cells):
        if cell.cell_type != "code":
            continue
        for line in cell.source.splitlines():
            assert len(line) <= 79, f"cell {i} of {source.name}: {line!r}"


@pytest.mark.parametrize("source", COURSE, ids=_ids(COURSE))
def test_notebook_follows_the_skeleton(source):
    cells = jupytext.read(source).cells
    markdown = [c.source for c in cells if c.cell_type == "markdown"]
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# ")
    headings = [line for text in markdown for line in text.splitlines()
                if line.startswith("## ")]
    for needed in ("## Summary", "## Exercises", "## References"):
        assert needed in headings, f"{source.name} lacks a '{needed}' section"
    assert headings.index("## Summary") < headings.index("## Exercises")

    # 4 to 8 exercises, each a numbered item.
    text = "\n".join(markdown)
    exercises = text.split("\n## Exercises", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\. ", exercises, flags=re.M)
    assert 4 <= len(items) <= 8, f"{source.name} has {len(items)} exercises"

    # Markdown before every code cell: no two code cells in a row.
    for i in range(1, len(cells)):
        both_code = cells[i].cell_type == cells[i - 1].cell_type == "code"
        assert not both_code, f"cells {i - 1} and {i} of {source.name} are both code"

    # Every section ends with a check (an assert) before the next section.
    sections = _sections(cells)
    for title, body in sections:
        if title in ("## Summary", "## Exercises", "## References"):
            continue
        code = "\n".join(c.source for c in body if c.cell_type == "code")
        if code.strip():
            assert re.search(r"^\s*assert ", code, flags=re.M), (
                f"section {title!r} of {source.name} has no check cell"
            )


def _sections(cells):
    """``(heading, cells)`` for every ``## `` section, in order."""
    sections: list[tuple[str, list]] = []
    for cell in cells:
        first = cell.source.splitlines()[0] if cell.source else ""
        if cell.cell_type == "markdown" and first.startswith("## "):
            sections.append((first.strip(), []))
        elif sections:
            sections[-1][1].append(cell)
    return sections


@pytest.mark.parametrize("source", SOURCES, ids=_ids(SOURCES))
def test_cell_ids_come_from_the_sources(source):
    # `make notebooks` names each cell after its source, so re-running an unchanged
    # notebook leaves its file unchanged (jupytext alone draws random ids).
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from execute_notebooks import stable_ids
    finally:
        sys.path.pop(0)
    expected = [c.id for c in stable_ids(jupytext.read(source)).cells]
    assert expected == [c.id for c in stable_ids(jupytext.read(source)).cells]
    assert [c.id for c in _executed(source).cells] == expected, (
        f"{source.with_suffix('.ipynb').name} was not written by `make notebooks`")
