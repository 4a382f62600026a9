"""Gateway configuration: one frozen dataclass, built once by the CLI (or a test)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineConfig
from gateway.guard import Policy, PolicyError, server_policy


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = ""            # "": the engine's model argument
    api_keys: tuple[str, ...] = ()         # empty: no authentication
    admin_key: str = ""                    # "": /v1/admin/* disabled (404)
    max_queued_requests: int = 256         # requests waiting for a slot; beyond this, 429
    max_body_bytes: int = 4 * 1024 * 1024  # beyond this, 413
    keepalive_interval_s: float = 10.0     # SSE comment pings while nothing else is sent
    drain_timeout_s: float = 30.0          # SIGTERM: running streams get this long to finish
    retry_after_s: int = 1                 # the Retry-After header on 429
    log_json: bool | None = None           # None: JSON unless stderr is a terminal
    log_level: str = "info"
    strict_fields: bool = False            # unknown request fields: 400 instead of ignored
    ui: bool = True                        # the web console at /ui (--no-ui: 404)
    # The guard's server policy: a floor requests may tighten in `plumbline.guard`, never loosen
    guard_mode: str = "off"                # off | flag | block
    guard_release: str = "unit"            # stream | unit | final (how block mode holds text)
    guard_checks: dict[str, Any] = field(default_factory=dict)   # the checks config file
    guard_client_override: bool = False    # requests may also loosen it (mode off, fewer checks)
    session_ttl_s: float = 3600.0          # `plumbline.session_id` facts live this long
    session_store: str = ""                # "": in memory; redis://host:port/db: shared (traces too)
    max_traces: int = 1000                 # diagnostic traces kept in memory
    trace_dir: str | None = None           # also append each trace to <dir>/traces.jsonl
    traces: bool = False                   # record traces without API keys (readable by anyone)
    trace_withheld: bool = False           # trace_dir files keep blocked choices' tokens too

    def __post_init__(self) -> None:
        assert 0 < self.port < 65536, "port must be in 1..65535"
        assert self.max_queued_requests >= 0, "max_queued_requests must be >= 0"
        assert self.max_body_bytes >= 1024, "max_body_bytes must be >= 1024"
        assert self.keepalive_interval_s > 0 and self.drain_timeout_s >= 0
        assert all(self.api_keys), "API keys must be non-empty"
        assert self.log_level in ("debug", "info", "warning", "error")
        assert self.session_ttl_s > 0 and self.max_traces >= 0
        assert self.session_store.split("://")[0] in ("", "redis", "rediss", "unix"), \
            "session_store must be a redis://, rediss:// or unix:// URL"
        try:
            self.guard_policy()
        except PolicyError as exc:
            raise AssertionError(f"guard: {exc.param}: {exc.message}") from None

    def guard_policy(self) -> Policy:
        """The server's default guard policy (checked at startup: a bad file stops the CLI)."""
        return server_policy(self.guard_mode, self.guard_release, self.guard_checks)

    @property
    def traces_enabled(self) -> bool:
        """Traces are kept when each can belong to a key, or when the operator asked anyway."""
        return bool(self.api_keys) or self.traces

    @property
    def model_name(self) -> str:
        """The id clients send as `model` and see in /v1/models."""
        return self.served_model_name or self.engine.model
