"""The real clients' fixtures: a live server on the real default model, one per module."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from engine import EngineConfig
from gateway.config import GatewayConfig
from tests.gateway.conftest import LiveServer, serve

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def default_server() -> Iterator[LiveServer]:
    config = GatewayConfig(engine=EngineConfig(max_num_seqs=8, kv_cache_memory_mb=64))
    yield from serve(config)


@pytest.fixture(scope="module")
def base_url(default_server: LiveServer) -> str:
    """What an OpenAI-compatible client takes as its base URL."""
    return default_server.url + "/v1"
