"""Execute the course notebooks from their ``.py`` sources into ``.ipynb`` files.

Each ``notebooks/**/NN_name.py`` (jupytext percent format) is read, run top to
bottom in a fresh ``python3`` kernel whose working directory is the notebook's
folder, and written to ``NN_name.ipynb`` beside it with its outputs. Widget
state, execution timings and the kernel's "trusted" signature are stripped, and
cell ids are derived from each cell's source, so
a committed notebook holds only what nbval compares and what a reader sees.

Usage::

    python tools/execute_notebooks.py                 # every notebook
    python tools/execute_notebooks.py notebooks/03_collapse.py
    python tools/execute_notebooks.py --jobs 2 --timeout 600

A notebook that raises stops with the cell's traceback and leaves the old
``.ipynb`` untouched (outputs are written to a temporary file, then renamed).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)",
              "language": "python"}


def notebook_sources(root: Path = NOTEBOOKS) -> list[Path]:
    """Every ``NN_name.py`` notebook source under ``root``, sorted."""
    return sorted(p for p in root.rglob("[0-9][0-9]_*.py")
                  if ".ipynb_checkpoints" not in p.parts)


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop widget state, timings and other run-specific details.

    What would differ between two runs of an unchanged notebook is made fixed:
    plotly's random trace ``uid``s are dropped (plotly draws new ones), widget
    views get ids made from their cell's id, and printed output that the kernel
    happened to send in several pieces is joined into one.
    """
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)
        if "outputs" not in cell:
            continue
        cell.outputs = _join_streams(cell.outputs)
        for k, output in enumerate(cell.outputs):
            data = output.get("data", {})

            # Widget views point at state that is no longer stored.
            data.pop("application/vnd.jupyter.widget-state+json", None)
            view = data.get("application/vnd.jupyter.widget-view+json")
            if view is not None:
                view["model_id"] = f"{cell.get('id', 'cell')}-{k}"
            for trace in data.get("application/vnd.plotly.v1+json", {}).get(
                    "data", []):
                trace.pop("uid", None)
    return nb


def _join_streams(outputs: list) -> list:
    # Consecutive pieces of one stream (stdout or stderr) become one output.
    joined = []
    for output in outputs:
        previous = joined[-1] if joined else None
        if (output.get("output_type") == "stream" and previous is not None
                and previous.get("output_type") == "stream"
                and previous.get("name") == output.get("name")):
            previous["text"] += output["text"]
        else:
            joined.append(output)
    return joined


def stable_ids(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Give every cell an id made from its type and source (jupytext draws random
    ones), so that re-executing an unchanged notebook changes nothing in its file."""
    seen: dict[str, int] = {}
    for cell in nb.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()
        count = seen[digest] = seen.get(digest, 0) + 1
        cell["id"] = digest[:12] if count == 1 else f"{digest[:12]}-{count}"
    return nb


def execute(source: Path, timeout: int = 600) -> float:
    """Run ``source`` and write its ``.ipynb``; return the seconds it took."""
    nb = stable_ids(jupytext.read(source))
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    env_renderer = os.environ.pop("PLOTLY_RENDERER", None)
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       record_timing=False,
                       resources={"metadata": {"path": str(source.parent)}}).execute()
    finally:
        if env_renderer is not None:
            os.environ["PLOTLY_RENDERER"] = env_renderer
    seconds = time.perf_counter() - start

    # Write next to the source, atomically.
    target = source.with_suffix(".ipynb")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.",
                               suffix=".ipynb")
    os.close(fd)
    try:
        jupytext.write(clean(nb), tmp, fmt="ipynb")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", type=Path,
                        help="notebook .py files (default: every notebook)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="notebooks run at once (default: 1)")
    parser.add_argument("--timeout", type=int, default=600,
                        help="seconds a cell may run (default: 600)")
    args = parser.parse_args(argv)
    sources = [p.resolve() for p in args.sources] or notebook_sources()
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        parser.error(f"no such notebook source: {', '.join(missing)}")

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {pool.submit(execute, p, args.timeout): p for p in sources}
        for future in concurrent.futures.as_completed(futures):
            name = futures[future].relative_to(ROOT)
            try:
                print(f"{name}: executed in {future.result():.1f} s", flush=True)
            except CellExecutionError as error:
                failed += 1
                print(f"{name}: FAILED\n{error}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
