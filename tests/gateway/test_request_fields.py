"""Request fields of issue 23 served through the server: stop strings with n > 1, priority,
truncate_prompt_tokens, bad_words, prompt lists, suffix, best_of, continuous usage, chat template
options, prompt_logprobs. The fake engine where the gateway's part is the point; the real
default model where real output matters."""
from __future__ import annotations

import httpx
import pytest

from tests.gateway.conftest import FakeEngine, sse_events
from tests.gateway.test_errors import MODEL, assert_error, chat


class SiblingWatcher(FakeEngine):
    """Records which single-sequence aborts had arrived when index 1 produced its first token
    (the fake plays index 0 to its end first, then index 1)."""

    seen_at_sibling_start: list[tuple[str, int]] | None = None

    async def _play(self, request):
        async for delta in super()._play(request):
            if delta.index == 1 and self.seen_at_sibling_start is None:
                self.seen_at_sibling_start = list(self.aborted_seqs)
            yield delta


def test_a_choice_that_hits_a_stop_string_is_aborted_alone_at_once(fake_server):
    server = fake_server(engine_cls=SiblingWatcher)
    stop = "fake"
    r = httpx.post(server.url + "/v1/chat/completions",
                   json=chat(n=2, max_tokens=40, stop=[stop]))
    assert r.status_code == 200, r.text
    body = r.json()
    (request_id,) = server.engine.requests
    # the stopped choice's sequence was aborted before its sibling generated anything
    assert server.engine.seen_at_sibling_start == [(request_id, 0)]
    # index 1 hit the stop string as well: it was aborted alone too
    assert server.engine.aborted_seqs == [(request_id, 0), (request_id, 1)]
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello there! I am a "] * 2
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "stop"]


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    from engine import EngineConfig
    from gateway.config import GatewayConfig
    from tests.gateway.conftest import serve

    config = GatewayConfig(engine=EngineConfig(model=str(tiny_model_dir), max_num_seqs=4,
                                               kv_cache_memory_mb=16, block_size=8))
    yield from serve(config)


def test_a_stopped_choice_frees_its_blocks_while_its_sibling_runs(tiny_server):
    core = tiny_server.runtime.engine.core
    body = {"model": core.config.model, "prompt": "Once upon a time", "n": 2, "seed": 7,
            "temperature": 1.0, "ignore_eos": True}
    # both runs sample choice 0's first tokens in the same batch shapes: the same tokens
    first = httpx.post(tiny_server.url + "/v1/completions", json={**body, "max_tokens": 3},
                       timeout=120).json()
    stop = first["choices"][0]["text"]
    assert stop and stop not in first["choices"][1]["text"]
    snapshots: list[tuple[list[tuple[int, int]], int]] = []
    postprocess = core.scheduler.postprocess

    def recording(*args, **kw):
        changed = postprocess(*args, **kw)
        snapshots.append(([(s.index, len(s.block_table)) for s in core.scheduler.running],
                          core.blocks.num_free_blocks))
        return changed

    core.scheduler.postprocess = recording
    try:
        r = httpx.post(tiny_server.url + "/v1/completions",
                       json={**body, "max_tokens": 120, "stop": [stop]}, timeout=120)
    finally:
        del core.scheduler.postprocess
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert choices[0]["text"] == "" and choices[0]["finish_reason"] == "stop"
    # after choice 0 stopped, steps ran with choice 1 alone holding blocks: choice 0's were free
    alone = [(running, free) for running, free in snapshots
             if [i for i, _ in running] == [1]]
    assert alone, snapshots[:8]
    assert all(free == core.blocks.num_blocks - held for [(_, held)], free in alone)
    assert core.blocks.num_free_blocks == core.blocks.num_blocks


def test_priority_orders_the_queue_then_arrival(fake_server):
    import threading

    from tests.gateway.conftest import wait_for

    hold = threading.Event()
    server = fake_server(max_num_seqs=1, hold=hold)
    admission = server.runtime.admission
    threads = []

    def send(priority, max_tokens):
        body = chat(max_tokens=max_tokens, priority=priority)
        t = threading.Thread(target=httpx.post, args=(server.url + "/v1/chat/completions",),
                             kwargs={"json": body, "timeout": 60})
        t.start()
        threads.append(t)

    send(0, 1)                            # takes the one slot, held
    wait_for(lambda: len(server.engine.requests) == 1)
    for k, (priority, max_tokens) in enumerate([(5, 2), (5, 3), (-1, 4), (0, 5)], 1):
        send(priority, max_tokens)
        wait_for(lambda: admission.num_waiting == k)
    hold.set()
    for t in threads:
        t.join()
    order = [(r.sampling.priority, r.sampling.max_tokens) for r in server.engine.requests.values()]
    assert order == [(0, 1), (-1, 4), (0, 5), (5, 2), (5, 3)]


