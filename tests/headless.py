"""A page of a running server in headless Chromium (Debian's, driven by Playwright), for the tests that check the web
page: `with page_at(url) as (page, errors):` opens it and waits until the page has read the server's settings;
`errors` collects the page's script errors. Skips the calling test where Chromium or Playwright is absent."""

from __future__ import annotations

import contextlib
import os

import pytest

CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def page_at(url: str):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (Debian's chromium package; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.body.dataset.ready === '1'")
            yield page, errors
        finally:
            browser.close()
