"""deploy/milvus/values-distributed.yaml against the pinned chart's own values.yaml.

tests/deploy/milvus-chart/ holds zilliztech/milvus-helm's charts/milvus
values.yaml and Chart.yaml at tag milvus-5.0.19, unmodified below a header
(sha256 checked). A key our values set that the chart does not have is a
typo Helm would silently ignore, so it fails here.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import yaml

from tests.deploy.common import DEPLOY, ROOT

CHART = Path(__file__).parent / "milvus-chart"
PINNED_CHART = "5.0.19"
# sha256 of the files as the chart repository has them (the lines below our header).
SHA256 = {"values.yaml": ("edfe192f3cfe1eca206d8737ec71af6bd7a9f896a9c2fed6689971478104deea", 3),
          "Chart.yaml": ("79748f45a25a76281cbfe014a00a0bd7790e405b46a2d5663506eb9de6094a15", 2)}
VALUES_FILE = DEPLOY / "milvus" / "values-distributed.yaml"
COORDINATORS = ("rootCoordinator", "queryCoordinator", "dataCoordinator", "indexCoordinator")
# The Milvus processes of a 2.6 cluster: each reads milvus.yaml's MinIO keys.
CLUSTER_COMPONENTS = ("proxy", "mixCoordinator", "queryNode", "dataNode", "streamingNode")


def ours() -> dict:
    return yaml.safe_load(VALUES_FILE.read_text())


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def chart() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def key_paths(tree: dict, prefix: tuple = ()):
    """Every key path of nested mappings; lists and strings are leaves."""
    for key, value in tree.items():
        yield prefix + (key,)
        if isinstance(value, dict) and value:
            yield from key_paths(value, prefix + (key,))


def open_map(node) -> bool:
    """A chart value that is an empty mapping ({}: resources, nodeSelector,
    annotations) is free-form: Kubernetes, not the chart, defines its keys."""
    return node == {}


def test_vendored_chart_files_are_unmodified():
    for name, (digest, header_lines) in SHA256.items():
        lines = (CHART / name).read_text().splitlines(keepends=True)
        assert all(line.startswith("#") for line in lines[:header_lines])
        assert "milvus-5.0.19" in "".join(lines[:header_lines])
        assert hashlib.sha256("".join(lines[header_lines:]).encode()).hexdigest() == digest, name


def test_chart_version_is_pinned_everywhere_it_is_named():
    assert chart()["name"] == "milvus" and chart()["version"] == PINNED_CHART
    text = VALUES_FILE.read_text()
    assert f"--version {PINNED_CHART}" in text and f"version {PINNED_CHART}" in text
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert f"--version {PINNED_CHART}" in docs
    assert not re.search(r"--version (?!%s)\d" % re.escape(PINNED_CHART), text + docs)


def test_every_key_we_set_exists_in_the_pinned_chart():
    theirs = chart_values()
    for path in key_paths(ours()):
        node = theirs
        for key in path:
            if open_map(node):
                break
            assert isinstance(node, dict) and key in node, f"{'.'.join(path)} is not a value of chart {PINNED_CHART}"
            node = node[key]


def test_milvus_image_is_the_charts_app_version():
    image = ours()["image"]["all"]
    assert image["repository"] == "milvusdb/milvus"
    assert image["tag"] == "v" + chart()["appVersion"]


def test_cluster_mode_runs_mix_coordinator_alone():
    values = ours()
    assert values["cluster"]["enabled"] is True
    assert values["mixCoordinator"]["enabled"] is True
    assert values["mixCoordinator"]["activeStandby"]["enabled"] is True
    assert values["mixCoordinator"]["replicas"] >= 2
    for name in COORDINATORS:
        assert values[name]["enabled"] is False, f"{name} would run beside mixCoordinator"
    assert values["indexNode"]["enabled"] is False, "Milvus 2.6 has no index node"
    for component in CLUSTER_COMPONENTS:
        assert values[component]["replicas"] >= 2, component
        assert values[component]["resources"]["limits"]["memory"], component


def test_minio_keys_come_from_a_secret_not_the_defaults():
    values = ours()
    assert "minioadmin" not in yaml.safe_dump(values)
    assert chart_values()["minio"]["accessKey"] == "minioadmin", "what the chart would use"
    secret = values["minio"]["existingSecret"]
    assert secret
    assert values["minio"]["accessKey"] == values["minio"]["secretKey"] == ""
    for component in CLUSTER_COMPONENTS:
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in values[component]["extraEnv"]}
        assert env == {"MINIO_ACCESS_KEY_ID": {"name": secret, "key": "accesskey"},
                       "MINIO_SECRET_ACCESS_KEY": {"name": secret, "key": "secretkey"}}, component


def test_one_write_ahead_log_woodpecker_on_the_object_store():
    values = ours()
    assert values["streaming"]["enabled"] is True
    assert values["streaming"]["woodpecker"] == {"embedded": True, "storage": {"type": "minio"}}
    for queue in ("pulsarv3", "pulsar", "kafka", "woodpecker"):
        assert values[queue]["enabled"] is False, queue
    assert chart_values()["pulsarv3"]["enabled"] is True, "the chart's default, turned off here"


def test_authentication_is_on_and_etcd_tolerates_a_loss():
    values = ours()
    user = yaml.safe_load(values["extraConfigFiles"]["user.yaml"])
    assert user["common"]["security"]["authorizationEnabled"] is True
    assert values["etcd"]["replicaCount"] == 3
    assert values["minio"]["mode"] == "distributed"


def test_docs_compatibility_table_names_what_is_tested_and_declared():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    section = docs.split("### Compatibility", 1)[1].split("\n## ", 1)[0]
    for needle in ("Milvus Lite", "2.3.5", ours()["image"]["all"]["tag"].lstrip("v"), "consistency"):
        assert needle in section, needle
