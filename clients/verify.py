"""`plumbline verify --url URL`: what a team runs before training on a server's logprobs.

It samples a few rollouts with temperature and top-p, recomputes every token's logprob with a
plain transformers forward of the same model in fp32, and reports mean and max |diff| for the
processed logprobs (the distribution actually sampled from: logits / temperature, truncated to
the top-p nucleus, renormalised) and the raw ones (log-softmax of the logits), with the share of
tokens whose |log-ratio| exceeds 0.01 (what a trainer's clip would see). It then checks that a
seeded request gives the same tokens and logprobs alone and among 31 others, and that
constrained output validates against its JSON schema.

It works against any OpenAI-compatible server that returns token ids (`return_token_ids`, as
vLLM names it); `/v1/server_info` (ours) supplies the model path, the weights in use and whether
determinism is promised. The reference computation here is written from the definitions, not
imported from the engine, so a bug in the engine's sampler cannot hide in both.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

PROMPTS = (
    "The history of the printing press began",
    "def fibonacci(n):\n",
    "Three facts about the ocean:",
    "Q: What is the boiling point of water?\nA:",
    "Once upon a time, in a small village,",
    "The main differences between TCP and UDP are",
)

# Small schemas that any model can finish within the default budget; --schemas adds real ones
# (e.g. ../shared/jsonschemabench/dev).
DEFAULT_SCHEMAS: dict[str, dict[str, Any]] = {
    "flag": {"type": "object", "properties": {"ok": {"type": "boolean"}},
             "required": ["ok"], "additionalProperties": False},
    "choice": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer"}},
        "required": ["color", "count"], "additionalProperties": False},
    "small_list": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
}

CLIP = 0.01          # |log-ratio| beyond which PPO-style clipping would act
LOGPROB_FLOOR = -9999.0   # JSON has no -inf; servers report impossible tokens as -9999


class VerifyError(Exception):
    """The harness cannot run (server unreachable, no token ids, ...): exit status 2."""


@dataclass(slots=True)
class Criterion:
    """One pass/fail line of the report."""

    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Diff:
    num_tokens: int = 0
    mean_abs_diff: float = 0.0
    max_abs_diff: float = 0.0
    clip_share: float = 0.0         # share of tokens with |log-ratio| > CLIP

    @classmethod
    def of(cls, diffs: Sequence[float]) -> Diff:
        if not diffs:
            return cls()
        return cls(len(diffs), sum(diffs) / len(diffs), max(diffs),
                   sum(d > CLIP for d in diffs) / len(diffs))


@dataclass(slots=True)
class Report:
    url: str
    model: str
    reference: str
    token_ids_from: str = ""        # "return_token_ids", or "chat logprob bytes"
    server: dict[str, Any] = field(default_factory=dict)
    logprobs: dict[str, Any] = field(default_factory=dict)
    determinism: dict[str, Any] = field(default_factory=dict)
    schemas: dict[str, Any] = field(default_factory=dict)
    checks: list[Criterion] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


# ------------------------------------------------------------------------------ the reference


class Reference:
    """The model as transformers computes it, in fp32."""

    def __init__(self, model_dir: Path, weights: Path | None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._by_bytes: dict[bytes, int] | None = None
        # transformers' own methods are untyped (mypy --strict would refuse the calls)
        self.model = cast(Any, AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                                    dtype=torch.float32))
        self.model.eval()
        if weights is not None:
            from gateway.admin import read_weights_file

            missing, unexpected = self.model.load_state_dict(read_weights_file(weights), strict=False)
            if unexpected or any("lm_head" not in k for k in missing):
                raise VerifyError(f"{weights} does not fit {model_dir}: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
            self.model.tie_weights()

    def token_id(self, raw: bytes) -> int:
        """The token whose bytes these are (for servers that report bytes, not ids)."""
        if self._by_bytes is None:
            from gateway.tokens import TokenTable

            table = TokenTable(self.tokenizer)
            self._by_bytes = {}
            for i in reversed(range(len(self.tokenizer))):   # the lowest id wins a tie
                self._by_bytes[bytes(table.get(i)[1])] = i
        if raw not in self._by_bytes:
            raise VerifyError(f"no token of the reference has the bytes {raw!r}")
        return self._by_bytes[raw]

    def logprobs(self, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                 temperature: float, top_p: float) -> tuple[list[float], list[float]]:
        """(processed, raw) logprob of each completion token given everything before it."""
        import torch

        ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
        with torch.inference_mode():
            logits = self.model(input_ids=ids).logits[0].float()               # [T, vocab]
        n = len(prompt_ids)
        logits = logits[n - 1:n - 1 + len(completion_ids)]                     # [C, vocab]
        target = torch.tensor(list(completion_ids)).unsqueeze(1)               # [C, 1]
        raw = torch.log_softmax(logits, -1).gather(1, target).squeeze(1)
        processed = torch.log_softmax(nucleus(logits / temperature, top_p), -1)
        processed = processed.gather(1, target).squeeze(1)
        return _floored(processed), _floored(raw)


def _floored(logprobs: Any) -> list[float]:
    out: list[float] = logprobs.clamp(min=LOGPROB_FLOOR).tolist()
    return out


def nucleus(logits: Any, top_p: float) -> Any:
    """Rows of logits [C, vocab] with every token outside the top-p nucleus at -inf: the smallest
    set of most likely tokens whose probability reaches top_p (the first token always stays)."""
    import torch

    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs            # mass of the more likely tokens
    drop_sorted = before > top_p
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def resolve_reference(args: argparse.Namespace,
                      info: dict[str, Any] | None) -> tuple[Path, Path | None]:
    """The model directory and the weights to load into it (None: the directory's own)."""
    from engine.config import DEFAULT_MODEL
    from engine.loader import resolve_model

    weights = Path(args.weights) if args.weights else None
    if args.model:
        return resolve_model(args.model), weights
    model = (info or {}).get("model", {})
    path = model.get("path")
    if path and Path(path).is_dir():
        source = model.get("weights_source")
        if weights is None and source and Path(source).exists():
            weights = Path(source)
        return Path(path), weights
    return resolve_model(model.get("source") or DEFAULT_MODEL), weights


# --------------------------------------------------------------------------------- the server


class Server:
    def __init__(self, url: str, api_key: str | None, timeout: float) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers,
                                        timeout=timeout)
        self.has_token_ids: bool | None = None     # None: not known yet

    async def get(self, path: str) -> httpx.Response:
        try:
            return await self.client.get(path)
        except httpx.TransportError as exc:
            raise VerifyError(f"cannot reach {self.client.base_url}{path}: {exc}") from None

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            r = await self.client.post(path, json=body)
        except httpx.TransportError as exc:
            raise VerifyError(f"cannot reach {self.client.base_url}{path}: {exc}") from None
        if r.status_code != 200:
            raise VerifyError(f"POST {path} answered {r.status_code}: {r.text[:500]}")
        out: dict[str, Any] = r.json()
        return out

    async def close(self) -> None:
        await self.client.aclose()


