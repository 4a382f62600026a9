"""Headless load test: start a server (or use `--host`), run Locust at each `--users` level,
check the server came back clean, write a report folder.

    python -m loadtests.run --users 1 8 32 --run-time 60s
    python -m loadtests.run --host http://127.0.0.1:8000 --scenarios chat json --users 8

After each level the runner reads /metrics and asserts 0 failed requests, running and waiting
back to 0 and every KV block free (`plumbline:kv_cache_usage_perc` back to 0). The report folder
holds, per level, Locust's CSV and HTML, plus summary.md and PNG plots across levels. The exit
status is non-zero when any assertion fails; the last line printed is a one-line summary.
Aggregate tokens/s is the server's generation-token counter (counted when a request ends) over
a window from the last user's spawn to the end of the run time: steady state, without the ramp or
the tail. When fewer than two requests per user finished inside that window (a run not much
longer than one request) it falls back to the whole level, ramp and tail included, which reads low;
summary.md says which.

Against `plumbline serve --replicas N` the report adds a table per replica: the client's
requests and failures by the `x-plumbline-replica` header, and each replica's tokens/s from its
own counter in the merged /metrics (`replica` label).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# --scenarios name -> (user class, weight variable)
SCENARIOS = {
    "chat": ("StreamingChatUser", "PLUMBLINE_LT_WEIGHT_CHAT"),
    "plain": ("PlainUser", "PLUMBLINE_LT_WEIGHT_PLAIN"),
    "json": ("StructuredOutputUser", "PLUMBLINE_LT_WEIGHT_JSON"),
    "tools": ("ToolAgentUser", "PLUMBLINE_LT_WEIGHT_TOOLS"),
    "guard": ("GuardedUser", "PLUMBLINE_LT_WEIGHT_GUARD"),
}
M = "plumbline:"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="",
                   help="target an already running server (127.0.0.1/localhost only); "
                        "default: start one on a free port and stop it at the end")
    p.add_argument("--api-key", default=os.environ.get("PLUMBLINE_API_KEY", ""),
                   help="API key for a server started with --api-key (default: "
                        "$PLUMBLINE_API_KEY)")
    p.add_argument("--users", type=int, nargs="+", default=[8],
                   help="concurrent users; several values run one level each, in order")
    p.add_argument("--spawn-rate", type=float, default=4.0, help="users started per second")
    p.add_argument("--run-time", default="30s", help="per level, Locust syntax (30s, 2m, 1h)")
    p.add_argument("--scenarios", nargs="+", choices=sorted(SCENARIOS), default=sorted(SCENARIOS),
                   help="user classes to run, each with its weight from the environment")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of free-text answers")
    p.add_argument("--out", type=Path, default=None,
                   help="report folder (default: reports/loadtest-<timestamp>)")
    p.add_argument("--settle-timeout", type=float, default=60.0,
                   help="seconds the server gets to drain after Locust stops")
    p.add_argument("--stop-timeout", default="60s",
                   help="Locust --stop-timeout: time users get to finish their current task")
    p.add_argument("--model", default="", help="model for the started server (default: its own)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra option for `plumbline serve`, e.g. --server-arg=--max-num-seqs=64")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


# ------------------------------------------------------------------------------ server


def check_local(url: str) -> str:
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "https") or parsed.hostname not in LOCAL_HOSTS:
        raise SystemExit(f"loadtest: refusing to target {url!r}: only 127.0.0.1/localhost")
    return f"{parsed.scheme}://{parsed.netloc}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


class Server:
    """`plumbline serve` in a child process, stopped with SIGTERM (the gateway drains) then KILL."""

    def __init__(self, log_path: Path, model: str, extra: Sequence[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "import sys; from gateway.cli import main; sys.exit(main())",
               "serve", "--host", "127.0.0.1", "--port", str(self.port), "--log-format", "json",
               *(["--model", model] if model else []), *extra]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} "
                                   f"(see {self.log.name})")
            try:
                if http_get(self.url + "/ready", timeout=2.0)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s (see {self.log.name})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


# ------------------------------------------------------------------------------ metrics


def scrape(url: str) -> dict[str, float]:
    """Unlabelled sums of every sample in /metrics, keyed by sample name."""
    return scrape_replicas(url)[""]


def scrape_replicas(url: str) -> dict[str, dict[str, float]]:
    """Sums of every sample in /metrics by sample name: under "" over everything, and under each
    replica id for the samples labelled with it (`plumbline serve --replicas`)."""
    status, text = http_get(url + "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    values: dict[str, dict[str, float]] = {"": {}}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key in {"", sample.labels.get("replica", "")}:
                into = values.setdefault(key, {})
                into[sample.name] = into.get(sample.name, 0.0) + sample.value
    return values


def settle(url: str, timeout: float) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Poll /metrics until nothing runs, waits or holds a KV block: the last scrape (as
    `scrape_replicas`) and the problems left, if any."""
    deadline = time.monotonic() + timeout
    while True:
        by_replica = scrape_replicas(url)
        m = by_replica[""]
        problems = []
        if m.get(M + "num_requests_running", 0.0) != 0:
            problems.append(f"running={m[M + 'num_requests_running']:.0f}")
        if m.get(M + "num_requests_waiting", 0.0) != 0:
            problems.append(f"waiting={m[M + 'num_requests_waiting']:.0f}")
        if m.get(M + "kv_cache_usage_perc", 0.0) != 0:
            problems.append(f"kv_cache_usage={m[M + 'kv_cache_usage_perc']:.4f} (blocks leaked)")
        if not problems or time.monotonic() > deadline:
            return by_replica, problems
        time.sleep(0.5)


