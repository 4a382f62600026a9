"""`GET /v1/stats`: the live numbers of /metrics as one small JSON object, for the console's
live view (Prometheus text is awkward to parse in a page). Counters are totals since start;
the page turns them into rates."""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from gateway.requests import runtime


def _total(counter: Counter) -> float:
    """The sum of a counter over all its label values."""
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


async def stats(request: Request) -> Response:
    rt = runtime(request)
    m = rt.metrics
    body: dict[str, Any] = {
        "object": "plumbline.stats", "time": time.time(), "ready": rt.is_ready,
        "model": rt.config.model_name,
        "streamed_tokens": _total(m.streamed_tokens),
        "requests_finished": _total(m.request_success),
        "checks_run": _total(m.checks_run), "checks_failed": _total(m.checks_failed),
        "guard_blocked": _total(m.guard_blocked),
        "num_running": None, "num_waiting": None, "num_kv_blocks": None,
        "num_kv_blocks_used": None, "prefix_cache_queried_tokens": None,
        "prefix_cache_hit_tokens": None, "num_forced_tokens": None, "num_preemptions": None,
        "weights_version": None,
    }
    engine = rt.engine
    if engine is not None:
        s = engine.stats()
        queued = rt.admission.num_waiting if rt.admission is not None else 0
        body.update(num_running=s.num_running, num_waiting=s.num_waiting + queued,
                    num_kv_blocks=s.num_blocks, num_kv_blocks_used=s.num_blocks - s.num_free_blocks,
                    prefix_cache_queried_tokens=s.num_prefix_queried_tokens,
                    prefix_cache_hit_tokens=s.num_prefix_hit_tokens,
                    num_forced_tokens=s.num_forced_tokens, num_preemptions=s.num_preemptions,
                    weights_version=engine.weights_version)
    return JSONResponse(body)
