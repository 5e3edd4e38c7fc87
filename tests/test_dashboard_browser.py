"""The dashboard end to end in headless Chromium (Debian's, driven by Playwright): load the
page, see the sessions, kill one, see it terminated with its stop report and audit row."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.test_control_api import TOKENS, BackgroundControl

if TYPE_CHECKING:
    from collections.abc import Iterator

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"


def _screenshot_targets() -> list[Path]:
    """Where the screenshot goes besides the test's tmp_path: ``docs/dashboard.png``
    when ``KILL_SWITCH_UPDATE_DOCS=1`` (so a test run leaves the tree clean), and
    ``$KILL_SWITCH_ARTIFACTS/dashboard.png`` for CI artefacts."""
    out = []
    if os.environ.get("KILL_SWITCH_UPDATE_DOCS") == "1":
        out.append(SCREENSHOT)
    artifacts = os.environ.get("KILL_SWITCH_ARTIFACTS")
    if artifacts:
        out.append(Path(artifacts) / "dashboard.png")
    return out


def _unavailable(why: str) -> None:
    # CI installs chromium and playwright: there a missing browser is a failure.
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why} (CI is set: the browser test must run)")
    pytest.skip(why)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium, or a skip (a failure under CI) if it is not installed."""
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is absent (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.slow
def test_dashboard_shows_sessions_kills_one_and_shows_its_audit(
    browser: Any, tmp_path: Path
) -> None:
    """Load, see every session, kill one with a reason, see it terminated, its stop
    report and its audit row; kill-all needs a confirmation; save a screenshot."""
    agents = [("researcher", {"tenant": "acme"}), ("coder", {"tenant": "zeta"})]
    with BackgroundControl(tmp_path, agents, busy=True) as plane:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"{plane.url}/#token={TOKENS['operator'][0]}")

        for s in plane.sessions:
            page.wait_for_selector(f'tr[data-session="{s.id}"][data-state="running"]')
        assert "#token" not in page.url  # the fragment is dropped once read
        assert page.evaluate("sessionStorage.getItem('kill_switch.token')") == TOKENS["operator"][0]
        page.wait_for_selector("#who:has-text('operator-t')")
        page.wait_for_selector("#conn:has-text('live')")

        victim = plane.sessions[2]  # the one with a process and a thread
        page.click(f'tr[data-session="{victim.id}"] button:has-text("more")')
        detail = page.wait_for_selector(f'tr[data-detail="{victim.id}"]:has-text("processes: ")')
        assert "sleep 60" in detail.inner_text()

        page.click(f'button[data-kill="{victim.id}"]')
        page.fill("#kill-reason", "exfiltration attempt <b>bold</b>")
        page.click("#kill-go")
        page.wait_for_selector(f'tr[data-session="{victim.id}"][data-state="terminated"]')
        report = page.wait_for_selector(f'tr[data-detail="{victim.id}"] pre.report')
        text = report.inner_text()
        assert "outcome stopped, quiescent" in text
        assert "operator-t" in text
        assert "exfiltration attempt <b>bold</b>" in text
        assert re.search(r"process \d+ sleep 60: SIGTERM", text)
        row = page.wait_for_selector(
            f'#audit-rows tr[data-kind="interrupt_requested"][data-session="{victim.id}"]'
        )
        assert "exfiltration attempt <b>bold</b>" in row.inner_text()
        assert "operator-t" in row.inner_text()
        page.wait_for_selector("#verify.ok:has-text('intact')")
        for s in plane.sessions[:2]:
            assert page.get_attribute(f'tr[data-session="{s.id}"]', "data-state") == "running"
        shot = page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        assert shot.startswith(b"\x89PNG")
        for target in _screenshot_targets():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(shot)

        page.click("#kill-all")
        page.fill("#kill-reason", "incident 42")
        page.click("#kill-go")
        page.wait_for_selector("#kill-error:has-text('tick the confirmation')")
        assert (
            page.get_attribute(f'tr[data-session="{plane.sessions[0].id}"]', "data-state")
            == "running"
        )
        page.check("#kill-confirm")
        page.click("#kill-go")
        for s in plane.sessions:
            page.wait_for_selector(f'tr[data-session="{s.id}"][data-state="terminated"]')
        assert all(
            s.report is not None and s.report.operator == "operator-t" for s in plane.sessions
        )
        assert errors == []
        page.close()


def test_a_viewer_sees_but_cannot_kill(browser: Any, tmp_path: Path) -> None:
    """With a viewer token the kill buttons are disabled (and the API would refuse)."""
    with BackgroundControl(tmp_path, [("researcher", {})]) as plane:
        page = browser.new_page()
        page.goto(f"{plane.url}/#token={TOKENS['viewer'][0]}")
        s = plane.sessions[0]
        page.wait_for_selector(f'tr[data-session="{s.id}"][data-state="running"]')
        assert page.is_disabled(f'button[data-kill="{s.id}"]')
        assert page.is_disabled("#kill-all")
        page.close()


def test_a_bad_token_is_asked_again(browser: Any, tmp_path: Path) -> None:
    """A wrong token shows the token form with the server's message, and is forgotten."""
    with BackgroundControl(tmp_path, [("researcher", {})]) as plane:
        page = browser.new_page()
        page.goto(f"{plane.url}/#token=kst_wrong")
        page.wait_for_selector("#login-error:has-text('unknown or revoked token')")
        assert page.evaluate("sessionStorage.getItem('kill_switch.token')") is None
        page.fill("#token", TOKENS["viewer"][0])
        page.click("#save-token")
        page.wait_for_selector(f'tr[data-session="{plane.sessions[0].id}"]')
        page.close()