# ------------------------------------------------------------------------------ one level


@dataclasses.dataclass
class Level:
    users: int
    requests: int = 0
    failures: int = 0
    wall_s: float = 0.0
    tokens: float = 0.0
    ttft: dict[str, float] = dataclasses.field(default_factory=dict)     # "50%" -> ms
    itl: dict[str, float] = dataclasses.field(default_factory=dict)
    e2e_avg_ms: float = 0.0
    failure_lines: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    locust_rc: int = 0
    throughput_window: str = ""
    final_metrics: dict[str, float] = dataclasses.field(default_factory=dict)   # after settling
    # replica id -> "requests"/"failures" (the client's, by response header) and "tokens"
    # (the replica's generation-token counter over the same window as `tokens`; absent for a
    # replica whose counter was gone at the window's end: killed, restarted under a new id)
    replicas: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    leaked_bytes: int = 0       # denied text the guard scenario's block answers let through

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def replica_rows(self) -> list[tuple[str, int, int, str, str]]:
        """(replica, requests, failures, tokens/s, share of tokens) per replica, "-" where its
        counter was gone at the end."""
        total = sum(r.get("tokens", 0.0) for r in self.replicas.values())
        rows = []
        for replica, r in sorted(self.replicas.items()):
            tps = share = "-"
            if "tokens" in r and self.wall_s:
                tps = f"{r['tokens'] / self.wall_s:.1f}"
                share = f"{r['tokens'] / total:.0%}" if total else "-"
            rows.append((replica or "none", int(r.get("requests", 0)), int(r.get("failures", 0)),
                         tps, share))
        return rows


PCTS = ("50%", "90%", "95%", "99%")


def _merge_pcts(entries: list[dict[str, Any]]) -> dict[str, float]:
    """Percentiles over several names, weighted by request count (an approximation)."""
    entries = [e for e in entries if e["requests"]]
    total = sum(e["requests"] for e in entries)
    if not total:
        return {}
    return {p: sum(e["pct_ms"][p] * e["requests"] for e in entries) / total for p in PCTS}


