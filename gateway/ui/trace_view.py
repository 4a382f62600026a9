"""`GET /v1/traces/{id}/tokens`: a trace (same body, same access rules as /v1/traces/{id}) with
what a viewer needs besides: each token's text and, for a constrained request, the steps where
budget-aware closing was due.

The closing steps are replayed with grammars/closing.py's own rule (`is_due`, the reserve the
trace recorded): "due" means the mask was narrowed to closing tokens where the grammar allowed
any."""
from __future__ import annotations

import codecs
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.guard.traces import read_trace
from gateway.requests import runtime
from gateway.tokens import TokenTable
from grammars.closing import JsonScan, effective_reserve, is_due


def closing_steps(texts: list[str], max_tokens: int | None, reserve: int | None,
                  free_text: bool = False) -> list[int]:
    """The token positions chosen while budget-aware closing was due."""
    if max_tokens is None or reserve is None:
        return []
    reserve = effective_reserve(reserve, max_tokens)
    if reserve <= 0:
        return []
    scan, steps = JsonScan(free_text=free_text), []
    for i, text in enumerate(texts):
        if is_due(scan, max_tokens - i, reserve):
            steps.append(i)
        scan.feed(text)
    return steps


def token_texts(table: TokenTable | None, ids: list[int]) -> list[str]:
    """Each token's text such that they join into the completion's text: a token holding the
    first bytes of a UTF-8 character shows "" and the one that completes it the character."""
    assert table is not None
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    return [decoder.decode(bytes(table.get(t)[1])) for t in ids]


async def trace_tokens(request: Request) -> Response:
    body = await read_trace(request)
    rt = runtime(request)
    rt.ready()
    views: list[dict[str, Any] | None] = []
    for choice in body["choices"]:
        ids = choice["completion_ids"]
        if ids is None:           # withheld from this caller: no texts either
            views.append(None)
            continue
        texts = token_texts(rt.token_table, ids)
        grammar = body["grammar"]
        steps = (closing_steps(texts, body["max_tokens"], body["close_reserve"],
                               bool(grammar.get("free_text")))
                 if grammar is not None else [])
        views.append({"texts": texts, "closing_steps": steps})
    body["token_views"] = views
    return JSONResponse(body)
