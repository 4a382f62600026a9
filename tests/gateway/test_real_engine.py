"""The main flows through the official openai SDK (and raw httpx SSE) against one live server on
the real default model. One server for the module: loading the model costs seconds."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from engine import EngineConfig
from gateway.config import GatewayConfig
from tests.gateway.conftest import sdk_client, serve, sse_events, wait_for

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "Write one sentence about the sea."}]


@pytest.fixture(scope="module")
def server():
    config = GatewayConfig(engine=EngineConfig(max_num_seqs=8, kv_cache_memory_mb=64))
    yield from serve(config)


@pytest.fixture(scope="module")
def client(server):
    return sdk_client(server)


@pytest.fixture(scope="module")
def greedy_text(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0)
    return out.choices[0].message.content


def stream_text(client, **kw):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_chat_non_streaming(client, greedy_text):
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0)
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == greedy_text
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens <= 16 and out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streaming_matches_non_streaming(client, greedy_text):
    text, chunks = stream_text(client, max_tokens=16, temperature=0,
                               stream_options={"include_usage": True})
    assert text == greedy_text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 16


def test_stop_string_spanning_tokens_never_leaks(client, greedy_text, tokenizer):
    ids = tokenizer(greedy_text, add_special_tokens=False).input_ids
    # a stop string made of the end of one token and the start of the next
    head = tokenizer.decode(ids[:4])
    stop = greedy_text[len(head) - 2:len(head) + 2]
    assert len(stop) == 4
    expected = greedy_text[:greedy_text.index(stop)]
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16,
                                         temperature=0, stop=[stop, "never-appears"])
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "stop"
    text, chunks = stream_text(client, max_tokens=16, temperature=0, stop=stop)
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"
    assert not any(stop[:2] in (c.choices[0].delta.content or "") for c in chunks[1:]
                   if stop[:2] not in expected)
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0,
                                         stop=stop, extra_body={"include_stop_str_in_output": True})
    assert out.choices[0].message.content == expected + stop


def test_seed_reproducibility_and_n(client):
    kw = dict(model=MODEL, messages=ASK, max_tokens=8, temperature=1.0, seed=1234, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    texts = ["", ""]
    finished = set()
    for c in chunks:
        for ch in c.choices:
            assert ch.index not in finished, "a chunk after the choice's finish_reason"
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1}
    assert texts == [c.message.content for c in a.choices]


def test_logprobs(client):
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token     # greedy takes the most likely token
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode("utf-8", "replace") == e.token
    raw = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0.7,
                                         seed=5, logprobs=True,
                                         extra_body={"plumbline": {"logprobs_mode": "raw"}})
    assert raw.model_extra["plumbline"] == {"logprobs_mode": "raw", "weights_version": 0}
    assert len(raw.choices[0].logprobs.content) == raw.usage.completion_tokens


def test_completions(client, tokenizer):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                    logprobs=2, echo=False)
    choice = out.choices[0]
    assert choice.text and len(choice.logprobs.tokens) == out.usage.completion_tokens
    assert choice.logprobs.text_offset[0] == 0
    ids = tokenizer(prompt).input_ids
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == choice.text
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == prompt + choice.text
    with_lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                        echo=True, logprobs=1)
    lp = with_lp.choices[0].logprobs
    assert with_lp.choices[0].text == prompt + choice.text
    assert len(lp.tokens) == len(ids) + with_lp.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None   # nothing predicts it
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert lp.token_logprobs[len(ids):] == pytest.approx(choice.logprobs.token_logprobs)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                            temperature=0, echo=True, logprobs=1, stream=True))
    assert chunks[0].choices[0].text == prompt
    assert len(chunks[0].choices[0].logprobs.tokens) == len(ids)
    assert "".join(c.choices[0].text for c in chunks) == prompt + choice.text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == choice.text


def test_raw_sse_frames(server):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"X-Request-Id": "sse-test-1"}, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-request-id"] == "sse-test-1"
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(f.startswith("data: ") or f.startswith(":") for f in frames)
    events = sse_events(iter(raw.split("\n")))
    chunks = [e for e in events if isinstance(e, dict)]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and "usage" in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] is not None
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 5


def test_disconnect_mid_stream_frees_kv_blocks(server):
    engine = server.runtime.engine
    body = {"model": MODEL, "messages": ASK, "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n >= 3:   # role chunk + two tokens: the request holds blocks now
                    break
            assert engine.stats().num_free_blocks < engine.stats().num_blocks
    # the connection is closed (a real TCP close); the engine must drop the request
    wait_for(lambda: engine.stats().num_running == 0 and engine.stats().num_waiting == 0,
             what="request aborted")
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert server.runtime.admission.num_in_use == 0 and not server.runtime.active


def test_bad_requests_do_not_disturb_a_running_stream(server):
    body = {"model": MODEL, "messages": ASK, "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            for bad in ({"model": MODEL, "messages": ASK, "max_tokens": 10**6},
                        {"model": MODEL, "messages": [{"role": "user", "content": "x " * 9000}]},
                        {"model": MODEL, "prompt": [10**8]}):
                path = "/v1/completions" if "prompt" in bad else "/v1/chat/completions"
                assert c.post(server.url + path, content=json.dumps(bad)).status_code == 400
            events = sse_events(lines)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_constrained_decoding(client):
    """response_format, structured_outputs and guided_* constrain the output; a bad grammar is a 400."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
              "required": ["name"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=24, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    choice = out.choices[0]
    if choice.finish_reason == "stop":          # a whole document, valid
        assert set(json.loads(choice.message.content)) == {"name"}
    else:                                       # cut by max_tokens, and marked so
        assert choice.finish_reason == "length"
        assert choice.model_extra["plumbline"]["incomplete"] is True
    picked = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert picked.choices[0].message.content in ("yes", "no")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=ASK,
                                       extra_body={"guided_regex": "(unclosed"})


