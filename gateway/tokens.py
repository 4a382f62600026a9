"""Token strings and bytes for logprobs, as OpenAI shows them (`token`, `bytes`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engine import TopLogprob
from engine.types import PromptLogprob
from gateway.protocol import logprob_value


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2): printable bytes map to themselves, the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class TokenTable:
    """Caches each token's text and exact bytes (a token may hold half a UTF-8 character)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            text = str(self._tokenizer.decode([token_id], skip_special_tokens=False))
            piece = self._tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str) and piece and all(c in _UNICODE_TO_BYTE for c in piece):
                raw = [_UNICODE_TO_BYTE[c] for c in piece]
                if bytes(raw).decode("utf-8", "replace") != text:   # a special or non-BPE token
                    raw = list(text.encode("utf-8"))
            else:
                raw = list(text.encode("utf-8"))
            hit = self._cache[token_id] = (text, raw)
        return hit

    def chat_entry(self, token_id: int, logprob: float,
                   top: Sequence[TopLogprob]) -> dict[str, Any]:
        text, raw = self.get(token_id)
        return {"token": text, "logprob": logprob_value(logprob), "bytes": raw,
                "top_logprobs": [self._alt(t) for t in top]}

    def _alt(self, t: TopLogprob) -> dict[str, Any]:
        text, raw = self.get(t.token_id)
        return {"token": text, "logprob": logprob_value(t.logprob), "bytes": raw}

    def completion_logprobs(self, token_ids: Sequence[int], logprobs: Sequence[float],
                            top: Sequence[Sequence[TopLogprob]], offset: int) -> dict[str, Any]:
        """The legacy completions shape: parallel lists plus character offsets."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}
        for token_id, lp, alts in zip(token_ids, logprobs, top):
            text, _ = self.get(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob_value(lp))
            out["top_logprobs"].append({self.get(a.token_id)[0]: logprob_value(a.logprob)
                                        for a in alts})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    def prompt_logprobs(self, token_ids: Sequence[int],
                        entries: Sequence[PromptLogprob | None]) -> dict[str, Any]:
        """echo + logprobs: the prompt's own tokens (the first has no logprob: null)."""
        out = self.completion_logprobs(token_ids, [0.0] * len(token_ids),
                                       [()] * len(token_ids), 0)
        for i, entry in enumerate(entries[:len(token_ids)]):
            out["token_logprobs"][i] = None if entry is None else logprob_value(entry.logprob)
            out["top_logprobs"][i] = None if entry is None else {
                self.get(a.token_id)[0]: logprob_value(a.logprob) for a in entry.top}
        return out
