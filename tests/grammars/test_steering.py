"""grammars.steering: the verdict after a token, fast-forward's switches, and when closing
narrows a row."""
from __future__ import annotations

import json

from grammars import GrammarSpec, allocate_bitmask
from grammars.steering import Steering, TokenVerdict
from tests.grammars.conftest import allowed_ids

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name"],
          "properties": {"name": {"type": "string", "maxLength": 30}}}


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def test_verdicts_follow_the_grammar(tokenizer, compiler):
    compiled = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    steering = Steering(len(tokenizer))
    g = compiled.matcher()
    tokens = ids(tokenizer, '{"name": "ab"}')
    verdicts = [steering.accept(g, t) for t in tokens]
    assert verdicts[:-1] == [TokenVerdict.ACCEPTED] * (len(tokens) - 1)
    assert verdicts[-1] is TokenVerdict.COMPLETE
    assert steering.accept(compiled.matcher(), ids(tokenizer, "[")[0]) is TokenVerdict.REJECTED


def test_forced_tokens_only_when_fast_forward_is_on_and_not_raw(tokenizer, compiler):
    compiled = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    on, off = Steering(len(tokenizer)), Steering(len(tokenizer), fast_forward=False)
    tokens = ids(tokenizer, '{"name": "abc"}')

    def after(n: int):                            # a cursor after the first n tokens
        g = compiled.matcher()
        assert g.accept(tokens[:n])
        return g
    points = [n for n in range(len(tokens)) if on.forced(after(n), 10, is_raw=False)]
    assert points                                 # the grammar forces tokens somewhere
    for n in points:
        assert on.forced(after(n), 10, is_raw=True) == []
        assert off.forced(after(n), 10, is_raw=False) == []
        assert on.forced(after(n), 0, is_raw=False) == []


def test_closing_narrows_only_inside_the_reserve(tokenizer, compiler):
    compiled = compiler.compile(GrammarSpec("json_schema", json.dumps(SCHEMA)))
    vocab = len(tokenizer)
    steering = Steering(vocab, close_reserve=4, tokenizer=tokenizer,
                        eos_token_ids=[tokenizer.eos_token_id])
    out = ids(tokenizer, '{"name": "abc')
    g = compiled.matcher()
    assert g.accept(out)
    def allowed_after(max_tokens: int, reserve: int | None) -> list[int]:
        mask = allocate_bitmask(1, vocab)
        g.fill_bitmask(mask, 0)
        steering.close_if_due(None, mask, 0, out, max_tokens, reserve)
        return allowed_ids(mask, 0, vocab)
    free = allowed_after(max_tokens=100, reserve=None)           # far from the end
    near = allowed_after(max_tokens=len(out) + 2, reserve=None)  # inside the reserve
    assert len(near) < len(free) and all(tokenizer.decode([t]).startswith('"') for t in near)
    assert allowed_after(max_tokens=len(out) + 2, reserve=0) == free   # a request turns it off


def test_free_text_before_a_call_is_never_steered(tokenizer, compiler):
    """tool_choice "auto": `{`, `[` or `"` in the answer's text is text, not JSON to close; a
    call's JSON is closed as any other, and a scan says when it narrowed a mask."""
    from grammars.tools import parse_tools_request, tool_call_grammar
    from tests.grammars.test_tools import TOOLS

    spec = tool_call_grammar(parse_tools_request(TOOLS, "auto"), tokenizer)
    assert spec is not None and spec.free_text
    compiled = compiler.compile(spec)
    vocab = len(tokenizer)
    steering = Steering(vocab, close_reserve=4, tokenizer=tokenizer, eos_token_ids=[tokenizer.eos_token_id])

    def steer(text: str):
        out = ids(tokenizer, text)
        g = compiled.matcher()
        assert g.accept(out)
        mask = allocate_bitmask(1, vocab)
        g.fill_bitmask(mask, 0)
        before = allowed_ids(mask, 0, vocab)
        scan = steering.close_if_due(None, mask, 0, out, len(out) + 2, None, spec)
        return scan, before, allowed_ids(mask, 0, vocab)

    for text in ('Try {"a": [1, "b', "Quote: \"x", "A list [1, 2"):
        scan, before, after = steer(text)
        assert after == before and not scan.steered and not scan.in_structure, text
    scan, before, after = steer('Sure. <tool_call>{"name": "get_weather", "arguments": {"city": "Par')
    assert scan.in_structure and scan.steered and len(after) < len(before)
    assert all(tokenizer.decode([t]).startswith('"') for t in after)
