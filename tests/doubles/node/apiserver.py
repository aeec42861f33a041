#!/usr/bin/env python3
"""TEST DOUBLE: a fake kube-apiserver for the kind node image double (stdlib only).

It serves real TLS on 0.0.0.0:6443 with the certificate the kubeadm double made, authenticates
clients by certificates signed by the cluster CA (the kubeadm bootstrap token may only register
Nodes), and answers the core/v1 subset a readiness check and a small test suite need, in the JSON
shapes of the Kubernetes API: /version, /readyz, /livez, /healthz, discovery, nodes, namespaces,
serviceaccounts, configmaps and secrets. State is kept in memory. Every request is logged
(method, path, status) to the log file `kind export logs` collects.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import datetime
import importlib
import json
import os
import random
import re
import socket
import ssl
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

try:  # in the repository (tests, mypy)
    from tests.doubles.node import controllers, podspec, resources
    from tests.doubles.node.resources import Resource
except ImportError:  # in the node image: /kipik-node/*.py next to this script
    import controllers  # type: ignore[import-not-found,no-redef]
    import podspec  # type: ignore[import-not-found,no-redef]
    import resources  # type: ignore[import-not-found,no-redef]
    from resources import Resource  # type: ignore[no-redef]

JSON = dict[str, Any]

INITIAL_NAMESPACES = ["default", "kube-node-lease", "kube-public", "kube-system"]
SERVICE_ACCOUNT_DELAY = 1.0
NODE_READY_DELAY = 1.5
NAMESPACE_FINALIZE_DELAY = 0.5
READYZ_STARTUP = 0.5
CRD_NAMES_ACCEPTED_DELAY = 0.05
CRD_ESTABLISHED_DELAY = 0.3
CONTROLLER_PERIOD = 0.05
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"  # what generateName and controllers draw from
METHOD_NOT_ALLOWED = "the server does not allow this method on the requested resource"


class ApiError(Exception):
    """An error answered as a Kubernetes `Status` object."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> JSON:
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            body["details"] = self.details
        body["code"] = self.code
        return body

    @classmethod
    def from_status(cls, status: JSON) -> ApiError:
        return cls(status["code"], status["reason"], status["message"], status.get("details"))


def invalid(res: Resource, name: str, errors: list[podspec.FieldError]) -> ApiError:
    """422 Invalid with one cause per field error, as kube-apiserver words it."""
    status = podspec.invalid_status(res.qualified_kind, name, errors)
    if res.group:
        status["details"]["group"] = res.group
        status["details"]["kind"] = res.kind
    return ApiError.from_status(status)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message, {})


def random_suffix(length: int = 5) -> str:
    return "".join(random.choices(NAME_CHARS, k=length))


def _details(group_resource: str, name: str) -> JSON:
    plural, _, group = group_resource.partition(".")
    details: JSON = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = plural
    return details


def not_found(group_resource: str, name: str) -> ApiError:
    """404 for `pods "x"` or `deployments.apps "x"`."""
    return ApiError(
        404, "NotFound", f'{group_resource} "{name}" not found', _details(group_resource, name)
    )


def already_exists(group_resource: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{group_resource} "{name}" already exists',
        _details(group_resource, name),
    )


def conflict(group_resource: str, name: str) -> ApiError:
    """409 for an update whose resourceVersion is not the stored one."""
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {group_resource} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        _details(group_resource, name),
    )


def unknown_resource() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return result


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ApiError(422, "Invalid", f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def json_patch(doc: Any, operations: list[Any]) -> Any:
    """RFC 6902 add/remove/replace/test/copy/move on a deep copy of `doc`."""
    doc = copy.deepcopy(doc)

    def parent(parts: list[str]) -> tuple[Any, str]:
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    def get(path: str) -> Any:
        node = doc
        for part in _pointer(path):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    def remove(path: str) -> Any:
        container, key = parent(_pointer(path))
        if isinstance(container, list):
            return container.pop(int(key))
        return container.pop(key)

    def add(path: str, value: Any) -> None:
        container, key = parent(_pointer(path))
        if isinstance(container, list):
            container.insert(len(container) if key == "-" else int(key), value)
        else:
            container[key] = value

    for op in operations:
        try:
            kind = op["op"]
            if kind == "add":
                add(op["path"], copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(op["path"])
            elif kind == "replace":
                remove(op["path"])
                add(op["path"], copy.deepcopy(op["value"]))
            elif kind == "test":
                if get(op["path"]) != op["value"]:
                    raise ApiError(422, "Invalid", f"testing value {op['path']} failed")
            elif kind == "copy":
                add(op["path"], copy.deepcopy(get(op["from"])))
            elif kind == "move":
                add(op["path"], remove(op["from"]))
            else:
                raise ApiError(400, "BadRequest", f"Unexpected kind: {kind}")
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise ApiError(
                422,
                "Invalid",
                f"the server rejected our request due to an error in our request: {exc}",
            ) from exc
    return doc


_SELECTOR_TERM = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9._/-]+)\s*"
    r"(?:(?P<op>==|=|!=|\s+in\s+|\s+notin\s+)\s*(?P<value>.*?))?\s*$"
)


def _split_selector(selector: str) -> list[str]:
    terms, depth, current = [], 0, ""
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    if current.strip():
        terms.append(current)
    return terms


def _requirement_holds(labels: dict[str, str], key: str, op: str, values: set[str]) -> bool:
    if op == "exists":
        return key in labels
    if op == "!exists":
        return key not in labels
    if op in ("=", "==", "in"):
        return labels.get(key) in values
    return labels.get(key) not in values  # "!=" and "notin"


def label_selector_matcher(selector: str) -> Callable[[dict[str, str]], bool]:
    """Parse a Kubernetes label selector (equality- and set-based) into a predicate."""
    requirements: list[tuple[str, str, set[str]]] = []
    for term in _split_selector(selector):
        match = _SELECTOR_TERM.match(term)
        if not match or (match["neg"] and match["op"]):
            raise ApiError(
                400, "BadRequest", f"unable to parse requirement: found '{term.strip()}'"
            )
        key, op, value = match["key"], (match["op"] or "").strip(), match["value"] or ""
        if not op:
            requirements.append((key, "!exists" if match["neg"] else "exists", set()))
        elif op in ("=", "==", "!="):
            requirements.append((key, op, {value}))
        else:
            if not (value.startswith("(") and value.endswith(")")):
                raise ApiError(400, "BadRequest", f"unable to parse requirement: {term.strip()}")
            values = {v.strip() for v in value[1:-1].split(",") if v.strip()}
            requirements.append((key, op, values))

    def matches(labels: dict[str, str]) -> bool:
        return all(_requirement_holds(labels, *requirement) for requirement in requirements)

    return matches


def field_selector_matcher(selector: str, group_resource: str = "") -> Callable[[JSON], bool]:
    """metadata.name/metadata.namespace everywhere, plus the fields the resource declares."""
    extra = resources.FIELD_LABELS.get(group_resource, ())
    requirements: list[tuple[str, bool, str]] = []
    for term in _split_selector(selector):
        match = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if not match:
            raise ApiError(
                400,
                "BadRequest",
                f"invalid selector: '{selector}'; can't understand '{term.strip()}'",
            )
        label, op, value = match.groups()
        if label not in ("metadata.name", "metadata.namespace") and label not in extra:
            message = (
                f"field label not supported: {label}"
                if extra
                else f'"{label}" is not a known field selector: only "metadata.name", '
                '"metadata.namespace"'
            )
            raise ApiError(400, "BadRequest", message)
        requirements.append((label, op != "!=", value))

    def matches(obj: JSON) -> bool:
        return all(
            (resources.field_value(obj, label) == value) == equal
            for label, equal, value in requirements
        )

    return matches


GENERATION = {
    "pods",
    "deployments.apps",
    "replicasets.apps",
    "statefulsets.apps",
    "daemonsets.apps",
    "jobs.batch",
    "customresourcedefinitions.apiextensions.k8s.io",
    "ingresses.networking.k8s.io",
    "networkpolicies.networking.k8s.io",
}
WORKLOADS = {
    "deployments.apps",
    "replicasets.apps",
    "statefulsets.apps",
    "daemonsets.apps",
    "jobs.batch",
}
CRD = "customresourcedefinitions.apiextensions.k8s.io"
ESTABLISHED = ("Established", "True")
# what a node's kubelet may do (the Node authorizer's rules), for system:nodes and bootstrap
NODE_RULES: dict[str, set[str]] = {
    "pods": {"get", "list", "watch"},
    "pods/status": {"get", "update", "patch"},
    "events": {"create", "patch", "update", "get", "list"},
    "services": {"get", "list", "watch"},
    "endpoints": {"get", "list", "watch"},
    "endpointslices.discovery.k8s.io": {"get", "list", "watch"},
    "nodes": {"get", "list", "watch", "create", "update", "patch"},
    "nodes/status": {"get", "update", "patch"},
    "configmaps": {"get", "list", "watch"},
    "secrets": {"get", "list", "watch"},
}


