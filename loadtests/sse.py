"""Server-sent events, read the way the spec frames them; no Locust import, so tests can use it
without gevent's monkey-patching."""
from __future__ import annotations

from collections.abc import Iterator


def sse_events(lines: Iterator[bytes | str]) -> Iterator[str]:
    """The data of each server-sent event: `data:` lines joined by newlines, comments skipped."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        line = line.rstrip("\r")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):        # keep-alive ping or comment
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    # an event cut off before its blank line is not dispatched (the spec's rule), so a stream
    # that breaks off mid-event shows up as a missing [DONE]