def _completion_body(args: argparse.Namespace, model: str, prompt_ids: Sequence[int], seed: int,
                     mode: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": list(prompt_ids),
                            "max_tokens": args.max_tokens, "temperature": args.temperature,
                            "top_p": args.top_p, "seed": seed, "logprobs": 0,
                            "return_token_ids": True}
    if mode is not None:
        body["plumbline"] = {"logprobs_mode": mode}
    return body


@dataclass(slots=True)
class Rollout:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]


def _floor(lp: float | None) -> float:
    return LOGPROB_FLOOR if lp is None else max(float(lp), LOGPROB_FLOOR)


async def rollout(server: Server, ref: Reference, args: argparse.Namespace, model: str,
                  prompt: str, seed: int, mode: str | None) -> Rollout:
    """One sampled completion with its token ids: from `return_token_ids` when the server has it
    (exact), else from the bytes of the chat logprobs, mapped back through the tokenizer."""
    if server.has_token_ids is not False:
        prompt_ids = list(ref.tokenizer(prompt).input_ids)
        try:
            out = await server.post("/v1/completions",
                                    _completion_body(args, model, prompt_ids, seed, mode))
        except VerifyError as exc:
            if server.has_token_ids or "return_token_ids" not in str(exc):
                raise
            server.has_token_ids = False
        else:
            choice = out["choices"][0]
            ids = choice.get("token_ids")
            echoed = out.get("prompt_token_ids", choice.get("prompt_token_ids"))
            if ids is not None:
                server.has_token_ids = True
                if echoed is not None and list(echoed) != prompt_ids:
                    raise VerifyError("the server changed the prompt's token ids")
                logprobs = (choice.get("logprobs") or {}).get("token_logprobs") or []
                return _checked(Rollout(prompt_ids, list(ids), [_floor(x) for x in logprobs]))
            server.has_token_ids = False
    return await _chat_rollout(server, ref, args, model, prompt, seed, mode)


