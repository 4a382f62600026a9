"""The web console: static pages at /ui (no build step, nothing fetched from elsewhere) and the
two small JSON endpoints they read, behind the API's own key: `GET /v1/stats` (the live view)
and `GET /v1/traces/{id}/tokens` (the trace viewer; the trace's access rules)."""
from __future__ import annotations

from pathlib import Path

from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from gateway.ui.stats import stats
from gateway.ui.trace_view import trace_tokens

STATIC_DIR = Path(__file__).parent / "static"
PREFIX = "/ui"


def console_routes(with_pages: bool) -> list[BaseRoute]:
    """The JSON endpoints always (clients may use them), the pages unless --no-ui."""
    routes: list[BaseRoute] = [
        Route("/v1/stats", stats, methods=["GET"]),
        Route("/v1/traces/{request_id}/tokens", trace_tokens, methods=["GET"]),
    ]
    if with_pages:
        routes.append(Mount(PREFIX, StaticFiles(directory=STATIC_DIR, html=True), name="ui"))
    return routes
