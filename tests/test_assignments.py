"""The course assignments: student versions generated, free of answers, graded.

``notebooks/assignments/NN_name_solution.py`` is the only version anyone edits;
``tools/make_assignments.py`` writes the student's ``NN_name.py`` from it, and
``make notebooks`` executes both (nbval then re-runs them with the course).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
jupytext = pytest.importorskip("jupytext")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import make_assignments  # noqa: E402

sys.path.pop(0)

SOLUTIONS = make_assignments.solution_sources()
IDS = [p.name for p in SOLUTIONS]


def _outputs(path: Path) -> list[str]:
    # The text of every code cell's outputs, one string per cell.
    texts = []
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for output in cell.outputs:
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
        texts.append("".join(parts))
    return texts


def _check_outputs(path: Path) -> list[str]:
    # Outputs of the cells that print a grader's report.
    return [t for t in _outputs(path) if "score" in t and ":" in t]


def test_four_assignments_each_with_both_versions():
    assert len(SOLUTIONS) >= 4, IDS
    for solution in SOLUTIONS:
        student = make_assignments.student_path(solution)
        for path in (solution, student, solution.with_suffix(".ipynb"),
                     student.with_suffix(".ipynb")):
            assert path.is_file(), f"{path.name} is missing"


@pytest.mark.parametrize("solution", SOLUTIONS, ids=IDS)
def test_student_version_is_generated_from_the_solution(solution):
    student = make_assignments.student_path(solution)
    assert student.read_text() == make_assignments.render(solution), (
        f"{student.name} is stale or edited by hand: run "
        "python tools/make_assignments.py, then make notebooks")


@pytest.mark.parametrize("solution", SOLUTIONS, ids=IDS)
def test_student_version_holds_no_solution_code(solution):
    student = make_assignments.student_path(solution).read_text()
    for cell in jupytext.read(solution).cells:
        tags = cell.metadata.get("tags", [])
        if "solution-only" in tags:
            hidden = cell.source.splitlines()
        elif "solution" in tags:
            lines = cell.source.splitlines()
            marked = any(make_assignments._MARKER.match(line) for line in lines)
            hidden, inside = [], not marked
            for line in lines:
                marker = make_assignments._MARKER.match(line)
                if marker:
                    inside = marker["word"] == "BEGIN"
                elif inside:
                    hidden.append(line)
        else:
            continue
        for line in hidden:
            if len(line.strip()) > 12:
                assert line.strip() not in student, (
                    f"{solution.name}: the student version shows {line.strip()!r}")
    assert "BEGIN SOLUTION" not in student and "solution-only" not in student


@pytest.mark.parametrize("solution", SOLUTIONS, ids=IDS)
def test_every_solution_passes_every_check(solution):
    reports = _check_outputs(solution.with_suffix(".ipynb"))
    assert reports, f"{solution.name} prints no check report"
    for report in reports:
        assert "All cases pass." in report and "FAILED" not in report, report


@pytest.mark.parametrize("solution", SOLUTIONS, ids=IDS)
def test_student_checks_say_not_implemented_yet(solution):
    student = make_assignments.student_path(solution).with_suffix(".ipynb")
    reports = _check_outputs(student)
    solved = _check_outputs(solution.with_suffix(".ipynb"))
    assert len(reports) == len(solved), "the two versions run different checks"
    for report in reports:
        assert "not implemented yet" in report, report


def test_generator_refuses_unbalanced_markers():
    with pytest.raises(ValueError, match="without an END"):
        make_assignments.strip_solution("x = 1\n    # BEGIN SOLUTION\n    y = 2")
    with pytest.raises(ValueError, match="without a BEGIN"):
        make_assignments.strip_solution("# END SOLUTION")
    stripped = make_assignments.strip_solution(
        'K = r"""\nvoid k() {\n    // BEGIN SOLUTION\n    y[0] = 1;\n'
        '    // END SOLUTION\n}\n"""')
    assert "    // TODO: your code here" in stripped and "y[0]" not in stripped
