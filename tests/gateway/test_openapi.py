"""schemathesis over the /openapi.json the server serves, against a live server on the fake
engine: every operation, with valid and invalid inputs (its examples, coverage and fuzzing
phases), must answer without a server error, with a status code the document declares, with a
body (each server-sent event, for a stream) that its schema validates, and to a method it does
not declare with a 405 naming the allowed ones."""
from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (content_type_conformance,
                                               response_headers_conformance,
                                               response_schema_conformance,
                                               status_code_conformance, unsupported_method)
from starlette.testclient import TestClient

import pytest

from gateway.app import create_app
from gateway.config import GatewayConfig
from tests.gateway.conftest import FakeEngine, LiveServer

MODEL = "smollm2-135m-instruct"
# Not schemathesis's positive/negative data checks: the server refuses some schema-valid bodies
# for reasons a schema cannot say (best_of other than n, an empty prompt), with a 400 naming why.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance,
          unsupported_method]   # a 405 with the Allow header RFC 9110 asks for

# The document as served (the route needs no engine: no lifespan runs here). The calls go over
# HTTP to the live server below, not through this app.
schema = schemathesis.openapi.from_dict(
    TestClient(create_app(GatewayConfig())).get("/openapi.json").json())


@pytest.fixture(scope="module")
def live(tokenizer):
    engine = FakeEngine(tokenizer)
    server = LiveServer(create_app(GatewayConfig(), engine_factory=lambda _: engine)).start()
    yield server
    server.stop()


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_operation_answers_as_documented(case, live):
    # A generation request naming another model is a 404 before anything else is looked at;
    # name the served one, so the rest of the body is what gets tested.
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = MODEL
    case.call_and_validate(base_url=live.url, checks=CHECKS)


def test_the_document_declares_responses_and_errors():
    paths = schema.raw_schema["paths"]
    operations = [(f"{method} {path}", op) for path, item in paths.items()
                  for method, op in item.items()]
    # every API route the app serves is in the document (not the document itself, not /ui)
    from starlette.routing import Route
    served = {(method.lower(), route.path.replace("{model:path}", "{model}"))
              for route in create_app(GatewayConfig()).routes if isinstance(route, Route)
              for method in route.methods or () if method != "HEAD"}
    declared = {(method, path) for path, item in paths.items() for method in item}
    assert served - declared == {("get", "/openapi.json")}
    assert len(operations) == 14
    for name, op in operations:
        assert op["responses"]["200"]["content"], name
    errors = {(name, code): response for name, op in operations
              for code, response in op["responses"].items() if code.startswith(("4", "5"))}
    # every error is OpenAI's error object, except the probes' own 503 bodies
    probes = {("get /health", "503"), ("get /ready", "503")}
    assert probes <= set(errors)
    for key, response in errors.items():
        expected = "Status" if key == ("get /health", "503") else "Error"
        assert response["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{expected}"}, key
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "ChatCompletionChunk" in str(chat["text/event-stream"]["schema"])
