"""The service's page (GET /) in a real headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium): the numbers it shows are /v1/score's, limits show as messages, and Continue
gives serve/generate.py's text for the same seed. With KERASLM_SCREENSHOT=path, the scored page
is also saved there as a PNG (the view docs/page.png shows, of a trained model)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_browser import WAIT, chromium, require_browser
from helpers_server import Server, serving

from serve.bundle import load_bundle
from serve.generate import generate

TEXT = ("the game began in 1998 , with zyzzyva on the team .\n"
        "= Valkyria Chronicles = was a game of the year .")

require_browser()

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("page"), tiny_bundle.bundle,
                 "--max-tokens-per-text", "300") as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    with chromium(tmp_path_factory.mktemp("chromium")) as driver:
        yield driver


def open_page(browser, server: Server) -> WebDriverWait:
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, WAIT)
    wait.until(lambda b: b.find_element(By.ID, "bundle").text not in ("", "loading…"))
    return wait


def type_text(browser, text: str) -> None:
    box = browser.find_element(By.ID, "text")
    box.clear()
    browser.execute_script("arguments[0].value = arguments[1];", box, text[:-1])
    box.send_keys(text[-1])  # typed: the page sees real key events


def test_scored_tokens_and_perplexity_are_the_apis(browser, server):
    wait = open_page(browser, server)
    type_text(browser, TEXT)
    browser.find_element(By.ID, "score").click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tokens .tok"))
    want = server.score([TEXT], per_token=True)[0]

    spans = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    got = [(s.get_attribute("data-token"), "oov" in s.get_attribute("class").split(),
            s.get_attribute("data-logprob")) for s in spans]
    assert got == [(t["token"], t["oov"], str(t["logprob"]) if t["logprob"] is not None
                    else "null") for t in want["per_token"]]
    assert ("zyzzyva", True) in [g[:2] for g in got]
    assert all(c.startswith("tok b") for c in (s.get_attribute("class") for s in spans))
    ppl = browser.find_element(By.ID, "perplexity")
    assert float(ppl.get_attribute("data-value")) == want["perplexity"]
    assert ppl.text == f"{want['perplexity']:.2f}"
    assert browser.find_element(By.ID, "ntokens").text == str(want["num_tokens"])
    assert browser.find_element(By.ID, "noov").text == str(want["num_oov"])

    spans[0].click()  # keyboard: focus a token, move with the arrows; its numbers are shown
    spans[0].send_keys("\ue014")  # ArrowRight
    assert browser.switch_to.active_element == spans[1]
    assert browser.find_element(By.ID, "detail").text.startswith(want["per_token"][1]["token"])
    if os.environ.get("KERASLM_SCREENSHOT"):
        browser.save_screenshot(str(Path(os.environ["KERASLM_SCREENSHOT"])))


def test_an_oversized_text_shows_the_limit(browser, server):
    wait = open_page(browser, server)
    type_text(browser, "word " * 400)
    browser.find_element(By.ID, "score").click()
    wait.until(lambda b: b.find_element(By.ID, "message").text)
    message = browser.find_element(By.ID, "message").text
    assert "limit is 300" in message and "max_tokens_per_text" in message


def test_continue_with_a_seed_is_generate_pys_text(browser, server, tiny_bundle):
    wait = open_page(browser, server)
    prompt = "the game began"
    type_text(browser, prompt)
    for field, value in (("gen-tokens", "12"), ("gen-seed", "7"), ("gen-top-k", "20")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "continue").click()
    out = browser.find_element(By.ID, "continuation")
    wait.until(lambda b: out.get_attribute("textContent"))
    want = generate(load_bundle(tiny_bundle.bundle), prompt, tokens=12, top_k=20, seed=7)[0]
    assert out.get_attribute("textContent") == want.text


def test_generate_limits_are_json_errors(server):
    over = server.post("/v1/generate", json={"prompt": "the", "tokens": 301})
    assert over.status_code == 413
    assert over.json()["error"] == {
        "code": "too_many_tokens", "message": "301 tokens asked for; the limit is 300 "
        "(max_tokens_per_text)", "limit": "max_tokens_per_text", "max": 300}
    bad = server.post("/v1/generate", json={"prompt": "the", "top_p": 0})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"
