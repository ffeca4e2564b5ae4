"""Swagger UI at /docs in a real browser (headless Chromium), with no request leaving the API's host."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.wait import WebDriverWait

from tests.conftest import Stack

# Debian's packages; scripts/test.sh installs them when they are missing.
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        message = "chromium and chromium-driver are needed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    # The driver named explicitly: Selenium never looks for (or downloads) one of its own.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def operation(driver: WebDriver, method: str, path: str) -> WebElement:
    """The operation block Swagger UI rendered for `method path`, once it is on the page."""
    xpath = (
        f"//div[contains(@class, 'opblock-{method.lower()}')]"
        f"[.//*[contains(@class, 'opblock-summary-path') and @data-path='{path}']]"
    )
    found: WebElement = WebDriverWait(driver, WAIT_S).until(
        expected_conditions.presence_of_element_located((By.XPATH, xpath))
    )
    return found


def test_swagger_ui_renders_offline_and_runs_a_request(stack: Stack, browser: WebDriver) -> None:
    assets = requests.get(f"{stack.api_url}/docs", timeout=10).text
    assert "/docs/assets/swagger-ui-bundle.js" in assets
    assert "cdn" not in assets.lower()

    browser.get(f"{stack.api_url}/docs")
    train = operation(browser, "POST", "/runs/train")
    assert "POST" in train.text

    healthz = operation(browser, "GET", "/healthz")
    healthz.find_element(By.CLASS_NAME, "opblock-summary").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda _: healthz.find_element(By.CLASS_NAME, "try-out__btn").is_displayed()
    )
    healthz.find_element(By.CLASS_NAME, "try-out__btn").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda _: healthz.find_element(By.CLASS_NAME, "execute").is_displayed()
    )
    healthz.find_element(By.CLASS_NAME, "execute").click()
    status = WebDriverWait(browser, WAIT_S).until(
        lambda _: healthz.find_element(
            By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status"
        )
    )
    assert status.text.strip().startswith("200")
    body = healthz.find_element(
        By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_description pre"
    )
    assert '"status": "ok"' in body.text

    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert isinstance(loaded, list)
    assert loaded, "the page loaded its scripts"
    assert all(str(url).startswith(stack.api_url) for url in loaded), loaded