def read_stats(path: Path, level: Level) -> None:
    """The statistics the locustfile wrote when Locust quit (after the last user stopped)."""
    stats = json.loads(path.read_text())
    entries = stats["entries"]
    http = [e for e in entries if e["type"] != "SSE"]
    sse = [e for e in entries if e["type"] == "SSE"]
    level.requests = sum(e["requests"] for e in http)
    level.failures = sum(e["failures"] for e in entries)
    level.ttft = _merge_pcts([e for e in sse if e["name"].startswith("ttft")])
    level.itl = _merge_pcts([e for e in sse if e["name"].startswith("itl")])
    if level.requests:
        level.e2e_avg_ms = sum(e["avg_ms"] * e["requests"] for e in http) / level.requests
    level.failure_lines = [f"{e['occurrences']}x {e['type']} {e['name']}: {e['error']}"
                           for e in stats["errors"]]
    # the guard scenario's block answers report the denied bytes they let through
    level.leaked_bytes = sum(e["content_bytes"] for e in sse if e["name"] == "guard leaked bytes")
    for replica, counts in stats.get("replicas", {}).items():
        if replica or counts["failures"]:       # "": no replica answered (only failures matter)
            level.replicas.setdefault(replica, {}).update(counts)


def parse_duration(text: str) -> float:
    """Locust's run-time syntax (90, 30s, 2m, 1h30m) in seconds."""
    if text.strip().isdigit():
        return float(text)
    parts = re.findall(r"(\d+)\s*([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != re.sub(r"\s", "", text):
        raise SystemExit(f"loadtest: cannot read run time {text!r}")
    return float(sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts))


class TokenWindow(threading.Thread):
    """Reads the generation-token counter at the window's two ends, off the main thread."""

    def __init__(self, url: str, start_s: float, end_s: float) -> None:
        super().__init__(daemon=True)
        self.url, self.start_s, self.end_s = url, start_s, end_s
        self.stop_event = threading.Event()
        # (monotonic time, tokens, finished, tokens by replica)
        self.samples: list[tuple[float, float, float, dict[str, float]]] = []

    def run(self) -> None:
        t0 = time.monotonic()
        for at in (self.start_s, self.end_s):
            if self.stop_event.wait(max(0.0, t0 + at - time.monotonic())):
                return
            try:
                by_replica = scrape_replicas(self.url)
            except (OSError, RuntimeError):
                return
            m = by_replica.pop("")
            self.samples.append((time.monotonic(), m.get(M + "generation_tokens_total", 0.0),
                                 m.get(M + "e2e_request_latency_seconds_count", 0.0),
                                 {r: v.get(M + "generation_tokens_total", 0.0)
                                  for r, v in by_replica.items()}))

    def measure(self, min_finished: int) -> tuple[float, float, dict[str, float]] | None:
        """(tokens, seconds, tokens by replica) inside the window, when at least min_finished
        requests ended there. A replica that started inside the window counts from 0."""
        if len(self.samples) < 2:
            return None
        (t_a, n_a, f_a, r_a), (t_b, n_b, f_b, r_b) = self.samples
        if f_b - f_a < min_finished:
            return None
        return n_b - n_a, t_b - t_a, {r: n - r_a.get(r, 0.0) for r, n in r_b.items()}


