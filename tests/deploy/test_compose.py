"""docker-compose.yml: the Compose Specification schema (vendored) and the rules the stack relies on."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import jsonschema
import yaml

from tests.deploy.common import DEPLOY, HEALTH_PORT, KNOWN_ENV, ROOT, compose, render, service_env_names

# compose-spec.json comes from the compose-spec project (Apache-2.0, LICENSE.compose-spec),
# as vendored by check-jsonschema 0.39.0, whose recorded sha256 this is.
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
COMPOSE_SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
# What Milvus pairs with its 2.6 server: the etcd and MinIO releases of the
# pinned chart (tests/deploy/milvus-chart/values.yaml: MinIO
# RELEASE.2024-12-18T13-15-44Z, etcd 3.5.25) and of Milvus's 2.6 standalone
# compose file as published copies show it. docs/deploy.md, compatibility.
ETCD = "quay.io/coreos/etcd:v3.5.25"
MINIO = "docker.io/minio/minio:RELEASE.2024-12-18T13-15-44Z"
OURS = ("embedder", "embedder-cpu", "search")


def test_compose_schema_is_the_vendored_one():
    assert hashlib.sha256(COMPOSE_SCHEMA.read_bytes()).hexdigest() == COMPOSE_SCHEMA_SHA256


def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_services_are_healthchecked_and_start_in_order():
    services = compose()["services"]
    assert set(services) == {"etcd", "minio", "milvus", *OURS}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
        for dep, condition in service.get("depends_on", {}).items():
            assert dep in services, f"{name} -> {dep}"
            assert condition["condition"] == "service_healthy", f"{name} -> {dep}"
    assert set(services["milvus"]["depends_on"]) == {"etcd", "minio"}
    assert set(services["search"]["depends_on"]) == {"milvus", "embedder", "embedder-cpu"}


def test_our_health_checks_use_the_plaintext_health_port_which_is_not_published():
    for name in OURS:
        service = compose()["services"][name]
        prefix = "SEARCH" if name == "search" else "EMBEDDER"
        assert service["environment"][f"{prefix}_HEALTH_PORT"] == str(HEALTH_PORT)
        assert service["healthcheck"]["test"] == ["CMD", "imgsearch", "health", f"127.0.0.1:{HEALTH_PORT}"]
        assert not any(str(HEALTH_PORT) in port for port in service["ports"]), name


def test_our_images_are_built_never_pulled():
    """pull_policy: build: `imagesearch/...` must not resolve to Docker Hub."""
    for name in OURS:
        service = compose()["services"][name]
        assert service["pull_policy"] == "build", name
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert "init" not in service, "the image runs tini as PID 1 already"


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


def test_milvus_is_the_declared_release_with_the_etcd_and_minio_it_pairs_with():
    services = compose()["services"]
    values = yaml.safe_load((DEPLOY / "milvus" / "values-distributed.yaml").read_text())
    image = values["image"]["all"]
    assert services["milvus"]["image"] == f"{image['repository']}:{image['tag']}"
    assert services["etcd"]["image"] == ETCD
    assert services["minio"]["image"] == MINIO
    for name, service in services.items():
        tag = service["image"].rsplit("/", 1)[-1]
        assert ":" in tag and not tag.endswith(":latest"), f"{name}: {service['image']}"
    env = services["milvus"]["environment"]
    assert env["MQ_TYPE"] == "woodpecker"
    # Milvus signs in to MinIO with whatever keys MinIO was given.
    minio = services["minio"]["environment"]
    assert env["MINIO_ACCESS_KEY_ID"] == minio["MINIO_ACCESS_KEY"]
    assert env["MINIO_SECRET_ACCESS_KEY"] == minio["MINIO_SECRET_KEY"]
    assert all(re.fullmatch(r"\$\{MINIO_\w+:-\w+\}", v) for v in minio.values()), "overridable"


def test_compose_profiles_pick_one_embedder_behind_one_alias():
    services = compose()["services"]
    embedders = {name: s for name, s in services.items() if "profiles" in s}
    assert {tuple(s["profiles"]) for s in embedders.values()} == {("gpu",), ("cpu",)}
    for name, s in embedders.items():
        assert s["networks"]["default"]["aliases"] == ["embedder"], name
        assert s["volumes"] == ["models:/models"] and s["environment"]["HF_HOME"] == "/models"
        assert re.fullmatch(r"\$\{EMBEDDER_MODEL_REVISION:-[0-9a-f]{40}\}",
                            s["environment"]["EMBEDDER_MODEL_REVISION"]), "weights pinned to a commit"
        assert s["environment"]["EMBEDDER_METRICS_PORT"] == "9101"
        assert "127.0.0.1:9101:9101" in s["ports"]
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


def test_compose_search_talks_to_the_embedder_alias_and_a_milvus_server():
    search = compose()["services"]["search"]
    env = search["environment"]
    assert env["SEARCH_EMBEDDER"] == "embedder:50051"
    assert env["SEARCH_MILVUS_URI"] == "http://milvus:19530", "the image has no Milvus Lite"
    assert env["SEARCH_METRICS_PORT"] == "9102"
    assert "127.0.0.1:9102:9102" in search["ports"]


def test_compose_env_names_are_service_flags():
    names = set()
    for service in compose()["services"].values():
        names |= set(service.get("environment", {}))
    unknown = service_env_names(names) - KNOWN_ENV
    assert not unknown, f"not a flag's environment twin: {sorted(unknown)}"


def test_every_pulled_image_name_is_fully_qualified():
    """Short names (`python:`, `minio/minio`) resolve differently on Podman,
    CRI-O and behind mirrors (unqualified-search registries): every image
    that is pulled names its registry. Our own images in compose are built
    locally (pull_policy: build), and the manifests' fail closed on
    REGISTRY.invalid until a registry is set."""
    names = []
    for dockerfile in (ROOT / "deploy" / "docker").glob("*.Dockerfile"):
        names += re.findall(r"^ARG \w+_IMAGE=(\S+)", dockerfile.read_text(), re.M)
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    names += [s["image"] for s in services.values()
              if "image" in s and s.get("pull_policy") != "build"]
    values = yaml.safe_load((ROOT / "deploy" / "milvus" / "values-distributed.yaml").read_text())
    names.append(values["image"]["all"]["repository"])
    for overlay in ("cpu", "gpu", "tls"):
        names += [c["image"] for o in render(f"overlays/{overlay}") if o["kind"] == "Deployment"
                  for c in o["spec"]["template"]["spec"]["containers"]
                  + o["spec"]["template"]["spec"].get("initContainers", [])]
    assert len(names) >= 8, names
    for name in names:
        registry = name.split("/", 1)[0]
        assert "/" in name and ("." in registry or ":" in registry), f"{name} names no registry"