def test_priority_must_be_an_integer(fake_server):
    server = fake_server()
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=chat(priority="high")),
                 400, "priority")
    assert_error(httpx.post(server.url + "/v1/completions",
                            json={"model": MODEL, "prompt": "a", "priority": 1.5}), 400, "priority")


def test_truncate_prompt_tokens_keeps_the_last_k(fake_server):
    server = fake_server()                 # max_model_len 512
    ids = list(range(100, 700))            # 600 tokens: longer than the context
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": MODEL, "prompt": ids, "max_tokens": 2, "truncate_prompt_tokens": 5})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 5
    full = httpx.post(server.url + "/v1/chat/completions", json=chat()).json()
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(truncate_prompt_tokens=3))
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    prompts = [req.prompt_token_ids for req in server.engine.requests.values()]
    assert prompts[0] == tuple(ids[-5:])
    assert len(prompts[1]) == full["usage"]["prompt_tokens"] and prompts[2] == prompts[1][-3:]
    # -1: the last max_model_len tokens, which leaves no room to generate here
    assert_error(httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": ids, "max_tokens": 2, "truncate_prompt_tokens": -1}), 400, "prompt")


@pytest.mark.parametrize("value", [0, -2, 513, "5", 2.0])
def test_bad_truncate_prompt_tokens_is_a_400(fake_server, value):
    server = fake_server()
    for path, body in (("/v1/chat/completions", chat(truncate_prompt_tokens=value)),
                       ("/v1/completions", {"model": MODEL, "prompt": "a",
                                            "truncate_prompt_tokens": value})):
        assert_error(httpx.post(server.url + path, json=body), 400, "truncate_prompt_tokens")
    assert server.engine.requests == {}


@pytest.fixture(scope="module")
def real_server():
    from engine import EngineConfig
    from gateway.config import GatewayConfig
    from tests.gateway.conftest import serve

    yield from serve(GatewayConfig(engine=EngineConfig(max_num_seqs=8, kv_cache_memory_mb=64)))


SEA = "Write about the sea. The sea is"


def completion(server, **kw):
    body = {"model": MODEL, "prompt": SEA, "max_tokens": 12,
            "temperature": 0, **kw}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_bad_words_one_token_and_several(real_server, tokenizer):
    greedy = completion(real_server, return_token_ids=True, logprobs=5)["choices"][0]
    ids = greedy["token_ids"]
    first = tokenizer.decode(ids[:1])
    assert tokenizer(" " + first.lstrip(), add_special_tokens=False).input_ids == ids[:1]
    banned = completion(real_server, bad_words=[first.strip()], return_token_ids=True, logprobs=5)
    choice = banned["choices"][0]
    assert choice["token_ids"][0] != ids[0]
    # processed logprobs: the banned token is gone from the distribution sampled from
    assert first not in choice["logprobs"]["top_logprobs"][0]
    assert first in greedy["logprobs"]["top_logprobs"][0]
    # a two-token word: its last token is banned only right after its first
    k = next(k for k in range(1, len(ids) - 1)
             if tokenizer(" " + tokenizer.decode(ids[k:k + 2]).lstrip(),
                          add_special_tokens=False).input_ids == ids[k:k + 2])
    pair = tokenizer.decode(ids[k:k + 2])
    choice = completion(real_server, bad_words=[pair], return_token_ids=True)["choices"][0]
    out = choice["token_ids"]
    assert out[:k + 1] == ids[:k + 1] and out[k + 1] != ids[k + 1]
    assert all(out[j:j + 2] != ids[k:k + 2] for j in range(len(out) - 1))


def test_bad_words_refusals(fake_server):
    server = fake_server()
    for value, param in (([""], "bad_words[0]"), (["  "], "bad_words"), ("x", "bad_words"),
                         (["x"] * 257, "bad_words")):
        assert_error(httpx.post(server.url + "/v1/chat/completions", json=chat(bad_words=value)),
                     400, param)
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=chat(
        bad_words=["x"], response_format={"type": "json_object"})), 400, "bad_words")
    assert server.engine.requests == {}
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(bad_words=[]))
    assert r.status_code == 200, r.text