def run_level(url: str, users: int, args: argparse.Namespace, out: Path) -> Level:
    level = Level(users)
    folder = out / f"users-{users}"
    folder.mkdir(parents=True, exist_ok=True)
    stats_path = folder / "stats.json"
    stats_path.unlink(missing_ok=True)
    env = dict(os.environ, PLUMBLINE_LT_MAX_TOKENS=str(args.max_tokens),
               PLUMBLINE_LT_STATS_JSON=str(stats_path),
               PLUMBLINE_LT_API_KEY=getattr(args, "api_key", ""))
    classes = []
    for name, (cls, weight_var) in SCENARIOS.items():
        if name in args.scenarios:
            classes.append(cls)
        else:
            env[weight_var] = "0"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
           "--host", url, "--users", str(users),
           "--spawn-rate", str(min(args.spawn_rate, users)), "--run-time", args.run_time,
           "--stop-timeout", args.stop_timeout, "--csv", str(folder / "locust"),
           "--html", str(folder / "locust.html"), "--only-summary", "--loglevel", "WARNING",
           *classes]
    run_s = parse_duration(args.run_time)
    ramp_s = min(users / args.spawn_rate, run_s / 2)
    window = TokenWindow(url, ramp_s + 1.0, run_s + 1.0)   # ~1 s: Locust's own start-up
    before = scrape_replicas(url)
    start = time.monotonic()
    window.start()
    with open(folder / "locust.log", "w") as log:
        level.locust_rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    level.wall_s = time.monotonic() - start
    window.stop_event.set()
    window.join()
    after_by_replica, level.problems = settle(url, args.settle_timeout)
    after = level.final_metrics = after_by_replica[""]
    measured = window.measure(min_finished=2 * users)
    gen = M + "generation_tokens_total"
    if measured is not None:
        level.tokens, level.wall_s, replica_tokens = measured
        level.throughput_window = "steady state"
    else:
        level.throughput_window = "whole level (short run)"
        level.tokens = after.get(gen, 0.0) - before[""].get(gen, 0.0)
        replica_tokens = {r: v.get(gen, 0.0) - before.get(r, {}).get(gen, 0.0)
                          for r, v in after_by_replica.items() if r}
    for replica, tokens in replica_tokens.items():
        level.replicas.setdefault(replica, {})["tokens"] = tokens
    if not stats_path.exists():
        level.problems.append(f"locust wrote no stats (exit {level.locust_rc}, see {folder}/locust.log)")
        return level
    read_stats(stats_path, level)
    if level.failures:
        level.problems.insert(0, f"{level.failures} failed requests")
    if level.leaked_bytes:
        level.problems.insert(0, f"the guard let {level.leaked_bytes} bytes of denied text through")
    return level


# ------------------------------------------------------------------------------ report


def _s(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.3f}"


