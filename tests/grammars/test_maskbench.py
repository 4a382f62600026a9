"""maskbench scoring on hand-made cases (no ../shared needed)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grammars import GrammarCompiler
from benchmarks.maskbench import score

CASES = {
    "plain.json": {"schema": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 2}},
                              "required": ["a"]},
                   "tests": [{"valid": True, "data": {"a": 3}}, {"valid": False, "data": {"a": 1}},
                             {"valid": False, "data": {}}]},
    "oneof.json": {"schema": {"oneOf": [{"type": "integer"}, {"minimum": 3}]},
                   "tests": [{"valid": True, "data": 1}, {"valid": True, "data": 3.5},
                             {"valid": False, "data": 5}]},
    "ordered.json": {"schema": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
                     "tests": [{"valid": True, "data": {"b": 1, "a": 2}}]},   # llguidance fixes property order
}


def test_score_counts_each_kind(tmp_path: Path, compiler: Any) -> None:
    for name, case in CASES.items():
        (tmp_path / name).write_text(json.dumps(case))
    result = score(tmp_path, compiler, "llguidance", limit=None, compile_timeout=30)
    assert (result.num_schemas, result.num_passing, result.compile_errors) == (3, 2, 0)
    assert (result.validation_errors, result.invalidation_errors, result.num_relaxed) == (1, 0, 1)
    assert result.failures == ["ordered.json: test 0 valid instance rejected"]
    assert "2/3 passing" in result.summary()


def test_compile_errors_are_counted_not_raised(tmp_path: Path, tokenizer: Any) -> None:
    from grammars import CompilerOptions

    (tmp_path / "x.json").write_text(json.dumps({"schema": {"not": {"type": "string"}}, "tests": []}))
    exact = GrammarCompiler(tokenizer, options=CompilerOptions(json_fallback=False))
    result = score(tmp_path, exact, "llguidance", limit=None, compile_timeout=30)
    assert result.compile_errors == 1 and result.num_passing == 0
