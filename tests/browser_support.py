"""What the browser tests share: Debian's chromium, and when to skip or fail.

Playwright drives ``/usr/bin/chromium`` (``apt-get install chromium``);
Playwright's own browser download cannot work offline. Without the browser or a
needed Python package a browser test skips, unless ``DMOE_EDU_REQUIRE_BROWSER=1``
(set by CI), where it fails.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-quic",
]
REQUIRE = os.environ.get("DMOE_EDU_REQUIRE_BROWSER") == "1"


def missing(modules: dict[str, str]) -> str | None:
    """Why a browser test cannot run here, or ``None`` if it can.

    Args:
        modules: Python modules it needs, each with the command that installs it.
    """
    if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"{CHROMIUM} is missing: apt-get install chromium"
    for module, install in {"playwright": "pip install playwright", **modules}.items():
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: {install}"
    return None


def require_browser(modules: dict[str, str]) -> None:
    """Skip the calling test (fail it under ``DMOE_EDU_REQUIRE_BROWSER=1``) when
    :func:`missing` names a reason."""
    reason = missing(modules)
    if reason is None:
        return
    if REQUIRE:
        pytest.fail(f"DMOE_EDU_REQUIRE_BROWSER=1 but the browser test cannot run: "
                    f"{reason}")
    pytest.skip(reason)
