"""TEST DOUBLE support: the API resources the node image's API server double serves (stdlib only).

The built-in resource types (group, version, names, scope, verbs, subresources, short names and
categories as kube-apiserver's discovery shows them), the types CustomResourceDefinitions add,
and the structural-schema checks of custom resources (types, required, enums, bounds, pruning of
unknown fields) with the texts kube-apiserver answers. Pure functions of plain data only.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

try:
    from tests.doubles.node.podspec import FieldError
except ImportError:  # in the node image: /kipik-node/podspec.py
    from podspec import FieldError  # type: ignore[import-not-found,no-redef]

JSON = dict[str, Any]

ALL_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
SUBRESOURCE_VERBS = {
    "status": ("get", "patch", "update"),
    "scale": ("get", "patch", "update"),
    "log": ("get",),
    "portforward": ("create", "get"),
    "finalize": ("update",),
}


@dataclass(frozen=True)
class Resource:
    """One served resource type (a row of an APIResourceList)."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    verbs: tuple[str, ...] = ALL_VERBS
    names: str = "subdomain"  # subdomain, label, dns1035, path
    singular: str = ""
    list_kind: str = ""
    crd: str = ""  # the CustomResourceDefinition that defines it
    schema: JSON | None = field(default=None, compare=False, hash=False)

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> str:
        """`deployments.apps`, `pods`: the store key and the word errors use."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def singular_name(self) -> str:
        return self.singular or self.kind.lower()

    @property
    def list_kind_name(self) -> str:
        return self.list_kind or f"{self.kind}List"

    @property
    def qualified_kind(self) -> str:
        """`Deployment.apps`, `Pod`: the kind in Invalid messages."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def discovery(self) -> list[JSON]:
        entry: JSON = {
            "name": self.plural,
            "singularName": self.singular_name,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        digest = hashlib.sha256(f"{self.group_version}/{self.plural}".encode()).digest()
        entry["storageVersionHash"] = base64.b64encode(digest[:8]).decode()
        entries = [entry]
        for sub in self.subresources:
            row: JSON = {
                "name": f"{self.plural}/{sub}",
                "singularName": "",
                "namespaced": self.namespaced,
                "kind": self.kind,
                "verbs": list(SUBRESOURCE_VERBS[sub]),
            }
            if sub == "scale":
                row |= {"group": "autoscaling", "version": "v1", "kind": "Scale"}
            elif sub in ("log", "portforward"):
                row["kind"] = {"log": "Pod", "portforward": "PodPortForwardOptions"}[sub]
            entries.append(row)
        return entries


def _r(group: str, version: str, plural: str, kind: str, namespaced: bool, **kw: Any) -> Resource:
    return Resource(group, version, plural, kind, namespaced, **kw)


ALL = ("all",)
BUILTIN: list[Resource] = [
    _r("", "v1", "configmaps", "ConfigMap", True, short_names=("cm",)),
    _r("", "v1", "endpoints", "Endpoints", True, short_names=("ep",), singular="endpoints"),
    _r("", "v1", "events", "Event", True, short_names=("ev",)),
    _r(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        short_names=("ns",),
        subresources=("finalize", "status"),
        verbs=("create", "delete", "get", "list", "patch", "update", "watch"),
        names="label",
    ),
    _r("", "v1", "nodes", "Node", False, short_names=("no",), subresources=("status",)),
    _r(
        "",
        "v1",
        "persistentvolumeclaims",
        "PersistentVolumeClaim",
        True,
        short_names=("pvc",),
        subresources=("status",),
    ),
    _r(
        "",
        "v1",
        "pods",
        "Pod",
        True,
        short_names=("po",),
        categories=ALL,
        subresources=("log", "portforward", "status"),
    ),
    _r("", "v1", "secrets", "Secret", True),
    _r("", "v1", "serviceaccounts", "ServiceAccount", True, short_names=("sa",)),
    _r(
        "",
        "v1",
        "services",
        "Service",
        True,
        short_names=("svc",),
        categories=ALL,
        subresources=("status",),
        verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"),
        names="dns1035",
    ),
    _r(
        "apps",
        "v1",
        "daemonsets",
        "DaemonSet",
        True,
        short_names=("ds",),
        categories=ALL,
        subresources=("status",),
    ),
    _r(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        short_names=("deploy",),
        categories=ALL,
        subresources=("scale", "status"),
    ),
    _r(
        "apps",
        "v1",
        "replicasets",
        "ReplicaSet",
        True,
        short_names=("rs",),
        categories=ALL,
        subresources=("scale", "status"),
    ),
    _r(
        "apps",
        "v1",
        "statefulsets",
        "StatefulSet",
        True,
        short_names=("sts",),
        categories=ALL,
        subresources=("scale", "status"),
    ),
    _r("batch", "v1", "jobs", "Job", True, categories=ALL, subresources=("status",)),
    _r("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    _r(
        "networking.k8s.io",
        "v1",
        "ingresses",
        "Ingress",
        True,
        short_names=("ing",),
        subresources=("status",),
    ),
    _r(
        "networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, short_names=("netpol",)
    ),
    _r(
        "rbac.authorization.k8s.io",
        "v1",
        "clusterrolebindings",
        "ClusterRoleBinding",
        False,
        names="path",
    ),
    _r("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False, names="path"),
    _r("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding", True, names="path"),
    _r("rbac.authorization.k8s.io", "v1", "roles", "Role", True, names="path"),
    _r(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        short_names=("crd", "crds"),
        categories=("api-extensions",),
        subresources=("status",),
    ),
    _r(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        False,
        categories=("api-extensions",),
    ),
    _r(
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration",
        False,
        categories=("api-extensions",),
    ),
]

# the field selectors each resource supports beyond metadata.name/metadata.namespace
FIELD_LABELS: dict[str, tuple[str, ...]] = {
    "pods": (
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ),
    "events": (
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
    ),
    "secrets": ("type",),
    "namespaces": ("status.phase",),
    "nodes": ("spec.unschedulable",),
    "services": ("spec.clusterIP", "spec.type"),
    "replicasets.apps": ("status.replicas",),
    "jobs.batch": ("status.successful",),
}


def field_value(obj: JSON, label: str) -> str:
    """The string value a field selector compares (absent -> empty; bools as Go prints them)."""
    if label == "source":
        return str((obj.get("source") or {}).get("component", ""))
    node: Any = obj
    for part in label.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, bool):
        return "true" if node else "false"
    return "" if node is None else str(node)


# -- names ------------------------------------------------------------------------------------
DNS1035_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


# -- custom resources -------------------------------------------------------------------------
def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def check_schema(value: Any, schema: JSON, path: str, errors: list[FieldError]) -> Any:
    """Validate `value` against a structural schema; return it pruned of unknown fields."""
    if value is None:
        if not schema.get("nullable") and schema.get("type"):
            errors.append(
                FieldError(
                    "Invalid",
                    path,
                    "null",
                    f'{path} in body must be of type {schema["type"]}: "null"',
                )
            )
        return None
    wanted = schema.get("type", "")
    actual = _type_of(value)
    if schema.get("x-kubernetes-int-or-string"):
        if actual not in ("integer", "string"):
            errors.append(
                FieldError(
                    "Invalid",
                    path,
                    actual,
                    f'{path} in body must be of type integer,string: "{actual}"',
                )
            )
        return value
    if wanted and not (wanted == actual or (wanted == "number" and actual == "integer")):
        errors.append(
            FieldError(
                "Invalid", path, actual, f'{path} in body must be of type {wanted}: "{actual}"'
            )
        )
        return value
    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_shown(v) for v in schema["enum"])
        errors.append(FieldError("NotSupported", path, value, f"supported values: {supported}"))
    if actual in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(
                FieldError(
                    "Invalid",
                    path,
                    value,
                    f"{path} in body should be greater than or equal to {schema['minimum']}",
                )
            )
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(
                FieldError(
                    "Invalid",
                    path,
                    value,
                    f"{path} in body should be less than or equal to {schema['maximum']}",
                )
            )
    if actual == "string":
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(
                FieldError(
                    "Invalid",
                    path,
                    value,
                    f"{path} in body should be at most {schema['maxLength']} chars long",
                )
            )
        if "minLength" in schema and len(value) < schema["minLength"]:
            errors.append(
                FieldError(
                    "Invalid",
                    path,
                    value,
                    f"{path} in body should be at least {schema['minLength']} chars long",
                )
            )
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(
                FieldError(
                    "Invalid", path, value, f"{path} in body should match '{schema['pattern']}'"
                )
            )
    if actual == "array":
        items = schema.get("items") or {}
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            errors.append(
                FieldError(
                    "TooMany", path, len(value), f"must have at most {schema['maxItems']} items"
                )
            )
        if "minItems" in schema and len(value) < schema["minItems"]:
            errors.append(
                FieldError(
                    "Invalid",
                    path,
                    len(value),
                    f"{path} in body should have at least {schema['minItems']} items",
                )
            )
        return [check_schema(v, items, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    if actual == "object":
        return _check_object(value, schema, path, errors)
    return value


def _check_object(value: JSON, schema: JSON, path: str, errors: list[FieldError]) -> JSON:
    props: JSON = schema.get("properties") or {}
    extra = schema.get("additionalProperties")
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    out: JSON = {}
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key in props:
            out[key] = check_schema(item, props[key], where, errors)
        elif isinstance(extra, dict):
            out[key] = check_schema(item, extra, where, errors)
        elif extra is True or preserve or (not props and not schema.get("type")):
            out[key] = copy.deepcopy(item)
    for key in schema.get("required") or []:
        if key not in value:
            errors.append(FieldError("Required", f"{path}.{key}" if path else key))
    return out


def prune_custom_resource(obj: JSON, schema: JSON) -> tuple[JSON, list[FieldError]]:
    """Apply a CRD version's openAPIV3Schema to a custom resource (metadata is the server's)."""
    errors: list[FieldError] = []
    top = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    body_schema = {k: v for k, v in schema.items() if k != "required"}
    props = dict(body_schema.get("properties") or {})
    for key in ("apiVersion", "kind", "metadata"):
        props.pop(key, None)
    body_schema["properties"] = props
    pruned = _check_object(top, body_schema, "", errors)
    for key in schema.get("required") or []:
        if key not in obj and key not in ("apiVersion", "kind", "metadata"):
            errors.append(FieldError("Required", key))
    result: JSON = {k: obj[k] for k in ("apiVersion", "kind", "metadata") if k in obj}
    result.update(pruned)
    return result, errors


def crd_errors(crd: JSON) -> list[FieldError]:
    """apiextensions.k8s.io/v1 CustomResourceDefinition validation (the usual subset)."""
    errors: list[FieldError] = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    group = spec.get("group") or ""
    plural = names.get("plural") or ""
    name = (crd.get("metadata") or {}).get("name", "")
    if name != f"{plural}.{group}":
        errors.append(
            FieldError("Invalid", "metadata.name", name, 'must be spec.names.plural+"."+spec.group')
        )
    if not group:
        errors.append(FieldError("Required", "spec.group"))
    elif "." not in group:
        errors.append(
            FieldError("Invalid", "spec.group", group, "should be a domain with at least one dot")
        )
    if not plural:
        errors.append(FieldError("Required", "spec.names.plural"))
    elif not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", plural):
        errors.append(
            FieldError(
                "Invalid",
                "spec.names.plural",
                plural,
                "a lowercase RFC 1123 label must "
                "consist of lower case alphanumeric characters or '-', and must start and "
                "end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
                "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')",
            )
        )
    if not names.get("kind"):
        errors.append(FieldError("Required", "spec.names.kind"))
    scope = spec.get("scope")
    if scope not in ("Cluster", "Namespaced"):
        if not scope:
            errors.append(FieldError("Required", "spec.scope"))
        else:
            errors.append(
                FieldError(
                    "NotSupported",
                    "spec.scope",
                    scope,
                    'supported values: "Cluster", "Namespaced"',
                )
            )
    versions = spec.get("versions") or []
    if not versions:
        errors.append(
            FieldError(
                "Invalid",
                "spec.versions",
                "null",
                "must have exactly one version marked as storage version",
            )
        )
        return errors
    storage = sum(1 for v in versions if v.get("storage"))
    if storage != 1:
        errors.append(
            FieldError(
                "Invalid",
                "spec.versions",
                "[]apiextensions.CustomResourceDefinitionVersion{...}",
                "must have exactly one version marked as storage version",
            )
        )
    if not any(v.get("served") for v in versions):
        errors.append(
            FieldError(
                "Invalid",
                "spec.versions",
                "[]apiextensions.CustomResourceDefinitionVersion{...}",
                "must have at least one version marked as served",
            )
        )
    seen: set[str] = set()
    for index, version in enumerate(versions):
        where = f"spec.versions[{index}]"
        vname = version.get("name") or ""
        if not vname:
            errors.append(FieldError("Required", f"{where}.name"))
        elif vname in seen:
            errors.append(FieldError("Duplicate", f"{where}.name", vname))
        seen.add(vname)
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        if not isinstance(schema, dict):
            errors.append(
                FieldError(
                    "Required", f"{where}.schema.openAPIV3Schema", detail="schemas are required"
                )
            )
        elif not schema.get("type"):
            errors.append(
                FieldError(
                    "Required",
                    f"{where}.schema.openAPIV3Schema.type",
                    detail="must not be empty at the root",
                )
            )
        elif schema.get("type") != "object":
            errors.append(
                FieldError(
                    "Invalid",
                    f"{where}.schema.openAPIV3Schema.type",
                    schema["type"],
                    "must be object at the root",
                )
            )
    return errors


def crd_defaults(crd: JSON) -> None:
    spec = crd.setdefault("spec", {})
    names = spec.setdefault("names", {})
    if names.get("kind"):
        names.setdefault("singular", names["kind"].lower())
        names.setdefault("listKind", names["kind"] + "List")
    spec.setdefault("conversion", {"strategy": "None"})
    for version in spec.get("versions") or []:
        version.setdefault("served", False)
        version.setdefault("storage", False)


def crd_resources(crd: JSON) -> list[Resource]:
    """The served versions of an Established CRD, as resource types."""
    spec = crd["spec"]
    names = spec["names"]
    found = []
    for version in spec.get("versions") or []:
        if not version.get("served"):
            continue
        subresources = tuple(
            sorted((version.get("subresources") or {}).keys() & {"status", "scale"})
        )
        found.append(
            Resource(
                spec["group"],
                version["name"],
                names["plural"],
                names["kind"],
                spec.get("scope") == "Namespaced",
                short_names=tuple(names.get("shortNames") or ()),
                categories=tuple(names.get("categories") or ()),
                subresources=subresources,
                singular=names.get("singular", ""),
                list_kind=names.get("listKind", ""),
                crd=crd["metadata"]["name"],
                schema=(version.get("schema") or {}).get("openAPIV3Schema") or {},
            )
        )
    return found
