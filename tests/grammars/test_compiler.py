"""GrammarCompiler: the LRU cache, shared in-flight compiles, the pool and its timeout."""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any

import pytest

from grammars import CompilerOptions, GrammarCompiler, GrammarError, GrammarSpec, register_backend
from grammars.spec import GrammarSpec as _Spec


@dataclass
class _FakeCompiled:
    spec: _Spec
    backend: str = "fake"
    vocab_size: int = 0
    notes: tuple[str, ...] = ()

    def matcher(self) -> Any:
        raise NotImplementedError


class _FakeBackend:
    """Compiles instantly, or blocks on `gate` for specs whose source says "slow"."""

    name = "fake"
    gate = threading.Event()
    calls: list[GrammarSpec] = []

    def __init__(self, tokenizer: Any, vocab_size: int, options: CompilerOptions) -> None:
        pass

    def compile(self, spec: GrammarSpec) -> _FakeCompiled:
        type(self).calls.append(spec)
        if "slow" in spec.source:
            assert type(self).gate.wait(timeout=30)
        if "boom" in spec.source:
            raise RuntimeError("library exploded")
        return _FakeCompiled(spec)


register_backend("fake", _FakeBackend)


@pytest.fixture()
def fake(tokenizer: Any) -> Any:
    _FakeBackend.calls.clear()
    _FakeBackend.gate.clear()
    c = GrammarCompiler(tokenizer, backend="fake", max_cached=2)
    yield c
    _FakeBackend.gate.set()
    c.close()


def _regex(text: str) -> GrammarSpec:
    return GrammarSpec("regex", text)


def test_cache_hit_returns_the_same_compiled_grammar(fake: GrammarCompiler) -> None:
    a = fake.compile(_regex("abc"))
    assert fake.compile(_regex("abc")) is a
    assert len(_FakeBackend.calls) == 1


def test_lru_evicts_least_recently_used(fake: GrammarCompiler) -> None:
    a, b = fake.compile(_regex("a")), fake.compile(_regex("b"))
    fake.compile(_regex("a"))            # a is now the most recent
    fake.compile(_regex("c"))            # evicts b
    assert fake.cache_size() == 2
    assert fake.compile(_regex("a")) is a
    assert fake.compile(_regex("b")) is not b
    assert [s.source for s in _FakeBackend.calls] == ["a", "b", "c", "b"]


def test_cache_key_includes_backend_and_options(tokenizer: Any) -> None:
    c1 = GrammarCompiler(tokenizer, backend="fake")
    c2 = GrammarCompiler(tokenizer, backend="fake", options=CompilerOptions(max_whitespace=0))
    spec = _regex("x")
    assert c1.compile(spec) is c1.compile(spec, backend="fake")
    assert c1.compile(spec) is not c2.compile(spec)


def test_errors_are_grammar_errors_and_cached(fake: GrammarCompiler) -> None:
    with pytest.raises(GrammarError, match="invalid regex"):
        fake.compile(_regex("(unclosed"))          # spec.validate() runs before the backend
    with pytest.raises(GrammarError, match="fake failed to compile the regex grammar: library exploded"):
        fake.compile(_regex("boom"))
    with pytest.raises(GrammarError):
        fake.compile(_regex("boom"))
    assert [s.source for s in _FakeBackend.calls] == ["boom"]


def test_unknown_backend(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="unknown grammar backend"):
        GrammarCompiler(tokenizer, backend="nope")
    c = GrammarCompiler(tokenizer, backend="fake")
    with pytest.raises(GrammarError, match="unknown grammar backend"):
        c.compile(_regex("a"), backend="nope")


def test_compile_async_times_out_and_the_loop_carries_on(fake: GrammarCompiler) -> None:
    async def scenario() -> None:
        with pytest.raises(GrammarError, match="timed out after 0.05s"):
            await fake.compile_async(_regex("slow"), timeout=0.05)
        # Other requests still compile while the slow one occupies a worker.
        ok = await fake.compile_async(_regex("fast"), timeout=10)
        assert ok.spec == _regex("fast")
        # The slow compile finishes in the background and lands in the cache.
        _FakeBackend.gate.set()
        slow = await fake.compile_async(_regex("slow"), timeout=10)
        assert slow.spec == _regex("slow")

    asyncio.run(scenario())
    assert [s.source for s in _FakeBackend.calls].count("slow") == 1


def test_concurrent_requests_share_one_compile(fake: GrammarCompiler) -> None:
    f1 = fake.compile_future(_regex("slow-shared"))
    f2 = fake.compile_future(_regex("slow-shared"))
    assert f1 is f2
    _FakeBackend.gate.set()
    assert f1.result(timeout=10).spec.source == "slow-shared"
    assert len(_FakeBackend.calls) == 1


def test_compile_time_is_recorded(fake: GrammarCompiler) -> None:
    assert fake.compile_time(_regex("t")) is None
    fake.compile(_regex("t"))
    seconds = fake.compile_time(_regex("t"))
    assert seconds is not None and seconds >= 0


def test_a_spec_may_name_its_backend(tokenizer):
    """`GrammarSpec.backend` (a request's plumbline.grammar_backend) picks the library over the
    compiler's default, and is part of the cache key."""
    from grammars import GrammarCompiler, GrammarSpec, register_backend
    from grammars.llguidance import LLGuidanceBackend

    seen = []

    class Recording(LLGuidanceBackend):
        def compile(self, spec):
            seen.append(spec)
            return super().compile(spec)

    register_backend("test_recording", lambda tok, n, opts: Recording(tok, n, opts))
    compiler = GrammarCompiler(tokenizer, backend="llguidance")
    try:
        plain = GrammarSpec("regex", "a+")
        named = GrammarSpec("regex", "a+", backend="test_recording")
        compiler.compile(plain)
        assert seen == []
        compiler.compile(named)
        assert seen == [named]
        compiler.compile(named)                       # cached under its own key
        assert seen == [named] and compiler.cache_size() == 2
    finally:
        compiler.close()
