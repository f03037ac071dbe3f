"""k8s/ manifests: valid against KubeRay v1.7.0's CRDs, and consistent with the project's code."""

from __future__ import annotations

import copy
import importlib
import re
import tomllib
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from deploy.config import AppConfig
from tests.k8s.crd import validate

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "k8s").glob("rayservice-*.yaml"))
JOBS = sorted((ROOT / "k8s").glob("rayjob-*.yaml"))
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def resources(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("apiVersion", "").startswith("ray.io/")]


def containers(cluster: dict) -> list[dict]:
    groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


@pytest.fixture(params=MANIFESTS, ids=[p.name for p in MANIFESTS])
def service(request) -> dict:
    [resource] = resources(request.param)
    assert resource["kind"] == "RayService"
    return resource


def test_manifests_exist():
    assert {p.name for p in MANIFESTS} >= {"rayservice-gpu.yaml", "rayservice-cpu.yaml"}
    assert {p.name for p in JOBS} >= {"rayjob-batch.yaml"}
    assert {p.name for p in (ROOT / "k8s").glob("*.yaml")} == {p.name for p in MANIFESTS + JOBS} | {"grafana-dashboard.yaml"}


def test_grafana_dashboard_configmap_is_the_dashboard():
    [configmap] = list(yaml.safe_load_all((ROOT / "k8s" / "grafana-dashboard.yaml").read_text()))
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"]["epserve.json"] == (ROOT / "deploy" / "grafana" / "epserve.json").read_text()


def test_head_pods_point_ray_at_grafana_and_prometheus(service):
    [head] = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in head.get("env", [])}
    assert env["RAY_GRAFANA_HOST"].startswith("http://") and env["RAY_PROMETHEUS_HOST"].startswith("http://")


def test_every_pod_starts_ray_with_the_serve_settings_of_the_embedded_cluster(service):
    from deploy.launch import SERVE_ENV

    for container in containers(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert {name: env.get(name) for name in SERVE_ENV} == SERVE_ENV, container["name"]


@pytest.fixture(params=JOBS, ids=[p.name for p in JOBS])
def job(request) -> dict:
    [resource] = resources(request.param)
    assert resource["kind"] == "RayJob"
    return resource


def test_batch_job_is_valid_and_runs_epserve_batch(job, monkeypatch):
    assert validate(job) == []
    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e for e in validate(typo))
    spec, cluster = job["spec"], job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert {c["image"] for c in containers(cluster)} == {f"epserve/epserve:{VERSION}-cpu"}
    # the entrypoint is an `epserve batch` command line this version of the CLI accepts
    words = spec["entrypoint"].split()
    assert words[:2] == ["epserve", "batch"]
    from deploy import cli

    parsed = {}
    monkeypatch.setattr(cli, "cmd_batch", lambda args: parsed.update(vars(args)) or 0)
    assert cli.main(words[1:]) == 0
    assert parsed["address"] == "auto" and parsed["output"].startswith("/data/")
    head = cluster["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    assert any(parsed["input"].startswith(m) and parsed["output"].startswith(m) for m in mounts)
    workers = sum(g["replicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                  for g in cluster["workerGroupSpecs"])
    assert parsed["instances"] * parsed["cpus_per_instance"] <= workers  # the pool fits the worker pods


def test_valid_against_the_crd_in_strict_mode(service):
    assert validate(service) == []


def test_the_validator_catches_mistakes(service):
    typo = copy.deepcopy(service)
    typo["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert any("enableInTreeAutoscalling" in e for e in validate(typo))
    wrong_type = copy.deepcopy(service)
    wrong_type["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
    assert any("maxReplicas" in e for e in validate(wrong_type))
    duplicate = copy.deepcopy(service)
    head = duplicate["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["ports"].append({"containerPort": 9000, "name": "grpc-again"})  # list-map key: containerPort
    assert any("duplicate" in e for e in validate(duplicate))


def test_controller_rules(service):
    name = service["metadata"]["name"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name)
    for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]


def test_serve_config_parses_and_matches_the_code(service):
    serve_config = ServeDeploySchema(**yaml.safe_load(service["spec"]["serveConfigV2"]))
    [app] = serve_config.applications
    module, attr = app.import_path.split(":")
    assert callable(getattr(importlib.import_module(module), attr))  # deploy.app:build_app
    for function in serve_config.grpc_options.grpc_servicer_functions:
        module, attr = function.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), attr))
    fields = set(AppConfig.model_fields)  # the model path exists in the pod only: check the names
    assert set(app.args) <= fields, set(app.args) - fields


def test_ports_images_versions_and_resources(service):
    cluster = service["spec"]["rayClusterConfig"]
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert len({p["name"] for p in head["ports"]}) == len(head["ports"])  # names are unique per pod
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["serve"] == serve_config["http_options"]["port"]
    assert ports["serve-grpc"] == serve_config["grpc_options"]["port"]  # KubeRay exposes serve-* ports
    images = {c["image"] for c in containers(cluster)}
    assert len(images) == 1
    [image] = images
    assert image.startswith("epserve/epserve:") and image.split(":")[1].startswith(VERSION)
    args = serve_config["applications"][0]["args"]
    gpus = args.get("gpus_per_worker", 0)
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if gpus:
            assert limits.get("nvidia.com/gpu", 0) >= gpus, group["groupName"]
    for role in ("attention_worker_resources", "expert_worker_resources"):
        for resource_name in args.get(role, {}):  # steered workers need a group that offers it
            assert any(resource_name in g["rayStartParams"].get("resources", "")
                       for g in cluster["workerGroupSpecs"]), f"no worker group advertises {resource_name}"
    # the Dockerfile builds on the same Ray
    dockerfile = (ROOT / "k8s" / "Dockerfile").read_text()
    assert f"rayproject/ray:{cluster['rayVersion']}" in dockerfile


def test_deploy_serve_config_matches_the_manifests():
    local = yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text())
    ServeDeploySchema(**local)
    for path in MANIFESTS:
        [resource] = resources(path)
        remote = yaml.safe_load(resource["spec"]["serveConfigV2"])
        assert remote["grpc_options"] == local["grpc_options"]
        assert remote["applications"][0]["import_path"] == local["applications"][0]["import_path"]


def test_the_image_and_the_wheel_hold_every_package():
    """pyproject lists each package (sub-packages too: a non-editable install, as in the image, holds
    only those), and the Dockerfile copies every top-level folder the install reads."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: Path(setuptools.get("package-dir", {}).get(name.split(".")[0], name.split(".")[0]),
                          *name.split(".")[1:]) for name in setuptools["packages"]}
    for name, folder in folders.items():
        assert (ROOT / folder / "__init__.py").is_file(), f"{name}: no {folder}/__init__.py"
    tops = {folder.parts[0] for folder in folders.values()}
    on_disk = {init.parent.relative_to(ROOT) for top in tops for init in (ROOT / top).rglob("__init__.py")}
    assert on_disk == set(folders.values()), f"packages missing from pyproject: {on_disk - set(folders.values())}"
    copied = set(re.findall(r"^COPY --chown=ray (\S+) \1$", (ROOT / "k8s" / "Dockerfile").read_text(), re.M))
    assert tops <= copied, f"the Dockerfile does not copy {sorted(tops - copied)}"
