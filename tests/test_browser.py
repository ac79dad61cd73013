"""A course notebook in a real browser: JupyterLab runs it, a dashboard responds.

JupyterLab serves a temporary copy of ``notebooks/`` (it autosaves, and the
committed notebooks must never change) on 127.0.0.1 with a token. Debian's
chromium, driven headless by Playwright, opens :data:`TARGET_NOTEBOOK`, runs
every cell through the menu (Run > Run All Cells), waits for the kernel to
finish, moves one control of the first dashboard and checks that its plotly
figure redrew with new data, while the page logs no errors.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``; Playwright's own
browser download cannot work here), ``playwright`` and ``jupyterlab``. Without
them the test skips, unless ``DMOE_EDU_REQUIRE_BROWSER=1`` (set by CI), where it
fails. On a failure a screenshot of the page and JupyterLab's log are saved in
the test's ``tmp_path`` and named in the message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from browser_support import CHROMIUM, CHROMIUM_ARGS, require_browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
TARGET_NOTEBOOK = "05_where_and_what.ipynb"
"""The notebook the test opens, inside ``notebooks/``: its first dashboard is driven."""

# Bounds on every wait, in seconds: generous for a loaded 2-core machine.
SERVER_START_S = 90
PAGE_LOAD_S = 120
RUN_ALL_S = 900  # the notebook's own run time, under nbval, is well under 2 min
REDRAW_S = 120
SHUTDOWN_S = 30


def _require_browser() -> None:
    require_browser({"jupyterlab": "pip install jupyterlab"})


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or ``None``."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid``, with its start time (Linux ``/proc``).

    The start time tells a process from a later one that reuses its pid.
    """
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(int(entry.name))
        if fields is None or len(fields) < 20:
            continue
        # Fields 4 and 22 of stat(5): the parent's pid and the start time.
        children.setdefault(int(fields[1]), []).append(int(entry.name))
        starts[int(entry.name)] = fields[19]
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found[child] = starts[child]
                todo.append(child)
    return found


def _alive(pid: int, start: str | None = None) -> bool:
    """Whether ``pid`` runs (not a zombie), and is the process that started at
    ``start`` when given."""
    fields = _proc_stat(pid)
    if fields is None or fields[0] == "Z":  # a zombie has exited already
        return False
    return start is None or (len(fields) > 19 and fields[19] == start)