def stream_events(server, path, body):
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        return sse_events(r.iter_lines())


def test_a_list_of_prompts_gets_one_choice_per_prompt_and_sample(fake_server, tokenizer):
    server = fake_server(max_num_seqs=8)
    body = {"model": MODEL, "prompt": ["Hi", "Good day to you"], "n": 2, "max_tokens": 3,
            "echo": True, "return_token_ids": True}
    out = httpx.post(server.url + "/v1/completions", json=body).json()
    prompts = [tuple(tokenizer("Hi").input_ids), tuple(tokenizer("Good day to you").input_ids)]
    assert [r.prompt_token_ids for r in server.engine.requests.values()] == prompts
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == ["HiHello there!"] * 2 + [
        "Good day to youHello there!"] * 2
    assert [tuple(c["prompt_token_ids"]) for c in out["choices"]] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert out["usage"]["prompt_tokens"] == len(prompts[0]) + len(prompts[1])   # once a prompt
    assert out["usage"]["completion_tokens"] == 4 * 3
    # streamed: the same choices, each prompt's echo ahead of its choices, usage summed
    events = stream_events(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    texts: dict[int, str] = {}
    for e in events[:-2]:
        for c in e["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert texts == {c["index"]: c["text"] for c in out["choices"]}
    assert events[-2]["usage"] == out["usage"] and events[-1] == "[DONE]"


def test_token_id_lists_are_prompts_too(fake_server):
    server = fake_server(max_num_seqs=8)
    out = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": [[11, 12, 13], [14, 15]], "max_tokens": 2}).json()
    assert [r.prompt_token_ids for r in server.engine.requests.values()] == [(11, 12, 13), (14, 15)]
    assert [c["index"] for c in out["choices"]] == [0, 1] and out["usage"]["prompt_tokens"] == 5
    out = httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": [16, 17], "max_tokens": 2}).json()
    assert len(out["choices"]) == 1 and out["usage"]["prompt_tokens"] == 2


def test_a_bad_prompt_in_a_list_queues_nothing(fake_server):
    from gateway.config import GatewayConfig

    server = fake_server()
    assert_error(httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": [[1, 2], [3, 10**9]]}), 400, "prompt")
    assert server.engine.requests == {}
    # the queue is full for the second prompt: a 429, and the first prompt's slot is freed
    server = fake_server(GatewayConfig(max_queued_requests=0), max_num_seqs=1)
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert r.status_code == 429, r.text
    assert server.runtime.admission.num_in_use == 0 and server.engine.requests == {}
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": ["a"]})
    assert r.status_code == 200, r.text


def test_continuous_usage_stats_puts_usage_in_every_chunk(fake_server):
    server = fake_server()
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in (("/v1/chat/completions", chat(max_tokens=6, stream_options=options)),
                       ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 6,
                                            "stream_options": options})):
        events = stream_events(server, path, body)[:-1]
        counts = [e["usage"]["completion_tokens"] for e in events]
        assert counts == sorted(counts) and counts[-1] == 6 and counts[-2] == 6
        assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + c
                   for e, c in zip(events, counts))
        # without continuous_usage_stats, only the last chunk counts
        events = stream_events(server, path, {**body, "stream_options": {"include_usage": True}})
        assert [e["usage"] is None for e in events[:-2]] == [True] * (len(events) - 2)


def test_prompt_list_choices_match_single_prompts_on_the_real_model(real_server):
    prompts = ["The sea is", "My favourite colour is"]
    each = [completion(real_server, prompt=p)["choices"][0]["text"] for p in prompts]
    both = completion(real_server, prompt=prompts)
    assert [c["text"] for c in both["choices"]] == each


