"""The page (GET /) of a service that needs an API key, in a real headless Chromium (as
tests/test_page.py): its first call gets 401, it asks for the key, keeps it for the tab and sends
it as `Authorization: Bearer KEY` on /v1/score and /v1/generate; a wrong key shows the API's
message."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from helpers_browser import WAIT, chromium, require_browser
from helpers_server import Server, serving

KEY = "page-key-0123456789"
TEXT = "the game began in 1998 , with zyzzyva on the team ."

require_browser()

from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("page-access")
    (tmp / "keys.txt").write_text(f"# the page's key\n{KEY}\n")
    with serving(tmp, tiny_bundle.bundle, "--api-key-file", str(tmp / "keys.txt")) as s:
        yield s


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    with chromium(tmp_path_factory.mktemp("chromium-access")) as driver:
        yield driver


def fresh_page(browser, server: Server) -> WebDriverWait:
    """The page with no key kept, its bundle name shown (/readyz needs none)."""
    browser.get(server.url + "/")
    browser.execute_script("sessionStorage.clear();")
    browser.refresh()
    wait = WebDriverWait(browser, WAIT)
    wait.until(lambda b: b.find_element(By.ID, "bundle").text == "tiny")
    return wait


def ask_with(browser, wait: WebDriverWait, key: str) -> None:
    """Wait for the key field, then give it `key`."""
    field = browser.find_element(By.ID, "api-key")
    wait.until(lambda b: field.is_displayed())
    assert field.get_attribute("type") == "password"
    field.clear()
    field.send_keys(key)
    browser.find_element(By.ID, "use-key").click()


def bearer() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_the_page_asks_for_the_key_then_scores_and_continues_as_the_api(browser, server):
    wait = fresh_page(browser, server)
    assert not browser.find_element(By.ID, "api-key").is_displayed()
    browser.find_element(By.ID, "text").send_keys(TEXT)
    browser.find_element(By.ID, "score").click()
    wait.until(lambda b: b.find_element(By.ID, "message").text)
    refused = server.post(json={"texts": [TEXT]})
    assert refused.status_code == 401
    assert browser.find_element(By.ID, "message").text == refused.json()["error"]["message"]

    ask_with(browser, wait, KEY)  # the refused Score runs again with the key
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tokens .tok"))
    want = server.post(json={"texts": [TEXT], "per_token": True}, headers=bearer())
    want = want.json()["results"][0]
    spans = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")
    assert [(s.get_attribute("data-token"), s.get_attribute("data-logprob")) for s in spans] == [
        (t["token"], str(t["logprob"])) for t in want["per_token"]]
    ppl = browser.find_element(By.ID, "perplexity")
    assert float(ppl.get_attribute("data-value")) == want["perplexity"]
    assert browser.find_element(By.ID, "message").text == ""
    assert not browser.find_element(By.ID, "api-key").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('keraslm.api-key');") == KEY

    for field, value in (("gen-tokens", "8"), ("gen-seed", "3")):  # the kept key, not asked
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "continue").click()
    out = browser.find_element(By.ID, "continuation")
    wait.until(lambda b: out.get_attribute("textContent"))
    expected = server.post("/v1/generate", json={"prompt": TEXT, "tokens": 8, "seed": 3,
                                                 "temperature": 1, "top_k": 0, "top_p": 1},
                           headers=bearer())
    assert out.get_attribute("textContent") == expected.json()["text"]
    assert not browser.find_element(By.ID, "api-key").is_displayed()


def test_a_wrong_key_shows_the_apis_message_and_asks_again(browser, server):
    wait = fresh_page(browser, server)
    browser.find_element(By.ID, "text").send_keys(TEXT)
    browser.find_element(By.ID, "score").click()
    message = browser.find_element(By.ID, "message")
    ask_with(browser, wait, "two words")  # never sent: not what a key file may hold
    wait.until(lambda b: "visible ASCII" in message.text)
    ask_with(browser, wait, "not-the-key")
    wait.until(lambda b: message.text == "the API key is not valid")
    assert server.post(json={"texts": [TEXT]}, headers={"Authorization": "Bearer not-the-key"}
                       ).json()["error"]["message"] == message.text
    assert browser.find_element(By.ID, "api-key").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('keraslm.api-key');") is None
    assert not browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")

    ask_with(browser, wait, KEY)  # then the right one: scored
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#tokens .tok"))
    assert message.text == ""
