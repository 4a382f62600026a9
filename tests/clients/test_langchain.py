"""langchain-openai's ChatOpenAI against the real server on the default model: invoke, stream,
with_structured_output by each of its three methods, bind_tools. The model is tiny: the tests
check structure and validity (a document the schema validates, a call the tool's schema
validates), never wording."""
from __future__ import annotations

import json

import jsonschema
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.clients.conftest import MODEL

pytestmark = pytest.mark.slow

ASK = "Describe the city of Paris: its name and its population."


class City(BaseModel):
    name: str
    population: int


def chat(base_url: str, max_tokens: int = 8) -> ChatOpenAI:
    return ChatOpenAI(base_url=base_url, api_key="unused", model=MODEL, max_tokens=max_tokens,
                      temperature=0, max_retries=0)


@pytest.fixture(scope="module")
def invoked(base_url):
    return chat(base_url).invoke("Say hello.")


def test_invoke(invoked):
    assert isinstance(invoked, AIMessage) and isinstance(invoked.content, str) and invoked.content
    assert invoked.response_metadata["finish_reason"] in ("stop", "length")
    assert 0 < invoked.usage_metadata["output_tokens"] <= 8
    assert invoked.usage_metadata["input_tokens"] > 0


def test_stream_matches_invoke(base_url, invoked):
    chunks = list(chat(base_url).stream("Say hello."))
    assert len(chunks) > 2 and all(isinstance(c, AIMessageChunk) for c in chunks)
    # greedy: the streamed text is the collected one
    assert "".join(c.content for c in chunks) == invoked.content


def test_structured_output_json_schema_parses_into_the_model(base_url):
    llm = chat(base_url, max_tokens=32).with_structured_output(City, method="json_schema",
                                                                include_raw=True)
    out = llm.invoke(ASK)
    assert out["parsing_error"] is None and isinstance(out["parsed"], City)
    assert City.model_validate_json(out["raw"].content) == out["parsed"]


def test_structured_output_function_calling_parses_into_the_model(base_url):
    llm = chat(base_url, max_tokens=32).with_structured_output(City, method="function_calling",
                                                                include_raw=True)
    out = llm.invoke(ASK)
    assert out["parsing_error"] is None and isinstance(out["parsed"], City)
    (call,) = out["raw"].tool_calls
    assert call["name"] == "City"
    jsonschema.validate(call["args"], City.model_json_schema())


def test_structured_output_json_mode_is_a_json_object(base_url):
    # json_mode asks for any JSON object (the schema is only in the prompt): a dict comes back
    llm = chat(base_url, max_tokens=32).with_structured_output(method="json_mode",
                                                                include_raw=True)
    out = llm.invoke(ASK + " Answer in JSON.")
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], dict)
    assert json.loads(out["raw"].content) == out["parsed"]


def get_weather(city: str, unit: str = "celsius") -> str:
    """The current weather in a city, in celsius or fahrenheit."""
    return f"sunny in {city}"


def test_bind_tools_forced_call_validates(base_url):
    llm = chat(base_url, max_tokens=32).bind_tools([get_weather], tool_choice="get_weather")
    out = llm.invoke("What is the weather in Paris?")
    (call,) = out.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    schema = llm.kwargs["tools"][0]["function"]["parameters"]
    jsonschema.validate(call["args"], schema)
    assert out.response_metadata["finish_reason"] == "tool_calls"


def test_bind_tools_streamed_call_validates(base_url):
    llm = chat(base_url, max_tokens=32).bind_tools([get_weather], tool_choice="required")
    merged = None
    for chunk in llm.stream("What is the weather in Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None
    (call,) = merged.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], llm.kwargs["tools"][0]["function"]["parameters"])
