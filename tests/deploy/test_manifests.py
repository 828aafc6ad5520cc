"""Kubernetes manifests: the overlays as `kubectl kustomize` renders them.

Core kinds are validated against the schemas kubernetes-validate bundles
(strict: unknown fields fail) for the oldest Kubernetes we support and the
newest it knows. kubernetes-validate has no schemas for custom resources
(KEDA's ScaledObject, cert-manager's Certificate and Issuer, the Prometheus
Operator's PodMonitor and PrometheusRule, an ExternalSecret), so those are
checked structurally here: the fields we use, and that what they name exists.
Then the rules the deployment relies on: probes on the plaintext health
port, TLS wiring, model delivery, scaling on the metrics the embedder really
exports, network policies, topology spread, no Secrets in the manifests,
images that fail closed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from tests.deploy.common import (EMBEDDER_LABELS, HEALTH_PORT, K8S, KNOWN_ENV, OVERLAYS, ROOT,
                                 SEARCH_LABELS, compose, config_map, exported_series,
                                 EXTERNAL_SERIES, main_container, objects, pod_spec,
                                 promql_series, render, rendered, service_env_names)

# The oldest Kubernetes we support (gRPC probes are GA since 1.27) and the newest bundled.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# Custom resources: kind -> the apiVersion we write (its CRD ships with the operator).
CUSTOM = {"ScaledObject": "keda.sh/v1alpha1", "Certificate": "cert-manager.io/v1",
          "Issuer": "cert-manager.io/v1", "PodMonitor": "monitoring.coreos.com/v1",
          "PrometheusRule": "monitoring.coreos.com/v1", "ExternalSecret": "external-secrets.io/v1"}
CORE_KINDS = {"ConfigMap", "Service", "Deployment", "HorizontalPodAutoscaler",
              "PodDisruptionBudget", "NetworkPolicy", "PersistentVolumeClaim"}
EXPECTED_KINDS = {"cpu": CORE_KINDS | {"ScaledObject"}, "gpu": CORE_KINDS | {"ScaledObject"},
                  "tls": CORE_KINDS | {"ScaledObject", "Certificate", "Issuer"}}
DEPLOYMENTS = {"imagesearch-embedder": ("embedder", 50051), "imagesearch-search": ("search", 50052)}


def validate(obj: dict, version: str) -> None:
    if obj["kind"] in CUSTOM:
        assert obj["apiVersion"] == CUSTOM[obj["kind"]], obj["metadata"]["name"]
        check_custom_resource(obj, version)
    else:
        kubernetes_validate.validate(obj, version, strict=True)


# --- custom resources, structurally ---------------------------------------

SCALED_OBJECT_SPEC = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval",
                      "cooldownPeriod", "initialCooldownPeriod", "idleReplicaCount", "advanced",
                      "triggers", "fallback"}
PROMETHEUS_TRIGGER = {"serverAddress", "query", "threshold", "activationThreshold",
                      "ignoreNullValues", "namespace", "unsafeSsl"}
CERTIFICATE_SPEC = {"secretName", "commonName", "dnsNames", "ipAddresses", "uris", "duration",
                    "renewBefore", "isCA", "usages", "privateKey", "issuerRef", "subject",
                    "secretTemplate"}
KEY_USAGES = {"signing", "digital signature", "content commitment", "key encipherment",
              "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
              "decipher only", "any", "server auth", "client auth", "code signing",
              "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
              "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"}


def check_custom_resource(obj: dict, version: str) -> None:
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    assert set(obj) <= {"apiVersion", "kind", "metadata", "spec"}, name
    spec = obj["spec"]
    if obj["kind"] == "ScaledObject":
        assert set(spec) <= SCALED_OBJECT_SPEC, set(spec) - SCALED_OBJECT_SPEC
        assert set(spec["scaleTargetRef"]) <= {"name", "kind", "apiVersion", "envSourceContainerName"}
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            assert set(trigger) <= {"type", "name", "metadata", "metricType", "useCachedMetrics",
                                    "authenticationRef"}
            assert trigger.get("metricType", "AverageValue") in ("AverageValue", "Value")
            meta = trigger["metadata"]
            assert set(meta) <= PROMETHEUS_TRIGGER and {"serverAddress", "query", "threshold"} <= set(meta)
            assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"
            float(meta["threshold"])
            assert urlparse(meta["serverAddress"]).scheme in ("http", "https")
        # The HPA behaviour KEDA passes through, checked by the real HPA schema.
        behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior:
            kubernetes_validate.validate({
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": name},
                "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                         "maxReplicas": 1, "behavior": behavior}}, version, strict=True)
    elif obj["kind"] == "Certificate":
        assert set(spec) <= CERTIFICATE_SPEC, set(spec) - CERTIFICATE_SPEC
        assert spec["secretName"] and spec["issuerRef"]["name"]
        assert spec["issuerRef"].get("kind", "Issuer") in ("Issuer", "ClusterIssuer")
        assert set(spec.get("usages", [])) <= KEY_USAGES, spec.get("usages")
        for field in ("duration", "renewBefore"):
            if field in spec:
                assert re.fullmatch(r"(\d+(h|m|s))+", spec[field]), spec[field]
        assert spec.get("dnsNames") or spec.get("commonName"), name
        assert spec.get("privateKey", {}).get("algorithm", "RSA") in ("RSA", "ECDSA", "Ed25519")
    elif obj["kind"] == "Issuer":
        kinds = set(spec) & {"selfSigned", "ca", "acme", "vault", "venafi"}
        assert len(kinds) == 1 and set(spec) == kinds, spec
        if "ca" in spec:
            assert spec["ca"]["secretName"]
    elif obj["kind"] == "PodMonitor":
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme",
                                     "relabelings", "metricRelabelings", "honorLabels"}
    elif obj["kind"] == "PrometheusRule":
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "record", "expr", "for", "labels", "annotations"}
                assert rule["expr"].strip()
                if "alert" in rule:
                    assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
                    assert rule["labels"]["severity"] in ("info", "warning", "critical")
    elif obj["kind"] == "ExternalSecret":
        assert spec["secretStoreRef"]["name"] and spec["target"]["name"]
        for item in spec["data"]:
            assert item["secretKey"] and item["remoteRef"]["key"]


# --- rendering and validation ----------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates_against_kubernetes_schemas(overlay, version):
    kinds = set()
    for obj in rendered(overlay):
        validate(obj, version)
        kinds.add(obj["kind"])
    assert kinds == EXPECTED_KINDS[overlay]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_base_and_component_files_validate(version):
    files = [p for p in sorted(K8S.glob("*/*.yaml")) + sorted(K8S.glob("*/*/*.yaml"))
             if p.name != "kustomization.yaml" and "overlays" not in p.parts]
    assert len(files) >= 8
    for path in files:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and "patch" not in path.name and path.name != "mount-certificates.yaml":
                validate(obj, version)


def test_no_namespace_is_hardcoded():
    """The user picks the namespace (kubectl -n or their own overlay)."""
    for path in [f"overlays/{o}" for o in OVERLAYS] + ["monitoring"]:
        assert all("namespace" not in o["metadata"] for o in render(path)), path
        assert all(o["kind"] != "Namespace" for o in render(path)), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_objects_in_the_manifests(overlay):
    """An `apply -k` must never write placeholders over real Secrets: they are
    created out of band (or by an ExternalSecret), and only referenced here."""
    assert not objects(overlay, "Secret")
    c = main_container(overlay, "imagesearch-search")
    [ref] = [e["secretRef"] for e in c["envFrom"] if "secretRef" in e]
    assert ref == {"name": "imagesearch-secrets", "optional": True}


def test_external_secret_example_fills_the_secret_the_pods_read():
    [obj] = yaml.safe_load_all((K8S / "examples" / "externalsecret.yaml").read_text())
    validate(obj, K8S_VERSIONS[-1])
    assert obj["spec"]["target"]["name"] == "imagesearch-secrets"
    assert {d["secretKey"] for d in obj["spec"]["data"]} <= KNOWN_ENV


# --- probes and ports --------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_probe_uses_the_plaintext_health_port_which_no_service_exposes(overlay):
    for name, (prefix, grpc_port) in DEPLOYMENTS.items():
        c = main_container(overlay, name)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == {"grpc": grpc_port, "health": HEALTH_PORT, "metrics": ports["metrics"]}
        env = config_map(overlay, name)
        key = "EMBEDDER" if prefix == "embedder" else "SEARCH"
        assert env[f"{key}_HEALTH_PORT"] == str(HEALTH_PORT)
        assert env[f"{key}_PORT"] == str(grpc_port)
        # Readiness and start-up: overall health (""); liveness: the "liveness" service.
        assert c["readinessProbe"]["grpc"] == {"port": HEALTH_PORT}, name
        assert c["startupProbe"]["grpc"] == {"port": HEALTH_PORT}, name
        assert c["livenessProbe"]["grpc"] == {"port": HEALTH_PORT, "service": "liveness"}, name
    for service in objects(overlay, "Service").values():
        exposed = {p["port"] for p in service["spec"]["ports"]} | {
            p["targetPort"] for p in service["spec"]["ports"]}
        assert not exposed & {HEALTH_PORT, "health"}, service["metadata"]["name"]


def test_embedder_start_up_allows_for_loading_the_model():
    for overlay in OVERLAYS:
        probe = main_container(overlay, "imagesearch-embedder")["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] >= 300


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_limited_non_root_and_read_only(overlay):
    for name in DEPLOYMENTS:
        pod = pod_spec(overlay, name)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"] + pod.get("initContainers", []):
            where = f"{overlay}/{name}/{c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {kind}"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], where
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, where
        annotations = objects(overlay, "Deployment")[name]["spec"]["template"]["metadata"]["annotations"]
        metrics = next(p["containerPort"] for p in pod["containers"][0]["ports"] if p["name"] == "metrics")
        assert annotations["prometheus.io/port"] == str(metrics)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_fail_closed_until_a_registry_is_set(overlay):
    """Bare names would resolve to Docker Hub; REGISTRY.invalid never resolves."""
    for name in DEPLOYMENTS:
        pod = pod_spec(overlay, name)
        for c in pod["containers"] + pod.get("initContainers", []):
            image = c["image"]
            assert image.startswith("REGISTRY.invalid/imagesearch/"), image
            assert re.search(r":\d+\.\d+\.\d+$", image), image
    assert ("cuda" in main_container(overlay, "imagesearch-embedder")["image"]) == (overlay == "gpu")


def test_gpu_overlay_requests_a_gpu_and_the_others_do_not():
    gpu = pod_spec("gpu", "imagesearch-embedder")
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    for overlay in ("cpu", "tls"):
        assert "nvidia.com/gpu" not in main_container(overlay, "imagesearch-embedder")["resources"]["limits"]
    devices = {o: config_map(o, "imagesearch-embedder")["EMBEDDER_DEVICE"] for o in OVERLAYS}
    assert devices == {"cpu": "cpu", "gpu": "cuda", "tls": "cpu"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_env_names_are_service_flags(overlay):
    names = set()
    for o in objects(overlay, "ConfigMap").values():
        names |= set(o["data"])
    for name in DEPLOYMENTS:
        pod = pod_spec(overlay, name)
        for c in pod["containers"] + pod.get("initContainers", []):
            names |= {e["name"] for e in c.get("env", [])}
    unknown = service_env_names(names) - KNOWN_ENV
    assert not unknown, f"not a flag's environment twin: {sorted(unknown)}"


# --- TLS ---------------------------------------------------------------------

TLS_ENV = {
    "imagesearch-embedder": {"EMBEDDER_TLS_CERT": "tls.crt", "EMBEDDER_TLS_KEY": "tls.key",
                             "EMBEDDER_TLS_CLIENT_CA": "ca.crt"},
    "imagesearch-search": {"SEARCH_TLS_CERT": "tls.crt", "SEARCH_TLS_KEY": "tls.key",
                           "SEARCH_EMBEDDER_TLS_CA": "ca.crt", "SEARCH_EMBEDDER_TLS_CERT": "tls.crt",
                           "SEARCH_EMBEDDER_TLS_KEY": "tls.key"},
}


def test_tls_overlay_serves_tls_only_on_grpc_while_probes_stay_plaintext():
    certificates = objects("tls", "Certificate")
    by_secret = {c["spec"]["secretName"]: c for c in certificates.values()}
    issuers = objects("tls", "Issuer")
    for cert in certificates.values():
        assert cert["spec"]["issuerRef"]["name"] in issuers
    for issuer in issuers.values():
        if "ca" in issuer["spec"]:
            assert by_secret[issuer["spec"]["ca"]["secretName"]]["spec"]["isCA"] is True
    for name, wanted in TLS_ENV.items():
        env = config_map("tls", name)
        c = main_container("tls", name)
        [mount] = [m for m in c["volumeMounts"] if m["name"] == "tls"]
        assert mount["readOnly"] is True
        [volume] = [v for v in pod_spec("tls", name)["volumes"] if v["name"] == "tls"]
        assert "optional" not in volume["secret"], "a pod without its certificate must not start"
        cert = by_secret[volume["secret"]["secretName"]]
        assert cert["spec"]["isCA"] is not True if "isCA" in cert["spec"] else True
        for key, file in wanted.items():
            assert env[key] == f"{mount['mountPath']}/{file}", key
        # The gRPC port is TLS-only now; the probes still reach the plaintext port.
        assert c["readinessProbe"]["grpc"]["port"] == HEALTH_PORT != next(
            p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    # The search service verifies the embedder by the host name it dials.
    target = config_map("tls", "imagesearch-search")["SEARCH_EMBEDDER"]
    host = re.fullmatch(r"dns:///([^:]+):\d+", target).group(1)
    embedder_secret = next(v["secret"]["secretName"] for v in pod_spec("tls", "imagesearch-embedder")["volumes"]
                           if v["name"] == "tls")
    assert host in by_secret[embedder_secret]["spec"]["dnsNames"]
    assert "server auth" in by_secret[embedder_secret]["spec"]["usages"]
    # Mutual TLS: the embedder demands a client certificate, the search pods present one.
    search_secret = next(v["secret"]["secretName"] for v in pod_spec("tls", "imagesearch-search")["volumes"]
                         if v["name"] == "tls")
    assert {"server auth", "client auth"} <= set(by_secret[search_secret]["spec"]["usages"])
    assert "imagesearch-search" in by_secret[search_secret]["spec"]["dnsNames"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_plain_overlays_have_no_tls(overlay):
    for name in DEPLOYMENTS:
        assert not set(TLS_ENV[name]) & set(config_map(overlay, name))
        assert all(v["name"] != "tls" for v in pod_spec(overlay, name)["volumes"])


# --- model delivery ----------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_comes_from_the_shared_cache_at_a_pinned_revision(overlay):
    pod = pod_spec(overlay, "imagesearch-embedder")
    main = pod["containers"][0]
    [init] = pod["initContainers"]
    assert init["image"] == main["image"], "the fetcher runs the same huggingface_hub"
    env = config_map(overlay, "imagesearch-embedder")
    assert re.fullmatch(r"[0-9a-f]{40}", env["EMBEDDER_MODEL_REVISION"]), "a commit, not a branch"
    assert env["HF_HOME"] == "/models"
    script = " ".join(init["args"])
    assert '--revision "$EMBEDDER_MODEL_REVISION"' in script and "hf download" in script
    assert "touch" in script, "a marker records a complete download"
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in main["env"]
    assert not any(e["name"] == "HF_HUB_OFFLINE" for e in init.get("env", []))
    mounts = {c["name"]: {m["name"]: m for m in c["volumeMounts"]} for c in (main, init)}
    assert mounts[main["name"]]["models"]["mountPath"] == "/models"
    assert mounts[main["name"]]["models"]["readOnly"] is True
    assert not mounts[init["name"]]["models"].get("readOnly", False)
    [volume] = [v for v in pod["volumes"] if v["name"] == "models"]
    pvc = objects(overlay, "PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "pods on several nodes share it"
    # The same weights in compose.
    compose_env = compose()["services"]["embedder"]["environment"]
    assert env["EMBEDDER_MODEL_REVISION"] in compose_env["EMBEDDER_MODEL_REVISION"]


# --- scaling -----------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_embedder_scales_on_queue_metrics_it_exports_search_on_cpu(overlay):
    deployments = objects(overlay, "Deployment")
    for name, d in deployments.items():
        assert "replicas" not in d["spec"], f"{name}: the autoscaler owns the replica count"
    [scaled] = objects(overlay, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"]["name"] == "imagesearch-embedder"
    hpas = objects(overlay, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == {"imagesearch-search"}
    used = set()
    for trigger in scaled["spec"]["triggers"]:
        series = promql_series(trigger["metadata"]["query"])
        assert series and series <= exported_series(), series - exported_series()
        used |= series
        # The namespace the docs deploy to (docs/deploy.md: -n imagesearch).
        assert 'namespace="imagesearch"' in trigger["metadata"]["query"]
    assert {"embedder_queue_items", "embedder_queue_wait_seconds_bucket"} <= used
    expected = (2, 4) if overlay == "gpu" else (2, 6)
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == expected
    pdbs = objects(overlay, "PodDisruptionBudget")
    assert sorted([p["spec"]["selector"]["matchLabels"] for p in pdbs.values()], key=str) == sorted(
        [d["spec"]["selector"]["matchLabels"] for d in deployments.values()], key=str)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_both_deployments_spread_over_zones_and_nodes(overlay):
    for name, d in objects(overlay, "Deployment").items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        constraints = d["spec"]["template"]["spec"]["topologySpreadConstraints"]
        assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone",
                                                          "kubernetes.io/hostname"}
        for c in constraints:
            assert c["labelSelector"]["matchLabels"].items() <= labels.items(), name
            assert c["labelSelector"]["matchLabels"] == d["spec"]["selector"]["matchLabels"]


# --- services and network policies ------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_headless_services_for_client_side_balancing(overlay):
    services = objects(overlay, "Service")
    assert services["imagesearch-embedder"]["spec"]["clusterIP"] == "None"
    assert services["imagesearch-embedder"]["spec"]["selector"] == EMBEDDER_LABELS
    assert services["imagesearch-search"]["spec"].get("clusterIP") != "None"
    assert services["imagesearch-search-headless"]["spec"]["clusterIP"] == "None"
    for name in ("imagesearch-search", "imagesearch-search-headless"):
        assert services[name]["spec"]["selector"] == SEARCH_LABELS
        assert [p["port"] for p in services[name]["spec"]["ports"]] == [50052]
    search_env = config_map(overlay, "imagesearch-search")
    assert search_env["SEARCH_EMBEDDER"] == "dns:///imagesearch-embedder:50051"
    assert search_env["SEARCH_MILVUS_URI"].startswith("http://")
    assert search_env["SEARCH_WORKERS"] == "0"  # one process per CPU of the pod's limit
    for name in DEPLOYMENTS:
        refs = {e["configMapRef"]["name"] for e in main_container(overlay, name)["envFrom"]
                if "configMapRef" in e}
        assert refs and refs <= set(objects(overlay, "ConfigMap")), name


def policy_rules(policy: dict, direction: str):
    peers = "from" if direction == "ingress" else "to"
    for rule in policy["spec"].get(direction, []):
        assert rule.get("ports"), "a rule without ports opens every port"
        assert rule.get(peers), f"a rule without {peers} admits every peer"
        yield rule[peers], {(p.get("protocol", "TCP"), p["port"]) for p in rule["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_search_pods_reach_the_embedder_grpc_port(overlay):
    policy = objects(overlay, "NetworkPolicy")["imagesearch-embedder"]
    assert policy["spec"]["podSelector"]["matchLabels"] == EMBEDDER_LABELS
    grpc = [peers for peers, ports in policy_rules(policy, "ingress") if ("TCP", 50051) in ports]
    assert grpc == [[{"podSelector": {"matchLabels": SEARCH_LABELS}}]]
    opened = set().union(*(ports for _, ports in policy_rules(policy, "ingress")))
    assert opened == {("TCP", 50051), ("TCP", 9101)}
    # Egress was open: now DNS and HTTPS (the hub, for fetch-model) only.
    assert "Egress" in policy["spec"]["policyTypes"]
    out = set().union(*(ports for _, ports in policy_rules(policy, "egress")))
    assert out == {("UDP", 53), ("TCP", 53), ("TCP", 443)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_search_policy_admits_clients_and_reaches_only_its_dependencies(overlay):
    policy = objects(overlay, "NetworkPolicy")["imagesearch-search"]
    assert policy["spec"]["podSelector"]["matchLabels"] == SEARCH_LABELS
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    opened = set().union(*(ports for _, ports in policy_rules(policy, "ingress")))
    assert opened == {("TCP", 50052), ("TCP", 9102)}
    egress = list(policy_rules(policy, "egress"))
    reached = set().union(*(ports for _, ports in egress))
    assert reached == {("TCP", 50051), ("TCP", 19530), ("UDP", 53), ("TCP", 53)}
    [embedder] = [peers for peers, ports in egress if ("TCP", 50051) in ports]
    assert embedder == [{"podSelector": {"matchLabels": EMBEDDER_LABELS}}]
    # Milvus's namespace is the one SEARCH_MILVUS_URI names.
    milvus_host = urlparse(config_map(overlay, "imagesearch-search")["SEARCH_MILVUS_URI"]).hostname
    [milvus] = [peers for peers, ports in egress if ("TCP", 19530) in ports]
    assert milvus == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": milvus_host.split(".")[1]}}}]


# --- monitoring --------------------------------------------------------------

def monitoring(kind: str) -> dict:
    [obj] = [o for o in render("monitoring") if o["kind"] == kind]
    return obj


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_monitoring_renders_and_validates(version):
    assert {o["kind"] for o in render("monitoring")} == {"ConfigMap", "PodMonitor", "PrometheusRule"}
    for obj in render("monitoring"):
        validate(obj, version)


def test_pod_monitor_scrapes_the_metrics_port_of_both_services():
    spec = monitoring("PodMonitor")["spec"]
    for overlay in OVERLAYS:
        for name, d in objects(overlay, "Deployment").items():
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert spec["selector"]["matchLabels"].items() <= labels.items(), name
            ports = {p["name"] for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}
            assert {e["port"] for e in spec["podMetricsEndpoints"]} <= ports


def test_alerts_cover_readiness_errors_a_full_queue_and_milvus_on_real_metrics():
    rules = {r["alert"]: r for g in monitoring("PrometheusRule")["spec"]["groups"] for r in g["rules"]}
    used = set()
    for name, rule in rules.items():
        series = promql_series(rule["expr"])
        unknown = series - exported_series() - EXTERNAL_SERIES
        assert series and not unknown, f"{name} reads {sorted(unknown)}, which nothing exports"
        used |= series
    exprs = " ".join(r["expr"] for r in rules.values())
    assert "kube_pod_status_ready" in exprs                      # readiness
    assert "grpc_server_handled_total" in exprs                  # error ratio
    assert "embedder_queue_items" in exprs                       # a queue that stays full
    assert 'search_dependency_up{dependency="milvus"}' in exprs  # Milvus unavailable
    # The saturation threshold is 80% of the queue bound the manifests set.
    max_queue = config_map("cpu", "imagesearch-embedder")["EMBEDDER_MAX_QUEUE"]
    assert f"0.8 * {max_queue}" in rules["ImagesearchEmbedderQueueSaturated"]["expr"]
    # Each batcher has its own bound: the sums keep them apart.
    assert rules["ImagesearchEmbedderQueueSaturated"]["expr"].count("(namespace, pod, batcher)") == 3


def test_dashboard_charts_only_metrics_that_exist():
    dashboard_map = monitoring("ConfigMap")
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(dashboard_map["data"]["imagesearch.json"])
    assert dashboard == json.loads((K8S / "monitoring" / "dashboard.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    charted = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            series = promql_series(target["expr"])
            assert series and series <= exported_series(), (panel["title"], series - exported_series())
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
            charted |= series
    # Every family the services export is on the dashboard (bar the _created twins).
    families = {re.sub(r"_(bucket|sum|count|total|created|info)$", "", s) for s in exported_series()}
    shown = {re.sub(r"_(bucket|sum|count|total|created|info)$", "", s) for s in charted}
    missing = families - shown
    assert not missing, f"exported but not charted: {sorted(missing)}"


def test_docs_deploy_to_the_namespace_the_scaling_queries_name():
    docs = (ROOT / "docs" / "deploy.md").read_text()
    assert "-n imagesearch" in docs


def test_fetch_model_script_downloads_once_per_revision_and_only_when_complete(tmp_path):
    """The init container's own script, run by sh with a stand-in `hf` on PATH
    that logs its arguments (exit status from $HF_FAILS)."""
    [init] = pod_spec("cpu", "imagesearch-embedder")["initContainers"]
    assert init["command"] == ["sh", "-c"]
    models, bin_dir, log = tmp_path / "models", tmp_path / "bin", tmp_path / "hf.log"
    models.mkdir()
    bin_dir.mkdir()
    (bin_dir / "hf").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit "${{HF_FAILS:-0}}"\n')
    (bin_dir / "hf").chmod(0o755)
    script = init["args"][0].replace("/models/", f"{models}/")

    def run(revision: str, fails: int = 0) -> int:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_FAILS": str(fails),
               "EMBEDDER_MODEL": "openai/clip-vit-base-patch32", "EMBEDDER_MODEL_REVISION": revision}
        return subprocess.run(["sh", "-c", script], env=env, capture_output=True, timeout=30).returncode

    def calls() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    assert run("a" * 40, fails=1) != 0 and len(calls()) == 1   # a failed download...
    assert not list(models.glob(".complete-*"))                  # ...leaves no marker
    assert run("a" * 40) == 0 and len(calls()) == 2
    assert calls()[-1].startswith("download openai/clip-vit-base-patch32 --revision " + "a" * 40)
    assert run("a" * 40) == 0 and len(calls()) == 2             # cached: the hub is not asked
    assert run("b" * 40) == 0 and len(calls()) == 3             # a new revision is fetched


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_rollout_or_a_drain_leaves_a_ready_replica_of_each_service(overlay):
    """The GPU overlay ran one embedder at least, replaced it with
    maxUnavailable 1, and let a drain evict it: search answered UNAVAILABLE
    for a whole model load. Each Deployment now keeps one ready pod through
    a rolling update (its fewest replicas less maxUnavailable) and through a
    drain (its PodDisruptionBudget)."""
    deployments = objects(overlay, "Deployment")
    floors = {spec["scaleTargetRef"]["name"]: spec["minReplicas"]
              for spec in (o["spec"] for o in objects(overlay, "HorizontalPodAutoscaler").values())}
    floors.update({spec["scaleTargetRef"]["name"]: spec["minReplicaCount"]
                   for spec in (o["spec"] for o in objects(overlay, "ScaledObject").values())})
    budgets = list(objects(overlay, "PodDisruptionBudget").values())
    for name, deployment in deployments.items():
        fewest = floors.get(name, deployment["spec"].get("replicas", 1))
        rolling = deployment["spec"]["strategy"]["rollingUpdate"]
        assert fewest - int(rolling["maxUnavailable"]) >= 1, (name, fewest, rolling)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        [budget] = [b["spec"] for b in budgets
                    if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert budget.get("minAvailable", 0) >= 1 or fewest - budget["maxUnavailable"] >= 1, \
            (name, budget)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_broken_scaling_query_fails_loudly_and_scale_up_is_paced(overlay):
    """The queue trigger left ignoreNullValues at KEDA's default (true): a
    query that matched nothing (another namespace, no scrape) read as an
    idle queue, and the embedder stayed at its minimum, saying nothing."""
    [scaled] = objects(overlay, "ScaledObject").values()
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["metadata"]["ignoreNullValues"] == "false", trigger["name"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleUp"]["policies"] and behavior["scaleDown"]["stabilizationWindowSeconds"] > 0


def test_the_model_fetch_downloads_once_when_pods_start_together(tmp_path):
    """The fetch-model init container's own script, run as three pods would
    run it on one shared volume (a directory here): one download, the others
    wait for its marker, a later pod finds it cached; and a lock left by a
    pod that died mid-download 31 minutes ago is ignored. `hf` is a stand-in
    that records its calls: the hub is unreachable from the test machines."""
    [init] = pod_spec("cpu", "imagesearch-embedder")["initContainers"]
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "hf").write_text('#!/bin/sh\necho "$*" >> "$DOWNLOADS"\nsleep 2\n')
    (tools / "hf").chmod(0o755)

    def pods(models, count: int) -> tuple[list[str], list[str]]:
        models.mkdir(exist_ok=True)
        calls = models.parent / f"{models.name}.calls"
        env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "DOWNLOADS": str(calls),
               "EMBEDDER_MODEL": "openai/clip-vit-base-patch32", "EMBEDDER_MODEL_REVISION": "abc123"}
        script = init["args"][0].replace("/models", str(models))
        running = [subprocess.Popen(["sh", "-c", script], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for _ in range(count)]
        logs = [p.communicate(timeout=120)[0] for p in running]
        assert [p.returncode for p in running] == [0] * count, logs
        return logs, calls.read_text().splitlines() if calls.exists() else []

    logs, calls = pods(tmp_path / "fresh", 3)
    assert len(calls) == 1 and "--revision abc123" in calls[0], calls
    assert any("waiting for another pod's download" in log for log in logs), logs
    logs, calls = pods(tmp_path / "fresh", 1)  # a later pod
    assert len(calls) == 1 and "cached: openai/clip-vit-base-patch32@abc123" in logs[0], logs
    stale = tmp_path / "stale" / ".lock-openai_clip-vit-base-patch32_abc123"
    stale.mkdir(parents=True)
    old = time.time() - 31 * 60
    os.utime(stale, (old, old))
    logs, calls = pods(tmp_path / "stale", 1)
    assert len(calls) == 1 and "over 30 minutes old" in logs[0], logs


def test_the_model_claim_names_a_storage_class_that_the_docs_explain():
    """The claim named no class, so it got the cluster's default: ReadWriteOnce
    on EKS, GKE and AKS, and the embedder pods stayed Pending."""
    for overlay in OVERLAYS:
        pvc = objects(overlay, "PersistentVolumeClaim")["imagesearch-models"]
        assert pvc["spec"]["storageClassName"] == "imagesearch-rwx"
    docs = (ROOT / "docs" / "deploy.md").read_text()
    section = docs.split("### Model delivery", 1)[1].split("\n### ", 1)[0]
    for words in ("imagesearch-rwx", "efs.csi.aws.com", "filestore.csi.storage.gke.io",
                  "file.csi.azure.com", "uid"):
        assert words in section, words


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_namespaces_follow_one_setting(overlay, tmp_path):
    """The KEDA queries named namespace="imagesearch" and the Prometheus of
    namespace "monitoring": in any other namespace the autoscaler read an
    empty result as an idle queue. Every string that names a namespace now
    comes from imagesearch-settings: rendered as an operator's overlay
    would set it, none of the old names is left."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(K8S / "overlays" / overlay, tmp_path)],  # kustomize: relative
        "configMapGenerator": [{"name": "imagesearch-settings", "behavior": "merge", "literals": [
            "namespace=search-prod", "prometheus-namespace=observability",
            "milvus-namespace=vectors"]}],
        "components": [os.path.relpath(K8S / "components" / "settings", tmp_path)]}))
    out = subprocess.run(["kubectl", "kustomize", "--load-restrictor", "LoadRestrictionsNone",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    objects_ = [o for o in yaml.safe_load_all(out.stdout) if o]
    assert not any(o["metadata"]["name"] == "imagesearch-settings" for o in objects_)  # local
    [scaled] = [o for o in objects_ if o["kind"] == "ScaledObject"]
    for trigger in scaled["spec"]["triggers"]:
        query = trigger["metadata"]["query"]
        assert 'namespace="search-prod"' in query and '"imagesearch"' not in query, query
        assert ".observability.svc:" in trigger["metadata"]["serverAddress"]
    peers = json.dumps([o["spec"] for o in objects_ if o["kind"] == "NetworkPolicy"])
    assert '"observability"' in peers and '"vectors"' in peers
    assert '"monitoring"' not in peers and '"milvus"' not in peers
    [search_env] = [o["data"] for o in objects_ if o["kind"] == "ConfigMap"
                    and o["metadata"]["name"].startswith("imagesearch-search-")]
    assert ".vectors.svc" in search_env["SEARCH_MILVUS_URI"]
    names = [n for o in objects_ if o["kind"] == "Certificate" for n in o["spec"].get("dnsNames", [])]
    if overlay == "tls":
        assert "imagesearch-search.search-prod.svc.cluster.local" in names
        assert "imagesearch-embedder.search-prod.svc" in names
    assert not [n for n in names if ".imagesearch." in n]
