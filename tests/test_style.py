"""Style rules that a tool can check: ruff over the library, tests and benches."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (pip install -e '.[dev]')")
    paths = [p for p in ("dmoe_edu", "tests", "bench", "tools", "conftest.py")
             if (ROOT / p).exists()]
    result = subprocess.run([ruff, "check", "--output-format", "concise", *paths],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