def _wait_gone(processes: dict[int, str], timeout: float) -> list[int]:
    """Wait until none of ``processes`` is alive; those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        alive = sorted(p for p, start in processes.items() if _alive(p, start))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _api(port: int, token: str, path: str, method: str = "GET") -> bytes:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method=method,
        headers={"Authorization": f"token {token}"},
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


@dataclasses.dataclass
class Lab:
    """A running JupyterLab: where it listens, its log, and what it started."""

    url: str
    token: str
    log_path: Path
    server: subprocess.Popen
    started: dict[int, str] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def jupyterlab(root_dir: Path, work: Path):
    """JupyterLab serving ``root_dir`` on 127.0.0.1; yields a :class:`Lab`.

    Its settings, workspaces and runtime files go to ``work``; nothing in the
    user's home is written. On exit it is asked to shut down (kernels
    included), then terminated, then killed, with every process it started.
    """
    token = secrets.token_hex(16)
    for name in ("config", "runtime", "settings", "workspaces", "ipython"):
        (work / name).mkdir(parents=True, exist_ok=True)

    # Never fetch the news feed, and do not pop up a toast that asks.
    notification = work / "settings" / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false"}))
    env = {
        **os.environ,
        "JUPYTER_CONFIG_DIR": str(work / "config"),
        "JUPYTER_RUNTIME_DIR": str(work / "runtime"),
        "IPYTHONDIR": str(work / "ipython"),
    }
    env.pop("PLOTLY_RENDERER", None)  # the notebooks' own renderer, as in the lab
    options = [
        "--no-browser", "--ip=127.0.0.1", "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
        # window.jupyterapp: the test reads the kernel's and cells' state from it.
        "--LabApp.expose_app_in_browser=True",
        # No network: no news feed, no update check, no extension listing.
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        f"--LabApp.user_settings_dir={work / 'settings'}",
        f"--LabApp.workspaces_dir={work / 'workspaces'}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options.append("--allow-root")
    log_path = work / "jupyterlab.log"

    # A free port can be taken between our check and the server's bind: retry.
    for _attempt in range(3):
        port = _free_port()
        with open(log_path, "ab") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "jupyterlab", f"--port={port}", *options],
                cwd=root_dir, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
        lab = Lab(f"http://127.0.0.1:{port}", token, log_path, server)
        try:
            if _wait_ready(server, port, token, log_path):
                yield lab
                return
        finally:
            lab.started.update(_descendants(server.pid))
            _stop(server, port, token, lab.started)
    raise AssertionError(f"no free port for JupyterLab after 3 tries; log: {log_path}")


def _wait_ready(server: subprocess.Popen, port: int, token: str,
                log_path: Path) -> bool:
    """True once the REST API answers; False if the port was taken."""
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if server.poll() is not None:
            if f"The port {port} is already in use" in _tail(log_path):
                return False
            raise AssertionError(f"JupyterLab exited with {server.returncode} at "
                                 f"start; log: {log_path}\n{_tail(log_path)}")
        try:
            _api(port, token, "/api/status")
            return True
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"JupyterLab did not answer within {SERVER_START_S} s; "
                    f"log: {log_path}\n{_tail(log_path)}") from None
            time.sleep(0.5)


def _stop(server: subprocess.Popen, port: int, token: str,
          started: dict[int, str]) -> None:
    # Ask politely (the server shuts its kernels down), then terminate, then kill.
    if server.poll() is None:
        with contextlib.suppress(OSError, urllib.error.URLError):
            _api(port, token, "/api/shutdown", method="POST")
        try:
            server.wait(SHUTDOWN_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
                server.wait(10)

    # Kernels run in sessions of their own: kill any that outlived the server.
    for pid in _wait_gone(started, 10):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --------------------------------------------------------------------------- the page

# The state of the open notebook, read from JupyterLab's application object.
_NOTEBOOK_STATE = """(name) => {
    const app = window.jupyterapp;
    const panel = app && app.shell.currentWidget;
    if (!panel || !panel.context || !panel.content || !panel.content.model
            || !panel.context.path.endsWith(name)) {
        return null;
    }
    const kernel = panel.sessionContext.session
        && panel.sessionContext.session.kernel;
    const cells = Array.from(panel.content.model.cells)
        .filter(cell => cell.type === "code" && cell.sharedModel.getSource().trim());
    const errors = [];
    for (const cell of cells) {
        for (let i = 0; i < cell.outputs.length; i++) {
            const output = cell.outputs.get(i).toJSON();
            if (output.output_type === "error") {
                errors.push(`${output.ename}: ${output.evalue}`);
            }
        }
    }
    return {
        kernel: kernel ? kernel.status : "none",
        cells: cells.length,
        executed: cells.filter(cell => cell.executionCount !== null).length,
        errors: errors,
    };
}"""

# The data of a plotly graph div, as text that changes when any trace changes.
_FIGURE_DATA = """(div) => JSON.stringify((div.data || []).map(trace => [
    trace.type, trace.x, trace.y, trace.z, trace.text]))"""


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll ``predicate`` until it returns a truthy value; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _run_all_cells(page, name: str) -> dict:
    """Clear the stored outputs, run every cell from the Run menu, wait for the end."""
    state = _wait_for(
        lambda: (lambda s: s if s and s["kernel"] == "idle" else None)(
            page.evaluate(_NOTEBOOK_STATE, name)),
        PAGE_LOAD_S, f"{name} to open with an idle kernel")
    assert state["cells"] > 0, f"{name} has no code cells"

    # Stored execution counts would look like a finished run: clear them first.
    page.evaluate("() => window.jupyterapp.commands.execute("
                  "'notebook:clear-all-cell-outputs')")
    _wait_for(lambda: page.evaluate(_NOTEBOOK_STATE, name)["executed"] == 0,
              30, "the outputs to clear")

    # The user's way: the Run menu, then Run All Cells.
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

    def finished():
        state = page.evaluate(_NOTEBOOK_STATE, name)
        if state["errors"]:
            raise AssertionError(f"{name} raised in the browser: {state['errors']}")
        done = state["executed"] == state["cells"] and state["kernel"] == "idle"
        return state if done else None

    return _wait_for(finished, RUN_ALL_S, f"every cell of {name} to run", 1.0)


def _move_a_control(board) -> str:
    """Move the dashboard's first slider (or toggle buttons, or dropdown)."""
    slider = board.get_by_role("slider")
    if slider.count():
        handle = slider.first
        handle.scroll_into_view_if_needed()
        before = handle.get_attribute("aria-valuenow")
        handle.focus()
        handle.press("ArrowRight")
        if handle.get_attribute("aria-valuenow") == before:  # it was at the end
            handle.press("ArrowLeft")
        after = handle.get_attribute("aria-valuenow")
        assert after != before, f"the slider did not move from {before}"
        return f"slider {before} -> {after}"
    toggles = board.locator(".widget-toggle-buttons button:not(.mod-active)")
    if toggles.count():
        text = toggles.first.inner_text()
        toggles.first.click()
        return f"toggle button {text!r}"
    dropdown = board.locator(".widget-dropdown select")
    if dropdown.count():
        options = dropdown.first.locator("option").all_inner_texts()
        current = dropdown.first.input_value()
        choice = next(o for o in options if o != current)
        dropdown.first.select_option(label=choice)
        return f"dropdown {current!r} -> {choice!r}"
    raise AssertionError("the dashboard has no slider, toggle buttons or dropdown")


