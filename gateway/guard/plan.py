"""A request's guard plan: the policy in force, what the checks may know, and the session.

Built in the route before the response starts, so a bad `plumbline.guard` or
`plumbline.assertions` is a 400 naming the field. The consistency buffer is filled from the
session store (`plumbline.session_id`), then the conversation, then the client's declared
facts. In "enforce" mode the asserted keys the requested JSON schema declares are pinned
(`const`) before the grammar compiles, so the mask itself rules the contradiction out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from gateway.guard.checks import CheckContext
from gateway.guard.facts import Assertion, AssertionBuffer, json_or_none, validate_assertions
from gateway.guard.guard import EventHook, Guard
from gateway.guard.pinning import pin_schema
from gateway.guard.policy import Policy, PolicyError, merge_policy
from gateway.guard.sessions import SessionStore
from gateway.protocol import BadRequest, ChatMessage, PlumblineOptions
from grammars.spec import GrammarSpec

if TYPE_CHECKING:
    from grammars.tools import ToolsRequest


@dataclass(slots=True)
class GuardPlan:
    policy: Policy
    context: CheckContext
    session_id: str | None = None
    pinned: bool = False      # enforce mode changed the grammar

    @property
    def needs_guard(self) -> bool:
        """A guard runs when checks run, or to collect the text a session must remember."""
        return self.policy.mode != "off" or self.session_id is not None

    def new_guard(self, on_event: EventHook | None = None) -> Guard:
        """One per choice: guards keep per-output state."""
        context = CheckContext(schema=self.context.schema, tools=self.context.tools,
                               is_structured=self.context.is_structured,
                               assertions=self.context.assertions)
        return Guard(self.policy, context, on_event=on_event)

    def session_facts(self, text: str, tool_calls: Sequence[dict[str, Any]],
                      source: str) -> list[Assertion]:
        """What the session remembers after a response: the buffer it was judged against, plus
        the response's own JSON leaves and tool-call arguments, except values that contradict
        the buffer (the earlier fact stands)."""
        new = AssertionBuffer()
        new.add_json(json_or_none(text), source)
        for call in tool_calls:
            new.add_json(json_or_none(call.get("arguments")), f"tool call {call.get('name')} "
                         f"arguments, {source}")
        buffer = self.context.assertions
        kept = [a for a in new.facts.values() if buffer.conflict(a.key, a.value) is None]
        return [*buffer.facts.values(), *kept]


def request_policy(server: Policy, options: PlumblineOptions | None,
                   may_loosen: bool = False) -> Policy:
    """The server default under the request's `plumbline.guard`; a bad one is a 400, and so is
    one that loosens the server's policy unless `may_loosen` (`--guard-client-override`)."""
    try:
        return merge_policy(server, None if options is None else options.guard,
                            may_loosen=may_loosen)
    except PolicyError as exc:
        raise BadRequest(exc.message, exc.param) from None


async def plan_guard(server: Policy, sessions: SessionStore, options: PlumblineOptions | None,
               grammar: GrammarSpec | None, messages: Sequence[ChatMessage] = (),
               tools: ToolsRequest | None = None,
               may_loosen: bool = False) -> tuple[GuardPlan, GrammarSpec | None]:
    """The request's plan, and its grammar (pinned in enforce mode)."""
    policy = request_policy(server, options, may_loosen)
    declared: dict[str, Any] = {}
    session_id = None
    if options is not None:
        session_id = options.session_id
        if options.assertions is not None:
            try:
                declared = validate_assertions(options.assertions)
            except ValueError as exc:
                raise BadRequest(str(exc), "plumbline.assertions") from None
    if policy.mode == "off" and session_id is None:
        return GuardPlan(policy, CheckContext()), grammar    # nothing to judge or remember
    session = await sessions.load(session_id) if session_id is not None else []
    buffer = AssertionBuffer.from_conversation([_message_dict(m) for m in messages],
                                               declared, session)
    schema = None
    if grammar is not None and grammar.kind == "json_schema":
        parsed = grammar.schema()
        schema = parsed if isinstance(parsed, dict) else None
    context = CheckContext(
        schema=schema, is_structured=grammar is not None and grammar.kind in ("json_schema",
                                                                              "json_object"),
        tools=[{"type": "function", "function": {"name": t.name, "parameters": dict(t.parameters)}}
               for t in (tools.tools if tools is not None else ())],
        assertions=buffer)
    plan = GuardPlan(policy, context, session_id)
    if (policy.mode != "off" and policy.consistency_mode == "enforce" and schema is not None
            and len(buffer)):
        pinned = pin_schema(schema, buffer.facts.values())
        if pinned != schema:
            assert grammar is not None
            grammar, plan.pinned = GrammarSpec.json_schema(pinned), True
    return plan, grammar


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content if isinstance(m.content, str)
                           else None}
    if m.content is not None and not isinstance(m.content, str):
        out["content"] = "".join(part.text or "" for part in m.content if part.type == "text")
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out
