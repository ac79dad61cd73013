"""The book: built from a clean state with warnings as errors, then read in chromium.

The build (``tools/build_book.py``, what ``make book`` runs) re-executes every
course notebook, so it takes a couple of minutes; it runs once per session into
a temporary folder. The browser part opens every page of the built site from
disk with the network cut off and checks what a reader would notice: figures
that do not draw, math left as TeX, links to pages or anchors that do not
exist, a Python traceback in the text, a script error.

Needs ``jupyter-book`` 1.x and ``sphinx-mathjax-offline`` (the ``book`` extra)
for the build, and the browser of :mod:`browser_support` for the rest.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, REQUIRE, require_browser

ROOT = Path(__file__).resolve().parents[1]
BOOK_NEEDS = {"jupyter_book": "pip install -e '.[book]'",
              "sphinx-mathjax-offline": "pip install -e '.[book]'"}

# Pages built from a notebook: each draws at least one plotly figure.
COURSE_PAGES = sorted(p.with_suffix(".html").name
                      for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# Collected per page in the browser once the page has settled.
_PAGE_FACTS = """() => ({
    ids: Array.from(document.querySelectorAll('[id]'), e => e.id),
    links: Array.from(document.querySelectorAll('a[href]'), a => a.href),
    plots: document.querySelectorAll('.js-plotly-plot').length,
    drawn: Array.from(document.querySelectorAll('.js-plotly-plot'))
        .filter(p => p.querySelector('.main-svg')).length,
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('.math mjx-container').length,
    mathErrors: document.querySelectorAll('mjx-merror').length,
    tracebacks: document.querySelectorAll('.output.traceback, .output.error').length,
    text: document.body ? document.body.innerText : '',
})"""


def _book_missing() -> str | None:
    for module, install in BOOK_NEEDS.items():
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: {install}"
    return None


@pytest.fixture(scope="session")
def built_book(tmp_path_factory) -> Path:
    """Build the book once into a temporary folder; its ``html`` folder."""
    reason = _book_missing()
    if reason:
        if REQUIRE:
            pytest.fail(f"DMOE_EDU_REQUIRE_BROWSER=1 but the book cannot be built: "
                        f"{reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("book")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "build_book.py"), "--output", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=1800)
    log = done.stdout + done.stderr
    (out / "build.log").write_text(log)
    assert done.returncode == 0, (
        f"the book build failed (exit {done.returncode}); the end of its log:\n"
        f"{log[-6000:]}")
    return out / "_build" / "html"


@pytest.mark.slow
def test_book_builds_with_warnings_as_errors(built_book):
    # The fixture built it with -W; here: every chapter and the reference are there.
    for page in ("intro.html", "api/index.html", "api/model.html",
                 *(f"course/{name}" for name in COURSE_PAGES)):
        assert (built_book / page).is_file(), f"{page} was not built"
    assert len(COURSE_PAGES) == 7
    assert (built_book / "_static" / "mathjax" / "tex-chtml.js").is_file()


@pytest.mark.slow
def test_every_page_reads_offline_in_a_browser(built_book):
    require_browser({})
    from playwright.sync_api import sync_playwright

    pages = sorted(p for p in built_book.rglob("*.html")
                   if "_static" not in p.parts and "_sources" not in p.parts)
    facts, remote, problems = {}, [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context()

            # Everything must come from disk: any other request is refused and noted.
            def route(request_route):
                url = request_route.request.url
                if url.startswith(("file:", "data:", "blob:", "about:")):
                    request_route.continue_()
                else:
                    remote.append(url)
                    request_route.abort()

            context.route("**/*", route)
            for path in pages:
                name = path.relative_to(built_book).as_posix()
                page = context.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
                page.on("console", lambda m, errors=errors: errors.append(m.text)
                        if m.type == "error" else None)
                page.goto(path.as_uri(), wait_until="load")
                _settle(page)
                facts[name] = page.evaluate(_PAGE_FACTS)
                problems += [f"{name}: {e}" for e in errors]
                page.close()
        finally:
            browser.close()

    assert not remote, f"pages asked the network for {sorted(set(remote))[:10]}"
    assert not problems, "script errors:\n" + "\n".join(problems[:20])

    for name, page in facts.items():
        # No Python traceback, rendered or as text.
        assert page["tracebacks"] == 0, f"{name} shows an error output"
        assert "Traceback (most recent call last)" not in page["text"], name

        # Every math element typeset by MathJax, without errors.
        assert page["typeset"] == page["math"], (
            f"{name}: {page['typeset']} of {page['math']} math elements typeset")
        assert page["mathErrors"] == 0, f"{name} has MathJax errors"

    # The pages that should draw figures do.
    for name in COURSE_PAGES:
        page = facts[f"course/{name}"]
        assert page["plots"] >= 1, f"{name} holds no plotly figure"
        assert page["drawn"] == page["plots"], (
            f"{name}: {page['drawn']} of {page['plots']} figures drawn")
    assert facts["intro.html"]["math"] >= 1, "the introduction's formula is missing"

    # Every internal link leads to a built page and, with a #fragment, to an
    # element with that id there.
    broken = []
    for name, page in facts.items():
        for link in page["links"]:
            parsed = urllib.parse.urlparse(link)
            if parsed.scheme != "file":
                continue
            target = Path(urllib.parse.unquote(parsed.path))
            if not target.is_file():
                broken.append(f"{name} -> {link} (no such page)")
                continue
            target_name = target.relative_to(built_book).as_posix()
            fragment = urllib.parse.unquote(parsed.fragment)
            if fragment and target_name in facts:
                if fragment not in facts[target_name]["ids"]:
                    broken.append(f"{name} -> {target_name}#{fragment} (no anchor)")
    assert not broken, "broken links:\n" + "\n".join(broken[:30])


def _settle(page) -> None:
    """Wait until the page's plotly figures are drawn and MathJax is done."""
    page.wait_for_function(
        """() => {
            const plots = document.querySelectorAll('.js-plotly-plot');
            const drawn = Array.from(plots).filter(p => p.querySelector('.main-svg'));
            const mj = window.MathJax;
            const mathDone = !document.querySelector('.math') ||
                (mj && mj.startup && mj.startup.promise &&
                 document.querySelectorAll('.math mjx-container').length ===
                 document.querySelectorAll('.math').length);
            return plots.length === drawn.length && mathDone;
        }""",
        timeout=60_000,
    )