def test_best_of_returns_the_samples_with_the_highest_cumulative_logprob(real_server):
    body = {"temperature": 1.0, "seed": 11, "logprobs": 0, "max_tokens": 6}
    samples = completion(real_server, n=4, **body)["choices"]
    totals = [sum(c["logprobs"]["token_logprobs"]) for c in samples]
    ranked = sorted(range(4), key=lambda i: -totals[i])
    assert len({samples[i]["text"] for i in ranked}) > 1
    best = completion(real_server, n=2, best_of=4, **body)
    assert [c["text"] for c in best["choices"]] == [samples[i]["text"] for i in ranked[:2]]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert best["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in samples)
    # two prompts: each keeps its own best, numbered prompt * n + rank
    two = completion(real_server, prompt=[SEA, SEA], n=1, best_of=4, **body)
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert [c["text"] for c in two["choices"]] == [samples[ranked[0]]["text"]] * 2


def test_best_of_refusals(fake_server):
    server = fake_server()
    base = {"model": MODEL, "prompt": "a"}
    assert_error(httpx.post(server.url + "/v1/completions", json={**base, "n": 2, "best_of": 1}),
                 400, "best_of", "at least n")
    assert_error(httpx.post(server.url + "/v1/completions",
                            json={**base, "best_of": 2, "stream": True}), 400, "best_of", "stream")
    assert_error(httpx.post(server.url + "/v1/completions", json={**base, "best_of": 65}),
                 400, "best_of")
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=chat(best_of=2)),
                 400, "best_of")
    assert server.engine.requests == {}
    r = httpx.post(server.url + "/v1/completions", json={**base, "n": 2, "best_of": 2, "stream": True})
    assert r.status_code == 200, r.text


def live_fake(tokenizer, **engine_kwargs):
    """A fake-engine server over a tokenizer of the test's own (FIM tokens, a chat template)."""
    from gateway.app import create_app
    from gateway.config import GatewayConfig
    from tests.gateway.conftest import LiveServer

    engine = FakeEngine(tokenizer, **engine_kwargs)
    server = LiveServer(create_app(GatewayConfig(), engine_factory=lambda _: engine)).start()
    server.engine = engine
    return server


def test_suffix_is_a_400_naming_it_where_the_model_has_no_fim_tokens(fake_server):
    server = fake_server()
    err = assert_error(httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "def f(", "suffix": "return x"}), 400, "suffix")
    assert "fill-in-the-middle" in err["message"]
    assert server.engine.requests == {}


def test_suffix_builds_a_fill_in_the_middle_prompt(tokenizer):
    import copy

    fim = copy.deepcopy(tokenizer)
    fim.add_tokens(["<fim_prefix>", "<fim_suffix>", "<fim_middle>"], special_tokens=True)
    pre, suf, mid = (fim.get_vocab()[t] for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"))
    server = live_fake(fim)
    try:
        r = httpx.post(server.url + "/v1/completions", json={
            "model": MODEL, "prompt": "def f(x):", "suffix": "    return y", "max_tokens": 2})
        assert r.status_code == 200, r.text
        (request,) = server.engine.requests.values()
        encode = lambda t: fim(t, add_special_tokens=False).input_ids  # noqa: E731
        assert list(request.prompt_token_ids) == [pre, *encode("def f(x):"), suf,
                                                  *encode("    return y"), mid]
        for body, param in (({"prompt": [1, 2]}, "suffix"), ({"prompt": "a", "echo": True}, "suffix")):
            assert_error(httpx.post(server.url + "/v1/completions", json={
                "model": MODEL, "suffix": "b", **body}), 400, param)
    finally:
        server.stop()


PREFILL = [{"role": "user", "content": "Name a colour."},
           {"role": "assistant", "content": "My favourite colour is"}]


def test_continue_final_message_leaves_the_last_message_open(fake_server, tokenizer):
    server = fake_server()
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(
        messages=PREFILL, continue_final_message=True, add_generation_prompt=False))
    assert r.status_code == 200, r.text
    closed = httpx.post(server.url + "/v1/chat/completions", json=chat(
        messages=PREFILL, add_generation_prompt=False))
    assert closed.status_code == 200, closed.text
    open_ids, closed_ids = (r.prompt_token_ids for r in server.engine.requests.values())
    assert tokenizer.decode(open_ids).endswith("<|im_start|>assistant\nMy favourite colour is")
    assert tokenizer.decode(closed_ids).endswith("My favourite colour is<|im_end|>\n")
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=chat(
        messages=PREFILL, continue_final_message=True)), 400, "continue_final_message")
    assert_error(httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "a", "continue_final_message": True}), 400,
        "continue_final_message")
    assert len(server.engine.requests) == 2


