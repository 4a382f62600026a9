"""The openai SDK's helpers beyond plain create (tests/gateway/test_real_engine.py has those)
against the real server on the default model: `parse` with a pydantic response_format, a
streamed forced tool call put back together from its deltas, the async client streaming."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.clients.conftest import MODEL

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}


class City(BaseModel):
    name: str
    population: int


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def test_parse_with_a_pydantic_response_format(client):
    out = client.chat.completions.parse(
        model=MODEL, response_format=City, max_tokens=32, temperature=0,
        messages=[{"role": "user", "content": "Describe Paris: its name and population."}])
    message = out.choices[0].message
    assert isinstance(message.parsed, City)
    assert City.model_validate_json(message.content) == message.parsed


def test_streamed_forced_tool_call_reassembles(client):
    stream = client.chat.completions.create(
        model=MODEL, tools=[WEATHER], max_tokens=48, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in stream:
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += delta.id or ""
            call["name"] += (delta.function.name or "") if delta.function else ""
            call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    (call,) = calls.values()
    assert call["id"] and call["name"] == "get_weather"
    jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])
    assert reasons[-1] == "tool_calls" and reasons[:-1] == [None] * (len(reasons) - 1)


def test_async_client_streams(base_url):
    async def run() -> tuple[str, list[str | None]]:
        client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
        stream = await client.chat.completions.create(
            model=MODEL, max_tokens=8, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Say hello."}])
        chunks = [chunk async for chunk in stream]
        await client.close()
        return ("".join(c.choices[0].delta.content or "" for c in chunks),
                [c.choices[0].finish_reason for c in chunks])

    text, reasons = asyncio.run(run())
    assert text and reasons[-1] in ("stop", "length")
