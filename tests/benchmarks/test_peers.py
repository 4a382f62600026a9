"""benchmarks/peers.py's reduction of repeated rounds to the medians its table reports (the
servers themselves run only in the benchmark: they need their own multi-GB venvs)."""
from __future__ import annotations

from benchmarks.peers import Round, median_rounds, table


def test_runs_reduce_to_one_median_row_per_peer_streams_and_mode():
    rounds = [Round("plumbline", 8, False, 100.0, 1.0, 2.0, 1024, 10.0),
              Round("plumbline", 8, False, 140.0, 3.0, 4.0, 1024, 7.0),
              Round("plumbline", 8, False, 120.0, 2.0, 9.0, 1024, 8.0),
              Round("plumbline", 8, True, 90.0, 1.5, 2.5, 900, 11.0, valid_json=8),
              Round("plumbline", 8, True, 80.0, 1.6, 2.6, 900, 12.0, valid_json=7),
              Round("vllm", 8, False, 60.0, 0.5, 0.9, 1024, 17.0),
              Round("vllm", 8, False, None, None, None, 0, None, errors=["HTTP 500"])]
    medians = median_rounds(rounds)
    assert [(r.peer, r.constrained, r.runs) for r in medians] == [
        ("plumbline", False, 3), ("plumbline", True, 2), ("vllm", False, 2)]
    plain, json_, vllm = medians
    assert (plain.tokens_per_s, plain.ttft_p50_s, plain.ttft_p95_s, plain.wall_s) == (120.0, 2.0, 4.0, 8.0)
    assert plain.num_tokens == 3072
    assert json_.valid_json == 15 and json_.tokens_per_s == 85.0
    # a failed run adds its error and no figure
    assert vllm.tokens_per_s == 60.0 and vllm.errors == ["HTTP 500"]
    md = table(medians)
    assert "| plumbline | json_schema | 8 | 85.0 |" in md and "| 15/16 |" in md
    assert "| vllm | plain | 8 | 60.0 | 0.50 | 0.90 | 2.00 |" in md      # 120 / 60


def test_every_server_is_up_for_all_runs_and_the_runs_alternate_the_order(monkeypatch, tmp_path):
    import argparse

    from benchmarks import peers

    started, stopped, calls = [], [], []

    class Proc:
        def __init__(self, name):
            self.name = name

    def start_server(peer, cache, model, args, out):
        if peer.name == "llamacpp":             # one that fails to start: its error, no rounds
            return None, 0, [peers.Round(peer.name, 8, False, errors=["not ready"])]
        started.append(peer.name)
        return Proc(peer.name), 1000 + len(started), []

    async def http_round(peer, port, prompt, n, constrained, args):
        calls.append((peer.name, n, constrained, tuple(started), tuple(stopped)))
        return peers.Round(peer.name, n, constrained, 1.0)

    monkeypatch.setattr(peers, "start_server", start_server)
    monkeypatch.setattr(peers, "http_round", http_round)
    monkeypatch.setattr(peers, "stop", lambda proc: stopped.append(proc.name))
    args = argparse.Namespace(runs=3, concurrency=[1, 8], constrained=True)
    chosen = [peers.PEERS[n] for n in ("plumbline", "vllm", "llamacpp")]
    rounds = peers.bench_servers(chosen, tmp_path, {}, "p", args, tmp_path)
    assert [c[0] for c in calls] == ["plumbline"] * 4 + ["vllm"] * 8 + ["plumbline"] * 8 + ["vllm"] * 4
    assert all(c[3] == ("plumbline", "vllm") and c[4] == () for c in calls)
    assert [(c[1], c[2]) for c in calls[:4]] == [(1, False), (8, False), (1, True), (8, True)]
    assert sorted(stopped) == ["plumbline", "vllm"]
    assert [r.errors for r in rounds if r.peer == "llamacpp"] == [["not ready"]]
    assert len(rounds) == 1 + 3 * 2 * 4
