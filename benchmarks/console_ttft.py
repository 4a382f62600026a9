"""Time to the first streamed token: the console (/ui, in Chromium) against curl.

    make serve &                                    # wait for "model_loaded"
    .venv/bin/python -m benchmarks.console_ttft [--url http://127.0.0.1:8000] [--api-key K]
                                                [--rounds 10] [--max-tokens 8]

Against a running server, alternates, one request at a time, the same chat request (greedy, the same prompt) sent by curl and by the
console's playground. curl: from spawning `curl -sN` to the first SSE line with non-empty
content (the spawn included, so curl is measured a little slow). Console: the page's own
figure (performance.now() when Send is clicked to the first content delta in the DOM,
`#pg-meta[data-ttft-ms]`). Each request's trace gives the server's own figure (queued to first
token; traces need --api-key or --traces), so the client's share shows apart from the
server's: on a busy machine the browser's own CPU use slows the server too. Prints one
summary line with the medians and their ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from typing import Any

CHROMIUM = "/usr/bin/chromium"       # Debian's package; no `playwright install` needed
# what a machine without network needs: no GPU, no QUIC, nothing fetched in the background
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PROMPT = "Name three fruits."


def curl_ttft(url: str, key: str, model: str, max_tokens: int) -> tuple[float, str]:
    body = json.dumps({"model": model, "stream": True, "temperature": 0,
                       "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": PROMPT}]})
    t0 = time.perf_counter()
    auth = ["-H", f"Authorization: Bearer {key}"] if key else []
    proc = subprocess.Popen(["curl", "-sN", url + "/v1/chat/completions", *auth, "-H",
                             "Content-Type: application/json", "-d", body],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first, completion_id = None, ""
    for line in proc.stdout:
        if first is None and line.startswith("data: {"):
            chunk = json.loads(line[6:])
            completion_id = chunk["id"]
            if chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
    proc.wait()
    assert first is not None, "no content streamed"
    return first * 1000, completion_id


def console_ttft(page: Any, max_tokens: int) -> tuple[float, str]:
    page.fill("input[name=max_tokens]", str(max_tokens))
    page.fill("input[name=temperature]", "0")
    page.click("#pg-send")
    page.wait_for_selector("#pg-finish")
    completion_id = page.get_attribute("#pg-trace-link", "href").removeprefix("#trace/")
    return float(page.get_attribute("#pg-meta", "data-ttft-ms")), completion_id


def server_ttft(url: str, headers: dict[str, str], completion_id: str) -> float:
    """Queued to first token, as the server's trace has it (nan without traces)."""
    import httpx

    r = httpx.get(f"{url}/v1/traces/{completion_id}", headers=headers)
    if r.status_code != 200:
        return float("nan")
    ts = r.json()["timestamps"]
    return (ts["first_token"] - ts["queued"]) * 1000


def main() -> None:
    import httpx
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=8)
    args = p.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = httpx.get(args.url + "/v1/models", headers=headers).json()["data"][0]["id"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(args.url + "/ui/")
        page.fill("#api-key", args.api_key)
        page.press("#api-key", "Tab")
        page.wait_for_function("document.querySelector('#pg-form').model.value !== ''")
        page.fill("#pg-messages .message .content", PROMPT)
        curl_ttft(args.url, args.api_key, model, args.max_tokens)      # warm-up, both
        console_ttft(page, args.max_tokens)
        runs: dict[str, list[tuple[float, str]]] = {"curl": [], "console": []}
        for _ in range(args.rounds):
            runs["curl"].append(curl_ttft(args.url, args.api_key, model, args.max_tokens))
            runs["console"].append(console_ttft(page, args.max_tokens))
        browser.close()
    med = {name: (statistics.median(t for t, _ in r),
                  statistics.median(server_ttft(args.url, headers, i) for _, i in r))
           for name, r in runs.items()}
    (c, cs), (b, bs) = med["curl"], med["console"]
    print(f"first token, median of {args.rounds}: curl {c:.1f} ms (server {cs:.1f}), console "
          f"{b:.1f} ms (server {bs:.1f}); console/curl {b / c:.2f}x; the client's share: "
          f"curl {c - cs:.1f} ms, console {b - bs:.1f} ms")


if __name__ == "__main__":
    main()