def _condition(kind: str, status: str, reason: str, message: str) -> JSON:
    stamp = now_rfc3339()
    return {
        "type": kind,
        "status": status,
        "lastTransitionTime": stamp,
        "reason": reason,
        "message": message,
    }


def has_condition(obj: JSON, kind: str, status: str = "True") -> bool:
    return any(
        c.get("type") == kind and c.get("status") == status
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def set_condition(obj: JSON, condition: JSON) -> bool:
    """Put `condition` into obj.status.conditions; True when something changed."""
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    for index, old in enumerate(conditions):
        if old.get("type") == condition["type"]:
            same = all(old.get(k) == condition.get(k) for k in ("status", "reason", "message"))
            if same:
                return False
            if old.get("status") == condition["status"]:
                condition = {**condition, "lastTransitionTime": old.get("lastTransitionTime")}
            conditions[index] = {**old, **condition}
            return True
    conditions.append(condition)
    return True


def fields_v1(body: Any) -> JSON:
    """A FieldsV1 set of the keys in `body` (lists as atomic leaves), for managedFields."""
    if not isinstance(body, dict):
        return {}
    return {f"f:{k}": fields_v1(v) for k, v in body.items() if k not in ("apiVersion", "kind")}


class Options:
    """What a request asks for beyond its body (query parameters, headers)."""

    def __init__(
        self,
        query: dict[str, str] | None = None,
        manager: str = "",
        system: bool = False,
    ) -> None:
        query = query or {}
        self.query = query
        self.dry_run = query.get("dryRun") == "All"
        self.field_manager = query.get("fieldManager") or ""
        self.default_manager = manager  # managedFields name writes without fieldManager by this
        self.force = query.get("force") in ("true", "1")
        self.strict = query.get("fieldValidation") == "Strict"
        self.propagation = query.get("propagationPolicy", "")
        self.warnings: list[str] = []
        self.system = system


class StreamRequest(Exception):
    """pods/log and pods/portforward: served by streaming.serve() outside the store lock."""

    def __init__(self, subresource: str, pod: JSON) -> None:
        super().__init__(subresource)
        self.subresource = subresource
        self.pod = pod


class Cluster:
    """The in-memory object store, with the background work of a control plane."""

    def __init__(self, cfg: JSON) -> None:
        self.cfg = cfg
        self.lock = threading.RLock()
        self.revision = 1
        self.objects: dict[tuple[str, str, str], JSON] = {}
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.started = time.monotonic()
        with open(cfg["ca_cert"]) as ca_file:
            self.ca_pem = ca_file.read()
        self.node_count = 0
        self.builtin = {(r.group, r.version, r.plural): r for r in resources.BUILTIN}
        self.builtin_by_gr = {r.group_resource: r for r in resources.BUILTIN}
        self.api = Api(self)
        for name in INITIAL_NAMESPACES:
            self._store_namespace(name)
        self.register_node(cfg["node_name"], cfg["node_ip"], cfg.get("node_labels", {}), True)
        controllers.start_cluster(self)

    # -- background work -------------------------------------------------------------------
    def later(self, delay: float, action: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, action))

    def run_due(self) -> None:
        """Apply what controllers would have done by now (before each request and periodically)."""
        now = time.monotonic()
        due = sorted((t for t in self.timers if t[0] <= now), key=lambda t: t[0])
        self.timers = [t for t in self.timers if t[0] > now]
        for _, action in due:
            action()

    def cni_installed(self) -> bool:
        return os.path.exists(self.cfg["cni_marker"])

    # -- low-level store -----------------------------------------------------------------------
    def next_revision(self) -> str:
        self.revision += 1
        return str(self.revision)

    def new_metadata(self, meta: JSON, namespace: str) -> JSON:
        meta = dict(meta)
        if namespace:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = self.next_revision()
        meta["creationTimestamp"] = now_rfc3339()
        for key in ("selfLink", "deletionTimestamp", "deletionGracePeriodSeconds"):
            meta.pop(key, None)
        return meta

    def put(self, group_resource: str, namespace: str, obj: JSON) -> JSON:
        self.objects[(group_resource, namespace, obj["metadata"]["name"])] = obj
        return obj

    def get(self, group_resource: str, namespace: str, name: str) -> JSON | None:
        return self.objects.get((group_resource, namespace, name))

    def items(self, group_resource: str, namespace: str | None = None) -> list[JSON]:
        return [
            obj
            for (gr, ns, _), obj in sorted(self.objects.items(), key=lambda kv: kv[0])
            if gr == group_resource and (namespace is None or ns == namespace)
        ]

    def touch(self, obj: JSON) -> None:
        """An in-place change of a stored object: a new resourceVersion."""
        obj["metadata"]["resourceVersion"] = self.next_revision()

    def remove(self, group_resource: str, namespace: str, name: str) -> JSON | None:
        obj = self.objects.pop((group_resource, namespace, name), None)
        if obj is not None:
            self.next_revision()
        return obj

    # -- resource types --------------------------------------------------------------------
    def crd_types(self) -> list[Resource]:
        found: list[Resource] = []
        for crd in self.items(CRD, ""):
            if has_condition(crd, *ESTABLISHED) and not crd["metadata"].get("deletionTimestamp"):
                found.extend(resources.crd_resources(crd))
        return found

    def served(self, group: str, version: str, plural: str) -> Resource | None:
        res = self.builtin.get((group, version, plural))
        if res is not None:
            return res
        return next(
            (
                r
                for r in self.crd_types()
                if (r.group, r.version, r.plural) == (group, version, plural)
            ),
            None,
        )

    def type_of(self, group_resource: str) -> Resource | None:
        """The storage version's resource type of a group resource."""
        res = self.builtin_by_gr.get(group_resource)
        if res is not None:
            return res
        crd = self.get(CRD, "", group_resource)
        if crd is None:
            return None
        types = resources.crd_resources(crd)
        storage = next(
            (v["name"] for v in crd["spec"].get("versions") or [] if v.get("storage")), ""
        )
        return next((r for r in types if r.version == storage), types[0] if types else None)

    def group_resources(self) -> list[str]:
        return sorted({key[0] for key in self.objects})

    # -- events ------------------------------------------------------------------------------
    def record_event(  # noqa: PLR0917 - positional like the request's parts
        self,
        involved: JSON,
        kind: str,
        api_version: str,
        event_type: str,
        reason: str,
        message: str,
        component: str,
    ) -> JSON:
        meta = involved["metadata"]
        namespace = meta.get("namespace") or "default"
        stamp = now_rfc3339()
        name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
        event: JSON = {
            "kind": "Event",
            "apiVersion": "v1",
            "metadata": self.new_metadata({"name": name}, namespace),
            "involvedObject": {
                "kind": kind,
                "namespace": meta.get("namespace", ""),
                "name": meta["name"],
                "uid": meta.get("uid", ""),
                "apiVersion": api_version,
                "resourceVersion": meta.get("resourceVersion", ""),
            },
            "reason": reason,
            "message": message,
            "source": {"component": component},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "type": event_type,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": "",
        }
        if not event["involvedObject"]["namespace"]:
            del event["involvedObject"]["namespace"]
        return self.put("events", namespace, event)

    # -- namespaces ---------------------------------------------------------------------------
    def _store_namespace(self, name: str) -> JSON:
        obj = {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": self.new_metadata(
                {"name": name, "labels": {"kubernetes.io/metadata.name": name}}, ""
            ),
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self.put("namespaces", "", obj)
        self.later(SERVICE_ACCOUNT_DELAY, lambda: self._populate_namespace(name))
        return obj

    def _populate_namespace(self, name: str) -> None:
        """What the service-account and root-CA publisher controllers do in a new namespace."""
        ns = self.get("namespaces", "", name)
        if ns is None or ns["status"]["phase"] != "Active":
            return
        if self.get("configmaps", name, "kube-root-ca.crt") is None:
            meta = {
                "name": "kube-root-ca.crt",
                "annotations": {
                    "kubernetes.io/description": "Contains a CA bundle that can be "
                    "used to verify the kube-apiserver when using internal endpoints "
                    "such as the internal service IP or kubernetes.default.svc. No "
                    "other usage is guaranteed across distributions of Kubernetes "
                    "clusters."
                },
            }
            self.put(
                "configmaps",
                name,
                {
                    "kind": "ConfigMap",
                    "apiVersion": "v1",
                    "metadata": self.new_metadata(meta, name),
                    "data": {"ca.crt": self.ca_pem},
                },
            )
        if self.get("serviceaccounts", name, "default") is None:
            self.put(
                "serviceaccounts",
                name,
                {
                    "kind": "ServiceAccount",
                    "apiVersion": "v1",
                    "metadata": self.new_metadata({"name": "default"}, name),
                },
            )

    def _finalize_namespace(self, name: str) -> None:
        """The namespace controller: every namespaced object goes, then the namespace."""
        for key in [k for k in self.objects if k[1] == name]:
            del self.objects[key]
        self.objects.pop(("namespaces", "", name), None)
        self.next_revision()

    # -- nodes ---------------------------------------------------------------------------------
    def register_node(
        self, name: str, address: str, extra_labels: dict[str, str], control_plane: bool
    ) -> JSON:
        labels = {
            "beta.kubernetes.io/arch": "amd64",
            "beta.kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
        }
        if control_plane:
            labels["node-role.kubernetes.io/control-plane"] = ""
            labels["node.kubernetes.io/exclude-from-external-load-balancers"] = ""
        labels.update(extra_labels)
        index = self.node_count
        self.node_count += 1
        pod_cidr = _pod_cidr(self.cfg["pod_subnet"], index)
        version = self.cfg["kubernetes_version"]
        stamp = now_rfc3339()
        capacity = {
            "cpu": str(os.cpu_count() or 1),
            "ephemeral-storage": "61202244Ki",
            "hugepages-2Mi": "0",
            "memory": "24590692Ki",
            "pods": "110",
        }
        # the kubelet registers not-ready; kubeadm's mark-control-plane phase adds its taint
        taints = [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]
        if control_plane:
            taints.insert(
                0, {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
            )
        node: JSON = {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": self.new_metadata(
                {
                    "name": name,
                    "labels": labels,
                    "annotations": {
                        "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///run/containerd/containerd.sock",
                        "node.alpha.kubernetes.io/ttl": "0",
                        "volumes.kubernetes.io/controller-managed-attach-detach": "true",
                    },
                },
                "",
            ),
            "spec": {
                "podCIDR": pod_cidr,
                "podCIDRs": [pod_cidr],
                "providerID": f"kind://docker/{self.cfg['cluster_name']}/{name}",
                "taints": taints,
            },
            "status": {
                "capacity": capacity,
                "allocatable": dict(capacity),
                "conditions": _node_conditions(False, stamp),
                "addresses": [
                    {"type": "InternalIP", "address": address},
                    {"type": "Hostname", "address": name},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
                "nodeInfo": {
                    "machineID": uuid.uuid4().hex,
                    "systemUUID": str(uuid.uuid4()),
                    "bootID": str(uuid.uuid4()),
                    "kernelVersion": os.uname().release,
                    "osImage": "Debian GNU/Linux 12 (bookworm)",
                    "containerRuntimeVersion": "containerd://1.7.24",
                    "kubeletVersion": version,
                    "kubeProxyVersion": version,
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                },
            },
        }
        self.put("nodes", "", node)
        self.later(NODE_READY_DELAY, lambda: self._node_ready_check(name))
        return node

    def _node_ready_check(self, name: str) -> None:
        """The kubelet reports Ready once a CNI configuration exists (kind's CNI step)."""
        node = self.get("nodes", "", name)
        if node is None:
            return
        if not self.cni_installed():
            self.later(0.25, lambda: self._node_ready_check(name))
            return
        node["status"]["conditions"] = _node_conditions(True, now_rfc3339())
        self.touch(node)


def _node_conditions(ready: bool, stamp: str) -> list[JSON]:
    def cond(kind: str, status: str, reason: str, message: str) -> JSON:
        return {
            "type": kind,
            "status": status,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
            "reason": reason,
            "message": message,
        }

    ready_condition = (
        cond("Ready", "True", "KubeletReady", "kubelet is posting ready status")
        if ready
        else cond(
            "Ready",
            "False",
            "KubeletNotReady",
            "container runtime network not ready: NetworkReady=false "
            "reason:NetworkPluginNotReady message:Network plugin returns error: "
            "cni plugin not initialized",
        )
    )
    return [
        cond(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
        cond(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        ready_condition,
    ]


def _pod_cidr(pod_subnet: str, index: int) -> str:
    first = pod_subnet.split(",", maxsplit=1)[0]
    if ":" in first:
        return first
    octets = first.split("/")[0].split(".")
    return f"{octets[0]}.{octets[1]}.{int(octets[2]) + index}.0/24"


def _diff_keys(old: Any, new: Any, path: str = "spec") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _diff_keys(old.get(key), new.get(key), f"{path}.{key}")
    return path


class Api:
    """The semantics of the resources: validation, defaults, admission, storage."""

    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster

    # -- discovery -------------------------------------------------------------------------------
    def version(self) -> JSON:
        git = self.c.cfg["kubernetes_version"]
        major, minor = git.lstrip("v").split(".")[:2]
        return {
            "major": major,
            "minor": minor,
            "gitVersion": git,
            "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean",
            "buildDate": "2024-12-10T00:00:00Z",
            "goVersion": "go1.22.9",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    def api_versions(self) -> JSON:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.c.cfg['node_ip']}:6443"}
            ],
        }

    def _all_types(self) -> list[Resource]:
        return [*resources.BUILTIN, *self.c.crd_types()]

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for res in self._all_types():
            if res.group and res.version not in groups.setdefault(res.group, []):
                groups[res.group].append(res.version)
        return groups

    def _group_entry(self, group: str, versions: list[str]) -> JSON:
        preferred = versions[0]
        crd = next((r for r in self.c.crd_types() if r.group == group), None)
        if crd is not None:
            stored = self.c.get(CRD, "", crd.group_resource)
            if stored is not None:
                preferred = next(
                    (v["name"] for v in stored["spec"]["versions"] if v.get("storage")),
                    preferred,
                )
        return {
            "name": group,
            "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
            "preferredVersion": {"groupVersion": f"{group}/{preferred}", "version": preferred},
        }

    def group_list(self) -> JSON:
        groups = [self._group_entry(g, v) for g, v in self._groups().items()]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def group(self, group: str) -> JSON:
        versions = self._groups().get(group)
        if not versions:
            raise unknown_resource()
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_entry(group, versions)}

    def resource_list(self, group: str, version: str) -> JSON:
        types = [r for r in self._all_types() if (r.group, r.version) == (group, version)]
        if not types:
            raise unknown_resource()
        body: JSON = {"kind": "APIResourceList"}
        if group:
            body["apiVersion"] = "v1"
        body["groupVersion"] = f"{group}/{version}" if group else version
        body["resources"] = [entry for r in types for entry in r.discovery()]
        return body

    def system_create(self, group_resource: str, namespace: str, body: JSON, manager: str) -> JSON:
        """A controller's create (no authorization; admission and validation as for clients)."""
        res = self.c.type_of(group_resource)
        if res is None:
            raise unknown_resource()
        return self.create(res, namespace, body, Options(manager=manager, system=True))

    # -- helpers -----------------------------------------------------------------------------
    def _get(self, res: Resource, namespace: str, name: str) -> JSON:
        obj = self.c.get(res.group_resource, namespace, name)
        if obj is None:
            raise not_found(res.group_resource, name)
        return obj

    def require_namespace(self, namespace: str, creating: bool) -> JSON:
        ns = self.c.get("namespaces", "", namespace)
        if ns is None:
            raise not_found("namespaces", namespace)
        if creating and ns["status"]["phase"] == "Terminating":
            raise ApiError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated",
                {
                    "name": namespace,
                    "kind": "namespaces",
                    "causes": [
                        {
                            "reason": "NamespaceTerminating",
                            "message": f"namespace {namespace} is being terminated",
                            "field": "metadata.namespace",
                        }
                    ],
                },
            )
        return ns

    def _typed(self, res: Resource, obj: JSON, version: str | None = None) -> JSON:
        """The object as served at `version` (custom resources differ only in apiVersion)."""
        out = copy.deepcopy(obj)
        out["kind"] = res.kind
        out["apiVersion"] = res.group_version if version is None else f"{res.group}/{version}"
        return out

    def _check_body(self, res: Resource, body: Any, namespace: str) -> JSON:
        if not isinstance(body, dict):
            raise bad_request(
                f"the object provided is unrecognized (must be of type {res.kind}): "
                "couldn't get version/kind; json parse error"
            )
        if body.get("apiVersion") not in (None, "", res.group_version):
            raise bad_request(
                f"the API version in the data ({body.get('apiVersion')}) does not match the "
                f"expected API version ({res.group_version})"
            )
        if body.get("kind") not in (None, "", res.kind):
            raise bad_request(
                f"the kind in the data ({body.get('kind')}) does not match the expected kind "
                f"({res.kind})"
            )
        meta = body.get("metadata") or {}
        if not isinstance(meta, dict):
            raise bad_request(
                f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: '
                "json: cannot unmarshal into Go struct field "
                f"{res.kind}.metadata of type v1.ObjectMeta"
            )
        for key in ("labels", "annotations"):
            values = meta.get(key)
            if values is not None and (
                not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values())
            ):
                raise bad_request(
                    f'{res.kind} in version "{res.version}" cannot be handled as a {res.kind}: '
                    f"json: cannot unmarshal into Go struct field ObjectMeta.metadata.{key} of "
                    "type map[string]string"
                )
        if res.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        out = copy.deepcopy(body)
        out["apiVersion"], out["kind"] = res.group_version, res.kind
        out["metadata"] = dict(meta)
        return out

    def _meta_errors(self, res: Resource, meta: JSON) -> list[podspec.FieldError]:
        name = meta.get("name", "")
        errors = [
            e
            for e in podspec.validate_metadata({**meta, "name": "x"}, res.namespaced)
            if e.path != "metadata.name"
        ]
        if not name and not meta.get("generateName"):
            errors.insert(
                0,
                podspec.FieldError(
                    "Required", "metadata.name", detail="name or generateName is required"
                ),
            )
            return errors
        if not name:
            return errors
        if res.names == "path":
            bad = next((s for s in ("/", "%") if s in name), None)
            if name in (".", ".."):
                errors.insert(
                    0,
                    podspec.FieldError("Invalid", "metadata.name", name, f"may not be '{name}'"),
                )
            elif bad:
                errors.insert(
                    0,
                    podspec.FieldError(
                        "Invalid", "metadata.name", name, f"may not contain '{bad}'"
                    ),
                )
            return errors
        pattern, message, limit = {
            "label": (podspec.DNS_LABEL, podspec.DNS1123_LABEL_MSG, 63),
            "dns1035": (resources.DNS1035, resources.DNS1035_MSG, 63),
            "subdomain": (podspec.DNS_SUBDOMAIN, podspec.DNS1123_SUBDOMAIN_MSG, 253),
        }[res.names]
        if len(name) > limit:
            errors.insert(
                0,
                podspec.FieldError(
                    "Invalid", "metadata.name", name, f"must be no more than {limit} characters"
                ),
            )
        elif not pattern.match(name):
            errors.insert(0, podspec.FieldError("Invalid", "metadata.name", name, message))
        return errors

    def _managed(self, obj: JSON, opts: Options, operation: str, body: Any, sub: str) -> None:
        manager = opts.field_manager or opts.default_manager or "unknown"
        entries = [
            e
            for e in obj["metadata"].get("managedFields") or []
            if not (
                e.get("manager") == manager
                and e.get("operation") == operation
                and e.get("subresource", "") == sub
            )
        ]
        entry: JSON = {
            "manager": manager,
            "operation": operation,
            "apiVersion": obj.get("apiVersion", ""),
            "time": now_rfc3339(),
            "fieldsType": "FieldsV1",
            "fieldsV1": fields_v1(body if isinstance(body, dict) else {}),
        }
        if sub:
            entry["subresource"] = sub
        entries.append(entry)
        obj["metadata"]["managedFields"] = entries

    # -- verbs -------------------------------------------------------------------------------
    def list_objects(self, res: Resource, namespace: str, query: dict[str, str]) -> JSON:
        labels = label_selector_matcher(query.get("labelSelector", ""))
        fields = field_selector_matcher(query.get("fieldSelector", ""), res.group_resource)
        if namespace and res.namespaced and self.c.get("namespaces", "", namespace) is None:
            items: list[JSON] = []
        else:
            items = [
                obj
                for obj in self.c.items(res.group_resource, namespace if namespace else None)
                if labels(obj["metadata"].get("labels") or {}) and fields(obj)
            ]
        meta: JSON = {"resourceVersion": str(self.c.revision)}
        limit = int(query.get("limit") or 0)
        start = int(base64.b64decode(query["continue"]).decode()) if query.get("continue") else 0
        if limit and start + limit < len(items):
            meta["continue"] = base64.b64encode(str(start + limit).encode()).decode()
            meta["remainingItemCount"] = len(items) - start - limit
            items = items[start : start + limit]
        elif start:
            items = items[start:]
        if res.crd:
            shown = [self._typed(res, obj) for obj in items]
        else:
            shown = [
                {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")} for obj in items
            ]
        return {
            "kind": res.list_kind_name,
            "apiVersion": res.group_version,
            "metadata": meta,
            "items": shown,
        }

    def get(self, res: Resource, namespace: str, name: str, sub: str = "") -> JSON:
        if namespace:
            self.require_namespace(namespace, creating=False)
        obj = self._get(res, namespace, name)
        if sub == "scale":
            return self._scale(res, obj)
        return self._typed(res, obj)

    def create(self, res: Resource, namespace: str, body: Any, opts: Options) -> JSON:
        if namespace:
            self.require_namespace(namespace, creating=True)
        gr = res.group_resource
        if gr == "pods":
            obj = self._decode_pod(body, namespace, opts)
        else:
            obj = self._check_body(res, body, namespace)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + random_suffix()
        name = meta.get("name", "")
        if gr == "nodes":
            errors = self._meta_errors(res, meta)
            if errors:
                raise invalid(res, name, errors)
            if self.c.get("nodes", "", name) is not None:
                raise already_exists("nodes", name)
            status = obj.get("status") or {}
            address = next(
                (
                    a.get("address", "")
                    for a in status.get("addresses", [])
                    if a.get("type") == "InternalIP"
                ),
                "",
            )
            if opts.dry_run:
                return obj
            return self.c.register_node(name, address, meta.get("labels") or {}, False)
        self._prepare(res, namespace, obj, None, opts)
        errors = self._meta_errors(res, meta) + self._validate(res, namespace, obj, None)
        if errors:
            raise invalid(res, name, errors)
        if self.c.get(gr, namespace, name) is not None:
            raise already_exists(gr, name)
        self._admit(res, namespace, obj, None, opts)
        obj["metadata"] = self.c.new_metadata(meta, namespace)
        if opts.dry_run:
            obj["metadata"].pop("resourceVersion", None)
        if gr in GENERATION or res.crd:
            obj["metadata"]["generation"] = 1
        self._managed(obj, opts, "Update", body, "")
        if opts.dry_run:
            return self._typed(res, obj)
        self.c.put(gr, namespace, obj)
        self._after_create(res, namespace, obj)
        return self._typed(res, obj)

    def update(  # noqa: PLR0917 - positional like the request's parts
        self, res: Resource, namespace: str, name: str, sub: str, body: Any, opts: Options
    ) -> JSON:
        if namespace:
            self.require_namespace(namespace, creating=False)
        old = self._get(res, namespace, name)
        if sub == "scale":
            return self._update_scale(res, old, body, opts)
        new = self._check_body(res, body, namespace)
        if new["metadata"].get("name") != name:
            raise bad_request(
                f"the name of the object ({new['metadata'].get('name')}) does not match the "
                f"name on the URL ({name})"
            )
        wanted = new["metadata"].get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise conflict(res.group_resource, name)
        if res.crd and not wanted:
            raise invalid(
                res,
                name,
                [
                    podspec.FieldError(
                        "Invalid",
                        "metadata.resourceVersion",
                        "0x0",
                        "must be specified for an update",
                    )
                ],
            )
        return self._store_update(res, namespace, old, new, sub, opts, "Update", body)

    def _store_update(  # noqa: PLR0917 - positional like the request's parts
        self,
        res: Resource,
        namespace: str,
        old: JSON,
        new: JSON,
        sub: str,
        opts: Options,
        operation: str,
        body: Any,
    ) -> JSON:
        gr = res.group_resource
        has_status = "status" in res.subresources
        if sub == "status":
            status = new.get("status")
            new = copy.deepcopy(old)
            if status is None:
                new.pop("status", None)
            else:
                new["status"] = status
            if gr == "pods":
                errors = self._pod_status_errors(new)
                if errors:
                    raise invalid(res, old["metadata"]["name"], errors)
        else:
            if has_status or gr in ("namespaces",):
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
                else:
                    new.pop("status", None)
            if gr == "namespaces":
                new["spec"] = old["spec"]
            meta = new["metadata"]
            for key in ("uid", "creationTimestamp", "namespace", "deletionTimestamp", "generation"):
                if key in old["metadata"]:
                    meta[key] = old["metadata"][key]
                else:
                    meta.pop(key, None)
            meta["name"] = old["metadata"]["name"]
            meta.setdefault("managedFields", old["metadata"].get("managedFields") or [])
            self._prepare(res, namespace, new, old, opts)
            errors = self._meta_errors(res, meta) + self._validate(res, namespace, new, old)
            if errors:
                raise invalid(res, old["metadata"]["name"], errors)
            self._admit(res, namespace, new, old, opts)
        spec_changed = {k: v for k, v in old.items() if k not in ("metadata", "status")} != {
            k: v for k, v in new.items() if k not in ("metadata", "status")
        }
        if "generation" in old["metadata"] and spec_changed and sub != "status":
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        self._managed(new, opts, operation, body, sub)
        if opts.dry_run:
            return self._typed(res, new)
        if new == old:
            return self._typed(res, old)
        new["metadata"]["resourceVersion"] = self.c.next_revision()
        self.c.put(gr, namespace, new)
        return self._typed(res, new)

    def patch(  # noqa: PLR0917 - positional like the request's parts
        self,
        res: Resource,
        namespace: str,
        name: str,
        sub: str,
        raw: bytes,
        content_type: str,
        opts: Options,
    ) -> tuple[int, JSON]:
        apply = content_type == "application/apply-patch+yaml"
        accepted = [
            "application/json-patch+json",
            "application/merge-patch+json",
            *([] if res.crd else ["application/strategic-merge-patch+json"]),
            "application/apply-patch+yaml",
        ]
        if content_type not in accepted:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(accepted)}",
                {},
            )
        if apply and not opts.field_manager:
            raise ApiError(
                422,
                "Invalid",
                'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is '
                "required for apply patch",
                {
                    "group": "meta.k8s.io",
                    "kind": "PatchOptions",
                    "causes": [
                        {
                            "reason": "FieldValueRequired",
                            "message": "Required value: is required for apply patch",
                            "field": "fieldManager",
                        }
                    ],
                },
            )
        if not apply and "force" in opts.query:
            raise ApiError(
                422,
                "Invalid",
                'PatchOptions.meta.k8s.io "" is invalid: force: Forbidden: may not be '
                "specified for non-apply patch",
                {
                    "group": "meta.k8s.io",
                    "kind": "PatchOptions",
                    "causes": [
                        {
                            "reason": "FieldValueForbidden",
                            "message": "Forbidden: may not be specified for non-apply patch",
                            "field": "force",
                        }
                    ],
                },
            )
        try:
            body = json.loads(raw or b"null")
        except ValueError as exc:
            if apply:
                raise ApiError(
                    415,
                    "UnsupportedMediaType",
                    "this kube-apiserver test double takes only JSON-encoded "
                    "application/apply-patch+yaml bodies (YAML is not supported)",
                    {},
                ) from exc
            raise bad_request(f"error decoding patch: {exc}") from exc
        if namespace:
            self.require_namespace(namespace, creating=False)
        old = self.c.get(res.group_resource, namespace, name)
        if apply:
            if not isinstance(body, dict):
                raise bad_request("error decoding YAML: apply patch must be an object")
            if body.get("apiVersion") != res.group_version:
                raise bad_request(
                    "Incorrect version specified in apply patch. Specified patch version: "
                    f"{body.get('apiVersion', '')}, expected: {res.group_version}"
                )
            if body.get("kind") != res.kind:
                raise bad_request(
                    f"the kind in the apply patch ({body.get('kind', '')}) does not match the "
                    f"kind of the resource ({res.kind})"
                )
            meta = body.get("metadata") or {}
            if meta.get("managedFields") is not None:
                raise bad_request("metadata.managedFields must be nil")
            if meta.get("name") != name:
                raise bad_request(
                    f"the name of the object ({meta.get('name', '')}) does not match the name "
                    f"on the URL ({name})"
                )
            if old is None and not sub:
                if namespace:
                    self.require_namespace(namespace, creating=True)
                created = self.create(res, namespace, body, opts)
                stored = self.c.get(res.group_resource, namespace, name)
                if stored is not None:
                    stored["metadata"]["managedFields"][-1]["operation"] = "Apply"
                    created["metadata"]["managedFields"] = copy.deepcopy(
                        stored["metadata"]["managedFields"]
                    )
                return 201, created
        if old is None:
            raise not_found(res.group_resource, name)
        if sub == "scale":
            scale = self._scale(res, old)
            return 200, self._update_scale(res, old, self._patched(scale, body, content_type), opts)
        current = self._typed(res, old)
        current["metadata"].pop("managedFields", None)
        new = self._patched(current, body, content_type)
        if not isinstance(new, dict):
            raise bad_request("the patched object is not an object")
        new = self._check_body(res, new, namespace)
        if new["metadata"].get("name") != name:
            raise bad_request(
                f"the name of the object ({new['metadata'].get('name')}) does not match the "
                f"name on the URL ({name})"
            )
        wanted = (
            (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        )
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise conflict(res.group_resource, name)
        new["metadata"]["managedFields"] = copy.deepcopy(old["metadata"].get("managedFields") or [])
        operation = "Apply" if apply else "Update"
        return 200, self._store_update(res, namespace, old, new, sub, opts, operation, body)

    def _patched(self, current: JSON, body: Any, content_type: str) -> Any:
        if content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise bad_request(
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            return json_patch(current, body)
        if not isinstance(body, dict):
            raise bad_request(
                "json: cannot unmarshal array into Go value of type map[string]interface {}"
            )
        if content_type == "application/apply-patch+yaml":
            body = (
                {k: v for k, v in body.items() if k != "status"}
                if "status" not in current
                else body
            )
        return json_merge_patch(current, body)

    def delete(self, res: Resource, namespace: str, name: str, opts: Options) -> JSON:
        if namespace:
            self.require_namespace(namespace, creating=False)
        gr = res.group_resource
        obj = self._get(res, namespace, name)
        if gr == "namespaces":
            if name in INITIAL_NAMESPACES:
                raise ApiError(
                    403,
                    "Forbidden",
                    f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                    {"name": name, "kind": "namespaces"},
                )
            if opts.dry_run:
                return self._typed(res, obj)
            if obj["status"]["phase"] != "Terminating":
                obj["status"]["phase"] = "Terminating"
                obj["metadata"]["deletionTimestamp"] = now_rfc3339()
                self.c.touch(obj)
                self.c.later(NAMESPACE_FINALIZE_DELAY, lambda: self.c._finalize_namespace(name))
            return self._typed(res, obj)
        if opts.dry_run:
            return self._typed(res, obj) if gr in ("pods", CRD) else self._success(res, obj)
        policy = opts.propagation
        if not policy and gr == "jobs.batch":
            policy = "Orphan"
            opts.warnings.append(
                "child pods are preserved by default when jobs are deleted; set "
                "propagationPolicy=Background to remove them or set propagationPolicy=Orphan to "
                "suppress this warning"
            )
        if policy == "Orphan":
            self._orphan(obj["metadata"]["uid"])
        elif policy == "Foreground":
            self._delete_dependents(obj["metadata"]["uid"])
        if gr == CRD:
            self._delete_crd(obj)
        self.c.remove(gr, namespace, name)
        if gr == "pods":
            deleted = self._typed(res, obj)
            deleted["metadata"]["deletionTimestamp"] = now_rfc3339()
            deleted["metadata"]["deletionGracePeriodSeconds"] = 0
            return deleted
        if gr == CRD:
            return self._typed(res, obj)
        return self._success(res, obj)

    def _success(self, res: Resource, obj: JSON) -> JSON:
        details: JSON = {"name": obj["metadata"]["name"]}
        if res.group:
            details["group"] = res.group
        details["kind"] = res.plural
        details["uid"] = obj["metadata"]["uid"]
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    def delete_collection(
        self, res: Resource, namespace: str, query: dict[str, str], opts: Options
    ) -> JSON:
        listed = self.list_objects(res, namespace, query)
        for item in listed["items"]:
            with contextlib.suppress(ApiError):
                self.delete(
                    res, item["metadata"].get("namespace", ""), item["metadata"]["name"], opts
                )
        return listed

    def _orphan(self, uid: str) -> None:
        for obj in list(self.c.objects.values()):
            refs = obj["metadata"].get("ownerReferences") or []
            kept = [r for r in refs if r.get("uid") != uid]
            if len(kept) != len(refs):
                if kept:
                    obj["metadata"]["ownerReferences"] = kept
                else:
                    del obj["metadata"]["ownerReferences"]
                self.c.touch(obj)

    def _delete_dependents(self, uid: str) -> None:
        for key, obj in list(self.c.objects.items()):
            if any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or []):
                self._delete_dependents(obj["metadata"]["uid"])
                self.c.remove(*key)

    def _delete_crd(self, crd: JSON) -> None:
        gr = crd["metadata"]["name"]
        for key in [k for k in self.c.objects if k[0] == gr]:
            del self.c.objects[key]

    # -- type-specific parts ---------------------------------------------------------------
    def _prepare(
        self, res: Resource, namespace: str, obj: JSON, old: JSON | None, opts: Options
    ) -> None:
        """Defaults and normalisation (before validation)."""
        gr = res.group_resource
        if old is None and "status" in res.subresources and gr != "pods":
            # status is the controllers' (kubelet's) to write; built-in types start with {}
            obj.pop("status", None)
            if not res.crd:
                obj["status"] = {}
        if gr == "secrets":
            self._normalize_secret(obj)
        elif gr == "configmaps":
            for key in ("data", "binaryData"):
                values = obj.get(key)
                if values is not None and (
                    not isinstance(values, dict)
                    or not all(isinstance(v, str) for v in values.values())
                ):
                    raise bad_request(
                        f'ConfigMap in version "v1" cannot be handled as a ConfigMap: json: '
                        f"cannot unmarshal into Go struct field ConfigMap.{key} of type "
                        "map[string]string"
                    )
        elif gr == "namespaces" and old is None:
            name = obj["metadata"].get("name", "")
            labels = dict(obj["metadata"].get("labels") or {})
            labels["kubernetes.io/metadata.name"] = name
            obj["metadata"]["labels"] = labels
            obj["spec"] = {"finalizers": ["kubernetes"]}
            obj["status"] = {"phase": "Active"}
        elif gr == "namespaces":
            labels = dict(obj["metadata"].get("labels") or {})
            labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
            obj["metadata"]["labels"] = labels
        elif gr == "services":
            controllers.service_defaults(self.c, obj, old)
        elif gr in WORKLOADS:
            controllers.workload_defaults(gr, obj)
        elif gr == CRD:
            resources.crd_defaults(obj)
        elif gr == "events" and old is None:
            obj.setdefault("count", 1)
        elif gr == "pods" and old is not None:
            obj["spec"] = obj.get("spec") or {}

    def _validate(
        self, res: Resource, namespace: str, obj: JSON, old: JSON | None
    ) -> list[podspec.FieldError]:
        gr = res.group_resource
        if gr == "pods":
            if old is None:
                return podspec.validate_pod(obj)
            if obj.get("spec") != old.get("spec"):
                message = (
                    "pod updates may not change fields other than `spec.containers[*].image`,"
                    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
                    "`spec.tolerations` (only additions to existing tolerations),"
                    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was "
                    "previously negative)"
                )
                changed = _diff_keys(old.get("spec"), obj.get("spec"))
                return [podspec.FieldError("Forbidden", "spec", detail=f"{message}\n  {changed}")]
            return []
        if gr == "services":
            return controllers.service_errors(self.c, obj, old)
        if gr in WORKLOADS:
            return controllers.workload_errors(gr, obj, old)
        if gr == CRD:
            errors = resources.crd_errors(obj)
            if old is not None:
                for key in ("group",):
                    if obj["spec"].get(key) != old["spec"].get(key):
                        errors.append(
                            podspec.FieldError(
                                "Invalid", f"spec.{key}", obj["spec"].get(key), "field is immutable"
                            )
                        )
            return errors
        if res.crd and res.schema is not None:
            pruned, errors = resources.prune_custom_resource(obj, res.schema)
            for key in [k for k in obj if k not in pruned]:
                del obj[key]
            obj.update(pruned)
            return errors
        return []

    def _admit(
        self, res: Resource, namespace: str, obj: JSON, old: JSON | None, opts: Options
    ) -> None:
        """Admission after validation (ServiceAccount, Pod Security, allocations)."""
        gr = res.group_resource
        if gr == "pods" and old is None:
            self._admit_pod(namespace, obj, opts)
        elif gr == "services":
            errors = controllers.allocate_service(self.c, obj, old, opts.dry_run)
            if errors:
                raise invalid(res, obj["metadata"].get("name", ""), errors)

    def _after_create(self, res: Resource, namespace: str, obj: JSON) -> None:
        gr = res.group_resource
        name = obj["metadata"]["name"]
        if gr == "namespaces":
            self.c.later(SERVICE_ACCOUNT_DELAY, lambda: self.c._populate_namespace(name))
        elif gr == "jobs.batch":
            controllers.job_selector(obj)
        elif gr == CRD:
            obj["status"] = {
                "conditions": [],
                "acceptedNames": {"plural": "", "kind": ""},
                "storedVersions": [
                    v["name"] for v in obj["spec"].get("versions") or [] if v.get("storage")
                ],
            }
            self.c.later(CRD_NAMES_ACCEPTED_DELAY, lambda: self._crd_names_accepted(name))
            self.c.later(CRD_ESTABLISHED_DELAY, lambda: self._crd_established(name))

    def _crd_names_accepted(self, name: str) -> None:
        crd = self.c.get(CRD, "", name)
        if crd is None:
            return
        crd["status"]["acceptedNames"] = copy.deepcopy(crd["spec"]["names"])
        set_condition(crd, _condition("NamesAccepted", "True", "NoConflicts", "no conflicts found"))
        self.c.touch(crd)

    def _crd_established(self, name: str) -> None:
        crd = self.c.get(CRD, "", name)
        if crd is None:
            return
        set_condition(
            crd,
            _condition(
                "Established",
                "True",
                "InitialNamesAccepted",
                "the initial names have been accepted",
            ),
        )
        self.c.touch(crd)

    def _normalize_secret(self, body: JSON) -> None:
        data = body.get("data") or {}
        if not isinstance(data, dict):
            raise bad_request(
                'Secret in version "v1" cannot be handled as a Secret: json: cannot unmarshal '
                "into Go struct field Secret.data of type map[string][]uint8"
            )
        data = dict(data)
        for key, value in data.items():
            try:
                base64.b64decode(value, validate=True)
            except (ValueError, TypeError) as exc:
                raise bad_request(
                    f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data '
                    f"at input byte 0 in Secret.data[{key}]"
                ) from exc
        for key, value in (body.pop("stringData", None) or {}).items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        if data:
            body["data"] = data
        body.setdefault("type", "Opaque")

    # -- pods ----------------------------------------------------------------------------------
    def _decode_pod(self, body: Any, namespace: str, opts: Options) -> JSON:
        try:
            decoded = podspec.decode(body)
        except podspec.DecodeError as exc:
            raise bad_request(f'Pod in version "v1" cannot be handled as a Pod: {exc}') from exc
        if decoded.unknown:
            if opts.strict:
                listed = ", ".join(f'unknown field "{u}"' for u in decoded.unknown)
                raise bad_request(f"strict decoding error: {listed}")
            opts.warnings.extend(f'unknown field "{u}"' for u in decoded.unknown)
        pod = self._check_body(self.c.builtin_by_gr["pods"], decoded.obj, namespace)
        spec = pod.setdefault("spec", {})
        if not spec.get("nodeName"):
            spec.pop("nodeName", None)
        pod.pop("status", None)
        return pod

    def _admit_pod(self, namespace: str, pod: JSON, opts: Options) -> None:
        name = pod["metadata"]["name"]
        spec = pod["spec"]
        sa_name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        sa = self.c.get("serviceaccounts", namespace, sa_name)
        if sa is None:
            raise ApiError(
                403,
                "Forbidden",
                f'pods "{name}" is forbidden: error looking up service account '
                f'{namespace}/{sa_name}: serviceaccount "{sa_name}" not found',
                {"name": name, "kind": "pods"},
            )
        podspec.apply_defaults(pod)
        automount = spec.get("automountServiceAccountToken")
        if automount is None:
            automount = sa.get("automountServiceAccountToken", True)
        if automount:
            self._add_token_volume(pod)
        ns_labels = self.require_namespace(namespace, creating=True)["metadata"].get("labels") or {}
        level, version = podspec.pod_security_level(ns_labels, "enforce")
        failures = podspec.pod_security_violations(level, spec)
        if failures:
            raise ApiError(
                403,
                "Forbidden",
                f'pods "{name}" is forbidden: violates PodSecurity "{level}:{version}": '
                + ", ".join(failures),
                {"name": name, "kind": "pods"},
            )
        level, version = podspec.pod_security_level(ns_labels, "warn")
        failures = podspec.pod_security_violations(level, spec)
        if failures:
            opts.warnings.append(
                f'would violate PodSecurity "{level}:{version}": ' + ", ".join(failures)
            )
        pod["status"] = {"phase": "Pending", "qosClass": podspec.qos_class(pod)}

    def _add_token_volume(self, pod: JSON) -> None:
        spec = pod["spec"]
        path = "/var/run/secrets/kubernetes.io/serviceaccount"
        volume = "kube-api-access-" + random_suffix()
        added = False
        for container in spec.get("containers") or []:
            mounts = container.setdefault("volumeMounts", [])
            if any(m.get("mountPath") == path for m in mounts):
                continue
            mounts.append({"name": volume, "readOnly": True, "mountPath": path})
            added = True
        if not added:
            return
        spec.setdefault("volumes", []).append(
            {
                "name": volume,
                "projected": {
                    "sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {
                            "configMap": {
                                "name": "kube-root-ca.crt",
                                "items": [{"key": "ca.crt", "path": "ca.crt"}],
                            }
                        },
                        {
                            "downwardAPI": {
                                "items": [
                                    {
                                        "path": "namespace",
                                        "fieldRef": {
                                            "apiVersion": "v1",
                                            "fieldPath": "metadata.namespace",
                                        },
                                    }
                                ]
                            }
                        },
                    ],
                    "defaultMode": 420,
                },
            }
        )

    def _pod_status_errors(self, pod: JSON) -> list[podspec.FieldError]:
        status = pod.get("status") or {}
        errors: list[podspec.FieldError] = []
        phase = status.get("phase")
        phases = ["Pending", "Running", "Succeeded", "Failed", "Unknown"]
        if phase is not None and phase not in phases:
            supported = ", ".join(f'"{p}"' for p in phases)
            errors.append(
                podspec.FieldError(
                    "NotSupported", "status.phase", phase, f"supported values: {supported}"
                )
            )
        for index, cond in enumerate(status.get("conditions") or []):
            if cond.get("status") not in ("True", "False", "Unknown"):
                errors.append(
                    podspec.FieldError(
                        "NotSupported",
                        f"status.conditions[{index}].status",
                        cond.get("status", ""),
                        'supported values: "False", "True", "Unknown"',
                    )
                )
        return errors

    # -- scale -----------------------------------------------------------------------------------
    def _scale(self, res: Resource, obj: JSON) -> JSON:
        meta = obj["metadata"]
        selector = ((obj.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
                if k in meta
            },
            "spec": {"replicas": (obj.get("spec") or {}).get("replicas", 0)},
            "status": {
                "replicas": (obj.get("status") or {}).get("replicas", 0),
                "selector": ",".join(f"{k}={v}" for k, v in sorted(selector.items())),
            },
        }

    def _update_scale(self, res: Resource, obj: JSON, body: Any, opts: Options) -> JSON:
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        replicas = (body.get("spec") or {}).get("replicas", 0)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise ApiError.from_status(
                podspec.invalid_status(
                    "Scale",
                    obj["metadata"]["name"],
                    [
                        podspec.FieldError(
                            "Invalid",
                            "spec.replicas",
                            replicas,
                            "must be greater than or equal to 0",
                        )
                    ],
                )
            )
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != obj["metadata"]["resourceVersion"]:
            raise conflict(res.group_resource, obj["metadata"]["name"])
        if not opts.dry_run and obj["spec"].get("replicas") != replicas:
            obj["spec"]["replicas"] = replicas
            obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
            self.c.touch(obj)
        scale = self._scale(res, obj)
        scale["spec"]["replicas"] = replicas
        return scale


