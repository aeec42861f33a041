"""TEST DOUBLE support: the object store and API semantics of the outer-cluster double.

Part of the outer-cluster double (a kube-apiserver + one kubelet backed by the local Docker
engine, standing in for the outer Kubernetes cluster of pytest-kipik's pod backend). Here are the
resources (namespaces, pods, events, service accounts, one node), their create/get/list/patch/
delete semantics with resourceVersions and a change history for watches, authentication by
bearer token, the injected authorization denials, admission (service accounts, Pod Security) and
the garbage collector of owner references. The kubelet (kubelet.py) makes pods real.
"""

from __future__ import annotations

import base64
import copy
import datetime
import json
import random
import re
import secrets
import string
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tests.doubles.node import podspec
from tests.doubles.node.apiserver import (
    ApiError,
    json_merge_patch,
    json_patch,
    label_selector_matcher,
)

if TYPE_CHECKING:
    from tests.doubles.outer.kubelet import Kubelet

JSON = dict[str, Any]
KUBERNETES_VERSION = "v1.31.4"
INITIAL_NAMESPACES = ("default", "kube-node-lease", "kube-public", "kube-system")
ADMIN_USER = "kubernetes-admin"
HISTORY = 50000
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_UNSCHEDULABLE = (
    "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No "
    "preemption victims found for incoming pod."
)


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    details: JSON = {"name": name, "kind": resource}
    if group:
        details = {"name": name, "group": group, "kind": resource}
    qualified = f"{resource}.{group}" if group else resource
    return ApiError(404, "NotFound", f'{qualified} "{name}" not found', details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


@dataclass
class Identity:
    """An authenticated user."""

    name: str
    groups: list[str]
    uid: str = ""

    @property
    def is_admin(self) -> bool:
        return "system:masters" in self.groups


@dataclass
class Denial:
    """One injected authorization denial (None matches anything)."""

    verb: str
    resource: str
    namespace: str | None = None
    user: str | None = None

    def matches(self, user: str, verb: str, resource: str, namespace: str) -> bool:
        return (
            self.verb in ("*", verb)
            and self.resource in ("*", resource)
            and (self.namespace is None or self.namespace == namespace)
            and (self.user is None or self.user == user)
        )


@dataclass
class Change:
    """One entry of the change history a watch replays."""

    revision: int
    resource: str
    kind: str  # ADDED, MODIFIED, DELETED
    obj: JSON


class Store:
    """Objects by resource and (namespace, name), a revision counter and a change history."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.revision = 100
        self.objects: dict[str, dict[tuple[str, str], JSON]] = {}
        self.history: deque[Change] = deque(maxlen=HISTORY)

    def _record(self, resource: str, kind: str, obj: JSON) -> None:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self.history.append(Change(self.revision, resource, kind, copy.deepcopy(obj)))
        self.changed.notify_all()

    def add(self, resource: str, obj: JSON) -> JSON:
        meta = obj["metadata"]
        self.objects.setdefault(resource, {})[(meta.get("namespace", ""), meta["name"])] = obj
        self._record(resource, "ADDED", obj)
        return obj

    def modified(self, resource: str, obj: JSON) -> JSON:
        self._record(resource, "MODIFIED", obj)
        return obj

    def remove(self, resource: str, namespace: str, name: str) -> JSON | None:
        obj = self.objects.get(resource, {}).pop((namespace, name), None)
        if obj is not None:
            self._record(resource, "DELETED", obj)
        return obj

    def get(self, resource: str, namespace: str, name: str) -> JSON | None:
        return self.objects.get(resource, {}).get((namespace, name))

    def items(self, resource: str, namespace: str = "") -> list[JSON]:
        found = self.objects.get(resource, {})
        return [obj for (ns, _), obj in sorted(found.items()) if not namespace or ns == namespace]

    def oldest_revision(self) -> int:
        return self.history[0].revision if self.history else self.revision


# -- field selectors -----------------------------------------------------------------------------
def _split(selector: str) -> list[str]:
    return [term.strip() for term in selector.split(",") if term.strip()]


def _lookup(obj: JSON, path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


FIELDS: dict[str, list[str]] = {
    "pods": [
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ],
    "events": [
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ],
    "namespaces": ["status.phase"],
    "serviceaccounts": [],
    "nodes": ["spec.unschedulable"],
}


def field_selector(resource: str, selector: str) -> Callable[[JSON], bool]:
    """A field selector predicate with the fields kube-apiserver supports per resource."""
    allowed = ["metadata.name", "metadata.namespace", *FIELDS.get(resource, [])]
    terms: list[tuple[str, bool, str]] = []
    for term in _split(selector):
        match = re.match(r"^([A-Za-z.]+)\s*(==|=|!=)\s*(.*)$", term)
        if not match:
            raise bad_request(f"invalid selector: '{selector}'; can't understand '{term}'")
        name, op, value = match.groups()
        if name not in allowed:
            raise bad_request(f"field label not supported: {name}")
        terms.append((name, op != "!=", value))

    def matches(obj: JSON) -> bool:
        for name, equal, value in terms:
            actual = _lookup(obj, "source.component" if name == "source" else name)
            if (actual == value) != equal:
                return False
        return True

    return matches


def make_token(namespace: str, name: str, uid: str, audience: str) -> str:
    """A JWT-shaped service account token (signature random: only this double checks it)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    issued = int(time.time())
    header = {"alg": "RS256", "kid": secrets.token_hex(8)}
    claims = {
        "aud": [audience],
        "exp": issued + 365 * 86400,
        "iat": issued,
        "iss": audience,
        "jti": str(uuid.uuid4()),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": uid},
        },
        "nbf": issued,
        "sub": f"system:serviceaccount:{namespace}:{name}",
    }
    return ".".join(
        [
            b64(json.dumps(header).encode()),
            b64(json.dumps(claims).encode()),
            b64(secrets.token_bytes(64)),
        ]
    )


