"""Offline validation of Ray custom resources against KubeRay's CRD schemas (../shared/kuberay).

The CRDs carry OpenAPI v3 structural schemas; this turns one into a JSON schema for a Draft 4
validator: `nullable` allows null, `x-kubernetes-int-or-string` allows integer or string, and in
strict mode every object with declared properties rejects unknown fields (the API server would
silently prune them, hiding typos such as `enableInTreeAutoscalling`). List-map keys
(`x-kubernetes-list-type: map`) are checked for uniqueness separately.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

SHARED = Path(os.environ.get("EPSERVE_SHARED", Path(__file__).resolve().parents[3] / "shared"))
CRD_DIR = SHARED / "kuberay" / "crds"
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml",
             "RayJob": "ray.io_rayjobs.yaml"}


def crd_dir() -> Path:
    if not CRD_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"KubeRay CRDs not found at {CRD_DIR}")
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (set EPSERVE_SHARED)")
    return CRD_DIR


def _convert(schema: dict, strict: bool) -> dict:
    schema = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-list")}
    if schema.pop("x-kubernetes-int-or-string", False):
        schema.pop("anyOf", None)
        schema["type"] = ["integer", "string"]
    if schema.pop("nullable", False) and "type" in schema:
        schema["type"] = [schema["type"], "null"] if isinstance(schema["type"], str) else schema["type"] + ["null"]
    schema.pop("format", None)  # int32 / date-time etc.: checked by the API server, not here
    preserve = schema.pop("x-kubernetes-preserve-unknown-fields", False)
    schema.pop("x-kubernetes-embedded-resource", None)
    schema.pop("x-kubernetes-map-type", None)
    schema.pop("x-kubernetes-validations", None)
    if "properties" in schema:
        schema["properties"] = {k: _convert(v, strict) for k, v in schema["properties"].items()}
        if strict and not preserve and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _convert(schema["additionalProperties"], strict)
    if "items" in schema:
        schema["items"] = _convert(schema["items"], strict)
    for key in ("anyOf", "allOf", "oneOf"):
        if key in schema:
            schema[key] = [_convert(s, strict) for s in schema[key]]
    return schema


@functools.cache
def _crd(kind: str) -> dict:
    """One parse per CRD and session: each is ~1 MB of YAML (2.7 s with the pure-Python loader)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load((crd_dir() / CRD_FILES[kind]).read_text(), Loader=loader)


def schema_for(kind: str, api_version: str, strict: bool = True) -> dict:
    crd = _crd(kind)
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group, f"{kind}: group {group} is not {crd['spec']['group']}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions and versions[version]["served"], f"{kind}: version {version} is not served"
    return _convert(copy.deepcopy(versions[version]["schema"]["openAPIV3Schema"]), strict)


def list_map_duplicates(obj, schema: dict, path: str = "") -> list[str]:
    """Entries of `x-kubernetes-list-type: map` lists that repeat a key (e.g. two ports named alike)."""
    problems = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key in schema["properties"]:
                problems += list_map_duplicates(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        keys = schema.get("x-kubernetes-list-map-keys")
        if schema.get("x-kubernetes-list-type") == "map" and keys:
            seen = set()
            for item in obj:
                k = tuple(item.get(key) for key in keys)
                if k in seen:
                    problems.append(f"{path}: duplicate {keys} = {k}")
                seen.add(k)
        for i, item in enumerate(obj):
            problems += list_map_duplicates(item, schema["items"], f"{path}[{i}]")
    return problems


def validate(resource: dict, strict: bool = True) -> list[str]:
    """Schema errors of one custom resource, as readable strings (empty when valid)."""
    kind, api_version = resource["kind"], resource["apiVersion"]
    validator = jsonschema.Draft4Validator(schema_for(kind, api_version, strict))
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator.iter_errors(resource)]
    version = next(v for v in _crd(kind)["spec"]["versions"] if v["name"] == api_version.split("/")[1])
    raw = version["schema"]["openAPIV3Schema"]
    return errors + list_map_duplicates(resource, raw)
