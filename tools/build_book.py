"""Build the course book (Jupyter Book 1.x) into ``book/_build/html``.

Steps:

1. Copy every course notebook (``notebooks/NN_name.ipynb``) into
   ``book/course/``, the folder ``book/_toc.yml`` lists. The copies lose their
   outputs, their jupytext pairing and the ``# NBVAL_IGNORE_OUTPUT`` markers
   (for nbval, not for readers); a cell that displays a dashboard gets the
   ``remove-output`` tag, because a static page cannot run a widget (the static
   figure each notebook shows beside every dashboard stands in for it).
2. Run ``jupyter-book build book --warningiserror --keep-going --all`` with
   ``PLOTLY_RENDERER=notebook``: every notebook is re-executed, and every
   plotly figure is written as self-contained HTML with plotly.js in the page
   (the committed notebooks' ``plotly_mimetype`` outputs are dropped by the
   book). Nothing is downloaded: the theme, MathJax (``sphinx-mathjax-offline``)
   and plotly.js come from installed packages.
3. Make the pages work offline: drop the three scripts that the executed
   notebooks point at a CDN for, each serving a feature the book does not use
   (:data:`CDN_SCRIPTS`), and fail if any page still loads something from the
   network. Also drop repeats of an identical inline script: sphinx-thebe 0.3.1
   under jupyter-book 1.0.4 writes its configuration twice into every page, and
   the second ``const`` declaration is a script error in the browser.

Usage::

    python tools/build_book.py             # what `make book` runs
    python tools/build_book.py --prepare   # only step 1
    python tools/build_book.py --output /tmp/book   # into /tmp/book/_build/html

Exits with jupyter-book's status; a warning fails the build, except the ones
``book/_config.yml`` lists under ``suppress_warnings`` (with the reason).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
NOTEBOOKS = ROOT / "notebooks"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
REMOVE_OUTPUT = "remove-output"
NBVAL_MARKER = "# NBVAL_IGNORE_OUTPUT"

CDN_SCRIPTS = {
    # plotly's notebook renderer loads MathJax 2 beside every figure, for LaTeX
    # in figure labels; ours have none, and the page's own MathJax is local.
    "plotly's MathJax": r"https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^\"]+",
    # myst-nb loads an ipywidgets manager (and require.js for it) on pages whose
    # outputs held a widget; the book removes those outputs.
    "widget manager": r"https://cdn\.jsdelivr\.net/npm/@jupyter-widgets/[^\"]+",
    "require.js": r"https://cdnjs\.cloudflare\.com/ajax/libs/require\.js/[^\"]+",
}
"""Scripts the build removes from every page: name -> URL pattern."""

_REMOTE = re.compile(r"""<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)=["']"""
                     r"""(?:https?:)?//[^"']+""", re.I)


def course_notebooks(root: Path = NOTEBOOKS) -> list[Path]:
    """The executed course notebooks, ``root/NN_name.ipynb``, in reading order."""
    return sorted(root.glob("[0-9][0-9]_*.ipynb"))


def shows_a_widget(cell: nbformat.NotebookNode) -> bool:
    """Whether a code cell's stored outputs display an ipywidgets view."""
    return any(WIDGET_VIEW in output.get("data", {})
               for output in cell.get("outputs", []))


def book_copy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A notebook as the book executes it: no outputs, dashboards tagged."""
    nb = nbformat.from_dict(nb)
    nb.metadata.pop("jupytext", None)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if shows_a_widget(cell):
            tags = cell.metadata.setdefault("tags", [])
            if REMOVE_OUTPUT not in tags:
                tags.append(REMOVE_OUTPUT)
        cell.outputs = []
        cell.execution_count = None
        cell.source = "\n".join(line for line in cell.source.splitlines()
                                if line.strip() != NBVAL_MARKER)
    return nb


def prepare(book: Path = BOOK, notebooks: Path = NOTEBOOKS) -> list[Path]:
    """Fill ``book/course/`` with the book's copies of the course notebooks."""
    sources = course_notebooks(notebooks)
    if not sources:
        raise SystemExit(f"no course notebooks (NN_name.ipynb) in {notebooks}")
    course = book / "course"
    shutil.rmtree(course, ignore_errors=True)
    course.mkdir(parents=True)
    written = []
    for source in sources:
        copy = book_copy(nbformat.read(source, as_version=4))
        target = course / source.name
        nbformat.write(copy, target)
        written.append(target)
    return written


def build(book: Path = BOOK, output: Path | None = None) -> int:
    """Run jupyter-book on ``book``, into ``output/_build/html``; its exit status.

    ``output`` defaults to ``book`` itself.
    """
    env = dict(os.environ, PLOTLY_RENDERER="notebook")
    # jupyter-book's command line, run by this interpreter (its script has no
    # `python -m` entry point).
    command = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
               "build", str(book), "--warningiserror", "--keep-going", "--all",
               "--builder", "html"]
    if output is not None:
        command += ["--path-output", str(output)]
    return subprocess.run(command, env=env, check=False).returncode


def make_offline(html: Path) -> dict[str, int]:
    """Drop :data:`CDN_SCRIPTS` from every page under ``html``; counts per script.

    Raises:
        SystemExit: if a page still loads a script, style, image or frame from the
            network afterwards (links a reader clicks are fine).
    """
    removed = dict.fromkeys([*CDN_SCRIPTS, "repeated inline script"], 0)
    remote = []
    for page in sorted(html.rglob("*.html")):
        text = page.read_text(encoding="utf-8")
        for name, url in CDN_SCRIPTS.items():
            text, count = re.subn(rf"""<script\b[^>]*\bsrc="{url}"[^>]*>\s*</script>""",
                                  "", text)
            removed[name] += count
        text, count = _drop_repeated_inline_scripts(text)
        removed["repeated inline script"] += count
        page.write_text(text, encoding="utf-8")
        remote += [f"{page.relative_to(html)}: {m.group(0)}"
                   for m in _REMOTE.finditer(text)
                   if not m.group(0).lower().startswith("<a")]
    if remote:
        raise SystemExit("pages still load from the network:\n  " + "\n  ".join(remote))
    return removed


def _drop_repeated_inline_scripts(text: str) -> tuple[str, int]:
    # An inline <script> on a line of its own that repeats an earlier one exactly.
    seen, kept, dropped = set(), [], 0
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if re.fullmatch(r"<script>.*</script>", stripped):
            if stripped in seen:
                dropped += 1
                continue
            seen.add(stripped)
        kept.append(line)
    return "".join(kept), dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepare", action="store_true",
                        help="only copy the notebooks into book/course/")
    parser.add_argument("--output", type=Path, default=None,
                        help="build into OUTPUT/_build/html (default: book/)")
    args = parser.parse_args(argv)
    copies = prepare()
    print(f"book/course/: {len(copies)} notebooks")
    if args.prepare:
        return 0
    # A clean build: pages of an earlier build must not survive as stale files.
    shutil.rmtree((args.output or BOOK) / "_build", ignore_errors=True)
    status = build(BOOK, args.output)
    if status != 0:
        return status
    html = (args.output or BOOK) / "_build" / "html"
    removed = make_offline(html)
    print("offline: removed " + ", ".join(f"{n} x{c}" for n, c in removed.items()))
    print(f"open {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
