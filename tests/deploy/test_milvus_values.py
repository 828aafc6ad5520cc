"""deploy/milvus/values-distributed.yaml against the pinned chart's own values.yaml.

tests/deploy/milvus-chart/ holds zilliztech/milvus-helm's charts/milvus
values.yaml, Chart.yaml, templates/config.tpl and the five coordinator
Deployment templates at tag milvus-5.0.19, unmodified below a header
(sha256 checked). A key our values set that the
chart does not have is a typo Helm would silently ignore, so it fails here.
Which message queue milvus.yaml names, and which coordinators run, are
decided by the templates' own conditions, read from the vendored files and
evaluated on our values merged over the chart's (`rendered_mq_types`,
`rendered_coordinators`), not by which keys exist.
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
          "Chart.yaml": ("79748f45a25a76281cbfe014a00a0bd7790e405b46a2d5663506eb9de6094a15", 2),
          "config.tpl": ("d040325a75aa24897cb4ca0b6d7a5428a05081860221f8303b392e87ce0d31a9", 3),
          "templates/mixcoord-deployment.yaml": (
              "e4544185f7a198558215b48e9d1d98877d5a041ec22b587150675ddfd1a2c86b", 3),
          "templates/rootcoord-deployment.yaml": (
              "6d76cc870f9564ab028d56ddd49f66ea0baf6faade65d8a6ef3e40b610a98f8b", 3),
          "templates/querycoord-deployment.yaml": (
              "526c6bc18c2648e34fd188489b307f0f2e4506ac0285e6d084b7014df6e4b0ea", 3),
          "templates/datacoord-deployment.yaml": (
              "5c39e9bd57868b20c78b5b8063fc176db4c03aec2123977dfc81972320e0702c", 3),
          "templates/indexcoord-deployment.yaml": (
              "d241de51ba24857f9efad2853dcfb015a8921fde728a5ec8817dd650a7d473a9", 3)}
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
        header = "".join(lines[:header_lines])
        assert header.startswith("{{- /*") if "templates/" in name or name.endswith(".tpl") else \
            all(line.startswith("#") for line in lines[:header_lines])
        assert "milvus-5.0.19" in header
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
    assert image["repository"] == "docker.io/milvusdb/milvus"
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


def merged(base: dict, over: dict) -> dict:
    """`over` on `base`, as Helm merges a values file over the chart's."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(
            base.get(key), dict) else value
    return out


def rendered_mq_types(values: dict) -> list[str]:
    """The `mq: type:` values config.tpl writes into milvus.yaml for
    `values`: each if / else-if chain of the template whose branches guard
    an `mq:` block by a `.Values.X.enabled` condition gives the type of its
    first true branch, as Go templates do; no `mq:` block means Milvus picks
    its own default (in cluster mode Pulsar first, at localhost:6650)."""
    template = (CHART / "config.tpl").read_text()
    # Each chain: `{{- if COND }}` ... `{{- else if COND }}` ... `{{- end }}` at the top level.
    branch = re.compile(r"\{\{-\s*(if|else if)\s+\.Values\.([\w.]+)\s*\}\}\s*\n\s*mq:\s*\n\s*type:\s*(\w+)")
    chains: list[list[tuple[str, str]]] = []
    for kind, condition, mq_type in branch.findall(template):
        if kind == "if":
            chains.append([])
        chains[-1].append((condition, mq_type))
    assert chains, "config.tpl no longer guards mq: blocks as this test reads them"
    types = []
    for chain in chains:
        for condition, mq_type in chain:
            if value(values, condition) is True:
                types.append(mq_type)
                break
    return types


def value(values: dict, path: str):
    node = values
    for key in path.split("."):
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node


