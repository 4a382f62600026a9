"""The engine as the gateway sees it: one protocol with named methods, nothing else.

`EngineClient` is what the gateway calls (`AsyncEngine` implements it; the gateway's test fakes
implement it too). A request is prepared once, before its response starts: `prepare` validates it
against the engine's `EngineLimits` and compiles its grammar, so that a bad request is a 400 and
never an error event mid-stream; `add_request` then takes the prepared request as it is.
`validate_request` is the one validation function: the engine and the fakes both call it, so an
error message under test is the real one.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from engine.types import GenerateRequest, RequestError, TokenDelta

if TYPE_CHECKING:
    from grammars import CompiledGrammar
    from grammars.spec import GrammarSpec

UpdateMode = Literal["pause", "drain", "abort"]


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """What a request is checked against; fixed once the engine has loaded."""

    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    grammar_compile_timeout: float


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_blocks: int
    num_preemptions: int
    num_forced_tokens: int = 0     # appended by grammar fast-forward, without a sampling step
    # Prefix cache: prompt tokens of admitted sequences that looked it up, and of those found.
    num_prefix_queried_tokens: int = 0
    num_prefix_hit_tokens: int = 0


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A request `EngineClient.prepare` validated, with its grammar compiled (None: no grammar)."""

    request: GenerateRequest
    grammar: CompiledGrammar | None = None
    grammar_backend: str | None = None
    grammar_compile_s: float | None = None     # None: no grammar, or a cache hit of unknown cost


def validate_request(request: GenerateRequest, limits: EngineLimits) -> None:
    """Raise RequestError for a request the engine cannot take."""
    prompt = request.prompt_token_ids
    params = request.sampling
    vocab_size, max_len = limits.vocab_size, limits.max_model_len
    if not prompt:
        raise RequestError("the prompt is empty", "prompt")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise RequestError(f"prompt token ids must lie in [0, {vocab_size})", "prompt")
    if len(prompt) >= max_len:
        raise RequestError(f"the prompt has {len(prompt)} tokens; this model's context is "
                           f"{max_len} tokens", "messages")
    if len(prompt) + params.max_tokens > max_len:
        raise RequestError(
            f"max_tokens ({params.max_tokens}) plus the prompt ({len(prompt)} tokens) exceeds the "
            f"context of {max_len} tokens", "max_tokens")
    if params.n > limits.max_num_seqs:
        raise RequestError(f"n must be <= {limits.max_num_seqs}", "n")
    for name, ids in (("stop_token_ids", params.stop_token_ids),
                      ("logit_bias", [t for t, _ in params.logit_bias]),
                      ("allowed_token_ids", params.allowed_token_ids or ()),
                      ("bad_words", [t for w in params.bad_words_token_ids for t in w])):
        if any(not 0 <= t < vocab_size for t in ids):
            raise RequestError(f"{name} token ids must lie in [0, {vocab_size})", name)


class EngineClient(Protocol):
    """What the gateway may call; `AsyncEngine` is the real one."""

    tokenizer: Any

    @property
    def limits(self) -> EngineLimits: ...
    @property
    def weights_version(self) -> int: ...

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    async def prepare(self, request: GenerateRequest) -> PreparedRequest:
        """Validate and compile the grammar; RequestError names the bad parameter."""
    def add_request(self, request: PreparedRequest) -> AsyncIterator[TokenDelta]: ...
    def abort(self, request_id: str, index: int | None = None) -> None:
        """Abort the request, or only its sequence `index` (a choice that hit a stop string)."""
    def stats(self) -> EngineStats: ...
    def server_info(self) -> dict[str, Any]:
        """What the loaded engine knows of itself: model path and architecture, numerics."""
    async def update_weights(self, state_dict: dict[str, Any], mode: UpdateMode = "pause",
                             reset_cache: bool = False) -> int: ...
    def allowed_token_counts(self, spec: GrammarSpec,
                             token_ids: Sequence[int]) -> list[int] | None:
        """How many tokens the grammar allowed before each of token_ids (a trace replay)."""
