"""Deployment files: Dockerfiles, docker-compose.yml, Kubernetes manifests, Milvus values.

Static checks, no Docker daemon, cluster or network: Kubernetes objects
against the schemas kubernetes-validate bundles (strict: unknown fields fail),
docker-compose.yml against the Compose Specification schema vendored in
schemas/, and the rules the deployment relies on (probes, non-root, GPU
requests, headless embedder Service, who may reach the embedder).

The overlays are rendered with `kubectl kustomize`, as they are deployed;
kubectl is part of this project's machines, so its absence fails, not skips.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from embedder_service.config import build_parser as embedder_parser
from search_service.config import build_parser as search_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ["cpu", "gpu"]
DOCKERFILES = sorted((DEPLOY / "docker").glob("*.Dockerfile"))
# The oldest Kubernetes we support (gRPC probes are GA since 1.27) and the newest bundled.
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# compose-spec.json comes from the compose-spec project (Apache-2.0, LICENSE.compose-spec),
# as vendored by check-jsonschema 0.39.0, whose recorded sha256 this is.
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
# Environment variables the deployment sets that the services' flags don't
# define yet: added with metrics and auth (issue 6). Harmless until then.
EMBEDDER_LABELS = {"app.kubernetes.io/name": "imagesearch", "app.kubernetes.io/component": "embedder"}
SEARCH_LABELS = {"app.kubernetes.io/name": "imagesearch", "app.kubernetes.io/component": "search"}


# --- helpers ---------------------------------------------------------------

@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: it renders the kustomize overlays (apt: kubectl)")
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in rendered(overlay) if o["kind"] == kind}


def containers(overlay: str):
    for name, deployment in objects(overlay, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            yield name, pod, container


def env_twins(parser) -> set[str]:
    """The environment variable of every flag, as EnvArgumentParser names it."""
    return {parser.env_prefix + opt.lstrip("-").replace("-", "_").upper()
            for action in parser._actions for opt in action.option_strings
            if opt.startswith("--") and opt != "--help"}


KNOWN_ENV = env_twins(embedder_parser()) | env_twins(search_parser()) | {"SEARCH_MILVUS_TOKEN"}


def service_env_names(names) -> set[str]:
    return {n for n in names if n.startswith(("EMBEDDER_", "SEARCH_"))}


def console_scripts() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    pairs = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per stage; stage 0 holds what comes before the first FROM."""
    result: list[list[tuple[str, str]]] = [[]]
    for word, rest in dockerfile_instructions(path):
        if word == "FROM":
            result.append([])
        result[-1].append((word, rest))
    return result


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


# --- Kubernetes --------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_validates_against_kubernetes_schemas(overlay, version):
    kinds = set()
    for obj in rendered(overlay):
        kubernetes_validate.validate(obj, version, strict=True)
        kinds.add(obj["kind"])
    assert kinds == {"ConfigMap", "Secret", "Service", "Deployment", "HorizontalPodAutoscaler",
                     "PodDisruptionBudget", "NetworkPolicy"}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_base_files_validate_against_kubernetes_schemas(version):
    files = [p for p in sorted((K8S / "base").glob("*.yaml")) if p.name != "kustomization.yaml"]
    assert files
    for path in files:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                kubernetes_validate.validate(obj, version, strict=True)


