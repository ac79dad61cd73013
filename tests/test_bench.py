"""The benchmark script runs and writes its report (structure only, no timings)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "train_step.py"


def tables(markdown: str) -> list[list[str]]:
    """The markdown tables of a report, each as its list of lines."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


@pytest.mark.slow
def test_quick_bench_writes_three_tables(tmp_path):
    out = tmp_path / "R.md"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()

    # One section and one table per benchmark, in order.
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert [h.split()[1] for h in headings[:3]] == ["1.", "2.", "3."]
    found = tables(text)
    assert len(found) == 3

    # Every table has a header, a separator, at least one row, and a verdict.
    for table in found:
        assert len(table) >= 3
        assert set(table[1]) <= set("|-: ")
        width = table[0].count("|")
        assert all(row.count("|") == width for row in table)
        assert "result" in table[0]
        assert any(v in row for row in table[2:] for v in ("pass", "FAIL"))

    # Section 3 holds the gating op to the goal; the gate networks have none.
    gating = {row.split("|")[1].strip(): row for row in found[2][2:]}
    op = next(row for name, row in gating.items() if name.startswith("`softmax_gate`"))
    assert "< 5 %" in op and ("pass" in op or "FAIL" in op)
    nets = [row for name, row in gating.items() if name.startswith("gate networks")]
    assert len(nets) == 3
    assert all("(no goal)" in row for row in nets)
    summary = text.split("## Summary", 1)[1]
    assert "`softmax_gate`" in summary and "Gate networks (no goal" in summary

    # The machine description and the GPU disclaimer are there.
    assert "torch threads: 1" in text
    assert "GPU kernel figures are not measured here" in text
    assert "--quick" in text