def drive_dashboard(notebook_dir: Path, name: str, work: Path) -> dict:
    """Open ``name`` from a copy of ``notebook_dir`` in chromium, run it, move a
    control of its first dashboard and check that its figure redraws.

    Returns:
        ``{"seconds": {phase: s}, "cells": code cells run, "moved": what moved}``.
    """
    from playwright.sync_api import sync_playwright

    copy = work / "notebooks"
    shutil.copytree(notebook_dir, copy,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    assert (copy / name).is_file(), f"{notebook_dir / name} does not exist"
    ours_before = _descendants(os.getpid())
    seconds, start = {}, time.monotonic()
    page_errors: list[str] = []
    console_errors: list[str] = []
    screenshot = work / "failure.png"

    def on_console(message) -> None:
        # No console error is known to be harmless here, so none is ignored.
        if message.type == "error":
            console_errors.append(f"{message.text} ({message.location.get('url')})")

    with jupyterlab(copy, work) as lab, sync_playwright() as playwright:
        seconds["server start"] = time.monotonic() - start
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport={"width": 1400, "height": 1000}
                                       ).new_page()
            page.set_default_timeout(REDRAW_S * 1000)
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.on("console", on_console)
            try:
                mark = time.monotonic()
                page.goto(f"{lab.url}/lab/tree/{name}?token={lab.token}",
                          wait_until="domcontentloaded", timeout=PAGE_LOAD_S * 1000)
                state = _run_all_cells(page, name)
                seconds["open and run all cells"] = time.monotonic() - mark

                # The first output holding both a control and a plotly figure.
                board = page.locator(".widget-vbox").filter(
                    has=page.locator(".js-plotly-plot")).filter(
                    has=page.locator(".widget-slider, .widget-toggle-buttons, "
                                     ".widget-dropdown")).first
                board.scroll_into_view_if_needed()
                graph = board.locator(".js-plotly-plot").first
                graph.wait_for(state="visible")
                before = _wait_for(
                    lambda: (lambda d: d if d != "[]" else None)(
                        graph.evaluate(_FIGURE_DATA)),
                    REDRAW_S, "the figure to draw its data")

                # Move a control; the kernel redraws the figure in place.
                mark = time.monotonic()
                moved = _move_a_control(board)
                _wait_for(lambda: graph.evaluate(_FIGURE_DATA) != before,
                          REDRAW_S, f"the figure to redraw after moving the {moved}")
                seconds["redraw"] = time.monotonic() - mark

                # Neither the dashboard, the kernel nor the page reported an error.
                page.wait_for_timeout(1000)  # errors of the redraw arrive late
                shown = board.locator(".dmoe-error")
                assert not shown.count(), f"the dashboard shows {shown.inner_text()}"
                assert page.evaluate(_NOTEBOOK_STATE, name)["errors"] == []
                assert not page_errors, f"the page raised: {page_errors}"
                assert not console_errors, f"console errors: {console_errors}"
            except BaseException as error:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(screenshot))
                raise AssertionError(
                    f"{error}\nscreenshot: {screenshot}\nJupyterLab log: "
                    f"{lab.log_path}\npage errors: {page_errors}\n"
                    f"console errors: {console_errors}") from error
        finally:
            browser.close()

    # JupyterLab, its kernels, chromium and Playwright's driver have all exited.
    left = _wait_gone(lab.started, 10) + _wait_gone(
        {pid: t for pid, t in _descendants(os.getpid()).items()
         if pid not in ours_before}, 10)
    assert not left, f"processes left running: {left}"
    seconds["total"] = time.monotonic() - start
    return {"seconds": seconds, "cells": state["cells"], "moved": moved}


# --------------------------------------------------------------------------- the test


@pytest.mark.slow
def test_dashboard_responds_in_jupyterlab(tmp_path):
    _require_browser()
    target = NOTEBOOKS / TARGET_NOTEBOOK
    if not target.is_file():
        pytest.fail(f"{target} is missing: run `make notebooks`")
    committed = target.read_bytes()

    result = drive_dashboard(NOTEBOOKS, TARGET_NOTEBOOK, tmp_path)

    # JupyterLab saved into its copy only: the committed notebook is untouched.
    assert target.read_bytes() == committed, f"{target} was modified"
    seconds = ", ".join(f"{k} {v:.1f}" for k, v in result["seconds"].items())
    print(f"{TARGET_NOTEBOOK}: {result['cells']} code cells; moved the "
          f"{result['moved']}; seconds: {seconds}")
