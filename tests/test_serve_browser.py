"""The service's web page in a real headless browser (Debian's chromium, driven by Playwright):
create an adapter from pasted examples, predict, and check the page rendered (screenshot)."""

import io
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from metalab.serve.app import create_app
from metalab.store.registry import Registry
from metalab.serve.server import BackgroundServer
from test_serve import bytes_run, served_text, text_run  # noqa: F401 - module fixtures reused

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# flags that work on these machines (closed network, root, no GPU): see the README's Development section
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

needs_browser = pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("METALAB_REQUIRE_BROWSER"),
    reason="chromium is not installed (CI installs it and sets METALAB_REQUIRE_BROWSER=1)")


def launch(playwright):
    if CHROMIUM is None:
        pytest.fail("METALAB_REQUIRE_BROWSER is set but no chromium is on PATH; install Debian's chromium package.")
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)  # a fresh temporary profile


def connected_page(playwright, server, key: str, height: int):
    """(browser, page): the service's page, connected with ``key``."""
    browser = launch(playwright)
    page = browser.new_page(viewport={"width": 1100, "height": height})
    page.goto(server.url + "/")
    page.fill("#key", key)
    page.click("#connect")
    page.wait_for_selector("#status.ok", timeout=15000)
    return browser, page


def press(page, button: str, then: str) -> None:
    """Click ``button`` and wait for ``then`` to appear."""
    page.click(button)
    page.wait_for_selector(then, timeout=15000)


def non_blank(png: bytes) -> tuple[float, int]:
    """(pixel standard deviation, number of distinct colours) of a screenshot."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return float(pixels.std()), len(np.unique(pixels.reshape(-1, 3), axis=0))


@needs_browser
def test_web_page_creates_an_adapter_and_predicts(served_text, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    db = tmp_path / "registry.sqlite"
    key = Registry(db).create_key("alice")
    with BackgroundServer(create_app(served_text.run_dir, db, rate_limit=0, served=served_text)) as server, \
            sync_playwright() as p:
        browser, page = connected_page(p, server, key, height=1300)
        assert "text inputs" in page.inner_text("#served")
        page.fill("#name", "bank")
        page.fill("#examples", "balance: what is my balance\nbalance: how much money do i have\n"
                               "transfer: send money to mom\ntransfer: wire money abroad\n"
                               "weather: will it rain today\nweather: what is the weather")
        page.click("#create")
        page.wait_for_selector("#created.ok", timeout=15000)
        assert "3 labels from 6 examples" in page.inner_text("#created")
        assert page.locator("#adapters tr").count() == 1
        page.fill("#predict-input", "what is my balance\nwill it rain today")
        page.click("#predict")
        page.wait_for_selector("#results .result", timeout=15000)
        labels = page.locator("#results .label").all_inner_texts()
        assert labels == ["balance", "weather"]  # the support texts themselves come back right
        assert page.locator("#results .result").first.locator(".bar").count() == 3

        # a bad request shows the server's message, naming the field
        page.fill("#examples", "only: one label")
        page.click("#create")
        page.wait_for_selector("#created.error", timeout=15000)
        assert "at least 2 labels" in page.inner_text("#created")

        # the text options: label names as examples and the lexical weight
        page.fill("#name", "bank+")
        page.fill("#examples", "balance: what is my balance\ntransfer: send money to mom")
        page.check("#names-as-examples")
        page.fill("#lexical-weight", "-1")
        page.click("#create")
        page.wait_for_selector("#created.error", timeout=15000)
        assert "lexical weight must be a number from 0 to 10" in page.inner_text("#created")
        page.fill("#lexical-weight", "0.3")
        page.click("#create")
        page.wait_for_selector("#created.ok", timeout=15000)
        assert "2 labels from 2 examples" in page.inner_text("#created")

        shot = page.screenshot(full_page=True)
        (tmp_path / "page.png").write_bytes(shot)
        std, colours = non_blank(shot)
        assert std > 20 and colours > 50, (std, colours)  # rendered text, bars and panels, not a blank page
        browser.close()
    made = Registry(db).list_adapters(Registry(db).tenant_for_key(key), served_text.key)
    assert [(a.name, a.names_as_examples, a.lexical_weight) for a in made] == [("bank", False, 0.0), ("bank+", True, 0.3)]


@needs_browser
def test_web_page_takes_arrays_for_an_array_run(bytes_run, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    db = tmp_path / "registry.sqlite"
    key = Registry(db).create_key("alice")
    with BackgroundServer(create_app(bytes_run, db, rate_limit=0)) as server, sync_playwright() as p:
        browser, page = connected_page(p, server, key, height=1100)
        assert "array inputs of shape [2, 3]" in page.inner_text("#served")
        assert page.is_visible("#array-examples") and not page.is_visible("#examples") and not page.is_visible("#names-as-examples")
        page.fill("#array-examples", "low: 10, 20, 30, 40, 50, 60\nlow: 11 19 31 42 49 61\nhigh: 250, 240, 230, 220, 210, 200")
        page.select_option("#head", "prototypes")
        press(page, "#create", "#created.ok")
        assert "2 labels from 3 examples" in page.inner_text("#created")
        page.fill("#predict-arrays", "248, 238, 229, 221, 212, 199\n12, 21, 29, 41, 52, 58")
        press(page, "#predict", "#results .result")
        assert page.locator("#results .label").all_inner_texts() == ["high", "low"]
        page.fill("#predict-arrays", "1, 2, x, 4, 5, 6")  # refused in the page, before any request
        press(page, "#predict", "#predict-error:has-text('is not a number')")
        page.fill("#predict-arrays", "1, 2, 3")  # the server's message, naming the field
        press(page, "#predict", "#predict-error:has-text('this run takes 6')")
        browser.close()
