"""JSONSchemaBench/MaskBench scoring of the grammar backends.

    python -m benchmarks.maskbench ../shared/jsonschemabench/dev [--backend NAME ...] [--limit N]

Scoring, per ../shared/jsonschemabench/README.md: compile the schema (a failure is a compile
error); feed each instance, serialised as compact JSON (separators "," and ":", non-ASCII kept
as UTF-8) and tokenized with the model's own tokenizer (no special tokens), through a fresh
matcher, then EOS. A valid instance must have every token allowed and EOS accepted (otherwise a
validation error); an invalid one must have some token or EOS refused (otherwise an
invalidation error). A token counts as allowed only if its mask bit is set *and*
accept_token() takes it. A schema passes when it compiles and has neither kind of error.
Mask time is one fill_bitmask() call, measured before every token and before EOS.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grammars.base import GrammarCompiler, allocate_bitmask
from grammars.spec import GrammarError, GrammarSpec


@dataclass
class Score:
    backend: str
    num_schemas: int = 0
    num_passing: int = 0
    compile_errors: int = 0
    validation_errors: int = 0     # valid instances rejected
    invalidation_errors: int = 0   # invalid instances accepted
    num_relaxed: int = 0           # schemas compiled through the fallback
    num_timeouts: int = 0          # compile errors that were timeouts
    compile_s: list[float] = field(default_factory=list)
    mask_s: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def pct(xs: list[float], q: float) -> float:
            if not xs:
                return float("nan")
            xs = sorted(xs)
            return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000

        return (f"{self.backend}: {self.num_passing}/{self.num_schemas} passing "
                f"({100 * self.num_passing / max(1, self.num_schemas):.1f}%), "
                f"compile errors {self.compile_errors}, validation errors {self.validation_errors}, "
                f"invalidation errors {self.invalidation_errors}, relaxed {self.num_relaxed}, "
                f"compile timeouts {self.num_timeouts}; "
                f"compile p50 {pct(self.compile_s, 0.5):.2f} ms p99 {pct(self.compile_s, 0.99):.1f} ms; "
                f"mask p50 {pct(self.mask_s, 0.5):.3f} ms p99 {pct(self.mask_s, 0.99):.3f} ms "
                f"({len(self.mask_s)} masks)")


def instance_token_ids(tokenizer: Any, data: Any) -> list[int]:
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def run_instance(compiled: Any, token_ids: list[int], eos: int, bitmask: Any, mask_s: list[float]) -> bool:
    """Whether the matcher accepts the whole instance followed by EOS."""
    m = compiled.matcher()
    for t in token_ids + [eos]:
        start = time.perf_counter()
        m.fill_bitmask(bitmask, 0)
        mask_s.append(time.perf_counter() - start)
        allowed = (int(bitmask[0, t // 32]) >> (t % 32)) & 1
        if not allowed or not m.accept_token(t):
            return False
    return bool(m.is_terminated())


def score(directory: Path, compiler: GrammarCompiler, backend: str, limit: int | None,
          compile_timeout: float) -> Score:
    files = sorted(directory.glob("*.json"))[:limit]
    result = Score(backend)
    eos = compiler.eos_token_id
    bitmask = allocate_bitmask(1, compiler.vocab_size or 0)
    for path in files:
        case = json.loads(path.read_text())
        result.num_schemas += 1
        spec = GrammarSpec.json_schema(case["schema"])
        start = time.perf_counter()
        try:
            compiled = compiler.compile_future(spec, backend).result(timeout=compile_timeout)
        except GrammarError as e:
            result.compile_errors += 1
            result.failures.append(f"{path.name}: compile error: {str(e)[:160]}")
            continue
        except concurrent.futures.TimeoutError:
            result.compile_errors += 1
            result.num_timeouts += 1
            result.failures.append(f"{path.name}: compile error: timed out after {compile_timeout:g}s")
            continue
        result.compile_s.append(time.perf_counter() - start)
        if any(n.startswith("relaxed") for n in getattr(compiled, "notes", ())):
            result.num_relaxed += 1
        ok = True
        for i, test in enumerate(case["tests"]):
            accepted = run_instance(compiled, instance_token_ids(compiler.tokenizer, test["data"]), eos,
                                    bitmask, result.mask_s)
            if test["valid"] and not accepted:
                result.validation_errors += 1
                result.failures.append(f"{path.name}: test {i} valid instance rejected")
                ok = False
            elif not test["valid"] and accepted:
                result.invalidation_errors += 1
                result.failures.append(f"{path.name}: test {i} INVALID instance accepted")
                ok = False
        result.num_passing += ok
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.maskbench", description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--backend", action="append", help="repeatable; default llguidance")
    parser.add_argument("--limit", type=int, default=None, help="first N files only")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--compile-timeout", type=float, default=30.0)
    parser.add_argument("--exact", action="store_true", help="no fallback: the backend as is")
    parser.add_argument("-v", "--verbose", action="store_true", help="list failing schemas")
    args = parser.parse_args(argv)

    import transformers

    from engine.loader import resolve_model
    from grammars.base import CompilerOptions

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model(args.model))
    options = CompilerOptions(json_fallback=not args.exact, always_validate=not args.exact)
    stuck = False
    for backend in args.backend or ["llguidance"]:
        compiler = GrammarCompiler(tokenizer, backend=backend, options=options, max_cached=1)
        result = score(args.directory, compiler, backend, args.limit, args.compile_timeout)
        compiler.close()
        stuck |= result.num_timeouts > 0
        if args.verbose:
            for line in result.failures:
                print("  " + line)
        print(result.summary(), flush=True)
    if stuck:
        # A timed-out compile keeps running in native code that cannot be interrupted; leave
        # without joining its thread.
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
