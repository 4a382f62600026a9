"""LiteLLM's `openai/` provider against the real server on the default model: completion,
stream, a forced tool call, a pydantic response_format. Structure and validity only."""
from __future__ import annotations

import json
import os

import jsonschema
import pytest
from pydantic import BaseModel

from tests.clients.conftest import MODEL

# before litellm is imported: its model cost map from the package, never from the network
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
import litellm  # noqa: E402

pytestmark = pytest.mark.slow

ASK = [{"role": "user", "content": "Say hello."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}


class City(BaseModel):
    name: str
    population: int


@pytest.fixture(scope="module")
def kw(base_url):
    return {"model": f"openai/{MODEL}", "api_base": base_url, "api_key": "unused",
            "temperature": 0, "max_tokens": 8, "num_retries": 0}


@pytest.fixture(scope="module")
def completed(kw):
    return litellm.completion(messages=ASK, **kw)


def test_completion(completed):
    choice = completed.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert 0 < completed.usage.completion_tokens <= 8


def test_stream_matches_completion(kw, completed):
    chunks = list(litellm.completion(messages=ASK, stream=True, **kw))
    assert len(chunks) > 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        completed.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_forced_tool_call_validates(kw):
    out = litellm.completion(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
        **{**kw, "max_tokens": 64})     # the call and its markup: about 40 tokens
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert out.choices[0].finish_reason == "tool_calls"


def test_pydantic_response_format(kw):
    out = litellm.completion(
        messages=[{"role": "user", "content": "Describe Paris: its name and population."}],
        response_format=City, **{**kw, "max_tokens": 32})
    City.model_validate_json(out.choices[0].message.content)
