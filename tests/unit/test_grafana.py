"""The Grafana dashboard and the Prometheus scrape config in configs/ match the metrics
voltage_ray defines: every charted `ray_voltage_*` series exists with the right suffix and
labels, every defined metric is charted, panels do not overlap, and Prometheus scrapes the port
`voltage-ray serve` exports on."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from voltage_ray.cli import DEFAULT_METRICS_PORT

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "configs" / "grafana" / "voltage_ray.json"
PROMETHEUS = REPO / "configs" / "prometheus.yml"
SUFFIXES = {"Counter": ("_total",), "Histogram": ("_bucket", "_sum", "_count"), "Gauge": ("",)}
SERIES = re.compile(r"\bray_[a-z_]+")
# A series with its optional label selector: ray_x{a="b", c=~"d"}
SELECTOR = re.compile(r"\b(ray_voltage_[a-z_]+)(?:\{([^}]*)\})?")
CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@dataclass(frozen=True)
class Metric:
    name: str  # as defined: voltage_requests
    kind: str  # Counter, Histogram or Gauge
    tags: frozenset[str]

    def series(self) -> set[str]:
        """The names Prometheus scrapes (Ray prefixes ``ray_``)."""
        return {f"ray_{self.name}{suffix}" for suffix in SUFFIXES[self.kind]}


@cache
def defined_metrics() -> dict[str, Metric]:
    """Every ``metrics.Counter/Histogram/Gauge("voltage_...", tag_keys=...)`` in voltage_ray."""
    found: dict[str, Metric] = {}
    for path in (REPO / "voltage_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in SUFFIXES or not node.args:
                continue
            first = node.args[0]
            name = str(first.value) if isinstance(first, ast.Constant) else ""
            if not name.startswith("voltage_"):
                continue
            tags: set[str] = set()
            for kw in node.keywords:
                if kw.arg == "tag_keys":
                    tags = set(_strings(kw.value))
            found[name] = Metric(name, node.func.attr, frozenset(tags))
    return found


def _strings(node: ast.expr) -> list[str]:
    """String constants of a tuple literal, or of a module-level tuple it names."""
    if isinstance(node, ast.Tuple | ast.List):
        return [str(e.value) for e in node.elts if isinstance(e, ast.Constant)]
    if isinstance(node, ast.Name):
        import voltage_ray.metrics as module

        return list(getattr(module, node.id))
    raise AssertionError(f"tag_keys is not a literal: {ast.dump(node)}")


def series_index() -> dict[str, Metric]:
    return {series: m for m in defined_metrics().values() for series in m.series()}


def problems(expr: str) -> list[str]:
    """What is wrong with one PromQL expression's voltage series and labels."""
    index = series_index()
    found: list[str] = []
    used = {m.group(1): m.group(2) or "" for m in SELECTOR.finditer(expr)}
    for series, selector in used.items():
        metric = index.get(series)
        if metric is None:
            found.append(f"{series} is not a metric voltage_ray defines (name or suffix)")
            continue
        allowed = metric.tags | ({"le"} if series.endswith("_bucket") else set())
        labels = {part.split("=")[0].strip(" !~") for part in selector.split(",") if part}
        found += [f"{series} has no label {label!r}" for label in labels - allowed]
    voltage = [index[s] for s in used if s in index]
    for clause in CLAUSE.findall(expr):
        for label in filter(None, (part.strip() for part in clause.split(","))):
            if label == "le" and any(m.kind == "Histogram" for m in voltage):
                continue
            if voltage and not any(label in m.tags for m in voltage):
                found.append(f"{label!r} in by (...) is a label of none of {sorted(used)}")
    return found


@cache
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_the_metric_names_come_from_the_source() -> None:
    metrics = defined_metrics()
    assert metrics["voltage_requests"] == Metric(
        "voltage_requests", "Counter", frozenset({"endpoint", "model", "status", "plan"})
    )
    assert metrics["voltage_batch_size"].kind == "Histogram"
    assert metrics["voltage_chat_running_rows"] == Metric(
        "voltage_chat_running_rows", "Gauge", frozenset({"model"})
    )


def test_every_panel_is_a_titled_prometheus_query() -> None:
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
    assert [v["name"] for v in dashboard()["templating"]["list"]] == ["datasource", "model"]


def test_every_charted_voltage_series_exists_with_its_labels() -> None:
    for expr in exprs():
        assert problems(expr) == [], expr
    others = {s for expr in exprs() for s in SERIES.findall(expr)} - set(series_index())
    assert others == {"ray_serve_deployment_replica_healthy"}  # Serve's own gauge


def test_every_voltage_metric_is_charted() -> None:
    charted = {m.group(1) for expr in exprs() for m in SELECTOR.finditer(expr)}
    index = series_index()
    assert {index[s].name for s in charted} == set(defined_metrics())


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("rate(ray_voltage_request_total[5m])", "ray_voltage_request_total is not a metric"),
        ("rate(ray_voltage_images[5m])", "ray_voltage_images is not a metric"),  # no _total
        ("ray_voltage_batch_size_total", "ray_voltage_batch_size_total is not a metric"),
        ('ray_voltage_failovers_total{plan="pro"}', "has no label 'plan'"),
        ("sum by (endpoint) (ray_voltage_completion_tokens_total)", "'endpoint' in by (...)"),
    ],
)
def test_the_checker_catches_a_wrong_series_or_label(expr: str, problem: str) -> None:
    assert any(problem in p for p in problems(expr)), problems(expr)


def test_panels_do_not_overlap() -> None:
    boxes = [p["gridPos"] for p in dashboard()["panels"]]
    for box in boxes:
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24 and box["h"] > 0
    cells = [
        (x, y)
        for box in boxes
        for x in range(box["x"], box["x"] + box["w"])
        for y in range(box["y"], box["y"] + box["h"])
    ]
    assert len(cells) == len(set(cells))


def test_prometheus_scrapes_the_port_voltage_ray_serve_exports_on() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = [
        t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]
    ]
    assert f"localhost:{DEFAULT_METRICS_PORT}" in targets
    assert config["global"]["scrape_interval"] == "5s"
