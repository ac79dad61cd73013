"""The benchmark script runs and writes its report (structure only, no timings)."""

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


OPS_SCRIPT = ROOT / "bench" / "ops.py"
VERDICTS = {"pass", "FAIL", "(no goal)"}


def load_report_module():
    """``bench/_report.py``, imported from its path (bench/ is not a package)."""
    path = ROOT / "bench" / "_report.py"
    spec = importlib.util.spec_from_file_location("_report", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_ops_bench_report_structure(tmp_path):
    out = tmp_path / "R.md"
    before = "# Kept\r\n\r\ntext of another report\n"
    out.write_bytes(before.encode())
    # 0.05 GiB: the smallest combine size runs, the larger ones are skipped.
    result = subprocess.run(
        [sys.executable, str(OPS_SCRIPT), "--quick", "--max-gib", "0.05",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    raw = out.read_bytes().decode()

    # The report went into its own section, after the text already there.
    assert raw.startswith(before)
    section = raw[len(before):]
    assert section.startswith("\n<!-- begin ops -->\n")
    assert section.endswith("<!-- end ops -->\n")
    text = section.split("<!-- begin ops -->\n", 1)[1]
    text = text.removesuffix("<!-- end ops -->\n")
    assert text.rstrip() + "\n" in result.stdout

    # Header: machine, threads, command, GPU status line.
    assert "torch threads: 1" in text
    assert "`python bench/ops.py --quick --max-gib 0.05" in text
    header = text.split("\n## ", 1)[0]
    gpu_lines = [line for line in header.splitlines()
                 if line.startswith(("- GPU: ", "- GPU figures not measured: "))]
    assert len(gpu_lines) == 1
    measured_gpu = gpu_lines[0].startswith("- GPU: ")
    from dmoe_edu import ops

    assert measured_gpu == (ops.backend_status()["cupy"] is None)

    # One numbered section and one table per measurement, then a summary.
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    parts = 4 if measured_gpu else 2
    assert [h.split()[1] for h in headings] == [f"{i}." for i in
                                                range(1, parts + 1)] + ["Summary"]
    found = tables(text)
    assert len(found) == parts
    for table in found:
        assert len(table) >= 3
        assert set(table[1]) <= set("|-: ")
        width = table[0].count("|")
        assert all(row.count("|") == width for row in table)
        head = [c.strip() for c in table[0].strip("|").split("|")]
        assert head[-2:] == ["goal", "result"]
        for row in table[2:]:
            assert row.strip("| ").rsplit("|", 1)[-1].strip() in VERDICTS, row

    # Section 1: every op, measured and skipped rows (working set over 0.05 GiB).
    cpu_rows = [[c.strip() for c in row.strip("|").split("|")] for row in found[0][2:]]
    assert {r[0] for r in cpu_rows} == {
        "combine forward", "combine backward", "softmax_gate forward",
        "softmax_gate fwd+bwd"}
    skipped = [r for r in cpu_rows if r[3].startswith("skipped (needs ")]
    assert skipped and all(r[-1] == "(no goal)" for r in skipped)
    assert all(float(r[3].split()[2]) > 0.05 for r in skipped)
    measured = [r for r in cpu_rows if r not in skipped]
    assert any(r[0] == "combine forward" for r in measured)
    assert all(float(r[8]) > 0 for r in measured)  # op % of copy

    # Section 2: the paper's sizes, 4 ops x 3 batches x 2 expert counts.
    assert len(found[1]) - 2 == 24
    summary = text.split("## Summary", 1)[1]
    assert "combine forward" in summary
    if not measured_gpu:
        assert "GPU figures not measured" in summary


def test_write_section_replaces_only_its_own_section(tmp_path):
    report = load_report_module()
    path = tmp_path / "sub" / "RESULTS.md"
    path.parent.mkdir()

    # A missing file is created with the section alone.
    report.write_section(path, "a", "# A\n\nfirst\n")
    assert path.read_text() == "<!-- begin a -->\n# A\n\nfirst\n<!-- end a -->\n"

    # A second section is appended; text around both is kept byte for byte.
    report.write_section(path, "b", "# B\r\nwindows line\r\n")
    path.write_bytes(b"intro \xc3\xa9\r\n" + path.read_bytes() + b"trailer\n")
    kept = path.read_bytes()
    b_start = kept.index(b"<!-- begin b -->")

    report.write_section(path, "a", "# A\n\nsecond, longer than before\n")
    new = path.read_bytes()
    assert new.startswith(b"intro \xc3\xa9\r\n<!-- begin a -->\n# A\n\nsecond")
    assert new.endswith(kept[b_start:])  # section b and the trailer, unchanged
    assert b"first" not in new

    # Replacing b keeps everything before it exactly.
    report.write_section(path, "b", "# B again")
    again = path.read_bytes()
    assert again.startswith(new[: new.index(b"<!-- begin b -->")])
    assert again.endswith(b"<!-- begin b -->\n# B again\n<!-- end b -->\ntrailer\n")
    assert not list(path.parent.glob(".*"))  # no temporary file left behind

    # Broken markers are refused, and the file is left as it was.
    path.write_text("<!-- begin a -->\nno end\n")
    with pytest.raises(ValueError, match="marker"):
        report.write_section(path, "a", "x")
    assert path.read_text() == "<!-- begin a -->\nno end\n"
    with pytest.raises(ValueError, match="section key"):
        report.write_section(path, "bad key -->", "x")


def test_ops_report_renders_gpu_sections(monkeypatch):
    """The GPU tables (not measurable here), from made-up figures: their shape
    and verdicts, so that the one run on a GPU cannot fail in the report."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_ops", OPS_SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def bw(pct: float, t_op: float) -> dict:
        return {"moved": 1e9, "t_copy": 1e-3, "t_op": t_op, "copy_gbs": 2000.0,
                "op_gbs": 1e9 / t_op / 1e9, "pct": pct, "pct_q": (pct - 1, pct + 1)}

    large = [
        {"op": "combine_fwd", "E": 4, "H": 128, "cupy": bw(80, 1.0),
         "reference": bw(50, 2.0)},                                   # pass
        {"op": "combine_fwd", "E": 4, "H": 512, "cupy": bw(80, 2.0),
         "reference": bw(90, 1.0)},                                   # slower: FAIL
        {"op": "combine_bwd", "E": 4, "H": 128, "cupy": bw(59, 1.0),
         "reference": bw(50, 2.0)},                                   # < 60 %: FAIL
        {"op": "combine_bwd", "E": 64, "H": 512, "skipped": 30 * 2**30},
        {"op": "gate_fwd", "E": 4, "H": None, "error": RuntimeError("a | b\nc")},
    ]
    paper = [
        {"op": "gate_fwd", "B": 256, "E": 4, "H": None, "launches": 1,
         "empty": 5e-6, "kernels": 6e-6, "cupy": 7e-6, "reference": 9e-6},  # pass
        {"op": "combine_bwd", "B": 256, "E": 4, "H": 100, "launches": 2,
         "empty": 5e-6, "kernels": 6e-6, "cupy": 8e-6, "reference": 9e-6},  # FAIL
    ]
    gpu = {"info": "Made-up GPU", "large": large, "paper": paper}
    args = SimpleNamespace(quick=False, max_gib=3.0)
    text = bench.report(None, gpu, ["--only", "gpu"], args)

    assert "- GPU: Made-up GPU" in text
    found = tables(text)
    assert len(found) == 2
    for table in found:
        width = table[0].count("|")
        assert all(row.count("|") == width for row in table)
    results = [[row.strip("| ").rsplit("|", 1)[-1].strip() for row in table[2:]]
               for table in found]
    assert results[0] == ["pass", "FAIL", "FAIL", "(no goal)", "FAIL"]
    assert results[1] == ["pass", "FAIL"]
    assert "skipped (needs 30 GiB)" in text and "error: RuntimeError: a / b c" in text
    summary = text.split("## Summary", 1)[1]
    assert "combine forward, large sizes" in summary and "FAIL (1 of 2" in summary
    assert "GPU paper sizes" in summary and "FAIL (1 of 2 rows)" in summary
