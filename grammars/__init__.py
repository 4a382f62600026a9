"""Constrained decoding: grammar specs, compilers and per-request token masks."""
from grammars.base import (
    CompiledGrammar,
    CompilerOptions,
    Grammar,
    GrammarCompiler,
    allocate_bitmask,
    allowed_token_counts,
    available_backends,
    backend_name,
    bitmask_width,
    fill_bitmasks,
    register_backend,
    take_forced,
)
from grammars.spec import GrammarError, GrammarSpec

__all__ = [
    "CompiledGrammar",
    "CompilerOptions",
    "Grammar",
    "GrammarCompiler",
    "GrammarError",
    "GrammarSpec",
    "allocate_bitmask",
    "allowed_token_counts",
    "available_backends",
    "backend_name",
    "bitmask_width",
    "fill_bitmasks",
    "register_backend",
    "take_forced",
]