@dataclass
class Config:
    """What the server was started with."""

    instance: str
    node_name: str
    gateway: str
    port: int
    ca_pem: str
    namespaces: list[str] = field(default_factory=list)


class Cluster:
    """The API semantics over the store; the kubelet is attached after construction."""

    AUDIENCE = "https://kubernetes.default.svc.cluster.local"

    def __init__(self, cfg: Config, admin_token: str) -> None:
        self.cfg = cfg
        self.store = Store()
        self.kubelet: Kubelet | None = None
        self.tokens: dict[str, Identity] = {
            admin_token: Identity(ADMIN_USER, ["system:masters", "system:authenticated"])
        }
        self.sa_tokens: dict[tuple[str, str], str] = {}
        self.denials: list[Denial] = []
        self.hold_pending = False
        self.unschedulable_message = DEFAULT_UNSCHEDULABLE
        self.exec_protocols = ["v4.channel.k8s.io"]
        self.schedule_changed = threading.Condition(self.store.lock)
        self.event_keys: dict[tuple[str, str, str, str, str], JSON] = {}
        with self.store.lock:
            self.node = self._make_node()
            self.store.add("nodes", self.node)
            for name in [*INITIAL_NAMESPACES, *cfg.namespaces]:
                if not self.store.get("namespaces", "", name):
                    self._add_namespace({"metadata": {"name": name}})

    # -- helpers ---------------------------------------------------------------------------
    def _meta(self, meta: JSON, namespace: str) -> JSON:
        meta = dict(meta)
        if namespace:
            meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        for key in ("selfLink", "deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(key, None)
        return meta

    def _make_node(self) -> JSON:
        name = self.cfg.node_name
        resources = {
            "cpu": "2",
            "ephemeral-storage": "61202244Ki",
            "hugepages-2Mi": "0",
            "memory": "24590692Ki",
            "pods": "110",
        }
        stamp = now()
        return {
            "kind": "Node",
            "apiVersion": "v1",
            "metadata": self._meta(
                {
                    "name": name,
                    "labels": {
                        "beta.kubernetes.io/arch": "amd64",
                        "beta.kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "kubernetes.io/hostname": name,
                        "kubernetes.io/os": "linux",
                    },
                },
                "",
            ),
            "spec": {"podCIDR": "", "providerID": f"kipik-test-outer://{self.cfg.instance}"},
            "status": {
                "capacity": resources,
                "allocatable": dict(resources),
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "lastHeartbeatTime": stamp,
                        "lastTransitionTime": stamp,
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                    },
                ],
                "addresses": [
                    {"type": "InternalIP", "address": self.cfg.gateway},
                    {"type": "Hostname", "address": name},
                ],
                "nodeInfo": {
                    "kubeletVersion": KUBERNETES_VERSION,
                    "containerRuntimeVersion": "docker://20.10",
                    "operatingSystem": "linux",
                    "architecture": "amd64",
                    "osImage": "kipik-test outer-cluster double",
                    "kernelVersion": "",
                    "kubeProxyVersion": KUBERNETES_VERSION,
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            },
        }

    # -- authentication and authorization ---------------------------------------------------
    def authenticate(self, header: str) -> Identity:
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() == "bearer":  # in-cluster clients send "bearer"
            identity = self.tokens.get(token.strip())
            if identity is not None:
                return identity
        raise ApiError(401, "Unauthorized", "Unauthorized")

    def authorize(
        self,
        user: Identity,
        verb: str,
        resource: str,
        namespace: str,
        *,
        name: str = "",
        group: str = "",
    ) -> None:
        """Raise the RBAC 403 when an injected denial matches this request."""
        for denial in self.denials:
            if denial.matches(user.name, verb, resource, namespace):
                raise forbidden(user.name, verb, resource, namespace, name=name, group=group)

    def allowed(self, user: Identity, verb: str, resource: str, namespace: str) -> bool:
        return not any(d.matches(user.name, verb, resource, namespace) for d in self.denials)

    # -- namespaces ------------------------------------------------------------------------
    def _add_namespace(self, body: JSON) -> JSON:
        meta = dict(body.get("metadata") or {})
        name = meta["name"]
        labels = dict(meta.get("labels") or {})
        labels["kubernetes.io/metadata.name"] = name
        meta["labels"] = labels
        obj = {
            "kind": "Namespace",
            "apiVersion": "v1",
            "metadata": self._meta(meta, ""),
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self.store.add("namespaces", obj)
        self._add_service_account(name, {"metadata": {"name": "default"}})
        return obj

    def require_namespace(self, namespace: str, creating: bool) -> JSON:
        ns = self.store.get("namespaces", "", namespace)
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

    def create_namespace(self, body: Any) -> JSON:
        body = self._plain_body(body, "Namespace")
        meta = body.get("metadata") or {}
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + _suffix()
            body["metadata"] = meta
        errors = podspec.validate_metadata(meta, namespaced=False, label_names=True)
        if errors:
            raise invalid("Namespace", meta.get("name", ""), errors)
        if self.store.get("namespaces", "", meta["name"]):
            raise already_exists("namespaces", meta["name"])
        return self._add_namespace(body)

    def update_namespace(self, name: str, new: JSON) -> JSON:
        old = self.store.get("namespaces", "", name)
        if old is None:
            raise not_found("namespaces", name)
        meta = new.get("metadata") or {}
        errors = podspec.validate_labels(meta.get("labels") or {}, "metadata.labels")
        if errors:
            raise invalid("Namespace", name, errors)
        labels = dict(meta.get("labels") or {})
        labels["kubernetes.io/metadata.name"] = name
        old["metadata"]["labels"] = labels
        old["metadata"]["annotations"] = dict(meta.get("annotations") or {})
        if not old["metadata"]["annotations"]:
            old["metadata"].pop("annotations")
        return self.store.modified("namespaces", old)

    def delete_namespace(self, name: str) -> JSON:
        ns = self.store.get("namespaces", "", name)
        if ns is None:
            raise not_found("namespaces", name)
        if name in ("default", "kube-system", "kube-public"):
            raise ApiError(
                403,
                "Forbidden",
                f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                {"name": name, "kind": "namespaces"},
            )
        if ns["status"]["phase"] != "Terminating":
            ns["status"]["phase"] = "Terminating"
            ns["metadata"]["deletionTimestamp"] = now()
            self.store.modified("namespaces", ns)
            threading.Thread(target=self._finalize_namespace, args=(name,), daemon=True).start()
        return ns

    def _finalize_namespace(self, name: str) -> None:
        with self.store.lock:
            for pod in self.store.items("pods", name):
                self.delete_pod(name, pod["metadata"]["name"], grace=None, propagation=None)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with self.store.lock:
                if not self.store.items("pods", name):
                    for resource in ("serviceaccounts", "events"):
                        for obj in self.store.items(resource, name):
                            self.store.remove(resource, name, obj["metadata"]["name"])
                    self.store.remove("namespaces", "", name)
                    return
            time.sleep(0.1)

    # -- service accounts ------------------------------------------------------------------
    def _add_service_account(self, namespace: str, body: JSON) -> JSON:
        meta = self._meta(dict(body.get("metadata") or {}), namespace)
        obj = {"kind": "ServiceAccount", "apiVersion": "v1", "metadata": meta}
        for key in ("automountServiceAccountToken", "imagePullSecrets", "secrets"):
            if key in body:
                obj[key] = body[key]
        self.store.add("serviceaccounts", obj)
        token = make_token(namespace, meta["name"], meta["uid"], self.AUDIENCE)
        self.tokens[token] = self._sa_identity(namespace, meta["name"], meta["uid"])
        self.sa_tokens[(namespace, meta["name"])] = token
        return obj

    def _sa_identity(self, namespace: str, name: str, uid: str) -> Identity:
        return Identity(
            f"system:serviceaccount:{namespace}:{name}",
            [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
            uid,
        )

    def create_service_account(self, namespace: str, body: Any) -> JSON:
        self.require_namespace(namespace, creating=True)
        body = self._plain_body(body, "ServiceAccount", namespace)
        meta = body.get("metadata") or {}
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + _suffix()
        errors = podspec.validate_metadata(meta, namespaced=True)
        if errors:
            raise invalid("ServiceAccount", meta.get("name", ""), errors)
        if self.store.get("serviceaccounts", namespace, meta["name"]):
            raise already_exists("serviceaccounts", meta["name"])
        return self._add_service_account(namespace, body)

    def delete_service_account(self, namespace: str, name: str) -> JSON:
        obj = self.store.remove("serviceaccounts", namespace, name)
        if obj is None:
            raise not_found("serviceaccounts", name)
        token = self.sa_tokens.pop((namespace, name), None)
        for key, identity in list(self.tokens.items()):
            if key == token or identity.uid == obj["metadata"]["uid"]:
                del self.tokens[key]
        return obj

    def token_request(self, namespace: str, name: str, body: Any) -> JSON:
        sa = self.store.get("serviceaccounts", namespace, name)
        if sa is None:
            raise not_found("serviceaccounts", name)
        spec = (body or {}).get("spec") or {}
        seconds = int(spec.get("expirationSeconds") or 3600)
        token = make_token(namespace, name, sa["metadata"]["uid"], self.AUDIENCE)
        self.tokens[token] = self._sa_identity(namespace, name, sa["metadata"]["uid"])
        expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
        return {
            "kind": "TokenRequest",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": None},
            "spec": {
                "audiences": spec.get("audiences") or [self.AUDIENCE],
                "expirationSeconds": seconds,
                "boundObjectRef": spec.get("boundObjectRef"),
            },
            "status": {
                "token": token,
                "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
            },
        }

    # -- generic helpers ---------------------------------------------------------------------
    def _plain_body(self, body: Any, kind: str, namespace: str = "") -> JSON:
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        if body.get("kind") not in (None, "", kind) or body.get("apiVersion") not in (
            None,
            "",
            "v1",
        ):
            raise bad_request(
                f"the API version in the data ({body.get('apiVersion')}) does not match the "
                "expected API version (v1)"
            )
        meta = body.get("metadata") or {}
        if not isinstance(meta, dict):
            raise bad_request("metadata must be an object")
        if namespace and meta.get("namespace") not in (None, "", namespace):
            raise bad_request(
                "the namespace of the provided object does not match the namespace sent on the "
                "request"
            )
        return copy.deepcopy(body)

    # -- events -------------------------------------------------------------------------------
    def record_event(
        self,
        pod: JSON,
        reason: str,
        *,
        message: str,
        kind: str = "Normal",
        component: str = "kubelet",
        field_path: str = "",
    ) -> None:
        """Record (or count again) an event about a pod, as the kubelet/scheduler would."""
        with self.store.lock:
            meta = pod["metadata"]
            key = (meta["namespace"], meta["uid"], reason, message, field_path)
            existing = self.event_keys.get(key)
            stamp = now()
            if existing is not None and self.store.get(
                "events", meta["namespace"], existing["metadata"]["name"]
            ):
                existing["count"] += 1
                existing["lastTimestamp"] = stamp
                self.store.modified("events", existing)
                return
            involved = {
                "kind": "Pod",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
                "apiVersion": "v1",
                "resourceVersion": meta.get("resourceVersion", ""),
            }
            if field_path:
                involved["fieldPath"] = field_path
            source = {"component": component}
            if component == "kubelet":
                source["host"] = self.cfg.node_name
            event = {
                "kind": "Event",
                "apiVersion": "v1",
                "metadata": self._meta(
                    {"name": f"{meta['name']}.{secrets.token_hex(8)}"}, meta["namespace"]
                ),
                "involvedObject": involved,
                "reason": reason,
                "message": message,
                "source": source,
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
                "type": kind,
                "eventTime": None,
                "reportingComponent": component,
                "reportingInstance": self.cfg.node_name if component == "kubelet" else "",
            }
            self.event_keys[key] = event
            self.store.add("events", event)

    # -- pods -----------------------------------------------------------------------------------
    def create_pod(
        self, user: Identity, namespace: str, body: Any, strict: bool, warnings: list[str]
    ) -> JSON:
        self.require_namespace(namespace, creating=True)
        try:
            decoded = podspec.decode(body)
            if isinstance(body, dict):
                self._plain_body(body, "Pod", namespace)
        except podspec.DecodeError as exc:
            raise bad_request(f'Pod in version "v1" cannot be handled as a Pod: {exc}') from exc
        if decoded.unknown:
            if strict:
                listed = ", ".join(f'unknown field "{u}"' for u in decoded.unknown)
                raise bad_request(f"strict decoding error: {listed}")
            warnings.extend(f'unknown field "{u}"' for u in decoded.unknown)
        pod = decoded.obj
        pod["kind"], pod["apiVersion"] = "Pod", "v1"
        meta = pod.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + _suffix()
        name = meta.get("name", "")
        spec = pod.setdefault("spec", {})
        if not spec.get("nodeName"):
            spec.pop("nodeName", None)
        pod.pop("status", None)
        # admission: ServiceAccount (mutating), then validation, then Pod Security
        sa_name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        sa = self.store.get("serviceaccounts", namespace, sa_name)
        if sa is None:
            raise ApiError(
                403,
                "Forbidden",
                f'pods "{name}" is forbidden: error looking up service account '
                f'{namespace}/{sa_name}: serviceaccount "{sa_name}" not found',
                {"name": name, "kind": "pods"},
            )
        errors = podspec.validate_pod(pod)
        if errors:
            raise invalid("Pod", name, errors)
        podspec.apply_defaults(pod)
        errors = podspec.unsupported_by_double(pod)
        if errors:
            raise invalid("Pod", name, errors)
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
            warnings.append(
                f'would violate PodSecurity "{level}:{version}": ' + ", ".join(failures)
            )
        if self.store.get("pods", namespace, name):
            raise already_exists("pods", name)
        meta = self._meta(meta, namespace)
        meta["generation"] = 1
        pod["metadata"] = meta
        pod["status"] = {"phase": "Pending", "qosClass": podspec.qos_class(pod)}
        self.store.add("pods", pod)
        if self.kubelet is not None:
            self.kubelet.admit(pod)
        self.collect_garbage(namespace)
        return pod

    def _add_token_volume(self, pod: JSON) -> None:
        spec = pod["spec"]
        container = spec["containers"][0]
        mounts = container.setdefault("volumeMounts", [])
        if any(m.get("mountPath") == TOKEN_DIR for m in mounts):
            return
        name = "kube-api-access-" + _suffix()
        spec.setdefault("volumes", []).append(
            {
                "name": name,
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
        mounts.append({"name": name, "readOnly": True, "mountPath": TOKEN_DIR})

    def get_pod(self, namespace: str, name: str) -> JSON:
        self.require_namespace(namespace, creating=False)
        pod = self.store.get("pods", namespace, name)
        if pod is None:
            raise not_found("pods", name)
        return pod

    def patch_pod(self, namespace: str, name: str, new: JSON) -> JSON:
        """Apply an update of a pod: only metadata (labels, annotations, owners) may change."""
        old = self.get_pod(namespace, name)
        old_spec = copy.deepcopy(old["spec"])
        if new.get("spec") != old_spec:
            changed = _diff_keys(old_spec, new.get("spec") or {})
            message = (
                "pod updates may not change fields other than `spec.containers[*].image`,"
                "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
                "`spec.tolerations` (only additions to existing tolerations),"
                "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was "
                "previously negative)"
            )
            raise invalid(
                "Pod",
                name,
                [podspec.FieldError("Forbidden", "spec", detail=f"{message}\n  {changed}")],
            )
        meta = new.get("metadata") or {}
        errors = podspec.validate_metadata({**meta, "name": name}, namespaced=True)
        if errors:
            raise invalid("Pod", name, errors)
        for key in ("labels", "annotations", "ownerReferences", "finalizers"):
            if meta.get(key):
                old["metadata"][key] = copy.deepcopy(meta[key])
            else:
                old["metadata"].pop(key, None)
        self.store.modified("pods", old)
        self.collect_garbage(namespace)
        return old

    def delete_pod(
        self, namespace: str, name: str, grace: int | None, propagation: str | None
    ) -> JSON:
        pod = self.get_pod(namespace, name)
        if propagation not in (None, "", "Orphan", "Background", "Foreground"):
            raise bad_request(
                f'propagationPolicy: Unsupported value: "{propagation}": supported values: '
                '"Foreground", "Background", "Orphan", "nil"'
            )
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
        if not pod["spec"].get("nodeName") or pod["status"].get("phase") in ("Succeeded", "Failed"):
            grace = 0
        grace = max(grace, 0)
        uid = pod["metadata"]["uid"]
        if propagation == "Orphan":
            for other in self.store.items("pods", namespace):
                refs = other["metadata"].get("ownerReferences") or []
                kept = [r for r in refs if r.get("uid") != uid]
                if len(kept) != len(refs):
                    if kept:
                        other["metadata"]["ownerReferences"] = kept
                    else:
                        other["metadata"].pop("ownerReferences")
                    self.store.modified("pods", other)
        if pod["metadata"].get("deletionTimestamp") and grace >= pod["metadata"].get(
            "deletionGracePeriodSeconds", 0
        ):
            return pod
        if grace == 0:
            self.store.remove("pods", namespace, name)
            if self.kubelet is not None:
                self.kubelet.kill(pod, 0)
            self.collect_garbage(namespace)
            return pod
        stamp = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=grace)
        pod["metadata"]["deletionTimestamp"] = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        pod["metadata"]["deletionGracePeriodSeconds"] = grace
        self.store.modified("pods", pod)
        if self.kubelet is not None:
            self.kubelet.kill(pod, grace)
        return pod

    def pod_gone(self, namespace: str, name: str, uid: str) -> None:
        """The kubelet finished with a terminating pod: the object goes away."""
        with self.store.lock:
            pod = self.store.get("pods", namespace, name)
            if pod is not None and pod["metadata"]["uid"] == uid:
                self.store.remove("pods", namespace, name)
            self.collect_garbage(namespace)

    def collect_garbage(self, namespace: str) -> None:
        """Background propagation: delete pods all of whose (pod) owners are gone."""
        with self.store.lock:
            live = {p["metadata"]["uid"]: p for p in self.store.items("pods", namespace)}
            for pod in list(live.values()):
                refs = pod["metadata"].get("ownerReferences") or []
                if not refs or pod["metadata"].get("deletionTimestamp"):
                    continue
                resolvable = [
                    r for r in refs if r.get("kind") == "Pod" and r.get("apiVersion") == "v1"
                ]
                if len(resolvable) != len(refs):
                    continue  # owners of kinds this double does not serve count as present
                if any(
                    r.get("uid") in live and live[r["uid"]]["metadata"]["name"] == r.get("name")
                    for r in refs
                ):
                    continue
                self.delete_pod(namespace, pod["metadata"]["name"], grace=None, propagation=None)

    def update_pod_status(
        self, namespace: str, name: str, uid: str, change: Callable[[JSON], None]
    ) -> JSON | None:
        """Let the kubelet change a pod's status (ignored if the pod is gone or replaced)."""
        with self.store.lock:
            pod = self.store.get("pods", namespace, name)
            if pod is None or pod["metadata"]["uid"] != uid:
                return None
            change(pod)
            self.store.modified("pods", pod)
            return copy.deepcopy(pod)

    # -- access reviews -------------------------------------------------------------------------
    def access_review(self, user: Identity, body: Any) -> JSON:
        if not isinstance(body, dict) or not isinstance(body.get("spec"), dict):
            raise bad_request("the body of the request was in an unknown format")
        spec = body["spec"]
        attrs = spec.get("resourceAttributes")
        allowed = True
        if attrs is not None:
            resource = attrs.get("resource", "")
            if attrs.get("subresource"):
                resource += "/" + attrs["subresource"]
            allowed = self.allowed(
                user, attrs.get("verb", ""), resource, attrs.get("namespace", "")
            )
        status: JSON = {"allowed": allowed}
        if allowed:
            status["reason"] = (
                'RBAC: allowed by ClusterRoleBinding "kipik-test-outer" of ClusterRole '
                f'"cluster-admin" to User "{user.name}"'
            )
        return {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    # -- watches -------------------------------------------------------------------------------
    def changes(
        self, resource: str, namespace: str, since: int, timeout: float, stop: threading.Event
    ) -> Iterator[Change | None]:
        """Changes after revision `since` as they happen (None now and then as a keep-alive)."""
        deadline = time.monotonic() + timeout
        position = since
        while not stop.is_set():
            with self.store.lock:
                fresh = [
                    c
                    for c in self.store.history
                    if c.revision > position
                    and c.resource == resource
                    and (not namespace or c.obj["metadata"].get("namespace", "") == namespace)
                ]
                if not fresh:
                    position = max(position, self.store.revision)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    self.store.changed.wait(min(left, 5.0))
            for change in fresh:
                position = change.revision
                yield change
            if not fresh:
                yield None


def _diff_keys(old: JSON, new: JSON) -> str:
    keys = sorted({*old, *new})
    return ", ".join(f"spec.{k}" for k in keys if old.get(k) != new.get(k))


def _suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


def forbidden(
    user: str, verb: str, resource: str, namespace: str, *, name: str = "", group: str = ""
) -> ApiError:
    """The RBAC authorizer's 403 text."""
    base = resource.split("/", 1)[0]
    qualified = f"{base}.{group}" if group else base
    subject = f'{qualified} "{name}"' if name else qualified
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    message = (
        f'{subject} is forbidden: User "{user}" cannot {verb} resource "{resource}" in API '
        f'group "{group}" {scope}'
    )
    details: JSON = {}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    details["kind"] = base
    return ApiError(403, "Forbidden", message, details)


def already_exists(resource: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{resource} "{name}" already exists',
        {"name": name, "kind": resource},
    )


class InvalidError(ApiError):
    """422 Invalid with the Status body built from field errors."""

    def __init__(self, body: JSON) -> None:
        super().__init__(422, "Invalid", body["message"], body["details"])


def invalid(kind: str, name: str, errors: list[podspec.FieldError]) -> ApiError:
    return InvalidError(podspec.invalid_status(kind, name, errors))


def merge(old: JSON, body: Any, content_type: str) -> JSON:
    """Apply a PATCH body the way its content type says."""
    if content_type == "application/json-patch+json":
        if not isinstance(body, list):
            raise bad_request("the body of the request was in an unknown format")
        result = json_patch(old, body)
    elif content_type in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
        if not isinstance(body, dict):
            raise bad_request("the body of the request was in an unknown format")
        result = json_merge_patch(old, body)
    else:
        raise ApiError(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: "
            "application/json-patch+json, application/merge-patch+json, "
            "application/apply-patch+yaml, application/strategic-merge-patch+json",
        )
    if not isinstance(result, dict):
        raise bad_request("the body of the request was in an unknown format")
    return result


__all__ = ["ApiError", "Cluster", "Config", "Identity", "label_selector_matcher", "merge"]