def test_output_cut_inside_its_structure_is_marked_incomplete(client):
    """max_tokens 3 ends the JSON early (too small a budget for closing): finish_reason "length"
    and plumbline.incomplete on the choice, streamed and not; a finished one carries no mark."""
    kw = dict(model=MODEL, messages=ASK, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": {
                  "type": "object", "properties": {"story": {"type": "string"}},
                  "required": ["story"], "additionalProperties": False}}})
    cut = client.chat.completions.create(max_tokens=3, **kw).choices[0]
    # Closing narrows the last token's mask (closed_early) yet has no room to close the JSON.
    assert cut.finish_reason == "length" and cut.model_extra["plumbline"] == {"incomplete": True,
                                                                              "closed_early": True}
    chunks = list(client.chat.completions.create(max_tokens=3, stream=True, **kw))
    last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1].choices[0]
    assert last.finish_reason == "length" and last.model_extra["plumbline"]["incomplete"] is True
    picked = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=8, temperature=0,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}}).choices[0]
    assert picked.finish_reason == "stop" and "plumbline" not in (picked.model_extra or {})


def test_a_shared_system_prompt_is_served_from_the_prefix_cache(client, server):
    system = {"role": "system", "content": "You answer questions about the weather, briefly. " * 6}

    def ask(question):
        return client.chat.completions.create(
            model=MODEL, messages=[system, {"role": "user", "content": question}], max_tokens=4,
            temperature=0)

    first, second = ask("Is it raining in Oslo?"), ask("Will it be sunny in Rome?")
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 48 <= cached < second.usage.prompt_tokens and cached % 16 == 0   # whole blocks of 16
    metrics = httpx.get(server.url + "/metrics").text
    hits = [line for line in metrics.splitlines() if line.startswith("plumbline:prefix_cache_hits{")]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) >= cached


@pytest.mark.parametrize("release", ["stream", "unit", "final"])
def test_block_mode_on_the_real_model_sends_no_denied_byte(client, release):
    """A sample of issue 20's property through the real model: a deny pattern the answer is
    bound to trip (the prompt asks about the sea), n = 2, logprobs on; whatever each choice's
    fate, the pattern matches nothing the client reads: content, or the tokens of the logprobs."""
    import re
    deny = r"(?i)\bthe\b|sea"
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=40, temperature=0.8, seed=3, n=2, stream=True,
        logprobs=True, extra_body={"plumbline": {"guard": {
            "mode": "block", "release": release, "checks": {"deny": [deny]}}}}))
    content, tokens, reasons = ["", ""], ["", ""], [None, None]
    for c in chunks:
        for ch in c.choices:
            content[ch.index] += ch.delta.content or ""
            tokens[ch.index] += "".join(t.token for t in (ch.logprobs.content if ch.logprobs else []) or [])
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
    assert "content_filter" in reasons                     # the pattern did come up
    for i in range(2):
        assert re.search(deny, content[i]) is None and re.search(deny, tokens[i]) is None
        assert content[i].startswith(tokens[i]) or tokens[i].startswith(content[i])


def test_tokenize_counts_what_the_real_engine_is_prompted(server, client):
    # token counters and RL trainers rely on it: /tokenize's count is the prompt the engine saw
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, temperature=0,
                                         extra_body={"reasoning_effort": "low"})
    body = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": ASK}).json()
    assert body["count"] == out.usage.prompt_tokens and body["max_model_len"] > body["count"]
    done = client.completions.create(model=MODEL, prompt="The sea is", max_tokens=2,
                                     temperature=0, extra_body={"return_token_ids": True})
    body = httpx.post(server.url + "/tokenize", json={"prompt": "The sea is"}).json()
    assert body["count"] == done.usage.prompt_tokens
    text = httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}).json()
    assert text == {"prompt": "The sea is"}


def test_logit_bias_min_tokens_and_allowed_token_ids_through_the_sdk(client, server):
    """OpenAI's logit_bias and vLLM's min_tokens / allowed_token_ids on the real model."""
    tok = server.runtime.tokenizer
    word = tok(" sea", add_special_tokens=False).input_ids[0]
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0,
                                         logit_bias={str(word): 100}, logprobs=True)
    assert [t.token for t in out.choices[0].logprobs.content] == [tok.decode([word])] * 4
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=20, temperature=0,
                                         logit_bias={str(eos): 100},
                                         extra_body={"min_tokens": 3, "return_token_ids": True})
    choice = out.choices[0]
    assert out.usage.completion_tokens == 4 and choice.finish_reason == "stop"
    allowed = tok(" a b c", add_special_tokens=False).input_ids
    out = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=6, temperature=1,
                                         seed=2, extra_body={"allowed_token_ids": allowed,
                                                             "return_token_ids": True})
    assert set(out.choices[0].model_extra["token_ids"]) <= set(allowed)
