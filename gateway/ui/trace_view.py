"""`GET /v1/traces/{id}/tokens`: a trace (same body, same access rules as /v1/traces/{id}) with
what a viewer needs besides: each token's text and, for a constrained request, the steps where
budget-aware closing was due.

The closing steps are replayed here the way grammars/steering.py decides them during
generation (the budget left down to the reserve plus one per open bracket, once a JSON value or
a tool call has begun), from the max_tokens and reserve the trace recorded: "due" means the
mask was narrowed to closing tokens where the grammar allowed any."""
from __future__ import annotations

import codecs
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.guard.traces import read_trace
from gateway.requests import runtime
from gateway.tokens import TokenTable
from grammars.closing import JsonScan


def closing_steps(texts: list[str], max_tokens: int | None, reserve: int | None) -> list[int]:
    """The token positions chosen while budget-aware closing was due."""
    if max_tokens is None or reserve is None:
        return []
    reserve = min(reserve, max_tokens // 2)
    if reserve <= 0:
        return []
    scan, steps = JsonScan(), []
    for i, text in enumerate(texts):
        if (scan.in_structure or scan.in_string) and max_tokens - i <= reserve + scan.depth:
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
        steps = (closing_steps(texts, body["max_tokens"], body["close_reserve"])
                 if body["grammar"] is not None else [])
        views.append({"texts": texts, "closing_steps": steps})
    body["token_views"] = views
    return JSONResponse(body)