def parse_api_path(path: str) -> tuple[str, str, list[str]] | None:
    """`/api/v1/...` or `/apis/GROUP/VERSION/...` -> (group, version, remaining segments)."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        return "", "v1", parts[2:]
    if parts[0] == "apis" and len(parts) >= 3:
        return parts[1], parts[2], parts[3:]
    return None


def _streaming() -> ModuleType:
    """The runtime helper's streaming module (node/streaming.py), imported when first needed."""
    try:
        return importlib.import_module("tests.doubles.node.streaming")
    except ModuleNotFoundError as exc:
        if exc.name not in ("tests", "tests.doubles", "tests.doubles.node"):
            raise
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.append(here)
    return importlib.import_module("streaming")


class Handler(BaseHTTPRequestHandler):
    """One HTTP request; TLS handshake and authentication happen in the handler's thread."""

    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16  # one write per response; handle_one_request() flushes
    server: ApiServer

    def setup(self) -> None:
        conn: ssl.SSLSocket = self.request
        conn.settimeout(30)
        try:
            conn.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            self.server.log(f"TLS handshake error from {self.client_address[0]}: {exc}")
            raise ConnectionAbortedError from exc
        super().setup()

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        """Like the base class, without a `Server` header (kube-apiserver sends none)."""
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    def authenticate(self) -> tuple[str, list[str]] | None:
        cert = self.connection.getpeercert()
        if cert:
            subject = {k: v for rdn in cert.get("subject", ()) for k, v in rdn}
            groups = [
                v for rdn in cert.get("subject", ()) for k, v in rdn if k == "organizationName"
            ]
            return subject.get("commonName", ""), [*groups, "system:authenticated"]
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer":
            token = token.strip()
            if token and token == self.server.cluster.cfg.get("bootstrap_token"):
                return f"system:bootstrap:{token.split('.')[0]}", [
                    "system:bootstrappers",
                    "system:authenticated",
                ]
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return None

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        if len(path) > 1:
            path = path.rstrip("/")
        lists = parse_qs(url.query)
        query = {k: v[-1] for k, v in lists.items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        user = "-"
        opts = Options(query, manager=self._default_manager())
        try:
            identity = self.authenticate()
            user = identity[0] if identity else "system:anonymous"
            with self.server.cluster.lock:
                self.server.cluster.run_due()
                code, body = self.route(method, path, query, raw, identity, opts)
        except ApiError as err:
            code, body = err.code, err.status()
        except StreamRequest as stream:
            self.server.log(f"{method} {self.path} stream user={user}")
            self.stream(stream, lists)
            return
        except Exception as exc:  # a bug of the double: answered as kube-apiserver answers panics
            self.server.log(f"internal error: {traceback.format_exc()}")
            code, body = (
                500,
                ApiError(500, "InternalError", f"Internal error occurred: {exc!r}", {}).status(),
            )
        self.server.log(f"{method} {self.path} {code} user={user} peer={self.client_address[0]}")
        if isinstance(body, str):
            data, ctype = body.encode(), "text/plain; charset=utf-8"
        else:
            data, ctype = (
                json.dumps(body, separators=(",", ":")).encode() + b"\n",
                "application/json",
            )
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Audit-Id", str(uuid.uuid4()))
        for warning in opts.warnings:
            self.send_header("Warning", f'299 - "{warning}"')
        self.end_headers()
        self.wfile.write(data)

    def _default_manager(self) -> str:
        agent = self.headers.get("User-Agent") or ""
        return agent.split("/", 1)[0][:128]

    def stream(self, request: StreamRequest, query: dict[str, list[str]]) -> None:
        try:
            module = _streaming()
        except ImportError as exc:
            err = ApiError(
                503,
                "ServiceUnavailable",
                f"pods/{request.subresource} is not available: the kubelet streaming module of "
                f"the node image double (streaming.py) is missing ({exc})",
                {},
            )
            data = json.dumps(err.status()).encode() + b"\n"
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        module.serve(self, request.subresource, request.pod, query)

    def forbidden(  # noqa: PLR0917 - positional like the request's parts
        self,
        user: str,
        verb: str,
        res: Resource | None,
        sub: str,
        namespace: str,
        name: str,
        path: str,
    ) -> ApiError:
        if res is None:
            return ApiError(
                403, "Forbidden", f'forbidden: User "{user}" cannot {verb} path "{path}"', {}
            )
        resource = f"{res.plural}/{sub}" if sub else res.plural
        scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
        subject = f'{res.group_resource} "{name}"' if name else res.group_resource
        message = (
            f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" in API '
            f'group "{res.group}" {scope}'
        )
        details: JSON = {}
        if name:
            details["name"] = name
        if res.group:
            details["group"] = res.group
        details["kind"] = res.plural
        return ApiError(403, "Forbidden", message, details)

    def route(  # noqa: PLR0917 - positional like the request's parts
        self,
        method: str,
        path: str,
        query: dict[str, str],
        raw: bytes,
        identity: tuple[str, list[str]] | None,
        opts: Options,
    ) -> tuple[int, JSON | str]:
        cluster = self.server.cluster
        api = cluster.api
        public = path in ("/version", "/healthz", "/livez", "/readyz") or path.startswith(
            ("/healthz/", "/livez/", "/readyz/")
        )
        user = identity[0] if identity else "system:anonymous"
        groups = identity[1] if identity else []
        if public:
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", METHOD_NOT_ALLOWED, {})
            if path == "/version":
                return 200, api.version()
            if path.startswith("/readyz") and (time.monotonic() - cluster.started < READYZ_STARTUP):
                return (
                    500,
                    "[-]poststarthook/start-apiextensions-controllers failed: reason "
                    "withheld\nreadyz check failed\n",
                )
            return 200, "ok"
        is_master = "system:masters" in groups
        is_node = "system:nodes" in groups or "system:bootstrappers" in groups
        verb_of_method = {
            "GET": "get",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }
        discovery = path in ("/api", "/apis") or (
            path.startswith("/apis/") and path.count("/") == 2
        )
        parsed = parse_api_path(path)
        if discovery or (parsed is not None and not parsed[2]):
            if identity is None:
                raise self.forbidden(user, verb_of_method[method], None, "", "", "", path)
            if method != "GET":
                raise ApiError(405, "MethodNotAllowed", METHOD_NOT_ALLOWED, {})
            if path == "/api":
                return 200, api.api_versions()
            if path == "/apis":
                return 200, api.group_list()
            if parsed is None:
                return 200, api.group(path.split("/")[2])
            return 200, api.resource_list(parsed[0], parsed[1])
        if parsed is None:
            if identity is None or not is_master:
                raise self.forbidden(user, verb_of_method[method], None, "", "", "", path)
            raise unknown_resource()
        group, version, rest = parsed
        namespace = name = sub = ""
        if (
            rest[0] == "namespaces"
            and len(rest) >= 3
            and not (group == "" and len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            namespace, rest = rest[1], rest[2:]
            if len(rest) > 3:
                raise unknown_resource()
        elif len(rest) > 3:
            raise unknown_resource()
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        res = cluster.served(group, version, plural)
        if (
            res is None
            or (namespace and not res.namespaced)
            or (sub and sub not in res.subresources)
        ):
            raise unknown_resource()
        if res.namespaced and not namespace and name:
            raise unknown_resource()
        watch = query.get("watch") in ("1", "true")
        if method == "GET":
            verb = "get" if name else ("watch" if watch else "list")
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        else:
            verb = verb_of_method[method]
        if sub in ("log", "portforward") and method == "POST":
            verb = "create"
        allowed = is_master or (
            is_node
            and verb in NODE_RULES.get(f"{res.group_resource}{'/' + sub if sub else ''}", set())
        )
        if is_node and not is_master and res.group_resource == "nodes" and verb == "create":
            allowed = True
        if not allowed:
            raise self.forbidden(user, verb, res, sub, namespace, name, path)
        if watch:
            raise ApiError(405, "MethodNotAllowed", METHOD_NOT_ALLOWED, {})
        if sub in ("log", "portforward"):
            if method not in ("GET", "POST"):
                raise ApiError(405, "MethodNotAllowed", METHOD_NOT_ALLOWED, {})
            api.require_namespace(namespace, creating=False)
            pod = api.get(res, namespace, name)
            raise StreamRequest(sub, pod)
        table = wants_table(self.headers.get("Accept") or "")
        body: Any = None
        if raw and method in ("POST", "PUT"):
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise bad_request(
                    f"the object provided is unrecognized (must be of type {res.kind}): "
                    f"couldn't get version/kind; json parse error: {exc}"
                ) from exc
        if method == "DELETE" and raw:
            with contextlib.suppress(ValueError):
                options = json.loads(raw)
                if isinstance(options, dict):
                    opts.propagation = opts.propagation or options.get("propagationPolicy") or ""
                    if options.get("orphanDependents") is True and not opts.propagation:
                        opts.propagation = "Orphan"
                    if "All" in (options.get("dryRun") or []):
                        opts.dry_run = True
        if method == "GET" and not name:
            listed = api.list_objects(res, namespace, query)
            return 200, as_table(res.plural, listed) if table else listed
        if method == "POST" and not name:
            return 201, api.create(res, namespace, body, opts)
        if method == "GET":
            got = api.get(res, namespace, name, sub)
            return 200, as_table(res.plural, got) if table and not sub else got
        if method == "PUT" and name:
            return 200, api.update(res, namespace, name, sub, body, opts)
        if method == "PATCH" and name:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            return api.patch(res, namespace, name, sub, raw, ctype, opts)
        if method == "DELETE" and name and not sub:
            return 200, api.delete(res, namespace, name, opts)
        if method == "DELETE" and not name:
            return 200, api.delete_collection(res, namespace, query, opts)
        raise ApiError(405, "MethodNotAllowed", METHOD_NOT_ALLOWED, {})


# -- server-side printing (what `kubectl get` asks for: Accept ...;as=Table;v=v1;g=meta.k8s.io) --
def _human_age(created: str) -> str:
    """An age the way kube-apiserver prints it (duration.HumanDuration, simplified)."""
    start = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc
    )
    seconds = int((datetime.datetime.now(datetime.timezone.utc) - start).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 48 * 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def _node_cells(obj: JSON) -> list[Any]:
    labels = obj["metadata"].get("labels") or {}
    roles = sorted(k.split("/", 1)[1] for k in labels if k.startswith("node-role.kubernetes.io/"))
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in obj.get("status", {}).get("conditions") or []
    )
    version = obj.get("status", {}).get("nodeInfo", {}).get("kubeletVersion", "")
    return ["Ready" if ready else "NotReady", ",".join(roles) or "<none>", "AGE", version]


_TABLE_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "nodes": [("Status", "string"), ("Roles", "string"), ("Age", "string"), ("Version", "string")],
    "namespaces": [("Status", "string"), ("Age", "string")],
    "configmaps": [("Data", "integer"), ("Age", "string")],
    "secrets": [("Type", "string"), ("Data", "integer"), ("Age", "string")],
    "serviceaccounts": [("Secrets", "integer"), ("Age", "string")],
}


def _cells(resource: str, obj: JSON) -> list[Any]:
    if resource == "nodes":
        cells = _node_cells(obj)
    elif resource == "namespaces":
        cells = [obj.get("status", {}).get("phase", "Active"), "AGE"]
    elif resource == "configmaps":
        cells = [len(obj.get("data") or {}) + len(obj.get("binaryData") or {}), "AGE"]
    elif resource == "secrets":
        cells = [obj.get("type", "Opaque"), len(obj.get("data") or {}), "AGE"]
    elif resource == "serviceaccounts":
        cells = [len(obj.get("secrets") or []), "AGE"]
    else:
        cells = ["AGE"]
    age = _human_age(obj["metadata"].get("creationTimestamp", now_rfc3339()))
    return [obj["metadata"]["name"], *(age if c == "AGE" else c for c in cells)]


def as_table(resource: str, body: JSON) -> JSON:
    """A meta.k8s.io/v1 Table of a list or a single object, rows carrying object metadata."""
    objects = body.get("items", [body])
    columns = [("Name", "string"), *_TABLE_COLUMNS.get(resource, [("Age", "string")])]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": body.get("metadata", {}).get("resourceVersion", "")},
        "columnDefinitions": [
            {
                "name": name,
                "type": kind,
                "format": "name" if name == "Name" else "",
                "description": name,
                "priority": 0,
            }
            for name, kind in columns
        ],
        "rows": [
            {
                "cells": _cells(resource, obj),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": obj["metadata"],
                },
            }
            for obj in objects
        ],
    }