async def _chat_rollout(server: Server, ref: Reference, args: argparse.Namespace, model: str,
                        prompt: str, seed: int, mode: str | None) -> Rollout:
    messages = [{"role": "user", "content": prompt}]
    text = ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = list(ref.tokenizer(text, add_special_tokens=False).input_ids)
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": args.max_tokens,
                            "temperature": args.temperature, "top_p": args.top_p, "seed": seed,
                            "logprobs": True}
    if mode is not None:
        body["plumbline"] = {"logprobs_mode": mode}
    out = await server.post("/v1/chat/completions", body)
    if out["usage"]["prompt_tokens"] != len(prompt_ids):
        raise VerifyError("the server returns no token ids and its chat template does not match "
                          "the reference's; verify needs `return_token_ids`")
    entries = (out["choices"][0].get("logprobs") or {}).get("content")
    if entries is None:
        raise VerifyError("the server returned neither token ids nor chat logprobs")
    ids = [ref.token_id(bytes(e["bytes"] or b"")) for e in entries]
    return _checked(Rollout(prompt_ids, ids, [_floor(e["logprob"]) for e in entries]))


def _checked(r: Rollout) -> Rollout:
    if len(r.logprobs) != len(r.token_ids):
        raise VerifyError(f"the server returned {len(r.logprobs)} logprobs for "
                          f"{len(r.token_ids)} tokens")
    return r


# ----------------------------------------------------------------------------------- the checks


async def check_logprobs(server: Server, ref: Reference, args: argparse.Namespace, model: str,
                         modes: Sequence[str | None], report: Report) -> None:
    """Rollouts, then the same logprobs from the reference; one Diff per logprobs mode."""
    diffs: dict[str, list[float]] = {}
    num_mismatched = 0
    for i in range(args.num_rollouts):
        first_ids: list[int] | None = None
        for mode in modes:
            r = await rollout(server, ref, args, model, PROMPTS[i % len(PROMPTS)], args.seed + i,
                              mode)
            if first_ids is None:
                first_ids = r.token_ids
            elif r.token_ids != first_ids:
                num_mismatched += 1     # same seed, other logprobs mode: must not change tokens
            if not r.token_ids:
                continue
            processed, raw = ref.logprobs(r.prompt_ids, r.token_ids, args.temperature, args.top_p)
            name = mode or args.server_logprobs_mode
            want = raw if name == "raw" else processed
            diffs.setdefault(name, []).extend(abs(a - b) for a, b in zip(r.logprobs, want))
    for mode, values in diffs.items():
        d = Diff.of(values)
        report.logprobs[mode] = asdict(d)
        report.checks.append(Criterion(
            f"logprobs_{mode}", d.num_tokens > 0 and d.max_abs_diff <= args.tol,
            f"{d.num_tokens} tokens, max |diff| {d.max_abs_diff:.2e} (tolerance {args.tol:.0e}), "
            f"{100 * d.clip_share:.1f}% beyond {CLIP}"))
    if len(modes) > 1:
        report.checks.append(Criterion(
            "seed_independent_of_logprobs_mode", num_mismatched == 0,
            f"{num_mismatched} of {args.num_rollouts} rollouts changed tokens with the mode"))


