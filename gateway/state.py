"""What the lifespan shares with the routes: the engine (once loaded), metrics and the queue."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from engine import EngineClient
from gateway.admission import Admission
from gateway.config import GatewayConfig
from gateway.guard import InMemorySessionStore, Policy, SessionStore, TraceRing
from gateway.metrics import Metrics
from gateway.protocol import Unavailable
from gateway.tokens import TokenTable


@dataclass(slots=True)
class Runtime:
    config: GatewayConfig
    metrics: Metrics
    engine: EngineClient | None = None
    admission: Admission | None = None
    token_table: TokenTable | None = None
    load_error: str | None = None
    is_draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))
    active: set[str] = field(default_factory=set)     # request ids in the engine (for the drain)
    policy: Policy = field(default_factory=Policy)    # the guard's server default
    sessions: SessionStore = field(default_factory=InMemorySessionStore)
    traces: TraceRing = field(default_factory=TraceRing)
    weights_source: str | None = None     # path of the last weights loaded through /v1/admin

    @property
    def tokenizer(self) -> Any:
        assert self.engine is not None
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        assert self.engine is not None
        return self.engine.limits.max_model_len

    @property
    def is_ready(self) -> bool:
        return self.engine is not None and not self.is_draining

    def ready(self) -> tuple[EngineClient, Admission]:
        """The engine and queue, or a 503 while loading or draining."""
        if self.is_draining:
            raise Unavailable("the server is shutting down", code="shutting_down")
        if self.engine is None or self.admission is None:
            raise Unavailable("the model is still loading" if self.load_error is None
                              else "the model failed to load", code="not_ready")
        return self.engine, self.admission
