"""deploy/kuberay/rayservice.yaml: valid for the RayService CRD, and serving configs/gpu.yaml.

rayservice.v1.schema.json is the v1 openAPIV3Schema of KubeRay's
ray-operator/config/crd/bases/ray.io_rayservices.yaml at commit
feeaf72facab4881ba2b179248bb67315634e229 (the file is identical at tag v1.7.0).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from voltage_ray.app import parse_config
from voltage_ray.config import SERVE_PROXY_ENV

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


@cache
def manifest() -> tuple[dict[str, Any], ...]:
    return tuple(yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()))


def rayservice() -> dict[str, Any]:
    return copy.deepcopy(next(d for d in manifest() if d["kind"] == "RayService"))


@cache
def schema() -> dict[str, Any]:
    """The CRD schema for jsonschema, which ignores x-kubernetes-* keywords and k8s formats (int32,
    int-or-string): an x-kubernetes-int-or-string node without an anyOf gets one."""

    def fix(node: Any) -> Any:
        if isinstance(node, list):
            return [fix(n) for n in node]
        if not isinstance(node, dict):
            return node
        node = {k: fix(v) for k, v in node.items()}
        if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
            node["anyOf"] = INT_OR_STRING
        return node

    return fix(json.loads((KUBERAY / "rayservice.v1.schema.json").read_text()))


def _path(parts: Iterable[Any]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts) or "."


def unknown_fields(value: Any, node: dict[str, Any], path: tuple[Any, ...] = ()) -> list[str]:
    """Fields a structural schema does not declare: what `kubectl apply --validate=strict` rejects
    (CRD schemas leave additionalProperties unset, so JSON Schema alone accepts them)."""
    found: list[str] = []
    if isinstance(value, dict):
        props = node.get("properties")
        extra = node.get("additionalProperties")
        open_ended = extra is not None or node.get("x-kubernetes-preserve-unknown-fields")
        if props is not None and not open_ended:
            found += [f"{_path((*path, k))}: unknown field" for k in value if k not in props]
        for key, item in value.items():
            sub = (props or {}).get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                found += unknown_fields(item, sub, (*path, key))
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, node["items"], (*path, i))
    return found


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """What the API server would reject: schema violations, then unknown fields."""
    invalid = Draft202012Validator(schema()).iter_errors(doc)
    errors = [f"{_path(e.absolute_path)}: {e.message}" for e in invalid]
    return errors + unknown_fields(doc, schema())


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def head() -> dict[str, Any]:
    return rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]


def workers() -> list[dict[str, Any]]:
    return rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return group["template"]["spec"]["containers"]


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_manifest_is_a_valid_rayservice() -> None:
    doc = rayservice()
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayService")
    assert schema_errors(doc) == []


def _typo(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfg"] = doc["spec"].pop("rayClusterConfig")


def _pod_typo(doc: dict[str, Any]) -> None:
    (container,) = containers(doc["spec"]["rayClusterConfig"]["headGroupSpec"])
    container["volumeMount"] = container.pop("volumeMounts")


def _replicas(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "two"


def _unquoted_param(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _quantity(doc: dict[str, Any]) -> None:
    (container,) = containers(doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0])
    container["resources"]["limits"]["memory"] = "48 GB"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_typo, [".spec.rayClusterConfg: unknown field", "'rayClusterConfig' is a required"]),
        (_pod_typo, [".template.spec.containers[0].volumeMount: unknown field"]),
        (_replicas, [".workerGroupSpecs[0].replicas: 'two' is not of type 'integer'"]),
        (_unquoted_param, [".rayStartParams.num-cpus: 0 is not of type 'string'"]),
        (_quantity, [".limits.memory: '48 GB' does not match"]),
    ],
)
def test_schema_check_rejects_typos_and_wrong_types(mutate: Any, expected: list[str]) -> None:
    doc = rayservice()
    mutate(doc)
    errors = schema_errors(doc)
    assert len(errors) == len(expected), errors
    assert all(any(part in e for e in errors) for part in expected), errors


def test_serve_config_is_the_gpu_profile() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    assert config == yaml.safe_load((REPO / "configs" / "gpu.yaml").read_text())
    ServeDeploySchema.model_validate(config)


def test_app_args_parse_with_the_pods_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    pod_env = env(containers(head())[0])
    for name in ("VOLTAGE_DB", "VOLTAGE_PLANS"):
        monkeypatch.setenv(name, pod_env[name])
    (app,) = serve_config()["applications"]
    config = parse_config(app["args"])
    assert [m.kind for m in config.models] == ["chat", "embeddings", "images"]
    assert config.database == str(Path(pod_env["VOLTAGE_DB"]).resolve())
    assert config.plans == str(Path(pod_env["VOLTAGE_PLANS"]).resolve())


def test_every_container_gets_the_same_env() -> None:
    envs = [env(c) for group in [head(), *workers()] for c in containers(group)]
    assert all(e == envs[0] for e in envs)
    assert {name: envs[0][name] for name in SERVE_PROXY_ENV} == SERVE_PROXY_ENV
    assert envs[0]["RAY_USAGE_STATS_ENABLED"] == "0"


def test_head_holds_the_database_and_serves_no_replicas() -> None:
    group = head()
    assert group["rayStartParams"]["num-cpus"] == "0"
    assert group["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert group["rayStartParams"]["metrics-export-port"] == "8080"
    (container,) = containers(group)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports | {"metrics": 8080, "serve": 8000, "dashboard": 8265} == ports
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/data")
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert env(container)["VOLTAGE_DB"].startswith(mount["mountPath"] + "/")
    pvcs = [d["metadata"]["name"] for d in manifest() if d["kind"] == "PersistentVolumeClaim"]
    assert pvcs == [claim]
    assert rayservice()["spec"]["upgradeStrategy"]["type"] == "None"  # one head owns the volume


def test_gpu_workers_autoscale_to_the_profiles_gpu_asks() -> None:
    assert rayservice()["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    (group,) = workers()
    (container,) = containers(group)
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1
    assert group["rayStartParams"]["metrics-export-port"] == "8080"
    assert {"name": "metrics", "containerPort": 8080} in container["ports"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (app,) = serve_config()["applications"]
    asks = [m["deployment"] for m in app["args"]["models"]]
    for bound, pods in (("min_replicas", "minReplicas"), ("max_replicas", "maxReplicas")):
        gpus_asked = sum(
            a["ray_actor_options"]["num_gpus"] * a["autoscaling_config"][bound] for a in asks
        )
        assert gpus_asked <= group[pods] * gpus, bound
