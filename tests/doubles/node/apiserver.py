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
import json
import os
import random
import re
import socket
import ssl
import string
import sys
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

JSON = dict[str, Any]

NAMESPACED = {
    "configmaps": ("ConfigMap", "configmap", "cm"),
    "secrets": ("Secret", "secret", ""),
    "serviceaccounts": ("ServiceAccount", "serviceaccount", "sa"),
}
CLUSTER_SCOPED = {
    "namespaces": ("Namespace", "namespace", "ns"),
    "nodes": ("Node", "node", "no"),
}
VERBS = ["create", "delete", "get", "list", "patch", "update"]
INITIAL_NAMESPACES = ["default", "kube-node-lease", "kube-public", "kube-system"]
SERVICE_ACCOUNT_DELAY = 1.0
NODE_READY_DELAY = 1.5
NAMESPACE_FINALIZE_DELAY = 0.5
READYZ_STARTUP = 0.5


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


def not_found(resource: str, name: str) -> ApiError:
    return ApiError(
        404, "NotFound", f'{resource} "{name}" not found', {"name": name, "kind": resource}
    )


def conflict(resource: str, name: str) -> ApiError:
    """409 for an update whose resourceVersion is not the stored one."""
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        {"name": name, "kind": resource},
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


def field_selector_matcher(selector: str) -> Callable[[JSON], bool]:
    """Support metadata.name and metadata.namespace (=, ==, !=), as every resource does."""
    requirements: list[tuple[str, bool, str]] = []
    for term in _split_selector(selector):
        match = re.match(r"^\s*(metadata\.name|metadata\.namespace)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if not match:
            raise ApiError(
                400,
                "BadRequest",
                f'"{term.strip()}" is not a known field selector: only "metadata.name", '
                '"metadata.namespace"',
            )
        field, op, value = match.groups()
        requirements.append((field.split(".")[1], op != "!=", value))

    def matches(obj: JSON) -> bool:
        meta = obj["metadata"]
        return all((meta.get(attr) == value) == equal for attr, equal, value in requirements)

    return matches


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
        for name in INITIAL_NAMESPACES:
            self._store_namespace(name)
        self.register_node(cfg["node_name"], cfg["node_ip"], cfg.get("node_labels", {}), True)

    # -- background work -------------------------------------------------------------------
    def later(self, delay: float, action: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, action))

    def run_due(self) -> None:
        """Apply what controllers would have done by now (lazily, before each request)."""
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
        for key in ("selfLink", "deletionTimestamp", "managedFields"):
            meta.pop(key, None)
        return meta

    def put(self, resource: str, namespace: str, obj: JSON) -> JSON:
        self.objects[(resource, namespace, obj["metadata"]["name"])] = obj
        return obj

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
        ns = self.objects.get(("namespaces", "", name))
        if ns is None or ns["status"]["phase"] != "Active":
            return
        if ("configmaps", name, "kube-root-ca.crt") not in self.objects:
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
        if ("serviceaccounts", name, "default") not in self.objects:
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
        for key in [k for k in self.objects if k[1] == name and k[0] in NAMESPACED]:
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
        resources = {
            "cpu": str(os.cpu_count() or 1),
            "ephemeral-storage": "61202244Ki",
            "hugepages-2Mi": "0",
            "memory": "24590692Ki",
            "pods": "110",
        }
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
            },
            "status": {
                "capacity": resources,
                "allocatable": dict(resources),
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
        node = self.objects.get(("nodes", "", name))
        if node is None:
            return
        if not self.cni_installed():
            self.later(0.25, lambda: self._node_ready_check(name))
            return
        node["status"]["conditions"] = _node_conditions(True, now_rfc3339())
        node["metadata"]["resourceVersion"] = self.next_revision()


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


class Api:
    """Routing and the semantics of the core/v1 resources."""

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

    def resource_list(self) -> JSON:
        resources = []
        for plural, (kind, singular, short) in {**NAMESPACED, **CLUSTER_SCOPED}.items():
            entry: JSON = {
                "name": plural,
                "singularName": singular,
                "namespaced": plural in NAMESPACED,
                "kind": kind,
                "verbs": VERBS,
            }
            if short:
                entry["shortNames"] = [short]
            resources.append(entry)
        return {"kind": "APIResourceList", "groupVersion": "v1", "resources": resources}

    # -- helpers -----------------------------------------------------------------------------
    def _get(self, resource: str, namespace: str, name: str) -> JSON:
        obj = self.c.objects.get((resource, namespace, name))
        if obj is None:
            raise not_found(resource, name)
        return obj

    def _require_namespace(self, namespace: str, creating: bool) -> None:
        ns = self.c.objects.get(("namespaces", "", namespace))
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

    def _kind_of(self, resource: str) -> str:
        return {**NAMESPACED, **CLUSTER_SCOPED}[resource][0]

    def _validate_body(self, resource: str, body: Any, namespace: str) -> JSON:
        kind = self._kind_of(resource)
        if not isinstance(body, dict):
            raise ApiError(400, "BadRequest", "the body of the request was in an unknown format")
        if body.get("kind") not in (None, kind) or body.get("apiVersion") not in (None, "v1"):
            raise ApiError(
                400,
                "BadRequest",
                f"the API version in the data ({body.get('apiVersion')}) does not match the "
                f"expected API version (v1)",
            )
        meta = body.get("metadata") or {}
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if namespace and meta.get("namespace") not in (None, "", namespace):
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the "
                "request",
            )
        name = meta.get("name") or ""
        if not name and not meta.get("generateName"):
            raise ApiError(
                422,
                "Invalid",
                f'{kind} "" is invalid: metadata.name: Required value: name or generateName is '
                "required",
                {
                    "kind": kind,
                    "causes": [
                        {
                            "reason": "FieldValueRequired",
                            "message": "Required value: name or generateName is required",
                            "field": "metadata.name",
                        }
                    ],
                },
            )
        check = name or meta["generateName"] + "a"
        if (
            len(check) > 253
            or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", check)
            or (
                resource == "namespaces"
                and not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", check)
            )
        ):
            rule = (
                "a lowercase RFC 1123 label must consist of lower case alphanumeric "
                "characters or '-', and must start and end with an alphanumeric character"
                if resource == "namespaces"
                else "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric "
                "character"
            )
            message = f'Invalid value: "{name}": {rule}'
            raise ApiError(
                422,
                "Invalid",
                f'{kind} "{name}" is invalid: metadata.name: {message}',
                {
                    "name": name,
                    "kind": kind,
                    "causes": [
                        {
                            "reason": "FieldValueInvalid",
                            "message": message,
                            "field": "metadata.name",
                        }
                    ],
                },
            )
        for field in ("labels", "annotations"):
            values = meta.get(field) or {}
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                raise ApiError(400, "BadRequest", f"metadata.{field} values must be strings")
        valid: JSON = copy.deepcopy(body)
        valid["kind"], valid["apiVersion"] = kind, "v1"
        if resource == "secrets":
            self._normalize_secret(valid)
        if resource == "configmaps":
            for field in ("data", "binaryData"):
                values = valid.get(field)
                if values is not None and (
                    not isinstance(values, dict)
                    or not all(isinstance(v, str) for v in values.values())
                ):
                    raise ApiError(400, "BadRequest", f"ConfigMap.{field} values must be strings")
        return valid

    def _normalize_secret(self, body: JSON) -> None:
        data = dict(body.get("data") or {})
        for key, value in data.items():
            try:
                base64.b64decode(value, validate=True)
            except (ValueError, TypeError) as exc:
                raise ApiError(
                    400,
                    "BadRequest",
                    f"illegal base64 data at input byte 0 in Secret.data[{key}]",
                ) from exc
        for key, value in (body.pop("stringData", None) or {}).items():
            data[key] = base64.b64encode(str(value).encode()).decode()
        if data:
            body["data"] = data
        body.setdefault("type", "Opaque")

    # -- verbs -------------------------------------------------------------------------------
    def list(self, resource: str, namespace: str, query: dict[str, str]) -> JSON:
        labels = label_selector_matcher(query.get("labelSelector", ""))
        fields = field_selector_matcher(query.get("fieldSelector", ""))
        items = [
            obj
            for (res, ns, _), obj in sorted(self.c.objects.items())
            if res == resource
            and (not namespace or ns == namespace)
            and labels(obj["metadata"].get("labels") or {})
            and fields(obj)
        ]
        if (
            namespace
            and resource in NAMESPACED
            and ("namespaces", "", namespace) not in self.c.objects
        ):
            items = []
        return {
            "kind": self._kind_of(resource) + "List",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self.c.revision)},
            "items": [
                {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")} for obj in items
            ],
        }

    def create(self, resource: str, namespace: str, body: Any) -> JSON:
        if namespace:
            self._require_namespace(namespace, creating=True)
        body = self._validate_body(resource, body, namespace)
        meta = dict(body.get("metadata") or {})
        if not meta.get("name"):
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        name = meta["name"]
        if (resource, namespace, name) in self.c.objects:
            raise ApiError(
                409,
                "AlreadyExists",
                f'{resource} "{name}" already exists',
                {"name": name, "kind": resource},
            )
        if resource == "nodes":
            status = body.get("status") or {}
            address = next(
                (
                    a.get("address", "")
                    for a in status.get("addresses", [])
                    if a.get("type") == "InternalIP"
                ),
                "",
            )
            return self.c.register_node(name, address, meta.get("labels") or {}, False)
        body["metadata"] = self.c.new_metadata(meta, namespace)
        if resource == "namespaces":
            return self._create_namespace(body)
        return self.c.put(resource, namespace, body)

    def _create_namespace(self, body: JSON) -> JSON:
        name = body["metadata"]["name"]
        labels = dict(body["metadata"].get("labels") or {})
        labels["kubernetes.io/metadata.name"] = name
        body["metadata"]["labels"] = labels
        body["spec"] = {"finalizers": ["kubernetes"]}
        body["status"] = {"phase": "Active"}
        self.c.put("namespaces", "", body)
        self.c.later(SERVICE_ACCOUNT_DELAY, lambda: self.c._populate_namespace(name))
        return body

    def get(self, resource: str, namespace: str, name: str) -> JSON:
        if namespace:
            self._require_namespace(namespace, creating=False)
        return self._get(resource, namespace, name)

    def _store_update(self, resource: str, namespace: str, old: JSON, new: JSON) -> JSON:
        meta = new.setdefault("metadata", {})
        for key in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp"):
            if key in old["metadata"]:
                meta[key] = old["metadata"][key]
        if resource == "namespaces":
            new["status"] = old["status"]
            new["spec"] = old["spec"]
        if resource == "nodes":
            new["status"] = old["status"]
        meta["resourceVersion"] = self.c.next_revision()
        return self.c.put(resource, namespace, new)

    def update(self, resource: str, namespace: str, name: str, body: Any) -> JSON:
        if namespace:
            self._require_namespace(namespace, creating=False)
        old = self._get(resource, namespace, name)
        body = self._validate_body(resource, body, namespace)
        if body["metadata"].get("name") != name:
            raise ApiError(
                400,
                "BadRequest",
                "the name of the object "
                f"({body['metadata'].get('name')}) does not match the name on the URL"
                f" ({name})",
            )
        wanted = body["metadata"].get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise conflict(resource, name)
        return self._store_update(resource, namespace, old, body)

    def patch(self, resource: str, namespace: str, name: str, body: Any, content_type: str) -> JSON:
        if namespace:
            self._require_namespace(namespace, creating=False)
        old = self._get(resource, namespace, name)
        if content_type == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(
                    400, "BadRequest", "the body of the request was in an unknown format"
                )
            new = json_patch(old, body)
        elif content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            if not isinstance(body, dict):
                raise ApiError(
                    400, "BadRequest", "the body of the request was in an unknown format"
                )
            new = json_merge_patch(old, body)
        else:
            raise ApiError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                "include: application/json-patch+json, application/merge-patch+json, "
                "application/strategic-merge-patch+json",
            )
        new = self._validate_body(resource, new, namespace)
        wanted = (
            (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        )
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise conflict(resource, name)
        return self._store_update(resource, namespace, old, new)

    def delete(self, resource: str, namespace: str, name: str) -> JSON:
        if namespace:
            self._require_namespace(namespace, creating=False)
        obj = self._get(resource, namespace, name)
        if resource == "namespaces":
            if name in INITIAL_NAMESPACES:
                raise ApiError(
                    403,
                    "Forbidden",
                    f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                    {"name": name, "kind": "namespaces"},
                )
            if obj["status"]["phase"] != "Terminating":
                obj["status"]["phase"] = "Terminating"
                obj["metadata"]["deletionTimestamp"] = now_rfc3339()
                obj["metadata"]["resourceVersion"] = self.c.next_revision()
                self.c.later(NAMESPACE_FINALIZE_DELAY, lambda: self.c._finalize_namespace(name))
            return obj
        del self.c.objects[(resource, namespace, name)]
        self.c.next_revision()
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": name, "kind": resource, "uid": obj["metadata"]["uid"]},
        }


