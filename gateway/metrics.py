"""Prometheus metrics, named like vLLM's (`vllm:` becomes `plumbline:`) where they mean the same.

Each app gets its own registry, so several apps (tests) never collide. Engine gauges are read
from `engine.stats()` at scrape time rather than pushed per step.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from gateway.state import Runtime

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        self.http_requests = Counter("plumbline:http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=r)
        self.request_success = Counter("plumbline:request_success",
                                       "Finished generation requests by finish reason",
                                       [*labels, "finished_reason"], registry=r)
        self.prompt_tokens = Counter("plumbline:prompt_tokens", "Prompt tokens processed",
                                     labels, registry=r)
        self.generation_tokens = Counter("plumbline:generation_tokens", "Tokens generated",
                                         labels, registry=r)
        # generation_tokens counts a request's tokens when it finishes; this one as they stream,
        # so a rate over it (the console's tokens/s) moves while requests run
        self.streamed_tokens = Counter("plumbline:streamed_tokens",
                                       "Tokens generated, counted as they reach the gateway",
                                       labels, registry=r)
        self.ttft_hist = Histogram("plumbline:time_to_first_token_seconds",
                                   "Arrival to first token", labels, buckets=_LATENCY_BUCKETS,
                                   registry=r)
        self.itl_hist = Histogram("plumbline:inter_token_latency_seconds",
                                  "Time between tokens of one sequence", labels,
                                  buckets=_ITL_BUCKETS, registry=r)
        self.e2e_hist = Histogram("plumbline:e2e_request_latency_seconds",
                                  "Arrival to last token", labels, buckets=_LATENCY_BUCKETS,
                                  registry=r)
        self.queue_hist = Histogram("plumbline:request_queue_time_seconds",
                                    "Arrival to admission into the engine", labels,
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.num_running = Gauge("plumbline:num_requests_running",
                                 "Sequences running in the engine", labels, registry=r)
        self.num_waiting = Gauge("plumbline:num_requests_waiting",
                                 "Requests queued in the gateway plus sequences waiting in the engine",
                                 labels, registry=r)
        self.kv_usage = Gauge("plumbline:kv_cache_usage_perc",
                              "Fraction of KV cache blocks in use (0-1)", labels, registry=r)
        self.num_preemptions = Gauge("plumbline:num_preemptions",
                                     "Preemptions since start (a counter kept by the engine)",
                                     labels, registry=r)
        self.num_forced_tokens = Gauge("plumbline:num_forced_tokens",
                                       "Tokens appended by grammar fast-forward since start (a "
                                       "counter kept by the engine)", labels, registry=r)
        self.prefix_queries = Gauge("plumbline:prefix_cache_queries",
                                    "Prompt tokens of requests that looked up the prefix cache "
                                    "(a counter kept by the engine)", labels, registry=r)
        self.prefix_hits = Gauge("plumbline:prefix_cache_hits",
                                 "Prompt tokens found in the prefix cache, their KV reused (a "
                                 "counter kept by the engine)", labels, registry=r)
        self.checks_run = Counter("plumbline:checks_run",
                                  "Checks run on a response (one per check per choice)",
                                  [*labels, "check"], registry=r)
        self.checks_failed = Counter("plumbline:checks_failed",
                                     "Checks that found at least one violation in a response",
                                     [*labels, "check"], registry=r)
        self.guard_blocked = Counter("plumbline:guard_blocked",
                                     "Responses (choices) withheld by the guard in block mode",
                                     labels, registry=r)
        self.consistency_conflicts = Counter("plumbline:consistency_conflicts",
                                             "Contradictions with the consistency buffer found",
                                             labels, registry=r)
        m = model_name
        self.ttft = self.ttft_hist.labels(m)
        self.itl = self.itl_hist.labels(m)
        self.e2e = self.e2e_hist.labels(m)
        self.queue_time = self.queue_hist.labels(m)
        self.streamed = self.streamed_tokens.labels(m)      # per token: the child, looked up once

    def observe_finished(self, finish_reasons: list[str], num_prompt_tokens: int,
                         num_completion_tokens: int, e2e_s: float) -> None:
        m = self.model_name
        for reason in finish_reasons:
            self.request_success.labels(m, reason).inc()
        self.prompt_tokens.labels(m).inc(num_prompt_tokens)
        self.generation_tokens.labels(m).inc(num_completion_tokens)
        self.e2e.observe(e2e_s)

    def observe_verdict(self, verdict: dict[str, Any]) -> None:
        """A choice's guard verdict (`Guard.verdict()`), once when the choice ends."""
        m = self.model_name
        for name in verdict["checks"]:
            self.checks_run.labels(m, name).inc()
        violations = verdict["violations"]
        for name in {v["check"] for v in violations}:
            self.checks_failed.labels(m, name).inc()
        num_conflicts = sum(v["check"] == "consistency" for v in violations)
        if num_conflicts:
            self.consistency_conflicts.labels(m).inc(num_conflicts)
        if verdict["blocked"]:
            self.guard_blocked.labels(m).inc()

    def render(self, runtime: Runtime) -> bytes:
        m = self.model_name
        if runtime.engine is not None:
            stats = runtime.engine.stats()
            queued = runtime.admission.num_waiting if runtime.admission else 0
            self.num_running.labels(m).set(stats.num_running)
            self.num_waiting.labels(m).set(stats.num_waiting + queued)
            self.kv_usage.labels(m).set(1.0 - stats.num_free_blocks / max(1, stats.num_blocks))
            self.num_preemptions.labels(m).set(stats.num_preemptions)
            self.num_forced_tokens.labels(m).set(stats.num_forced_tokens)
            self.prefix_queries.labels(m).set(stats.num_prefix_queried_tokens)
            self.prefix_hits.labels(m).set(stats.num_prefix_hit_tokens)
        return generate_latest(self.registry)
