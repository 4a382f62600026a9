"""The web console (/ui) in a real browser: Playwright's sync API driving Debian's Chromium
against one live server on the real default model. Screenshots of each view go to the test's
output folder (`console-screenshots` under pytest's tmp path)."""
from __future__ import annotations

import json
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from gateway.config import GatewayConfig
from tests.gateway.conftest import LiveServer, serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="no chromium binary (Debian's `chromium` package; make "
                                       "system-deps installs it)")
# What this machine's closed network needs: no GPU, no QUIC, nothing fetched in the background.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
KEY, ADMIN = "console-key", "console-admin-key"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
DEADLINE_MS = 300_000     # against hangs only: a loaded CI box may generate slowly


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    yield from serve(GatewayConfig(api_keys=(KEY,), admin_key=ADMIN))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("console-screenshots")


@pytest.fixture()
def page(browser: Any, server: LiveServer) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(DEADLINE_MS)
    page.urls = []                               # every request the page makes
    page.on("request", lambda r: page.urls.append(r.url))
    page.goto(server.url + "/ui/")
    page.fill("#api-key", KEY)
    page.press("#api-key", "Tab")                # change: the models list loads with the key
    page.wait_for_function("document.querySelector('#pg-form').model.value !== ''")
    yield page
    context.close()


def ask(page: Any, content: str, max_tokens: int, temperature: float = 0.0) -> None:
    page.fill("#pg-messages .message .content", content)
    page.fill("input[name=max_tokens]", str(max_tokens))
    page.fill("input[name=temperature]", str(temperature))


def send_and_wait(page: Any) -> str:
    """Send the form, wait for the finish; the completion id the page links to its trace."""
    page.click("#pg-send")
    page.wait_for_selector("#pg-finish")
    href = page.get_attribute("#pg-trace-link", "href")
    return href.removeprefix("#trace/")


def trace(server: LiveServer, trace_id: str, key: str = KEY) -> Any:
    r = httpx.get(f"{server.url}/v1/traces/{trace_id}", timeout=60,
                  headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()


TEXT_NODES = """[...document.getElementById('pg-answer').childNodes]
    .filter((n) => n.nodeType === Node.TEXT_NODE).map((n) => n.textContent).join('')"""


def test_playground_streams_an_answer_with_flags_inline(page: Any, server: LiveServer,
                                                       shots: Path) -> None:
    ask(page, "Name three fruits.", max_tokens=16)
    page.select_option("select[name=guard_mode]", "flag")
    page.fill("textarea[name=deny]", r"(?i)\b[a-z]{5,12}\b")     # every word of 5+ letters
    # count the pieces of text as they land in the answer: a stream, not one body at the end
    page.evaluate("""() => { window.pieces = 0; new MutationObserver((ms) => {
        for (const m of ms) window.pieces += m.addedNodes.length; })
        .observe(document.getElementById('pg-answer'), {childList: true}); }""")
    trace_id = send_and_wait(page)
    assert page.evaluate("window.pieces") >= 2
    assert float(page.get_attribute("#pg-meta", "data-ttft-ms")) > 0
    got = trace(server, trace_id)
    (choice,) = got["choices"]
    assert int(page.get_attribute("#pg-usage", "data-completion-tokens")) == len(
        choice["completion_ids"])
    r = httpx.post(server.url + "/detokenize", json={"tokens": choice["completion_ids"]},
                   headers={"Authorization": f"Bearer {KEY}"})
    # flag mode sends every token: the whole text, with a flag where each violation was found
    text = page.evaluate(TEXT_NODES)
    assert text.strip() and r.json()["prompt"].startswith(text)
    # each flag right after the text it flags: as many characters before it as its end offset
    ends = page.evaluate("""() => { let n = 0; const out = [];
        for (const node of document.getElementById('pg-answer').childNodes) {
            if (node.nodeType === Node.TEXT_NODE) n += node.length; else out.push(n); }
        return out; }""")
    violations = got["checks"][0]["violations"]
    assert ends == [v["end"] for v in violations] and len(violations) > 0
    assert page.inner_text("#pg-outcome .verdict").startswith("guard: flagged")
    # the key lives in the page's memory only; every request went to the server itself
    assert page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]") == [
        0, 0, ""]
    assert page.urls and all(u.startswith(server.url + "/") for u in page.urls)
    page.screenshot(path=str(shots / "playground.png"), full_page=True)