async def check_determinism(server: Server, ref: Reference, args: argparse.Namespace,
                            model: str, expected: bool, report: Report) -> None:
    """The same seeded requests alone (one at a time), then among `concurrency` others."""
    num_probes = min(args.num_rollouts, args.concurrency)

    def body(i: int) -> dict[str, Any]:
        prompt_ids = list(ref.tokenizer(PROMPTS[i % len(PROMPTS)]).input_ids)
        b = _completion_body(args, model, prompt_ids, args.seed + 1000 + i, None)
        b.pop("return_token_ids")    # text and logprobs suffice here
        return b

    def key(out: dict[str, Any]) -> tuple[str, list[float]]:
        c = out["choices"][0]
        return c["text"], list((c.get("logprobs") or {}).get("token_logprobs") or [])

    alone = [key(await server.post("/v1/completions", body(i))) for i in range(num_probes)]
    crowd = await asyncio.gather(*[server.post("/v1/completions", body(i))
                                   for i in range(args.concurrency)])
    together = [key(out) for out in crowd[:num_probes]]
    same_text = sum(a[0] == b[0] for a, b in zip(alone, together))
    same_all = sum(a == b for a, b in zip(alone, together))
    max_diff = max((abs(x - y) for a, b in zip(alone, together) if a[0] == b[0]
                    for x, y in zip(a[1], b[1])), default=0.0)
    report.determinism = {"num_probes": num_probes, "concurrency": args.concurrency,
                          "same_tokens": same_text, "bit_identical": same_all,
                          "max_logprob_diff": max_diff, "expected": expected}
    detail = (f"{same_all}/{num_probes} bit-identical alone vs among {args.concurrency} "
              f"({same_text} same text, max logprob diff {max_diff:.1e})")
    report.checks.append(Criterion("determinism", same_all == num_probes or not expected,
                               detail + ("" if expected else "; not promised by the server")))


def load_schemas(paths: Sequence[str], limit: int) -> dict[str, dict[str, Any]]:
    """Schemas from files or directories of *.json (jsonschemabench files keep theirs under
    "schema"); the built-in set when no path is given."""
    if not paths:
        return dict(DEFAULT_SCHEMAS)
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    out: dict[str, dict[str, Any]] = {}
    for f in files[:limit]:
        doc = json.loads(f.read_text())
        out[f.stem] = doc["schema"] if isinstance(doc.get("schema"), dict) else doc
    return out


async def check_schemas(server: Server, args: argparse.Namespace, model: str,
                        report: Report) -> None:
    """Each schema through response_format; every finished output must validate. Output cut
    by max_tokens cannot be judged, and a schema the server refuses (400) is not a failure."""
    import jsonschema

    schemas = load_schemas(args.schemas, args.num_schemas)

    async def one(name: str, schema: dict[str, Any]) -> tuple[str, str]:
        body = {"model": model, "max_tokens": args.schema_max_tokens, "seed": args.seed,
                "temperature": args.temperature, "top_p": args.top_p,
                "messages": [{"role": "user", "content": "Reply with JSON for this schema: "
                              + json.dumps(schema)[:2000]}],
                "response_format": {"type": "json_schema", "json_schema": {
                    "name": "verify", "schema": schema, "strict": True}}}
        try:
            out = await server.post("/v1/chat/completions", body)
        except VerifyError as exc:
            return name, "refused" if " 400:" in str(exc) else f"error: {exc}"
        choice = out["choices"][0]
        if choice["finish_reason"] != "stop":
            return name, "cut"
        try:
            jsonschema.validate(json.loads(choice["message"]["content"] or ""), schema)
        except (ValueError, jsonschema.ValidationError) as exc:
            return name, f"invalid: {str(exc).splitlines()[0][:200]}"
        return name, "valid"

    results = dict(await asyncio.gather(*[one(n, s) for n, s in schemas.items()]))
    counts = {k: sum(v.split(":")[0] == k for v in results.values())
              for k in ("valid", "invalid", "cut", "refused", "error")}
    report.schemas = {"results": results, **counts}
    report.checks.append(Criterion(
        "schema_compliance", counts["invalid"] == 0 and counts["error"] == 0,
        f"{counts['valid']} valid, {counts['invalid']} invalid, {counts['cut']} cut by "
        f"max_tokens, {counts['refused']} refused, {counts['error']} errors "
        f"of {len(schemas)} schemas"))


# ---------------------------------------------------------------------------------- the command