def test_chat_template_kwargs_reach_the_template(tokenizer):
    import copy

    templated = copy.deepcopy(tokenizer)
    templated.chat_template = ("{{ greeting | default('none') }}|"
                               "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    server = live_fake(templated)
    try:
        for kwargs, expected in (({"greeting": "hello"}, "hello|hi"), (None, "none|hi")):
            r = httpx.post(server.url + "/v1/chat/completions", json=chat(chat_template_kwargs=kwargs))
            assert r.status_code == 200, r.text
            request = list(server.engine.requests.values())[-1]
            assert templated.decode(request.prompt_token_ids) == expected
        for kwargs in ({"add_generation_prompt": False}, {"tools": []}):
            assert_error(httpx.post(server.url + "/v1/chat/completions",
                                    json=chat(chat_template_kwargs=kwargs)), 400,
                         "chat_template_kwargs")
        assert_error(httpx.post(server.url + "/v1/chat/completions",
                                json=chat(chat_template_kwargs=["x"])), 400, "chat_template_kwargs")
        assert len(server.engine.requests) == 2
    finally:
        server.stop()


def test_prompt_logprobs_on_chat_and_completions_match_the_model(real_server, hf_default_model,
                                                                  tokenizer):
    import torch

    r = httpx.post(real_server.url + "/v1/chat/completions", timeout=120, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 1,
        "prompt_logprobs": 2, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    ids, entries = body["prompt_token_ids"], body["prompt_logprobs"]
    assert len(entries) == len(ids) == body["usage"]["prompt_tokens"] and entries[0] is None
    with torch.no_grad():
        logits = hf_default_model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)                          # [len, vocab]: raw
    for i in range(1, len(ids)):
        entry = entries[i]
        own = entry[str(ids[i])]
        assert own["logprob"] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-3)
        assert own["decoded_token"] == tokenizer.decode([ids[i]])
        top = torch.topk(expected[i - 1], 2)
        for j, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            assert entry[str(t)]["rank"] == j and entry[str(t)]["logprob"] == pytest.approx(v, abs=1e-3)
        # the rank over the whole vocabulary; a token within 1e-3 of ours may order either way
        mine = expected[i - 1, ids[i]]
        surely_above = int((expected[i - 1] > mine + 1e-3).sum())
        maybe_above = int((expected[i - 1] > mine - 1e-3).sum())
        assert surely_above + 1 <= own["rank"] <= maybe_above + 1
        assert len(entry) == (2 if own["rank"] <= 2 else 3)
    # completions: each prompt's own list on each of its choices
    out = completion(real_server, prompt=["Hello world", "The sea"], max_tokens=1,
                     prompt_logprobs=0, return_token_ids=True)
    for choice in out["choices"]:
        prompt = choice["prompt_token_ids"]
        assert [list(e) if e else None for e in choice["prompt_logprobs"]] == [None] + [
            [str(t)] for t in prompt[1:]]


def test_prompt_logprobs_refusals(fake_server):
    server = fake_server()
    for body in (chat(prompt_logprobs=1, stream=True), chat(prompt_logprobs=21),
                 chat(prompt_logprobs=-1), chat(prompt_logprobs=True)):
        assert_error(httpx.post(server.url + "/v1/chat/completions", json=body), 400,
                     "prompt_logprobs")
    assert_error(httpx.post(server.url + "/v1/completions", json={
        "model": MODEL, "prompt": "a", "prompt_logprobs": 1, "stream": True}), 400, "prompt_logprobs")
    assert server.engine.requests == {}


def test_tokenize_counts_what_the_chat_route_renders_with_the_template_options(fake_server):
    server = fake_server()
    options = {"messages": PREFILL, "continue_final_message": True,
               "add_generation_prompt": False, "chat_template_kwargs": {"unused": 1}}
    counted = httpx.post(server.url + "/tokenize", json=options)
    assert counted.status_code == 200, counted.text
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(**options))
    assert r.status_code == 200, r.text
    (request,) = server.engine.requests.values()
    assert counted.json()["tokens"] == list(request.prompt_token_ids)


class Leaky(FakeEngine):
    def __init__(self, tokenizer, **kw):
        super().__init__(tokenizer, **kw)
        self.text_ids = list(tokenizer("All fine. SECRET-1234 and then a long tail of text "
                                       "that the engine need not generate any more.",
                                       add_special_tokens=False).input_ids)


def test_a_blocked_choice_is_aborted_alone_too(fake_server):
    from gateway.config import GatewayConfig

    server = fake_server(GatewayConfig(guard_mode="block", guard_checks={"deny": [r"SECRET-\d{4}"]}),
                         engine_cls=Leaky)
    r = httpx.post(server.url + "/v1/chat/completions", json=chat(n=2, max_tokens=60))
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["content_filter"] * 2
    (request_id,) = server.engine.requests
    assert server.engine.aborted_seqs == [(request_id, 0), (request_id, 1)]