def write_summary(out: Path, levels: list[Level], args: argparse.Namespace, target: str) -> None:
    lines = ["# Load test", "",
             f"- target: {target}", f"- scenarios: {', '.join(args.scenarios)}",
             f"- run time per level: {args.run_time}, spawn rate {args.spawn_rate}/s, "
             f"max_tokens {args.max_tokens}", "",
             "| users | requests | failures | tokens/s | TTFT p50 s | TTFT p95 s | TTFT p99 s "
             "| ITL p50 s | ITL p95 s | mean HTTP latency s | tokens/s over | guard leaked bytes "
             "| server clean |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for lv in levels:
        clean = "yes" if not [p for p in lv.problems if "failed requests" not in p] else \
            "; ".join(p for p in lv.problems if "failed requests" not in p)
        lines.append(f"| {lv.users} | {lv.requests} | {lv.failures} | {lv.tokens_per_s:.1f} "
                     f"| {_s(lv.ttft.get('50%'))} | {_s(lv.ttft.get('95%'))} "
                     f"| {_s(lv.ttft.get('99%'))} | {_s(lv.itl.get('50%'))} "
                     f"| {_s(lv.itl.get('95%'))} | {_s(lv.e2e_avg_ms)} | {lv.throughput_window} "
                     f"| {lv.leaked_bytes} | {clean} |")
    if any(lv.replicas for lv in levels):
        lines += ["", "## Per replica", "",
                  "Requests and failures as the client saw them (by `x-plumbline-replica`; "
                  "\"none\": failed before a replica answered), tokens/s from each replica's "
                  "generation-token counter over the level's window (\"-\": the replica's "
                  "counter was gone at the end: it was killed or restarted).", "",
                  "| users | replica | requests | failures | tokens/s | share of tokens |",
                  "|---:|---|---:|---:|---:|---:|"]
        lines += [f"| {lv.users} | {' | '.join(map(str, row))} |"
                  for lv in levels for row in lv.replica_rows()]
    failures = [f"- users={lv.users}: {line}" for lv in levels for line in lv.failure_lines]
    if failures:
        lines += ["", "## Failures", "", *failures]
    lines += ["", "Per level: `users-N/stats.json` (the figures above; type SSE = the ttft/itl "
              "measurements), `users-N/locust.html` and Locust's CSV. Plots: `throughput.png`, `ttft.png`, `itl.png`.", ""]
    (out / "summary.md").write_text("\n".join(lines))


def write_plots(out: Path, levels: list[Level]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [lv.users for lv in levels]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(users, [lv.tokens_per_s for lv in levels], marker="o")
    ax.set(xlabel="concurrent users", ylabel="generated tokens/s (aggregate)",
           title="Throughput")
    _finish(fig, ax, users, out / "throughput.png")
    for key, title in (("ttft", "Time to first token"), ("itl", "Inter-token latency")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in PCTS:
            ax.plot(users, [getattr(lv, key).get(p, float("nan")) / 1000 for lv in levels],
                    marker="o", label=f"p{p.rstrip('%')}")
        ax.set(xlabel="concurrent users", ylabel="seconds", title=title)
        ax.legend()
        _finish(fig, ax, users, out / f"{key}.png")


def _finish(fig: Any, ax: Any, users: list[int], path: Path) -> None:
    if len(users) > 1 and max(users) / max(1, min(users)) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_xticks(users, [str(u) for u in users])
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def one_line(levels: list[Level], problems: list[str], out: Path) -> str:
    requests = sum(lv.requests for lv in levels)
    failures = sum(lv.failures for lv in levels)
    top = max(levels, key=lambda lv: lv.users) if levels else None
    parts = [f"loadtest {'OK' if not problems else 'FAILED'}:",
             f"users={','.join(str(lv.users) for lv in levels)}",
             f"requests={requests}", f"failures={failures}"]
    if top is not None:
        parts += [f"tokens/s={top.tokens_per_s:.1f}@{top.users}",
                  f"ttft_p50={_s(top.ttft.get('50%'))}s", f"ttft_p95={_s(top.ttft.get('95%'))}s"]
    parts.append(f"report={out}")
    if problems:
        parts.append("| " + "; ".join(problems))
    return " ".join(parts)


# ------------------------------------------------------------------------------ main


@dataclasses.dataclass
class Report:
    folder: Path
    levels: list[Level]
    problems: list[str]      # every failed assertion, each prefixed with its level

    @property
    def ok(self) -> bool:
        return bool(self.levels) and not self.problems


def execute(args: argparse.Namespace) -> Report:
    """Start the server if asked, run every level, stop the server, write the report."""
    target = check_local(args.host) if args.host else ""
    if any(u < 1 for u in args.users):
        raise SystemExit("loadtest: --users must be positive")
    out = args.out or Path("reports") / time.strftime("loadtest-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    server = None
    report = Report(out, [], [])
    try:
        if not target:
            server = Server(out / "server.log", args.model, args.server_arg)
            server.wait_ready()
            target = server.url
        for users in args.users:
            level = run_level(target, users, args, out)
            report.levels.append(level)
            report.problems += [f"users={users}: {p}" for p in level.problems]
            print(f"users={users}: requests={level.requests} failures={level.failures} "
                  f"tokens/s={level.tokens_per_s:.1f} ttft_p50={_s(level.ttft.get('50%'))}s "
                  f"{'clean' if not level.problems else '; '.join(level.problems)}", flush=True)
            for replica, requests, failures, tps, _ in level.replica_rows():
                print(f"  replica {replica}: requests={requests} failures={failures} "
                      f"tokens/s={tps}", flush=True)
    except (RuntimeError, OSError) as exc:
        report.problems.append(str(exc))
    finally:
        if server is not None:
            server.stop()
    if report.levels:
        write_summary(out, report.levels, args, target)
        if not args.no_plots:
            write_plots(out, report.levels)
    return report


def run(args: argparse.Namespace) -> int:
    report = execute(args)
    print(one_line(report.levels, report.problems, report.folder), flush=True)
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.run",
                                     description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