def test_no_namespace_is_hardcoded():
    """The user picks the namespace (kubectl -n or their own overlay)."""
    for overlay in OVERLAYS:
        assert all("namespace" not in o["metadata"] for o in rendered(overlay))
        assert all(o["kind"] != "Namespace" for o in rendered(overlay))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_probed_limited_and_non_root(overlay):
    seen = set()
    for name, pod, c in containers(overlay):
        seen.add(name)
        where = f"{overlay}/{name}/{c['name']}"
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
        # Readiness: overall health (""); liveness: the "liveness" health service.
        assert c["readinessProbe"]["grpc"]["port"] == port, where
        assert c["readinessProbe"]["grpc"].get("service", "") == "", where
        assert c["livenessProbe"]["grpc"] == {"port": port, "service": "liveness"}, where
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {kind}"
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["runAsUser"] != 0, where
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, where
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, where
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/tmp" in mounts, f"{where}: a read-only root needs a writable /tmp"
        image = c["image"]
        assert re.search(r":[\w][\w.-]*$", image.rsplit("/", 1)[-1]) and not image.endswith(":latest"), image
        # Prometheus annotations name the metrics port the container exposes.
        annotations = objects(overlay, "Deployment")[name]["spec"]["template"]["metadata"]["annotations"]
        metrics = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics)
    assert seen == {"imagesearch-embedder", "imagesearch-search"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_embedder_has_a_startup_probe_for_the_model_load(overlay):
    c = objects(overlay, "Deployment")["imagesearch-embedder"]["spec"]["template"]["spec"]["containers"][0]
    probe = c["startupProbe"]
    assert probe["grpc"]["port"] == 50051
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 300, "model download needs minutes"


def test_gpu_overlay_requests_a_gpu_and_cpu_overlay_does_not():
    gpu = objects("gpu", "Deployment")["imagesearch-embedder"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cuda" in gpu["containers"][0]["image"]
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["tolerations"])
    cpu = objects("cpu", "Deployment")["imagesearch-embedder"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert "cuda" not in cpu["containers"][0]["image"]
    devices = {o: config_map(o, "imagesearch-embedder")["EMBEDDER_DEVICE"] for o in OVERLAYS}
    assert devices == {"cpu": "cpu", "gpu": "cuda"}


def config_map(overlay: str, prefix: str) -> dict[str, str]:
    """A generated ConfigMap's data, found by its name without the hash suffix."""
    [data] = [o["data"] for n, o in objects(overlay, "ConfigMap").items()
              if re.fullmatch(re.escape(prefix) + r"-[a-z0-9]{10}", n)]
    return data


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_search_balances_over_the_headless_embedder_service(overlay):
    services = objects(overlay, "Service")
    embedder = services["imagesearch-embedder"]["spec"]
    assert embedder["clusterIP"] == "None"
    assert embedder["selector"] == EMBEDDER_LABELS
    assert services["imagesearch-search"]["spec"].get("clusterIP") != "None"
    assert services["imagesearch-search"]["spec"]["selector"] == SEARCH_LABELS
    search_env = config_map(overlay, "imagesearch-search")
    assert search_env["SEARCH_EMBEDDER"] == "dns:///imagesearch-embedder:50051"
    assert search_env["SEARCH_MILVUS_URI"].startswith("http://")
    # The Deployments read the generated ConfigMaps (hash-suffixed names).
    for name, _, c in containers(overlay):
        refs = {e["configMapRef"]["name"] for e in c["envFrom"] if "configMapRef" in e}
        assert refs and refs <= set(objects(overlay, "ConfigMap")), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_search_pods_reach_the_embedder_grpc_port(overlay):
    [policy] = objects(overlay, "NetworkPolicy").values()
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == EMBEDDER_LABELS
    assert "Ingress" in spec["policyTypes"]
    grpc_rules = []
    for rule in spec["ingress"]:
        assert rule.get("ports"), "a rule without ports opens every port"
        assert rule.get("from"), "a rule without from admits every source"
        if any(p["port"] in (50051, "grpc") for p in rule["ports"]):
            grpc_rules.append(rule)
            assert rule["from"] == [{"podSelector": {"matchLabels": SEARCH_LABELS}}]
            assert [p["port"] for p in rule["ports"]] == [50051]
    assert len(grpc_rules) == 1
    # The search pods carry the labels the policy admits.
    search_pod = objects(overlay, "Deployment")["imagesearch-search"]["spec"]["template"]
    assert SEARCH_LABELS.items() <= search_pod["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_autoscalers_and_budgets_cover_both_deployments(overlay):
    deployments = objects(overlay, "Deployment")
    for name, d in deployments.items():
        assert "replicas" not in d["spec"], f"{name}: the autoscaler owns the replica count"
    hpas = objects(overlay, "HorizontalPodAutoscaler")
    assert {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()} == set(deployments)
    for h in hpas.values():
        assert 1 <= h["spec"]["minReplicas"] <= h["spec"]["maxReplicas"]
    pdbs = objects(overlay, "PodDisruptionBudget")
    selectors = [p["spec"]["selector"]["matchLabels"] for p in pdbs.values()]
    assert sorted(selectors, key=str) == sorted(
        [d["spec"]["selector"]["matchLabels"] for d in deployments.values()], key=str)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_marked_placeholders(overlay):
    secrets = objects(overlay, "Secret")
    assert set(secrets) == {"imagesearch-secrets", "imagesearch-tls"}
    for secret in secrets.values():
        assert all("PLACEHOLDER" in v.upper() for v in secret["stringData"].values())
    assert set(secrets["imagesearch-secrets"]["stringData"]) == {"SEARCH_MILVUS_TOKEN"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_env_names_are_service_flags(overlay):
    names = set()
    for o in objects(overlay, "ConfigMap").values():
        names |= set(o["data"])
    for o in objects(overlay, "Secret").values():
        names |= set(o.get("stringData", {})) - {"tls.crt", "tls.key"}
    unknown = service_env_names(names) - KNOWN_ENV
    assert not unknown, f"not a flag's environment twin: {sorted(unknown)}"


# --- Dockerfiles -----------------------------------------------------------

def test_the_three_images_exist():
    assert [p.name for p in DOCKERFILES] == [
        "embedder-cpu.Dockerfile", "embedder-cuda.Dockerfile", "search.Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_is_multistage_pinned_non_root_and_healthchecked(path):
    preamble, *built = stages(path)
    args = dict(re.match(r"(\w+)=?(.*)", rest).groups() for word, rest in preamble if word == "ARG")
    assert len(built) >= 2, "multi-stage: a builder and a runtime stage"
    names = set()
    for stage in built:
        words = stage[0][1].split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
        if len(words) == 3 and words[1].upper() == "AS":
            names.add(words[2])
        if image in names:
            continue
        tag = image.rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith(":latest"), f"unpinned base image {image}"
    final = dict(built[-1])  # the last of each instruction wins
    assert any(w == "COPY" and r.startswith("--from=") for w, r in built[-1]), "runtime copies the build"
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0") and user, "runs as a non-root user"
    assert re.search(r"\bimgsearch health\b", final["HEALTHCHECK"])
    entrypoint = json.loads(final["ENTRYPOINT"])
    assert entrypoint[0] in console_scripts() - {"imgsearch"}
    if "CMD" in final:
        assert json.loads(final["CMD"])[0].startswith("-"), "CMD only passes flags"
    for word, rest in dockerfile_instructions(path):
        if word == "RUN" and "pip install" in rest:
            assert "-c constraints.txt" in rest, f"unpinned pip install: {rest}"


def test_each_dockerfile_serves_its_own_service():
    scripts = {p.name: json.loads(dict(stages(p)[-1])["ENTRYPOINT"])[0] for p in DOCKERFILES}
    assert scripts == {"embedder-cpu.Dockerfile": "imgsearch-embedder",
                       "embedder-cuda.Dockerfile": "imgsearch-embedder",
                       "search.Dockerfile": "imgsearch-search"}


def test_dockerignore_sends_only_what_the_images_copy():
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert {".git", ".venv"} <= set(lines)
    assert not any(line.startswith("!") and re.search(r"\.git|\.venv", line) for line in lines)
    assert lines[0] == "*", "an allowlist: deny everything, allow back what the build copies"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for path in DOCKERFILES:
        for word, rest in dockerfile_instructions(path):
            if word == "COPY" and not rest.startswith("--"):
                for source in shlex.split(rest)[:-1]:
                    assert source.rstrip("/") in allowed, f"{path.name} copies {source}, which .dockerignore drops"
                    assert (ROOT / source).exists(), source


# --- docker compose --------------------------------------------------------

def test_compose_schema_is_the_vendored_one():
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == COMPOSE_SCHEMA_SHA256


def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_services_are_healthchecked_and_start_in_order():
    services = compose()["services"]
    assert {"etcd", "minio", "milvus", "embedder", "embedder-cpu", "search"} == set(services)
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        for dep, condition in service.get("depends_on", {}).items():
            assert dep in services, f"{name} -> {dep}"
            assert condition["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(services["milvus"]["depends_on"]) == {"etcd", "minio"}
    assert set(services["search"]["depends_on"]) == {"milvus", "embedder", "embedder-cpu"}
    for ours in ("embedder", "embedder-cpu", "search"):
        assert services[ours]["healthcheck"]["test"][1:3] == ["imgsearch", "health"]


def test_compose_volumes_are_named():
    doc = compose()
    declared = set(doc["volumes"])
    used = set()
    for name, service in doc["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            assert source in declared, f"{name}: {source} is not a named volume"
            used.add(source)
    assert used == declared


def test_compose_images_are_pinned():
    for name, service in compose()["services"].items():
        image = service["image"]
        tag = image.rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith(":latest"), f"{name}: {image}"
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_compose_profiles_pick_one_embedder_behind_one_alias():
    services = compose()["services"]
    embedders = {name: s for name, s in services.items() if "profiles" in s}
    assert {tuple(s["profiles"]) for s in embedders.values()} == {("gpu",), ("cpu",)}
    for name, s in embedders.items():
        assert s["networks"]["default"]["aliases"] == ["embedder"], name
        assert s["volumes"] == ["models:/models"] and s["environment"]["HF_HOME"] == "/models"
        assert s["environment"]["EMBEDDER_METRICS_PORT"] == "9101"
        assert "127.0.0.1:9101:9101" in s["ports"]
        # Optional dependencies: only the active profile's embedder exists.
        assert services["search"]["depends_on"][name]["required"] is False
    gpu = next(s for s in embedders.values() if s["profiles"] == ["gpu"])
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["EMBEDDER_DEVICE"] == "cuda"
    assert "cuda" in gpu["build"]["dockerfile"]
    # GPU is the default: .env sets COMPOSE_PROFILES, which --profile replaces.
    dotenv = dict(line.split("=", 1) for line in (ROOT / ".env").read_text().splitlines()
                  if line and not line.startswith("#"))
    assert dotenv == {"COMPOSE_PROFILES": "gpu"}
    for name in ("etcd", "minio", "milvus", "search"):
        assert "profiles" not in services[name], f"{name} runs in every profile"


def test_compose_search_talks_to_the_embedder_alias_and_milvus():
    env = compose()["services"]["search"]["environment"]
    assert env["SEARCH_EMBEDDER"] == "embedder:50051"
    assert env["SEARCH_MILVUS_URI"] == "http://milvus:19530"
    assert env["SEARCH_DATA_DIR"] == "/data"
    assert env["SEARCH_METRICS_PORT"] == "9102"
    assert "127.0.0.1:9102:9102" in compose()["services"]["search"]["ports"]


def test_compose_env_names_are_service_flags():
    names = set()
    for service in compose()["services"].values():
        names |= set(service.get("environment", {}))
    unknown = service_env_names(names) - KNOWN_ENV
    assert not unknown, f"not a flag's environment twin: {sorted(unknown)}"


# --- Milvus cluster values -------------------------------------------------

def test_milvus_values_run_cluster_mode_on_the_tested_server_version():
    values = yaml.safe_load((DEPLOY / "milvus" / "values-distributed.yaml").read_text())
    assert values["cluster"]["enabled"] is True
    assert values["etcd"]["replicaCount"] == 3
    assert values["minio"]["mode"] == "distributed"
    assert values["pulsar"]["enabled"] is True
    for component in ("proxy", "queryNode", "dataNode", "indexNode"):
        assert values[component]["replicas"] >= 1
        assert values[component]["resources"]["limits"]["memory"]
    compose_milvus = compose()["services"]["milvus"]["image"]
    assert compose_milvus == f"{values['image']['all']['repository']}:{values['image']['all']['tag']}"