async def verify(args: argparse.Namespace) -> Report:
    t0 = time.perf_counter()
    server = Server(args.url, args.api_key, args.timeout)
    try:
        r = await server.get("/v1/server_info")
        info = r.json() if r.status_code == 200 else None
        r = await server.get("/v1/models")
        if r.status_code != 200:
            raise VerifyError(f"GET /v1/models answered {r.status_code}: {r.text[:300]}")
        model = args.served_model or r.json()["data"][0]["id"]
        model_dir, weights = resolve_reference(args, info)
        ref = Reference(model_dir, weights)
        report = Report(args.url, model, str(weights or model_dir))
        if info is not None:
            report.server = {"weights_version": info["model"]["weights_version"],
                             **{k: info["numerics"][k] for k in ("dtype", "lm_head_dtype",
                                                                 "deterministic")},
                             "lm_head_precision": info["numerics"].get("lm_head_precision"),
                             "plumbline": info["versions"].get("plumbline")}
        # Ours takes the logprobs mode per request; others report their server-wide mode.
        modes: list[str | None] = ["processed", "raw"] if info is not None else [None]
        if args.from_bytes:
            server.has_token_ids = False
        await check_logprobs(server, ref, args, model, modes, report)
        report.token_ids_from = ("return_token_ids" if server.has_token_ids
                                 else "chat logprob bytes")
        if args.concurrency > 1:
            expected = {"yes": True, "no": False}.get(
                args.expect_deterministic, bool(info and info["numerics"]["deterministic"]))
            await check_determinism(server, ref, args, model, expected, report)
        if args.num_schemas > 0:
            await check_schemas(server, args, model, report)
    finally:
        await server.close()
    report.duration_s = round(time.perf_counter() - t0, 2)
    return report


def format_table(report: Report) -> str:
    lines = [f"plumbline verify: {report.url} (model {report.model}, reference {report.reference})",
             f"token ids from {report.token_ids_from}"]
    if report.server:
        lines.append("server: " + ", ".join(f"{k}={v}" for k, v in report.server.items()))
    lines.append("")
    lines.append(f"{'logprobs':<10} {'tokens':>7} {'mean |diff|':>12} {'max |diff|':>11} "
                 f"{'|log-ratio|>' + str(CLIP):>17}")
    for mode, d in report.logprobs.items():
        lines.append(f"{mode:<10} {d['num_tokens']:>7} {d['mean_abs_diff']:>12.2e} "
                     f"{d['max_abs_diff']:>11.2e} {100 * d['clip_share']:>16.2f}%")
    lines.append("")
    width = max(len(c.name) for c in report.checks) if report.checks else 10
    for c in report.checks:
        lines.append(f"{'PASS' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    lines.append("")
    lines.append(f"{'OK' if report.ok else 'FAILED'} in {report.duration_s:.1f} s")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--model", default=None,
                   help="reference model (id, HF directory or .gguf); default: the path the "
                        "server reports in /v1/server_info, else the default model")
    p.add_argument("--weights", default=None,
                   help="safetensors file or HF directory to load into the reference; default: "
                        "the weights the server last loaded through /v1/admin/weights")
    p.add_argument("--from-bytes", action="store_true",
                   help="recover token ids from chat logprobs' bytes even when the server "
                        "returns token ids (the fallback for servers that do not)")
    p.add_argument("--served-model", default=None, help="the model id to send (default: the "
                                                        "first in /v1/models)")
    p.add_argument("--num-rollouts", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tol", type=float, default=1e-3,
                   help="largest |logprob diff| accepted against the fp32 reference")
    p.add_argument("--server-logprobs-mode", choices=["processed", "raw"], default="raw",
                   help="what a server without /v1/server_info reports (vLLM's default: raw)")
    p.add_argument("--concurrency", type=int, default=32,
                   help="batch for the determinism check (1 skips it)")
    p.add_argument("--expect-deterministic", choices=["auto", "yes", "no"], default="auto",
                   help="fail when a seeded request changes with the batch; auto: when the "
                        "server reports deterministic mode")
    p.add_argument("--schemas", nargs="*", default=[],
                   help="JSON schema files or directories (default: a small built-in set)")
    p.add_argument("--num-schemas", type=int, default=3, help="at most this many (0 skips)")
    p.add_argument("--schema-max-tokens", type=int, default=64)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per HTTP request")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """0: every check passed; 1: a check failed; 2: the harness could not run."""
    if not (0 < args.top_p <= 1 and args.temperature > 0 and args.num_rollouts >= 1):
        print("plumbline verify: needs temperature > 0, top_p in (0, 1] and at least one "
              "rollout", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(verify(args))
    except VerifyError as exc:
        print(f"plumbline verify: {exc}", file=sys.stderr)
        return 2
    # every number in the report is finite: logprobs are floored at -9999 like the servers'
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_table(report))
    return 0 if report.ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="plumbline verify",
                                     description=(__doc__ or "").split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
