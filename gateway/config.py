"""Gateway configuration: one frozen dataclass, built once by the CLI (or a test)."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.config import EngineConfig


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = ""            # "": the engine's model argument
    api_keys: tuple[str, ...] = ()         # empty: no authentication
    max_queued_requests: int = 256         # requests waiting for a slot; beyond this, 429
    max_body_bytes: int = 4 * 1024 * 1024  # beyond this, 413
    keepalive_interval_s: float = 10.0     # SSE comment pings while nothing else is sent
    drain_timeout_s: float = 30.0          # SIGTERM: running streams get this long to finish
    retry_after_s: int = 1                 # the Retry-After header on 429
    log_json: bool | None = None           # None: JSON unless stderr is a terminal
    log_level: str = "info"

    def __post_init__(self) -> None:
        assert 0 < self.port < 65536, "port must be in 1..65535"
        assert self.max_queued_requests >= 0, "max_queued_requests must be >= 0"
        assert self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024"
        assert self.keepalive_interval_s > 0 and self.drain_timeout_s >= 0
        assert all(self.api_keys), "API keys must be non-empty"
        assert self.log_level in ("debug", "info", "warning", "error")

    @property
    def model_name(self) -> str:
        """The id clients send as `model` and see in /v1/models."""
        return self.served_model_name or self.engine.model
