"""The vocabulary the engine shares with the gateway (requests in, token deltas out), and the
types of one step inside it (`Batch` from the scheduler, `StepResult` from the sampler)."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    from engine.sequence import Sequence
    from grammars.spec import GrammarSpec

LogprobsMode = Literal["processed", "raw"]


class FinishReason(enum.Enum):
    STOP = "stop"          # EOS, a stop token id, or a stop string (gateway/LLM)
    LENGTH = "length"      # max_tokens or the context window ran out
    ABORT = "abort"        # client went away or abort() was called
    ERROR = "error"        # the step failed for this sequence; others go on


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. temperature 0 means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None     # top-N alternatives per token (0 = only the sampled one)
    logprobs_mode: LogprobsMode = "processed"
    prompt_logprobs: int | None = None  # logprobs of the prompt tokens (raw), with top-N
    include_stop_str_in_output: bool = False
    grammar: GrammarSpec | None = None
    # Budget-aware closing of a constrained output: None takes the engine's default
    # (EngineConfig.grammar_close_reserve), 0 turns it off.
    close_reserve: int | None = None
    # OpenAI's logit_bias: (token id, bias in [-100, 100]) added to the logits after penalties
    # and before the grammar mask, so processed logprobs include it.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # vLLM's min_tokens: EOS and stop_token_ids cannot end the output before this many tokens
    # (where the grammar allows another token: a grammar that allows only EOS ends the output).
    min_tokens: int = 0
    # vLLM's allowed_token_ids: every other token is masked out.
    allowed_token_ids: tuple[int, ...] | None = None
    # vLLM's priority: the waiting queue is ordered by (priority, arrival), lower values first.
    # Not sampling, but like n and max_tokens it travels with the request to each sequence.
    priority: int = 0
    # vLLM's bad_words, as token ids (the gateway tokenizes each word with and without a leading
    # space): a one-token word is never sampled; of a longer one, the last token is banned
    # where the output ends with the others.
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.stop_token_ids, tuple):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.logit_bias, dict):
            object.__setattr__(self, "logit_bias", tuple(sorted(self.logit_bias.items())))
        if self.allowed_token_ids is not None and not isinstance(self.allowed_token_ids, tuple):
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        if not isinstance(self.bad_words_token_ids, tuple) or any(
                not isinstance(w, tuple) for w in self.bad_words_token_ids):
            object.__setattr__(self, "bad_words_token_ids",
                               tuple(tuple(w) for w in self.bad_words_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.temperature >= 0.0, "temperature", "must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (or -1 for off)"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty", "must be > 0"),
            (self.n >= 1, "n", "must be >= 1"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs",
             "must be in [0, 20]"),
            (self.logprobs_mode in ("processed", "raw"), "logprobs_mode", "must be 'processed' or 'raw'"),
            (self.close_reserve is None or self.close_reserve >= 0, "close_reserve", "must be >= 0"),
            (all(-100.0 <= b <= 100.0 for _, b in self.logit_bias), "logit_bias",
             "values must be in [-100, 100]"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens", "must be in [0, max_tokens]"),
            (self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
             "must not be empty"),
            (self.allowed_token_ids is None or self.grammar is None, "allowed_token_ids",
             "cannot be combined with a grammar (response_format, structured outputs, tools)"),
            (all(self.bad_words_token_ids), "bad_words", "must not hold an empty word"),
            # Tokens a grammar forces are appended without sampling (fast-forward), where no
            # ban could apply: refused rather than broken silently.
            (not self.bad_words_token_ids or self.grammar is None, "bad_words",
             "cannot be combined with a grammar (response_format, structured outputs, tools)"),
        ]
        for ok, name, why in checks:
            if not ok:
                raise ValueError(f"{name} {why}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    @property
    def has_logit_rules(self) -> bool:
        """logit_bias, min_tokens, allowed_token_ids or bad_words: the sampler edits this row's
        logits."""
        return (bool(self.logit_bias) or self.min_tokens > 0 or self.allowed_token_ids is not None
                or bool(self.bad_words_token_ids))


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True, slots=True)
class PromptLogprob:
    """Raw logprob of a prompt token given the tokens before it, with the top-N alternatives."""

    logprob: float
    top: tuple[TopLogprob, ...]
    rank: int | None = None    # of the token among the vocabulary (1 = the most likely)


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New tokens of one sequence (index within its request) since the last delta."""

    request_id: str
    index: int
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]                       # one per token, in the request's mode
    top_logprobs: tuple[tuple[TopLogprob, ...], ...]  # one tuple per token ((), when not asked)
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_completion_tokens: int
    error: str | None = None
    # Once, in a request's first delta, when asked: one entry per prompt token (None for the first).
    prompt_logprobs: tuple[PromptLogprob | None, ...] | None = None
    weights_versions: tuple[int, ...] = ()            # weights version of each token
    num_cached_tokens: int = 0      # prompt tokens whose KV came from the prefix cache
    closed_early: bool = False      # budget-aware closing narrowed this sequence's mask

    def merge(self, later: TokenDelta) -> TokenDelta:
        """Concatenate a later delta of the same sequence (used when a consumer falls behind)."""
        assert later.request_id == self.request_id and later.index == self.index
        return TokenDelta(
            self.request_id, self.index, self.token_ids + later.token_ids,
            self.logprobs + later.logprobs, self.top_logprobs + later.top_logprobs,
            later.finish_reason, later.num_prompt_tokens, later.num_completion_tokens,
            later.error, self.prompt_logprobs or later.prompt_logprobs,
            self.weights_versions + later.weights_versions, later.num_cached_tokens,
            self.closed_early or later.closed_early,
        )


@dataclass(slots=True)
class CompletionOutput:
    """One finished sequence, as the offline `LLM` returns it."""

    index: int
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[tuple[TopLogprob, ...]]
    text: str
    finish_reason: str | None
    weights_versions: list[int] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    """All sequences of one prompt; the first one's fields are exposed directly."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PromptLogprob | None] | None = None

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def logprobs(self) -> list[float]:
        return self.outputs[0].logprobs

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    def to_dict(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "outputs": [
            {"index": o.index, "text": o.text, "token_ids": o.token_ids,
             "logprobs": o.logprobs, "finish_reason": o.finish_reason} for o in self.outputs]}


class RequestError(ValueError):
    """A request the engine cannot take (maps to HTTP 400); `param` names the culprit."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --- one engine step: what the scheduler hands the runner, and what comes back ---------------

@dataclass(slots=True)
class Batch:
    seqs: list[Sequence]      # decodes first (a few tokens each, see is_decode), then prefill chunks
    num_decodes: int

    @property
    def num_tokens(self) -> int:
        return sum(s.num_scheduled_tokens for s in self.seqs)

    @property
    def sampling_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if s.samples_this_step]


class StepResult(NamedTuple):
    """One entry per sequence of `Batch.sampling_seqs`, in that order."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[tuple[TopLogprob, ...]]
    # seq_id -> PromptLogprobs of the prompt positions this step computed (prompt_logprobs asks)
    prompt_logprobs: dict[int, list[PromptLogprob]] | None = None
    weights_version: int = 0


EMPTY_RESULT = StepResult([], [], [])
