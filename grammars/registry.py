"""Grammar backends by name: the built-in adapters (each imports its library only when used)
and any a program registers; which names a request may use, and whether each is installed."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from grammars.spec import GrammarError

if TYPE_CHECKING:
    from grammars.base import Backend, CompilerOptions

BackendFactory = Callable[[Any, int, "CompilerOptions"], "Backend"]
BACKENDS: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make a backend selectable by name; factory(tokenizer, vocab_size, options) -> Backend."""
    BACKENDS[name] = factory


def available_backends() -> list[str]:
    register_builtin()
    return sorted(BACKENDS)


# Names a request may use for a built-in backend, and the module each needs installed.
_ALIASES = {"outlines": "outlines_core"}
_MODULES = {"llguidance": "llguidance", "outlines_core": "outlines_core", "xgrammar": "xgrammar"}


def backend_name(name: str) -> str:
    """The registered backend a name means ("outlines" is outlines-core); GrammarError when
    it names none, or one whose library is not installed (the extras are optional)."""
    import importlib.util

    register_builtin()
    resolved = _ALIASES.get(name, name)
    if resolved not in BACKENDS:
        raise GrammarError(f"unknown grammar backend {name!r}; expected one of "
                           f"{sorted({*BACKENDS, *_ALIASES} - set(_ALIASES.values()))}")
    module = _MODULES.get(resolved)
    if module is not None and importlib.util.find_spec(module) is None:
        raise GrammarError(f"grammar backend {name!r} is not installed on this server "
                           f"(pip install {module.replace('_', '-')})")
    return resolved


def register_builtin() -> None:
    # Factories import their library lazily: a backend that is not installed only fails when used.
    if "llguidance" in BACKENDS:
        return

    def llguidance_factory(tok: Any, vocab_size: int, opts: CompilerOptions) -> Backend:
        from grammars.llguidance import LLGuidanceBackend
        return LLGuidanceBackend(tok, vocab_size, opts)

    def outlines_factory(tok: Any, vocab_size: int, opts: CompilerOptions) -> Backend:
        from grammars.outlines_core import OutlinesCoreBackend
        return OutlinesCoreBackend(tok, vocab_size, opts)

    def xgrammar_factory(tok: Any, vocab_size: int, opts: CompilerOptions) -> Backend:
        from grammars.xgrammar import XGrammarBackend
        return XGrammarBackend(tok, vocab_size, opts)

    BACKENDS.setdefault("llguidance", llguidance_factory)
    BACKENDS.setdefault("outlines_core", outlines_factory)
    BACKENDS.setdefault("xgrammar", xgrammar_factory)