def test_json_schema_request_shows_a_valid_document_and_its_trace(
        page: Any, server: LiveServer, shots: Path) -> None:
    ask(page, "Give me a person as JSON.", max_tokens=40)
    page.select_option("select[name=format]", "json_schema")
    page.fill("textarea[name=schema]", '{"type": "object",')
    assert page.inner_text("#pg-schema-status").startswith("✗")
    page.fill("textarea[name=schema]", json.dumps(SCHEMA))
    assert page.inner_text("#pg-schema-status").startswith("✓")
    trace_id = send_and_wait(page)
    jsonschema.validate(json.loads(page.inner_text("#pg-document")), SCHEMA)
    page.screenshot(path=str(shots / "playground-json-schema.png"), full_page=True)
    num_tokens = int(page.get_attribute("#pg-usage", "data-completion-tokens"))

    page.click("#pg-trace-link")
    page.wait_for_selector("#tr-allowed")
    counts = trace(server, trace_id)["grammar"]["allowed_token_counts"][0]
    assert page.locator("#tr-tokens-0 .tok").count() == num_tokens
    assert page.locator("#tr-allowed rect").count() == len(counts) > 0
    # forced tokens are those the grammar allowed alone (the `{`... of a schema forces some)
    assert page.locator("#tr-tokens-0 .tok.forced").count() == counts.count(1)
    assert page.locator("#tr-timeline .step").count() == num_tokens
    # hover: the raw logprob, recomputed by the page (this trace is in processed mode)
    title = page.get_attribute("#tr-tokens-0 .tok >> nth=0", "title")
    assert re.search(r"processed logprob -?\d+\.\d{4}\nraw logprob -?\d+\.\d{4}", title), title
    page.screenshot(path=str(shots / "trace.png"), full_page=True)


def test_tool_call_request_shows_the_call(page: Any) -> None:
    ask(page, "What is the weather in Paris?", max_tokens=40)
    page.fill("textarea[name=tools]", json.dumps(WEATHER))
    page.select_option("select[name=tool_choice]", "required")
    assert page.inner_text("#pg-tools-status").startswith("✓ 1 tool(s): get_weather")
    send_and_wait(page)
    assert page.inner_text("#pg-finish") == "finish_reason: tool_calls"
    assert page.inner_text(".call[data-index='0'] b") == "get_weather"
    args = json.loads(page.inner_text(".call[data-index='0'] .args"))
    assert isinstance(args["city"], str)


def test_blocked_response_shows_the_block_and_none_of_its_text(
        page: Any, server: LiveServer, shots: Path) -> None:
    ask(page, "Name three fruits.", max_tokens=24)
    page.select_option("select[name=guard_mode]", "block")
    page.select_option("select[name=guard_release]", "stream")
    page.fill("textarea[name=deny]", r"(?i)\b[a-z]{5,12}\b")     # the first word of 5+ letters
    trace_id = send_and_wait(page)
    page.wait_for_selector("#pg-blocked")
    assert page.inner_text("#pg-finish") == "finish_reason: content_filter"
    # what was generated, from the admin's view of the trace
    full = trace(server, trace_id, ADMIN)
    ids = full["choices"][0]["completion_ids"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": ids},
                      headers={"Authorization": f"Bearer {KEY}"}).json()["prompt"]
    (violation,) = full["checks"][0]["violations"]
    withheld = text[violation["start"]:]
    assert len(withheld) >= 5
    shown = page.evaluate(TEXT_NODES)      # the released text (flags and banner are elements)
    assert text.startswith(shown) and len(shown) <= violation["start"]
    for dom in (page.content(), page.inner_text("body")):
        assert withheld not in dom and text[violation["start"]:violation["end"]] not in dom
    page.screenshot(path=str(shots / "playground-blocked.png"), full_page=True)

    # the caller's own trace view: verdict and counts, no tokens
    page.click("#pg-trace-link")
    page.wait_for_selector("#tr-withheld-0")
    assert page.locator(".tok").count() == 0 and page.locator(".violation").count() == 1
    assert text[violation["start"]:violation["end"]] not in page.content()
    page.screenshot(path=str(shots / "trace-withheld.png"), full_page=True)


def test_live_view_counters_move_during_a_request(page: Any, server: LiveServer,
                                                   shots: Path) -> None:
    page.click("nav a[data-view=live]")
    page.wait_for_selector("#lv-running")
    before = float(page.get_attribute("#lv-finished .value", "data-value"))
    seen = threading.Event()
    body = {"model": "smollm2-135m-instruct", "stream": True, "max_tokens": 400,
            "ignore_eos": True, "messages": [{"role": "user", "content": "Count to a thousand."}]}

    def generate() -> None:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=300,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            for _ in r.iter_lines():
                if seen.is_set():          # leaving early aborts the request
                    return

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        page.wait_for_function("""() => {
            const v = (id) => Number(document.querySelector(`#lv-${id} .value`).dataset.value);
            return v('running') === 1 && v('rate') > 0 && v('kv') > 0; }""")
        page.screenshot(path=str(shots / "live.png"), full_page=True)
    finally:
        seen.set()
        thread.join()
    page.wait_for_function(f"Number(document.querySelector('#lv-finished .value').dataset.value)"
                           f" > {before}")
    page.wait_for_function("document.querySelector('#lv-running .value').dataset.value === '0'")
