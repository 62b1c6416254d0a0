"""Reading a daemon's /metrics against kube-proxy's lists and the Grafana dashboard (shared by tests).

`metric_list()` and `bucket_list()` read metrics-v1.34.txt and buckets-v1.34.txt;
`exposed(text)` parses Prometheus' text format (prometheus_client's parser);
`dashboard_problems()` names every dashboard query that would not resolve on it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE.parents[1] / "deploy" / "grafana" / "dataplane.json"
# Labels Prometheus adds to every scraped series, and the one every histogram bucket has.
TARGET_LABELS = frozenset({"job", "instance"})
OUR_PREFIXES = ("kubeproxy", "dataplane", "process", "python", "kubernetes")
_NAME = re.compile(rf"\b((?:{'|'.join(OUR_PREFIXES)})_\w+)(\{{[^}}]*\}})?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"label_values\(\s*([\w:]+)(?:\{[^}]*\})?\s*,\s*(\w+)\s*\)")


def _rows(name: str) -> list[list[str]]:
    return [line.split() for line in (HERE / name).read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def metric_list() -> list[tuple[str, str, frozenset[str]]]:
    """(name, type, label names) of each metric family kube-proxy v1.34's nftables mode registers."""
    return [(name, kind, frozenset() if labels == "-" else frozenset(labels.split(",")))
            for name, kind, labels in _rows("metrics-v1.34.txt")]


def _expand(expression: str) -> tuple[float, ...]:
    bounds: list[float] = []
    for part in expression.split("+"):
        kind, _, args = part.partition("(")
        start, step, count = (float(a) for a in args.rstrip(")").split(","))
        bounds += [start * step ** i if kind == "exponential" else start + step * i for i in range(int(count))]
    return tuple(bounds)


def bucket_list() -> dict[str, tuple[float, ...]]:
    """histogram name -> its upper bounds (without +Inf), as kube-proxy defines them."""
    return {name: _expand(expression) for name, expression in _rows("buckets-v1.34.txt")}


def exposed(text: str) -> dict[str, list[dict[str, str]]]:
    """sample name (with _count, _bucket, ...) -> the label sets it is exposed with."""
    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append(dict(sample.labels))
    return found


def dashboard_queries(dashboard: dict) -> list[str]:
    """Every PromQL query of the dashboard: each panel target's and each template variable's."""
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query":
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def dashboard_problems(dashboard: dict, samples: dict[str, list[dict[str, str]]]) -> list[str]:
    """What would not resolve: a metric not exposed, or a label it does not carry that a query
    matches on, groups by, or asks label_values() for."""
    labels = {name: set().union(*label_sets) | TARGET_LABELS for name, label_sets in samples.items()}
    problems = []
    for query in dashboard_queries(dashboard):
        found = _NAME.findall(query)
        if not found:
            problems.append(f"{query}: names no metric")
        grouping = {label.strip() for group in _GROUPING.findall(query) for label in group.split(",") if label.strip()}
        for name, matchers in found:
            if name not in samples:
                problems.append(f"{query}: {name} is not exposed")
                continue
            wanted = set(_MATCHER.findall(matchers)) | grouping - ({"le"} if name.endswith("_bucket") else set())
            if wanted - labels[name]:
                problems.append(f"{query}: {name} has no label {sorted(wanted - labels[name])}")
        for name, label in _LABEL_VALUES.findall(query):
            if label not in labels.get(name, set()):
                problems.append(f"{query}: label_values of {name} has no label {label!r}")
    return problems


def load_dashboard(path: Path = DASHBOARD) -> dict:
    return json.loads(path.read_text())