def wants_table(accept: str) -> bool:
    """True when the Accept header asks for a meta.k8s.io/v1 Table first."""
    for part in accept.split(","):
        params = dict(p.strip().split("=", 1) for p in part.split(";")[1:] if "=" in p)
        if params.get("as") == "Table" and params.get("g", "meta.k8s.io") == "meta.k8s.io":
            return params.get("v", "v1") == "v1"
        if part.strip().startswith(("application/json", "*/*")):
            return False
    return False


class ApiServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose accepted sockets become TLS sockets (handshake deferred)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, cfg: JSON, context: ssl.SSLContext, log_path: str) -> None:
        self.context = context
        self.log_file = open(log_path, "a", buffering=1)  # noqa: SIM115 - open while serving
        self.log_lock = threading.Lock()
        self.cluster = Cluster(cfg)
        self.api = self.cluster.api
        self.stopping = threading.Event()
        super().__init__((cfg.get("host", "0.0.0.0"), cfg.get("port", 6443)), Handler)
        self.controller_thread = threading.Thread(
            target=self._control_loop, name="controllers", daemon=True
        )
        self.controller_thread.start()

    def _control_loop(self) -> None:
        """The controller manager and scheduler: reconcile whenever the store changed."""
        seen = -1
        while not self.stopping.wait(CONTROLLER_PERIOD):
            try:
                with self.cluster.lock:
                    self.cluster.run_due()
                    if self.cluster.revision != seen:
                        seen = self.cluster.revision  # changes made here trigger another pass
                        controllers.reconcile(self.cluster)
            except Exception as exc:  # a controller bug must not stop the others
                self.log(f"controller error: {exc!r}")

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()
        self.log_file.close()

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        tls = self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return tls, addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError):
            self.log(f"error serving {client_address}: {exc!r}")

    def log(self, line: str) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        with self.log_lock:
            self.log_file.write(f"{stamp} {line}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="JSON written by the kubeadm double")
    args = parser.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cfg["cert"], cfg["key"])
    context.load_verify_locations(cfg["ca_cert"])
    context.verify_mode = ssl.CERT_OPTIONAL
    server = ApiServer(cfg, context, cfg["log"])
    server.log(
        f"kube-apiserver (kipik test double) {cfg['kubernetes_version']} serving on "
        f"0.0.0.0:{cfg.get('port', 6443)} for node {cfg['node_name']}"
    )
    server.serve_forever()


if __name__ == "__main__":
    main()
