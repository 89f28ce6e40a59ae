"""The playground in real headless Chromium (Debian's, driven by Playwright; no browser download):
pick two prefixes, type a prompt, compare, and see both outputs stream in."""

from __future__ import annotations

import shutil

import httpx
import pytest

from prefixtune.serving import build_app
from prefixtune.serving.background import running
from test_serving import PROMPTS, write_store
from tiny import tiny_model, tiny_tokenizer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install)")


@pytest.fixture
def live_server(tmp_path):
    write_store(tmp_path / "store")
    app, engine, _ = build_app(tiny_model("llama"), tiny_tokenizer(), tmp_path / "store")
    with running(app) as url:
        yield url, engine
    engine.close()


def test_playground_compares_two_prefixes_side_by_side(live_server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, engine = live_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page()
        page.goto(url)
        page.wait_for_selector("input[value=formal-blog]")
        page.check("input[value=formal-blog]")
        page.check("input[value=twitter-wit]")
        page.fill("#prompt", PROMPTS[0])
        page.fill("#max-tokens", "6")
        page.click("#compare")
        page.wait_for_selector("#outputs[data-done=true]", timeout=60_000)
        columns = page.query_selector_all("#outputs .output")
        shown = {column.get_attribute("data-model"): column.query_selector("pre").inner_text() for column in columns}
        page.screenshot(path=str(tmp_path / "playground.png"))
        browser.close()
    assert set(shown) == {"formal-blog", "twitter-wit"}
    assert all(text.strip() for text in shown.values())
    assert shown["formal-blog"] != shown["twitter-wit"]
    # what the page shows is what the API returns for the same request
    for name, text in shown.items():
        body = {"model": name, "prompt": PROMPTS[0], "max_tokens": 6}
        assert text == httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
