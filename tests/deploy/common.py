"""What the deployment tests share: paths, rendering, the services' real flags and metrics.

Everything here reads the repository as it is: kustomize renders the
overlays (kubectl is part of this project's machines, so its absence fails,
not skips), the flags come from the services' own parsers, and the metric
names from the Python sources that define them.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from embedder_service.config import build_parser as embedder_parser
from search_service.config import build_parser as search_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
REQUIREMENTS = DEPLOY / "requirements"
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
OVERLAYS = ["cpu", "gpu", "tls"]
HEALTH_PORT = 8081
EMBEDDER_LABELS = {"app.kubernetes.io/name": "imagesearch", "app.kubernetes.io/component": "embedder"}
SEARCH_LABELS = {"app.kubernetes.io/name": "imagesearch", "app.kubernetes.io/component": "search"}


# --- rendering -------------------------------------------------------------

@functools.cache
def render(path: str) -> tuple[dict, ...]:
    """`kubectl kustomize K8S/path`, as it would be applied."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: it renders the kustomize overlays (apt: kubectl)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def rendered(overlay: str) -> tuple[dict, ...]:
    return render(f"overlays/{overlay}")


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in rendered(overlay) if o["kind"] == kind}


def pod_spec(overlay: str, deployment: str) -> dict:
    return objects(overlay, "Deployment")[deployment]["spec"]["template"]["spec"]


def main_container(overlay: str, deployment: str) -> dict:
    [container] = pod_spec(overlay, deployment)["containers"]
    return container


def config_map(overlay: str, prefix: str) -> dict[str, str]:
    """A generated ConfigMap's data, found by its name without the hash suffix."""
    [data] = [o["data"] for n, o in objects(overlay, "ConfigMap").items()
              if re.fullmatch(re.escape(prefix) + r"-[a-z0-9]{10}", n)]
    return data


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- the services' flags ---------------------------------------------------

def env_twins(parser) -> set[str]:
    """The environment variable of every flag, as EnvArgumentParser names it."""
    return {parser.env_prefix + opt.lstrip("-").replace("-", "_").upper()
            for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


# Read from the environment only, by design (never a flag: secrets stay off
# the command line).
ENV_ONLY = {"SEARCH_MILVUS_TOKEN", "SEARCH_AUTH_TOKEN"}
KNOWN_ENV = env_twins(embedder_parser()) | env_twins(search_parser()) | ENV_ONLY


def service_env_names(names) -> set[str]:
    return {n for n in names if n.startswith(("EMBEDDER_", "SEARCH_"))}


def console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


# --- the metrics the code exports ------------------------------------------

_METRIC_DEF = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|Info|CounterMetricFamily|GaugeMetricFamily|"
    r"HistogramMetricFamily)\(\s*\"([a-zA-Z_:][a-zA-Z0-9_:]*)\"")


@functools.cache
def exported_series() -> frozenset[str]:
    """Every series name the services can expose, from their metric definitions:
    a histogram's _bucket/_sum/_count, a counter's _total, an Info's _info."""
    names: set[str] = set()
    for package in ("imagesearch", "embedder_service", "search_service"):
        for path in (ROOT / package).rglob("*.py"):
            for kind, name in _METRIC_DEF.findall(path.read_text()):
                if kind in ("Counter", "CounterMetricFamily"):
                    base = name.removesuffix("_total")
                    names |= {base + "_total", base + "_created"}
                elif kind in ("Histogram", "HistogramMetricFamily", "Summary"):
                    names |= {name + "_bucket", name + "_sum", name + "_count", name + "_created"}
                elif kind == "Info":
                    names.add(name + "_info")
                else:
                    names.add(name)
    return frozenset(names)


# Series from other exporters that the alerts use (kube-state-metrics, Prometheus itself).
EXTERNAL_SERIES = {"kube_pod_status_ready", "kube_deployment_status_replicas_available", "up"}
_PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "rate", "irate", "increase", "by", "without",
                 "on", "ignoring", "group_left", "group_right", "histogram_quantile", "and", "or",
                 "unless", "vector", "clamp_min", "clamp_max", "bool", "offset", "label_values",
                 "abs", "time", "humanizePercentage"}


def promql_series(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (identifiers that are not
    functions, keywords, label names or label values)."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_matchers = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", r"\1", without_matchers)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_groupings)
    names = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", without_ranges))
    return {n for n in names if n not in _PROMQL_WORDS and not re.fullmatch(r"[0-9e]+", n)
            and not n.startswith("__")}