def test_build_book_tags_dashboards_and_drops_cdn_scripts(tmp_path):
    # No browser needed: the two transformations of tools/build_book.py.
    nbformat = pytest.importorskip("nbformat")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import build_book
    finally:
        sys.path.pop(0)

    nb = nbformat.v4.new_notebook()
    widget = nbformat.v4.new_code_cell("# NBVAL_IGNORE_OUTPUT\nboard")
    widget.outputs = [nbformat.v4.new_output(
        "display_data", data={build_book.WIDGET_VIEW: {"model_id": "x"},
                              "text/plain": "VBox()"})]
    plain = nbformat.v4.new_code_cell("1 + 1")
    plain.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"},
                                            execution_count=1)]
    nb.cells = [widget, plain]
    copy = build_book.book_copy(nb)
    assert copy.cells[0].metadata["tags"] == ["remove-output"]
    assert copy.cells[0].source == "board"
    assert "tags" not in copy.cells[1].metadata
    assert all(c.outputs == [] for c in copy.cells)
    assert nb.cells[0].outputs, "the original must not change"

    html = tmp_path / "html"
    html.mkdir()
    (html / "a.html").write_text(
        '<script src="https://cdnjs.cloudflare.com/ajax/libs/mathjax/3.2.2/es5/'
        'tex-svg.min.js"></script><p>kept</p>\n'
        '<a href="https://example.org">a link a reader clicks is fine</a>\n'
        '  <script>const A = 1;</script>\n<script>var b = 2;</script>\n'
        '    <script>const A = 1;</script>\n')
    removed = build_book.make_offline(html)
    assert removed["plotly's MathJax"] == 1 and removed["repeated inline script"] == 1
    text = (html / "a.html").read_text()
    assert text.startswith("<p>kept</p>") and text.count("const A = 1") == 1
    assert "var b = 2" in text
    (html / "b.html").write_text('<script src="https://example.org/x.js"></script>')
    with pytest.raises(SystemExit, match="b.html"):
        build_book.make_offline(html)
