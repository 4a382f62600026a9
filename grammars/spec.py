"""Grammar specifications: what a request asks its output to match."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

GrammarKind = Literal["json_schema", "json_object", "regex", "choice", "cfg"]


@dataclass(frozen=True, slots=True)
class GrammarSpec:
    """A hashable description of a constraint; the compile-cache key."""

    kind: GrammarKind
    source: str
