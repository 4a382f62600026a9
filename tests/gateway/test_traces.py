"""The trace ring: bounded, found by completion id or HTTP request id, JSONL when asked; the
allowed-token replay on a real grammar."""
from __future__ import annotations

import json

from gateway.guard.traces import Trace, TraceRing


def trace(i: int) -> Trace:
    return Trace(f"chatcmpl-{i}", f"req-{i}", "chat.completion", [1, 2, 3], "processed")


def test_ring_keeps_the_newest_and_finds_them_by_either_id(tmp_path):
    ring = TraceRing(max_traces=2, trace_dir=tmp_path)
    traces = [ring.open(trace(i)) for i in range(3)]
    assert len(ring) == 2 and ring.get("chatcmpl-0") is None and ring.get("req-0") is None
    assert ring.get("req-2") is traces[2] and ring.get("chatcmpl-1") is traces[1]
    t = traces[2]
    t.add_tokens(0, [7, 8], [-0.5, -0.25])
    t.event("check_violation", 0, {"check": "deny"})
    t.finish_choice(0, "content_filter", {"blocked": True})
    ring.close(t)
    ring.close(t)          # once only
    (line,) = (tmp_path / "traces.jsonl").read_text().splitlines()
    got = json.loads(line)
    # a blocked choice: its tokens stay out of the file (keep_withheld puts them in)
    assert got["id"] == "chatcmpl-2" and got["choices"][0]["completion_ids"] is None
    assert got["choices"][0]["num_completion_tokens"] == 2 and got["choices"][0]["redacted"]
    assert got["choices"][0]["finish_reason"] == "content_filter"
    assert got["events"][0]["event"] == "check_violation" and got["checks"] == [{"blocked": True}]
    ts = got["timestamps"]
    assert ts["queued"] <= ts["first_token"] <= ts["finished"]


def test_redaction_and_owner_ids(tmp_path):
    ring = TraceRing(max_traces=4, trace_dir=tmp_path, keep_withheld=True)
    t = ring.open(trace(0))
    t.add_tokens(0, [7, 8], [-0.5, -0.25])
    t.add_tokens(1, [9], [-0.1])
    t.finish_choice(0, "content_filter", {"blocked": True})
    t.finish_choice(1, "stop", {"blocked": False})
    shown = t.to_dict(redact_withheld=True)["choices"]
    assert [c["completion_ids"] for c in shown] == [None, [9]]
    assert [c["logprobs"] for c in shown] == [None, [-0.1]]
    assert [c["redacted"] for c in shown] == [True, False]
    ring.close(t)
    got = json.loads((tmp_path / "traces.jsonl").read_text())
    assert got["choices"][0]["completion_ids"] == [7, 8] and not got["choices"][0]["redacted"]
    # block mode: a choice the checks have not cleared yet is still held, so it is withheld too
    held = Trace("chatcmpl-h", None, "chat.completion", [1], "processed", guard={"mode": "block"})
    held.add_tokens(0, [5, 6], [-0.1, -0.2])
    assert held.to_dict(redact_withheld=True)["choices"][0]["completion_ids"] is None
    held.finish_choice(0, "abort", None)            # cut off before a verdict: still withheld
    assert held.to_dict(redact_withheld=True)["choices"][0]["redacted"]
    held.finish_choice(0, "stop", {"blocked": False, "passed": True})
    assert held.to_dict(redact_withheld=True)["choices"][0]["completion_ids"] == [5, 6]
    flag = Trace("chatcmpl-f", None, "chat.completion", [1], "processed", guard={"mode": "flag"})
    flag.add_tokens(0, [5], [-0.1])                 # flag streams as generated: nothing held
    assert flag.to_dict(redact_withheld=True)["choices"][0]["completion_ids"] == [5]
    # an owner id is stable per key within the ring's process, differs across keys and rings
    owner = ring.owner_of(b"key-a")
    assert owner == ring.owner_of(b"key-a") != ring.owner_of(b"key-b")
    assert "key-a" not in owner and TraceRing(1).owner_of(b"key-a") != owner


def test_allowed_token_counts_replays_the_grammar(default_model_dir):
    from transformers import AutoTokenizer

    from grammars import GrammarCompiler, GrammarSpec, allowed_token_counts

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    compiler = GrammarCompiler(tok)
    spec = GrammarSpec.choice(["yes", "no"])
    ids = tok("yes", add_special_tokens=False).input_ids
    counts = allowed_token_counts(compiler.compile(spec), ids + [tok.eos_token_id])
    # one count per token up to where the grammar completes (the engine stops there)
    assert len(counts) == len(ids) and 1 <= counts[0] < 100
