"""Every replica's Prometheus metrics in one scrape, each sample labelled with its replica.

Each replica keeps its own registry (gateway/metrics.py); the ingress asks each one and
merges the texts by metric family, so `/metrics` on the ingress reads like one process with a
`replica` label. Ray Serve's own metrics (`ray_serve_*`: queue lengths, replica health,
request latencies per deployment) are exported by Ray on each node's metrics port.
"""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def merge_metrics(texts: dict[str, str]) -> str:
    """replica id -> exposition text, to one exposition text with `replica="<id>"` added."""
    helps: dict[str, tuple[str, str]] = {}
    samples: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            helps.setdefault(family.name, (family.documentation, family.type))
            rows = samples.setdefault(family.name, [])
            for s in family.samples:
                labels = {**s.labels, "replica": replica}
                body = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                rows.append(f"{s.name}{{{body}}} {_number(s.value)}")
    out = []
    for name, (doc, kind) in helps.items():
        out += [f"# HELP {name} {_escape_help(doc)}", f"# TYPE {name} {kind}", *samples[name]]
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if value != value:
        return "NaN"
    return {float("inf"): "+Inf", float("-inf"): "-Inf"}.get(value, repr(float(value)))
