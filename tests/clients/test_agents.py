"""The OpenAI Agents SDK over the chat-completions model against the real server on the default
model: an agent with two function tools. tool_choice makes it call one; the SDK validates the
arguments against the tool's schema before running it, so a run that reaches the tool proves
the call valid. Tracing is off (it would upload to OpenAI)."""
from __future__ import annotations

from typing import Any

import pytest
from agents import (Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool,
                    set_tracing_disabled)
from openai import AsyncOpenAI

from tests.clients.conftest import MODEL

pytestmark = pytest.mark.slow


def make_agent(base_url: str, calls: list[tuple[str, Any]], tool_choice: str) -> Agent:
    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append(("add", (a, b)))
        return a + b

    @function_tool
    def shout(text: str) -> str:
        """The text in capital letters."""
        calls.append(("shout", text))
        return text.upper()

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    return Agent(
        name="helper", instructions="Use the tools to answer.", tools=[add, shout],
        model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(tool_choice=tool_choice, temperature=0, max_tokens=32),
        # the first tool's result is the final output: a tiny model need not write an answer
        tool_use_behavior="stop_on_first_tool")


@pytest.fixture(scope="module", autouse=True)
def no_tracing():
    set_tracing_disabled(True)
    yield
    set_tracing_disabled(False)


def test_agent_calls_a_named_tool_with_valid_arguments(base_url):
    calls: list[tuple[str, Any]] = []
    result = Runner.run_sync(make_agent(base_url, calls, "add"), "What is 2 plus 3?",
                             max_turns=2)
    (call,) = calls
    name, (a, b) = call
    assert name == "add" and isinstance(a, int) and isinstance(b, int)
    assert result.final_output == str(a + b)


def test_agent_picks_one_of_its_tools_when_one_is_required(base_url):
    calls: list[tuple[str, Any]] = []
    result = Runner.run_sync(make_agent(base_url, calls, "required"),
                             "Shout the word hello.", max_turns=2)
    assert calls and {name for name, _ in calls} <= {"add", "shout"}
    name, args = calls[0]
    expected = str(args[0] + args[1]) if name == "add" else args.upper()
    assert result.final_output == expected
