"""A real headless browser for the page's tests: Debian's chromium and chromium-driver, driven by
Selenium (.ci/run installs both). Plain helpers; each page test module calls `require_browser()`
before it imports Selenium's submodules."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT = 30  # seconds, for anything the page does
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1100,900")


def require_browser() -> None:
    """Skip the calling module when Selenium or the browser is missing, or fail it instead
    under KERASLM_REQUIRE_BROWSER (set by .ci/run, so CI never skips the page)."""
    pytest.importorskip("selenium.webdriver")
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        if os.environ.get("KERASLM_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing", pytrace=False)
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)",
                    allow_module_level=True)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator:
    """A headless Chromium (a selenium webdriver.Chrome) with its own profile folder."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options,
                              service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
