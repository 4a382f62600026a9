"""GuardedChoice: what a choice may send in block mode, tokens and tool calls included."""
from __future__ import annotations

from types import SimpleNamespace

from gateway.guard.checks import CheckContext
from gateway.guard.plan import GuardPlan
from gateway.guard.policy import server_policy
from gateway.guard.release import GuardedChoice
from gateway.guard.sessions import InMemorySessionStore
from gateway.metrics import Metrics
from gateway.tool_calls import ToolCallParser

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}]


def choice(mode: str, release: str = "unit", session_id: str | None = None,
           tools: bool = False) -> tuple[GuardedChoice, SimpleNamespace]:
    rt = SimpleNamespace(metrics=Metrics("m"), sessions=InMemorySessionStore())
    plan = GuardPlan(server_policy(mode, release, {"deny": [r"SECRET-\d{4}"]}),
                     CheckContext(tools=TOOLS if tools else []), session_id)
    return GuardedChoice(plan, 0, rt, "chatcmpl-1"), rt  # type: ignore[arg-type]


def play(gc: GuardedChoice, pieces: list[str], parser: ToolCallParser | None = None,
         finish: str = "stop") -> list:
    outs = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        text, calls = piece, ()
        if parser is not None:
            deltas = parser.feed(piece) + (parser.finish() if last else [])
            text = "".join(d.text for d in deltas if hasattr(d, "text"))
            calls = tuple(d for d in deltas if not hasattr(d, "text"))
        outs.append(gc.step(text, calls, (i,), (-0.5,), ((),), parser, finish if last else None))
        if outs[-1].blocked:
            break
    return outs


def test_block_holds_token_entries_with_their_text_and_drops_them_on_failure():
    gc, rt = choice("block")
    outs = play(gc, ["Fine. ", "Then ", "SECRET-", "1234 ", "more."])
    sent_ids = [t for o in outs for t in o.token_ids]
    assert "".join(o.text for o in outs) == "Fine. " and sent_ids == [0]
    assert outs[-1].blocked and outs[-1].verdict["blocked"]
    assert rt.metrics.guard_blocked.labels("m")._value.get() == 1


def test_block_passing_releases_every_token_by_the_end():
    gc, _ = choice("block")
    outs = play(gc, ["All ", "good. ", "Yes."])
    assert "".join(o.text for o in outs) == "All good. Yes."
    assert [t for o in outs for t in o.token_ids] == [0, 1, 2]
    assert outs[-1].verdict["passed"]


def test_flag_passes_everything_through():
    gc, _ = choice("flag")
    outs = play(gc, ["x SECRET-", "1234 y"])
    assert "".join(o.text for o in outs) == "x SECRET-1234 y"
    assert [v["check"] for o in outs for v in o.violations] == ["deny"]
    assert [t for o in outs for t in o.token_ids] == [0, 1]


def test_block_withholds_a_call_to_an_unknown_tool():
    gc, _ = choice("block", tools=True)
    outs = play(gc, ['<tool_call>{"name": "nope", ', '"arguments": {}}</tool_call>'],
                ToolCallParser())
    assert not any(o.calls or o.token_ids for o in outs)
    assert outs[-1].blocked and outs[-1].violations[0]["check"] == "tool_args"


def test_block_releases_a_call_once_it_passed():
    gc, _ = choice("block", tools=True)
    pieces = ['<tool_call>{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}',
              '</tool_call>', '']
    outs = play(gc, pieces, ToolCallParser())
    assert not any(o.calls for o in outs[:2])     # announced by the parser, held here
    args = "".join(c.arguments for o in outs for c in o.calls)
    assert args == '{"city": "Paris"}' and outs[-1].verdict["passed"]


def test_session_remembers_a_passing_response():
    gc, rt = choice("flag", session_id="s")
    play(gc, ['{"order": {"id": 41}}'])
    # Generation.updates saves them (awaiting the store) before the last update leaves
    assert [(a.key, a.value) for a in gc.session_facts] == [("/order/id", 41)]