ROUTE = re.compile(
    r"^/api/v1(?:/namespaces/(?P<ns>[^/]+)/(?P<nsres>[^/]+)(?:/(?P<nsname>[^/]+))?"
    r"|/(?P<res>[^/]+)(?:/(?P<name>[^/]+))?)/?$"
)


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
            return subject.get("commonName", ""), groups
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer ") :].strip()
            if token == self.server.cluster.cfg.get("bootstrap_token"):
                return f"system:bootstrap:{token.split('.')[0]}", ["system:bootstrappers"]
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return None

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        if len(path) > 1:
            path = path.rstrip("/")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        user = "-"
        try:
            identity = self.authenticate()
            user = identity[0] if identity else "system:anonymous"
            with self.server.cluster.lock:
                self.server.cluster.run_due()
                code, body = self.route(method, path, query, raw, identity)
        except ApiError as err:
            code, body = err.code, err.status()
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
        self.end_headers()
        self.wfile.write(data)

    def forbidden(self, user: str, verb: str, resource: str, namespace: str, path: str) -> ApiError:
        if resource:
            scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            message = (
                f'{resource} is forbidden: User "{user}" cannot {verb} resource '
                f'"{resource}" in API group "" {scope}'
            )
            return ApiError(403, "Forbidden", message, {"kind": resource})
        return ApiError(
            403, "Forbidden", f'forbidden: User "{user}" cannot {verb} path "{path}"', {}
        )

    def route(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        raw: bytes,
        identity: tuple[str, list[str]] | None,
    ) -> tuple[int, JSON | str]:
        api = self.server.api
        public = path in ("/version", "/healthz", "/livez", "/readyz") or path.startswith(
            ("/healthz/", "/livez/", "/readyz/")
        )
        match = ROUTE.match(path)
        namespace = resource = name = ""
        if match:
            namespace = match["ns"] or ""
            resource = match["nsres"] or match["res"] or ""
            name = match["nsname"] or match["name"] or ""
            if match["res"] == "namespaces":
                resource, name = "namespaces", match["name"] or ""
        verb = {
            "GET": "list" if match and not name else "get",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }[method]
        is_master = identity is not None and "system:masters" in identity[1]
        is_bootstrap = identity is not None and "system:bootstrappers" in identity[1]
        if not public and not is_master:
            user = identity[0] if identity else "system:anonymous"
            if not (is_bootstrap and method == "POST" and resource == "nodes" and not namespace):
                raise self.forbidden(user, verb, resource, namespace, path)
        if public:
            if method != "GET":
                raise ApiError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                    {},
                )
            if path == "/version":
                return 200, api.version()
            if path.startswith("/readyz") and (
                time.monotonic() - self.server.cluster.started < READYZ_STARTUP
            ):
                return (
                    500,
                    "[-]poststarthook/start-apiextensions-controllers failed: reason "
                    "withheld\nreadyz check failed\n",
                )
            return 200, "ok"
        if method == "GET" and path in ("/api", "/api/"):
            return 200, api.api_versions()
        if method == "GET" and path in ("/api/v1", "/api/v1/"):
            return 200, api.resource_list()
        if method == "GET" and path in ("/apis", "/apis/"):
            return 200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
        known = resource in NAMESPACED or resource in CLUSTER_SCOPED
        if not match or not known or (namespace and resource not in NAMESPACED):
            raise unknown_resource()
        if query.get("watch") in ("1", "true"):
            raise ApiError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
                {},
            )
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                raise ApiError(
                    400, "BadRequest", f"the body of the request was in an unknown format: {exc}"
                ) from exc
        table = wants_table(self.headers.get("Accept") or "")
        if method == "GET" and not name:
            listed = api.list(resource, namespace, query)
            return 200, as_table(resource, listed) if table else listed
        if method == "POST" and not name:
            return 201, api.create(resource, namespace, body)
        if method == "GET" and name:
            got = api.get(resource, namespace, name)
            return 200, as_table(resource, got) if table else got
        if method == "PUT" and name:
            return 200, api.update(resource, namespace, name, body)
        if method == "PATCH" and name:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            return 200, api.patch(resource, namespace, name, body, ctype)
        if method == "DELETE" and name:
            return 200, api.delete(resource, namespace, name)
        raise ApiError(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
            {},
        )


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
        self.api = Api(self.cluster)
        super().__init__(("0.0.0.0", cfg.get("port", 6443)), Handler)

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
