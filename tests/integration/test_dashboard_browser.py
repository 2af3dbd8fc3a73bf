"""The dashboard in a real browser: headless Chromium from the distribution (never a browser
Playwright downloads), driven by Playwright. It submits a tiny job from the submit page, watches
it reach `registered` without a reload, opens the evaluation report and promotes the version.
Screenshots go to $TUNEBUS_TEST_ARTIFACTS/dashboard (default: <tmp>/tunebus-artifacts/dashboard)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest

from tunebus.shared.dashboard import Dashboard

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium installed (apt-get install chromium; .ci/run installs "
    "it where it runs as root with apt-get)")

WORDS = ["tune", "bus", "adapter", "model", "loss", "rank", "alpha", "token", "layer"]


@pytest.fixture
def artifacts() -> Path:
    root = Path(os.environ.get("TUNEBUS_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "tunebus-artifacts")
    folder = root / "dashboard"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture
def browser_page():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.errors = errors
        yield page
        browser.close()


def test_a_tiny_job_is_watched_to_registered_its_report_opened_and_promoted(
        stack, tiny_model_uri, tmp_path, artifacts, browser_page):
    page = browser_page
    dataset = tmp_path / "spell.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": f"Spell {w}.", "output": " ".join(w)}) + "\n"
                               for w in WORDS))
    adapter = f"browser-{uuid.uuid4().hex[:6]}"
    with Dashboard(stack.as_role("operator")) as dashboard:
        page.goto(f"{dashboard.url}#/submit")
        page.set_input_files("input[name=dataset]", str(dataset))
        page.fill("input[name=adapter_name]", adapter)
        page.fill("input[name=base_model]", tiny_model_uri)
        # A learning rate this small keeps the loss where it was, so the registry does not
        # promote the version by itself: the promotion below is the operator's.
        for name, value in (("iters", "4"), ("learning_rate", "0.0000001"), ("batch_size", "2"),
                            ("max_seq_length", "64"), ("rank", "4")):
            page.fill(f"input[name={name}]", value)
        page.click("#check")
        page.wait_for_selector("#validation h2:has-text('Valid')", timeout=30_000)
        page.screenshot(path=artifacts / "submit.png", full_page=True)
        page.click("#start")

        # The job page, live: the state moves on to done with no reload of the document.
        page.wait_for_selector("#job-state", timeout=30_000)
        page.evaluate("window.__sameDocument = true")
        page.wait_for_selector("#job-state[data-phase=done]", timeout=180_000)
        assert page.evaluate("window.__sameDocument") is True
        register = page.locator("[data-stage=register]").inner_text()
        assert "done" in register and f"{adapter}:1" in register
        assert page.locator("#job-ref").inner_text() == f"{adapter}:1"
        assert page.locator("#chart canvas").count() == 1  # the loss curve was drawn

        report = page.frame_locator("iframe.report")
        assert "Evaluation of" in report.locator("h1").inner_text(timeout=30_000)
        page.screenshot(path=artifacts / "job.png", full_page=True)
        job_url = page.url
        page.click("#report-box a")  # the report on a page of its own, as "open" shows it
        page.wait_for_selector("h1:has-text('Evaluation of')", timeout=30_000)
        page.screenshot(path=artifacts / "report.png", full_page=True)
        page.goto(job_url)
        page.wait_for_selector("#job-ref", timeout=30_000)

        page.click("#job-ref")
        page.wait_for_selector("#promote", timeout=30_000)
        assert page.locator("h1 .state.ok").count() == 0  # not in production yet
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#promote")
        page.wait_for_selector("h1 .state.ok:has-text('production')", timeout=30_000)
        assert page.locator("#promote").is_disabled()
        page.screenshot(path=artifacts / "adapter.png", full_page=True)

        page.goto(f"{dashboard.url}#/jobs")
        page.wait_for_selector(f"tr[data-job='{dataset.parent.name}'], #jobs tbody tr", timeout=30_000)
        page.screenshot(path=artifacts / "jobs.png")
    assert page.errors == [], page.errors