def rendered_coordinators(values: dict) -> set[str]:
    """The coordinator Deployments the chart renders for `values`: each
    template is guarded by its first line, `{{- if and .Values.A .Values.B }}`."""
    running = set()
    for template in sorted((CHART / "templates").glob("*coord-deployment.yaml")):
        guard = next(line for line in template.read_text().splitlines() if not line.startswith(
            ("{{- /*", "(commit", "Apache")))
        conditions = re.fullmatch(r"\{\{-\s*if and((?:\s+\.Values\.[\w.]+)+)\s*\}\}", guard)
        assert conditions, f"{template.name} is no longer guarded as this test reads it: {guard}"
        if all(value(values, c.removeprefix(".Values.")) is True for c in conditions.group(1).split()):
            running.add(template.name.removesuffix("-deployment.yaml"))
    return running


def test_the_chart_runs_the_mix_coordinator_alone():
    """By the templates' own guards: mixcoord in cluster mode, and none of the
    four coordinators it replaces beside it."""
    assert rendered_coordinators(merged(chart_values(), ours())) == {"mixcoord"}
    assert rendered_coordinators(merged(chart_values(), {"rootCoordinator": {"enabled": True}})) \
        == {"mixcoord", "rootcoord"}  # what a stray value would add


def test_the_chart_renders_woodpecker_as_the_one_message_queue():
    """Our values set woodpecker.enabled false: no branch of config.tpl's
    chains was true, so milvus.yaml named no message queue, Milvus 2.6 in
    cluster mode fell back to Pulsar (its address defaults to localhost),
    and `helm install --wait` timed out. Woodpecker, embedded in the
    streaming nodes on the object store, is the branch to take."""
    values = merged(chart_values(), ours())
    assert values["cluster"]["enabled"] is True
    assert rendered_mq_types(values) == ["woodpecker"]
    assert rendered_mq_types(chart_values()) == ["pulsar"], "the chart's own default: pulsarv3"
    # The chart starts a separate woodpecker StatefulSet only when woodpecker
    # is enabled and not embedded (_helpers.tpl, milvus.woodpecker.external.enabled).
    assert values["streaming"]["enabled"] is True
    assert values["streaming"]["woodpecker"] == {"embedded": True, "storage": {"type": "minio"}}
    for queue in ("pulsarv3", "pulsar", "kafka", "externalPulsar", "externalKafka"):
        assert values[queue]["enabled"] is False, queue


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


def test_milvus_namespace_policies_admit_only_the_search_pods_and_milvus_itself():
    """Nothing limited who reached Milvus, and the chart's etcd has auth off:
    any pod could read the metadata and the vectors. The example policies
    for the Milvus namespace let the search pods alone reach the proxy, and
    Milvus alone (and their own peers) reach etcd and MinIO. The labels are
    the chart's (milvus.matchLabels, bitnami etcd, the MinIO subchart)."""
    import kubernetes_validate

    policies = {p["metadata"]["name"]: p["spec"] for p in yaml.safe_load_all(
        (DEPLOY / "milvus" / "networkpolicy.yaml").read_text()) if p}
    for name, spec in policies.items():
        kubernetes_validate.validate({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                                      "metadata": {"name": name}, "spec": spec},
                                     kubernetes_validate.latest_version(), strict=True)
    milvus = {"app.kubernetes.io/name": "milvus", "app.kubernetes.io/instance": "milvus"}
    [proxy] = policies["milvus-proxy-from-imagesearch"]["ingress"]
    assert [p["port"] for p in proxy["ports"]] == [19530]
    assert proxy["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "imagesearch"}}, "podSelector": {"matchLabels": {
            "app.kubernetes.io/name": "imagesearch", "app.kubernetes.io/component": "search"}}}]
    for name, own in (("milvus-etcd", {"app.kubernetes.io/name": "etcd",
                                       "app.kubernetes.io/instance": "milvus"}),
                      ("milvus-minio", {"app": "minio", "release": "milvus"})):
        spec = policies[name]
        assert spec["podSelector"]["matchLabels"] == own and spec["policyTypes"] == ["Ingress"]
        peers = [peer for rule in spec["ingress"] for peer in rule["from"]]
        assert peers and all(set(peer) == {"podSelector"} for peer in peers), name  # this namespace
        assert {tuple(sorted(p["podSelector"]["matchLabels"].items())) for p in peers} == {
            tuple(sorted(milvus.items())), tuple(sorted(own.items()))}, name
