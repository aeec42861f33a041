"""The DinD pod of the pod backend, as plain data: built and merged purely, sent elsewhere.

Only :func:`load_template` reads a file (the user's pod template).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pytest_kipik.errors import ConfigError
from pytest_kipik.labels import PREFIX

CONTAINER = "dind"
#: Pod spec fields a template may set (scheduling, runtime, pull secrets and the like).
TEMPLATE_SPEC_FIELDS = (
    "affinity",
    "dnsConfig",
    "dnsPolicy",
    "imagePullSecrets",
    "nodeName",
    "nodeSelector",
    "priorityClassName",
    "runtimeClassName",
    "schedulerName",
    "tolerations",
    "topologySpreadConstraints",
)
#: Fields of the DinD container a template may set.
TEMPLATE_CONTAINER_FIELDS = ("env", "imagePullPolicy", "resources", "securityContext")
DEFAULT_RESOURCES = {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}


def validate_template(data: Any) -> dict[str, Any]:
    """Check a pod template: a Pod (or part of one) with only what kipik lets it change."""
    if not isinstance(data, dict):
        raise ConfigError("a pod template must be a YAML mapping (a Pod, or a part of one)")
    if data.get("kind", "Pod") != "Pod" or data.get("apiVersion", "v1") != "v1":
        raise ConfigError("a pod template must be apiVersion v1, kind Pod")
    unknown = set(data) - {"apiVersion", "kind", "metadata", "spec"}
    if unknown:
        raise ConfigError(f"unknown top-level fields {sorted(unknown)}: use metadata and spec")
    meta = data.get("metadata") or {}
    if set(meta) - {"labels", "annotations"}:
        raise ConfigError("metadata may only carry labels and annotations")
    for key in {**(meta.get("labels") or {}), **(meta.get("annotations") or {})}:
        if str(key).startswith(PREFIX):
            raise ConfigError(f"metadata key {key!r}: the {PREFIX} prefix is kipik's own")
    spec = data.get("spec") or {}
    not_allowed = sorted(set(spec) - {*TEMPLATE_SPEC_FIELDS, "containers"})
    if not_allowed:
        raise ConfigError(
            f"spec fields {not_allowed} cannot be set by a template (kipik owns them); "
            f"allowed: {', '.join(TEMPLATE_SPEC_FIELDS)}, containers"
        )
    containers = spec.get("containers") or []
    if len(containers) > 1 or any(not isinstance(c, dict) for c in containers):
        raise ConfigError(f"spec.containers may hold one entry, for the {CONTAINER!r} container")
    for container in containers:
        extra = sorted(set(container) - {*TEMPLATE_CONTAINER_FIELDS, "name"})
        if extra or container.get("name", CONTAINER) != CONTAINER:
            raise ConfigError(
                f"spec.containers[0] must be named {CONTAINER!r} and may set only "
                f"{', '.join(TEMPLATE_CONTAINER_FIELDS)} (found {extra or container.get('name')})"
            )
    return data


def load_template(path: Path) -> dict[str, Any]:
    """Read and check a pod template file; errors name the file."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"pod template {path}: {exc}") from None
    try:
        return validate_template(data)
    except ConfigError as exc:
        raise ConfigError(f"pod template {path}: {exc}") from None


def build_pod(
    *,
    name: str,
    namespace: str,
    image: str,
    args: Sequence[str],
    labels: Mapping[str, str],
    deadline_seconds: int,
    service_account: str | None = None,
    storage_limit: str | None = None,
    owner: Mapping[str, str] | None = None,
    template: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The DinD pod: privileged, no service-account token, emptyDir for the inner daemon.

    ``owner`` (``name``/``uid`` of the pod kipik runs in) makes the DinD pod a dependant, so it
    is garbage-collected with it. ``deadline_seconds`` becomes ``activeDeadlineSeconds``: a pod
    left by a killed run stops by itself. ``template`` (see :func:`validate_template`) is merged
    last.
    """
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": image,
        "args": list(args),
        "securityContext": {"privileged": True},
        "resources": copy.deepcopy(DEFAULT_RESOURCES),
        "volumeMounts": [
            {"name": "docker", "mountPath": "/var/lib/docker"},
            {"name": "modules", "mountPath": "/lib/modules", "readOnly": True},
        ],
    }
    empty_dir: dict[str, Any] = {"sizeLimit": storage_limit} if storage_limit else {}
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "activeDeadlineSeconds": deadline_seconds,
            "terminationGracePeriodSeconds": 5,
            "containers": [container],
            "volumes": [
                {"name": "docker", "emptyDir": empty_dir},
                {"name": "modules", "hostPath": {"path": "/lib/modules", "type": "Directory"}},
            ],
        },
    }
    if service_account:
        pod["spec"]["serviceAccountName"] = service_account
    if owner:
        pod["metadata"]["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": owner["name"], "uid": owner["uid"]}
        ]
    if template:
        _merge_template(pod, template)
    return pod


def _merge_template(pod: dict[str, Any], template: Mapping[str, Any]) -> None:
    meta = template.get("metadata") or {}
    for key in ("labels", "annotations"):
        if meta.get(key):
            pod["metadata"][key] = {**dict(meta[key]), **pod["metadata"].get(key, {})}
    spec = dict(template.get("spec") or {})
    for container in spec.pop("containers", None) or []:
        ours = pod["spec"]["containers"][0]
        for key in TEMPLATE_CONTAINER_FIELDS:
            if key in container:
                ours[key] = copy.deepcopy(container[key])
    for key, value in spec.items():
        pod["spec"][key] = copy.deepcopy(value)
