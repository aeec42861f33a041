"""TEST DOUBLE support: decoding, validation, defaulting and Pod Security admission of Pods.

Shared by the node image's API server double and the outer-cluster double (stdlib only: it is
copied into the node image). Mirrors what kube-apiserver does with a Pod before storing it,
with the texts it answers: JSON decoding against the v1 schema (type errors and malformed
quantities are 400 BadRequest; unknown fields are dropped with a `Warning` header, or refused
with `fieldValidation=Strict`), field validation (422 Invalid with one cause per field, as
k8s.io/kubernetes/pkg/apis/core/validation words them), the defaults the API server fills in, and
the Pod Security admission checks (baseline and restricted) a pod-backend DinD can run into.
Pure functions of plain data only.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

JSON = dict[str, Any]

# -- the v1 schema (the fields a client may send; value types as the Go structs declare them) --
_VOLUME_TYPES = [
    "gcePersistentDisk",
    "awsElasticBlockStore",
    "gitRepo",
    "secret",
    "nfs",
    "iscsi",
    "glusterfs",
    "persistentVolumeClaim",
    "rbd",
    "flexVolume",
    "cinder",
    "cephfs",
    "flocker",
    "downwardAPI",
    "fc",
    "azureFile",
    "configMap",
    "vsphereVolume",
    "quobyte",
    "azureDisk",
    "photonPersistentDisk",
    "projected",
    "portworxVolume",
    "scaleIO",
    "storageos",
    "csi",
    "ephemeral",
    "image",
]
SUPPORTED_VOLUME_TYPES = ("emptyDir", "hostPath")

SCHEMA: dict[str, dict[str, str]] = {
    "Pod": {
        "apiVersion": "string",
        "kind": "string",
        "metadata": "ObjectMeta",
        "spec": "PodSpec",
        "status": "any",
    },
    "ObjectMeta": {
        "name": "string",
        "generateName": "string",
        "namespace": "string",
        "selfLink": "string",
        "uid": "string",
        "resourceVersion": "string",
        "generation": "int",
        "creationTimestamp": "any",
        "deletionTimestamp": "any",
        "deletionGracePeriodSeconds": "int",
        "labels": "map",
        "annotations": "map",
        "ownerReferences": "[]OwnerReference",
        "finalizers": "[]string",
        "managedFields": "[]any",
    },
    "OwnerReference": {
        "apiVersion": "string",
        "kind": "string",
        "name": "string",
        "uid": "string",
        "controller": "bool",
        "blockOwnerDeletion": "bool",
    },
    "PodSpec": {
        "volumes": "[]Volume",
        "initContainers": "[]Container",
        "containers": "[]Container",
        "ephemeralContainers": "[]any",
        "restartPolicy": "string",
        "terminationGracePeriodSeconds": "int",
        "activeDeadlineSeconds": "int",
        "dnsPolicy": "string",
        "nodeSelector": "map",
        "serviceAccountName": "string",
        "serviceAccount": "string",
        "automountServiceAccountToken": "bool",
        "nodeName": "string",
        "hostNetwork": "bool",
        "hostPID": "bool",
        "hostIPC": "bool",
        "shareProcessNamespace": "bool",
        "securityContext": "PodSecurityContext",
        "imagePullSecrets": "[]LocalObjectReference",
        "hostname": "string",
        "subdomain": "string",
        "affinity": "any",
        "schedulerName": "string",
        "tolerations": "[]Toleration",
        "hostAliases": "[]any",
        "priorityClassName": "string",
        "priority": "int",
        "dnsConfig": "any",
        "readinessGates": "[]any",
        "runtimeClassName": "string",
        "enableServiceLinks": "bool",
        "preemptionPolicy": "string",
        "overhead": "resources",
        "topologySpreadConstraints": "[]any",
        "setHostnameAsFQDN": "bool",
        "os": "any",
        "hostUsers": "bool",
        "schedulingGates": "[]any",
        "resourceClaims": "[]any",
        "resources": "ResourceRequirements",
    },
    "Container": {
        "name": "string",
        "image": "string",
        "command": "[]string",
        "args": "[]string",
        "workingDir": "string",
        "ports": "[]ContainerPort",
        "envFrom": "[]any",
        "env": "[]EnvVar",
        "resources": "ResourceRequirements",
        "resizePolicy": "[]any",
        "restartPolicy": "string",
        "volumeMounts": "[]VolumeMount",
        "volumeDevices": "[]any",
        "livenessProbe": "any",
        "readinessProbe": "any",
        "startupProbe": "any",
        "lifecycle": "any",
        "terminationMessagePath": "string",
        "terminationMessagePolicy": "string",
        "imagePullPolicy": "string",
        "securityContext": "SecurityContext",
        "stdin": "bool",
        "stdinOnce": "bool",
        "tty": "bool",
    },
    "ContainerPort": {
        "name": "string",
        "hostPort": "int",
        "containerPort": "int",
        "protocol": "string",
        "hostIP": "string",
    },
    "EnvVar": {"name": "string", "value": "string", "valueFrom": "EnvVarSource"},
    "EnvVarSource": {
        "fieldRef": "ObjectFieldSelector",
        "resourceFieldRef": "any",
        "configMapKeyRef": "any",
        "secretKeyRef": "any",
        "fileKeyRef": "any",
    },
    "ObjectFieldSelector": {"apiVersion": "string", "fieldPath": "string"},
    "ResourceRequirements": {"limits": "resources", "requests": "resources", "claims": "[]any"},
    "VolumeMount": {
        "name": "string",
        "readOnly": "bool",
        "recursiveReadOnly": "string",
        "mountPath": "string",
        "subPath": "string",
        "mountPropagation": "string",
        "subPathExpr": "string",
    },
    "SecurityContext": {
        "capabilities": "Capabilities",
        "privileged": "bool",
        "seLinuxOptions": "any",
        "windowsOptions": "any",
        "runAsUser": "int",
        "runAsGroup": "int",
        "runAsNonRoot": "bool",
        "readOnlyRootFilesystem": "bool",
        "allowPrivilegeEscalation": "bool",
        "procMount": "string",
        "seccompProfile": "SeccompProfile",
        "appArmorProfile": "any",
    },
    "Capabilities": {"add": "[]string", "drop": "[]string"},
    "SeccompProfile": {"type": "string", "localhostProfile": "string"},
    "PodSecurityContext": {
        "seLinuxOptions": "any",
        "windowsOptions": "any",
        "runAsUser": "int",
        "runAsGroup": "int",
        "runAsNonRoot": "bool",
        "supplementalGroups": "[]int",
        "supplementalGroupsPolicy": "string",
        "fsGroup": "int",
        "sysctls": "[]any",
        "fsGroupChangePolicy": "string",
        "seccompProfile": "SeccompProfile",
        "appArmorProfile": "any",
        "seLinuxChangePolicy": "string",
    },
    "Volume": {
        "name": "string",
        "hostPath": "HostPathVolumeSource",
        "emptyDir": "EmptyDirVolumeSource",
        **dict.fromkeys(_VOLUME_TYPES, "any"),
    },
    "HostPathVolumeSource": {"path": "string", "type": "string"},
    "EmptyDirVolumeSource": {"medium": "string", "sizeLimit": "quantity"},
    "Toleration": {
        "key": "string",
        "operator": "string",
        "value": "string",
        "effect": "string",
        "tolerationSeconds": "int",
    },
    "LocalObjectReference": {"name": "string"},
}

_GO_TYPES = {"string": "string", "int": "int64", "bool": "bool", "map": "map[string]string"}
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_QUANTITY = re.compile(
    r"^([+-]?[0-9]*\.?[0-9]+|[+-]?[0-9]+\.)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][-+]?[0-9]+)?$"
)
_SUFFIX = {
    "": 1.0,
    "n": 1e-9,
    "u": 1e-6,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}


class DecodeError(Exception):
    """The body cannot be handled as a Pod (400 BadRequest)."""


def parse_quantity(value: Any) -> float:
    """A resource.Quantity's value; DecodeError with the API server's text when malformed."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DecodeError(f"quantities must match the regular expression '{QUANTITY_PATTERN}'")
    text = str(value) if not isinstance(value, str) else value
    match = _QUANTITY.match(text.strip()) if text == text.strip() else None
    if not match:
        raise DecodeError(f"quantities must match the regular expression '{QUANTITY_PATTERN}'")
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return float(number) * 10.0 ** int(suffix[1:])
    return float(number) * _SUFFIX[suffix]


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _go_type(kind: str) -> str:
    if kind.startswith("[]"):
        inner = kind[2:]
        return "[]" + (f"v1.{inner}" if inner in SCHEMA else _GO_TYPES.get(inner, "interface {}"))
    if kind in SCHEMA:
        return f"v1.{kind}"
    if kind == "resources":
        return "v1.ResourceList"
    return _GO_TYPES.get(kind, "interface {}")


@dataclass
class Decoded:
    """A decoded object: unknown fields dropped and listed (paths as the API server prints)."""

    obj: JSON
    unknown: list[str] = field(default_factory=list)


def decode(body: Any, struct: str = "Pod") -> Decoded:
    """Check `body` against the schema like Go's JSON decoder (unknown fields collected)."""
    if not isinstance(body, dict):
        raise DecodeError(
            f"json: cannot unmarshal {_json_kind(body)} into Go value of type v1.{struct}"
        )
    unknown: list[str] = []
    obj = _decode_struct(body, struct, "", [], unknown)
    return Decoded(obj, unknown)


def _decode_struct(
    value: JSON, struct: str, path: str, go_path: list[str], unknown: list[str]
) -> JSON:
    out: JSON = {}
    fields = SCHEMA[struct]
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            unknown.append(where)
            continue
        if item is None:
            continue  # Go leaves the zero value for a JSON null
        out[key] = _decode_value(item, fields[key], struct, where, [*go_path, key], unknown)
    return out


def _decode_value(  # noqa: PLR0917 - one recursion step of the decoder
    item: Any, kind: str, parent: str, path: str, go_path: list[str], unknown: list[str]
) -> Any:
    def mismatch() -> DecodeError:
        return DecodeError(
            f"json: cannot unmarshal {_json_kind(item)} into Go struct field "
            f"{parent}.{'.'.join(go_path)} of type {_go_type(kind)}"
        )

    if kind == "any":
        return copy.deepcopy(item)
    if kind == "string":
        if not isinstance(item, str):
            raise mismatch()
        return item
    if kind == "int":
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise mismatch()
        if isinstance(item, float) and not item.is_integer():
            raise DecodeError(
                f"json: cannot unmarshal number {item} into Go struct field "
                f"{parent}.{'.'.join(go_path)} of type int64"
            )
        return int(item)
    if kind == "bool":
        if not isinstance(item, bool):
            raise mismatch()
        return item
    if kind == "map":
        if not isinstance(item, dict) or not all(isinstance(v, str) for v in item.values()):
            raise mismatch()
        return dict(item)
    if kind == "quantity":
        parse_quantity(item)
        return item
    if kind == "resources":
        if not isinstance(item, dict):
            raise mismatch()
        for quantity in item.values():
            parse_quantity(quantity)
        return dict(item)
    if kind.startswith("[]"):
        if not isinstance(item, list):
            raise mismatch()
        inner = kind[2:]
        return [
            _decode_value(element, inner, parent, f"{path}[{index}]", go_path, unknown)
            for index, element in enumerate(item)
        ]
    if kind in SCHEMA:
        if not isinstance(item, dict):
            raise mismatch()
        return _decode_struct(item, kind, path, go_path, unknown)
    raise AssertionError(kind)


# -- field validation (422) -----------------------------------------------------------------
@dataclass
class FieldError:
    """One field.Error: its type decides the cause reason and the wording."""

    kind: str  # Required, Invalid, NotSupported, NotFound, Duplicate, Forbidden, TooMany
    path: str
    value: Any = None
    detail: str = ""

    REASONS: ClassVar[dict[str, tuple[str, str]]] = {
        "Required": ("FieldValueRequired", "Required value"),
        "Invalid": ("FieldValueInvalid", "Invalid value"),
        "NotSupported": ("FieldValueNotSupported", "Unsupported value"),
        "NotFound": ("FieldValueNotFound", "Not found"),
        "Duplicate": ("FieldValueDuplicate", "Duplicate value"),
        "Forbidden": ("FieldValueForbidden", "Forbidden"),
        "TooMany": ("FieldValueTooMany", "Too many"),
    }

    def body(self) -> str:
        label = self.REASONS[self.kind][1]
        if self.kind in ("Required", "Forbidden"):
            return f"{label}: {self.detail}" if self.detail else label
        shown = f'"{self.value}"' if isinstance(self.value, str) else _go_repr(self.value)
        text = f"{label}: {shown}"
        return f"{text}: {self.detail}" if self.detail else text

    def cause(self) -> JSON:
        return {"reason": self.REASONS[self.kind][0], "message": self.body(), "field": self.path}

    def __str__(self) -> str:
        return f"{self.path}: {self.body()}"


def _go_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def invalid_status(kind: str, name: str, errors: list[FieldError]) -> JSON:
    """The 422 Status body for these field errors."""
    listed = ", ".join(str(e) for e in errors)
    text = listed if len(errors) == 1 else f"[{listed}]"
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'{kind} "{name}" is invalid: {text}',
        "reason": "Invalid",
        "details": {"name": name, "kind": kind, "causes": [e.cause() for e in errors]},
        "code": 422,
    }


DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is "
    "'(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
QUALIFIED_NAME_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
    "end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex "
    "used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)
FIELD_REF_PATHS = [
    "metadata.annotations",
    "metadata.labels",
    "metadata.name",
    "metadata.namespace",
    "metadata.uid",
    "spec.nodeName",
    "spec.serviceAccountName",
    "status.hostIP",
    "status.hostIPs",
    "status.podIP",
    "status.podIPs",
]


def validate_labels(labels: dict[str, str], path: str) -> list[FieldError]:
    errors = []
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if (
            not name
            or len(name) > 63
            or not QUALIFIED_NAME.match(name)
            or (prefix and (len(prefix) > 253 or not DNS_SUBDOMAIN.match(prefix)))
        ):
            errors.append(FieldError("Invalid", path, key, QUALIFIED_NAME_MSG))
        if len(value) > 63:
            errors.append(FieldError("Invalid", path, value, "must be no more than 63 characters"))
        elif not LABEL_VALUE.match(value):
            errors.append(FieldError("Invalid", path, value, LABEL_VALUE_MSG))
    return errors


def validate_metadata(meta: JSON, namespaced: bool, label_names: bool = False) -> list[FieldError]:
    """Name (DNS subdomain, or label for namespaces), labels and owner references."""
    errors: list[FieldError] = []
    name = meta.get("name", "")
    if not name and not meta.get("generateName"):
        errors.append(
            FieldError("Required", "metadata.name", detail="name or generateName is required")
        )
    elif name:
        pattern, message = (
            (DNS_LABEL, DNS1123_LABEL_MSG)
            if label_names
            else (DNS_SUBDOMAIN, DNS1123_SUBDOMAIN_MSG)
        )
        if len(name) > (63 if label_names else 253) or not pattern.match(name):
            errors.append(FieldError("Invalid", "metadata.name", name, message))
    errors += validate_labels(meta.get("labels") or {}, "metadata.labels")
    controllers = 0
    for ref in meta.get("ownerReferences") or []:
        where = "metadata.ownerReferences"
        if not ref.get("apiVersion"):
            errors.append(
                FieldError("Invalid", f"{where}.apiVersion", "", "version must not be empty")
            )
        if not ref.get("kind"):
            errors.append(FieldError("Invalid", f"{where}.kind", "", "kind must not be empty"))
        if not ref.get("name"):
            errors.append(FieldError("Invalid", f"{where}.name", "", "name must not be empty"))
        if not ref.get("uid"):
            errors.append(FieldError("Invalid", f"{where}.uid", "", "uid must not be empty"))
        controllers += bool(ref.get("controller"))
    if controllers > 1:
        errors.append(
            FieldError(
                "Invalid",
                "metadata.ownerReferences",
                "",
                "Only one reference can have Controller set to true.",
            )
        )
    return errors


def _check_enum(errors: list[FieldError], value: Any, path: str, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        supported = ", ".join(f'"{a}"' for a in allowed)
        errors.append(FieldError("NotSupported", path, value, f"supported values: {supported}"))


def validate_pod(pod: JSON) -> list[FieldError]:
    """Field validation of a defaulted Pod (what ValidatePodCreate reports, the usual subset)."""
    errors = validate_metadata(pod.get("metadata") or {}, namespaced=True)
    spec = pod.get("spec") or {}
    volumes = spec.get("volumes") or []
    names: set[str] = set()
    for index, volume in enumerate(volumes):
        where = f"spec.volumes[{index}]"
        name = volume.get("name", "")
        if not name:
            errors.append(FieldError("Required", f"{where}.name"))
        elif not DNS_LABEL.match(name) or len(name) > 63:
            errors.append(FieldError("Invalid", f"{where}.name", name, DNS1123_LABEL_MSG))
        elif name in names:
            errors.append(FieldError("Duplicate", f"{where}.name", name))
        names.add(name)
        sources = [key for key in volume if key != "name"]
        if not sources:
            errors.append(FieldError("Required", where, detail="must specify a volume type"))
        elif len(sources) > 1:
            errors.append(
                FieldError(
                    "Forbidden",
                    f"{where}.{sources[1]}",
                    detail="may not specify more than 1 volume type",
                )
            )
        if "hostPath" in volume:
            host = volume["hostPath"]
            if not host.get("path"):
                errors.append(FieldError("Required", f"{where}.hostPath.path"))
            kinds = [
                "",
                "DirectoryOrCreate",
                "Directory",
                "FileOrCreate",
                "File",
                "Socket",
                "CharDevice",
                "BlockDevice",
            ]
            if host.get("type", "") not in kinds:
                _check_enum(errors, host.get("type"), f"{where}.hostPath.type", kinds[1:])
        if "emptyDir" in volume:
            medium = volume["emptyDir"].get("medium", "")
            if medium not in ("", "Memory", "HugePages"):
                _check_enum(errors, medium, f"{where}.emptyDir.medium", ["", "Memory", "HugePages"])
    containers = spec.get("containers") or []
    if not containers:
        errors.append(FieldError("Required", "spec.containers"))
    for index, container in enumerate(containers):
        errors += _validate_container(container, f"spec.containers[{index}]", names)
    restart = spec.get("restartPolicy", "Always")
    _check_enum_if(errors, restart, "spec.restartPolicy", ["Always", "OnFailure", "Never"])
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and not 1 <= deadline <= 2147483647:
        errors.append(
            FieldError(
                "Invalid",
                "spec.activeDeadlineSeconds",
                deadline,
                "must be between 1 and 2147483647, inclusive",
            )
        )
    grace = spec.get("terminationGracePeriodSeconds")
    if grace is not None and grace < 0:
        errors.append(
            FieldError(
                "Invalid",
                "spec.terminationGracePeriodSeconds",
                grace,
                "must be greater than or equal to 0",
            )
        )
    _check_enum_if(
        errors,
        spec.get("dnsPolicy", "ClusterFirst"),
        "spec.dnsPolicy",
        ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
    )
    for index, secret in enumerate(spec.get("imagePullSecrets") or []):
        if not secret.get("name"):
            errors.append(FieldError("Required", f"spec.imagePullSecrets[{index}].name"))
    for index, toleration in enumerate(spec.get("tolerations") or []):
        operator = toleration.get("operator", "Equal")
        _check_enum_if(errors, operator, f"spec.tolerations[{index}].operator", ["Equal", "Exists"])
        effect = toleration.get("effect", "")
        if effect:
            _check_enum_if(
                errors,
                effect,
                f"spec.tolerations[{index}].effect",
                ["NoSchedule", "PreferNoSchedule", "NoExecute"],
            )
    service_account = spec.get("serviceAccountName", "")
    if service_account and not DNS_SUBDOMAIN.match(service_account):
        errors.append(
            FieldError("Invalid", "spec.serviceAccountName", service_account, DNS1123_SUBDOMAIN_MSG)
        )
    errors += validate_labels(spec.get("nodeSelector") or {}, "spec.nodeSelector")
    return errors


def _check_enum_if(errors: list[FieldError], value: Any, path: str, allowed: list[str]) -> None:
    if value not in allowed:
        _check_enum(errors, value, path, allowed)


def _validate_container(container: JSON, where: str, volumes: set[str]) -> list[FieldError]:
    errors: list[FieldError] = []
    name = container.get("name", "")
    if not name:
        errors.append(FieldError("Required", f"{where}.name"))
    elif not DNS_LABEL.match(name) or len(name) > 63:
        errors.append(FieldError("Invalid", f"{where}.name", name, DNS1123_LABEL_MSG))
    if not container.get("image", "").strip():
        errors.append(FieldError("Required", f"{where}.image"))
    policy = container.get("imagePullPolicy")
    if policy is not None:
        _check_enum_if(
            errors, policy, f"{where}.imagePullPolicy", ["Always", "IfNotPresent", "Never"]
        )
    mount_paths: set[str] = set()
    for index, mount in enumerate(container.get("volumeMounts") or []):
        here = f"{where}.volumeMounts[{index}]"
        if not mount.get("name"):
            errors.append(FieldError("Required", f"{here}.name"))
        elif mount["name"] not in volumes:
            errors.append(FieldError("NotFound", f"{here}.name", mount["name"]))
        path = mount.get("mountPath", "")
        if not path:
            errors.append(FieldError("Required", f"{here}.mountPath"))
        elif path in mount_paths:
            errors.append(FieldError("Invalid", f"{here}.mountPath", path, "must be unique"))
        mount_paths.add(path)
        propagation = mount.get("mountPropagation")
        if propagation is not None:
            _check_enum_if(
                errors,
                propagation,
                f"{here}.mountPropagation",
                ["Bidirectional", "HostToContainer", "None"],
            )
        sub = mount.get("subPath", "")
        if sub and (sub.startswith("/") or ".." in sub.split("/")):
            errors.append(
                FieldError(
                    "Invalid", f"{here}.subPath", sub, "must be a relative path without '..'"
                )
            )
    for index, env in enumerate(container.get("env") or []):
        here = f"{where}.env[{index}]"
        env_name = env.get("name", "")
        if not env_name:
            errors.append(FieldError("Required", f"{here}.name"))
        elif not ENV_NAME.match(env_name):
            errors.append(
                FieldError(
                    "Invalid",
                    f"{here}.name",
                    env_name,
                    "a valid environment variable name must consist of alphabetic characters, "
                    "digits, '_', '-', or '.', and must not start with a digit (e.g. 'my.env-name',"
                    "  or 'MY_ENV.NAME',  or 'MyEnvName1', regex used for validation is "
                    "'[-._a-zA-Z][-._a-zA-Z0-9]*')",
                )
            )
        source = env.get("valueFrom")
        if source is not None:
            if env.get("value"):
                errors.append(
                    FieldError(
                        "Invalid",
                        f"{here}.valueFrom",
                        "",
                        "may not be specified when `value` is not empty",
                    )
                )
            if not source:
                errors.append(
                    FieldError(
                        "Invalid",
                        f"{here}.valueFrom",
                        "",
                        "must specify one of: `fieldRef`, "
                        "`resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`",
                    )
                )
            ref = source.get("fieldRef")
            if ref is not None:
                path = ref.get("fieldPath", "")
                base = path.split("[", 1)[0] if path.startswith("metadata.") else path
                if not path:
                    errors.append(FieldError("Required", f"{here}.valueFrom.fieldRef.fieldPath"))
                elif base not in FIELD_REF_PATHS:
                    _check_enum(
                        errors, path, f"{here}.valueFrom.fieldRef.fieldPath", FIELD_REF_PATHS
                    )
                if ref.get("apiVersion", "v1") != "v1":
                    _check_enum(
                        errors, ref["apiVersion"], f"{here}.valueFrom.fieldRef.apiVersion", ["v1"]
                    )
    resources = container.get("resources") or {}
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    for kind_name, values in (("limits", limits), ("requests", requests)):
        for resource, value in values.items():
            if parse_quantity(value) < 0:
                errors.append(
                    FieldError(
                        "Invalid",
                        f"{where}.resources.{kind_name}[{resource}]",
                        str(value),
                        "must be greater than or equal to 0",
                    )
                )
    for resource, value in requests.items():
        if resource in limits and parse_quantity(value) > parse_quantity(limits[resource]):
            errors.append(
                FieldError(
                    "Invalid",
                    f"{where}.resources.requests",
                    str(value),
                    f"must be less than or equal to {resource} limit of {limits[resource]}",
                )
            )
    for index, port in enumerate(container.get("ports") or []):
        number = port.get("containerPort", 0)
        if not 1 <= number <= 65535:
            errors.append(
                FieldError(
                    "Invalid",
                    f"{where}.ports[{index}].containerPort",
                    number,
                    "must be between 1 and 65535, inclusive",
                )
            )
    return errors


def unsupported_by_double(pod: JSON) -> list[FieldError]:
    """What a real cluster accepts but this double cannot run: refused clearly, never ignored."""
    errors: list[FieldError] = []
    spec = pod.get("spec") or {}
    note = "not supported by the outer-cluster test double"
    if len(spec.get("containers") or []) > 1:
        errors.append(
            FieldError(
                "TooMany",
                "spec.containers",
                len(spec["containers"]),
                f"must have at most 1 items; more are {note}",
            )
        )
    for key in ("initContainers", "ephemeralContainers"):
        if spec.get(key):
            errors.append(FieldError("Forbidden", f"spec.{key}", detail=note))
    for key in ("hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"):
        if spec.get(key):
            errors.append(FieldError("Forbidden", f"spec.{key}", detail=f"true is {note}"))
    for index, volume in enumerate(spec.get("volumes") or []):
        for key in volume:
            if key != "name" and key not in SUPPORTED_VOLUME_TYPES:
                errors.append(
                    FieldError(
                        "Forbidden",
                        f"spec.volumes[{index}].{key}",
                        detail=f"this volume type is {note} (only emptyDir and hostPath)",
                    )
                )
    for index, container in enumerate((spec.get("containers") or [])[:1]):
        where = f"spec.containers[{index}]"
        for env_index, env in enumerate(container.get("env") or []):
            source = env.get("valueFrom") or {}
            for key in source:
                if key != "fieldRef":
                    errors.append(
                        FieldError(
                            "Forbidden", f"{where}.env[{env_index}].valueFrom.{key}", detail=note
                        )
                    )
        for key in ("envFrom", "volumeDevices"):
            if container.get(key):
                errors.append(FieldError("Forbidden", f"{where}.{key}", detail=note))
        for mount_index, mount in enumerate(container.get("volumeMounts") or []):
            if mount.get("subPathExpr"):
                errors.append(
                    FieldError(
                        "Forbidden", f"{where}.volumeMounts[{mount_index}].subPathExpr", detail=note
                    )
                )
    return errors


# -- defaults ------------------------------------------------------------------------------------
def apply_defaults(pod: JSON) -> None:
    """What the API server's defaulting fills in (the fields clients commonly read back)."""
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("securityContext", {})
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
    spec.setdefault("priority", 0)
    spec.setdefault("serviceAccountName", spec.get("serviceAccount") or "default")
    spec["serviceAccount"] = spec["serviceAccountName"]
    tolerations = spec.setdefault("tolerations", [])
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        if not any(t.get("key") == key for t in tolerations):
            tolerations.append(
                {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}
            )
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            volume["hostPath"].setdefault("type", "")
    for container in spec.get("containers") or []:
        image = container.get("image", "")
        tag = image.rsplit("/", 1)[-1]
        latest = "@" not in image and (":" not in tag or tag.endswith(":latest"))
        container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("fieldRef")
            if ref is not None:
                ref.setdefault("apiVersion", "v1")
        for port in container.get("ports") or []:
            port.setdefault("protocol", "TCP")


def qos_class(pod: JSON) -> str:
    containers = pod["spec"].get("containers") or []
    requests_any = limits_all = False
    guaranteed = True
    for container in containers:
        resources = container.get("resources") or {}
        limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
        if limits or requests:
            requests_any = True
        for resource in ("cpu", "memory"):
            if (
                resource not in limits
                or requests.get(resource, limits[resource]) != limits[resource]
            ):
                guaranteed = False
        limits_all = limits_all or bool(limits)
    if guaranteed and containers:
        return "Guaranteed"
    return "Burstable" if requests_any else "BestEffort"


# -- Pod Security admission -------------------------------------------------------------------
def _names(kind: str, items: list[str]) -> str:
    quoted = ", ".join(f'"{i}"' for i in items)
    return f"{kind} {quoted}" if len(items) == 1 else f"{kind}s {quoted}"


def _baseline(spec: JSON) -> list[str]:
    containers = spec.get("containers") or []
    failures = []
    added = []
    allowed_caps = {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
    for c in containers:
        for cap in ((c.get("securityContext") or {}).get("capabilities") or {}).get("add") or []:
            if cap not in allowed_caps:
                added.append((c["name"], cap))
    if added:
        names = sorted({n for n, _ in added})
        caps = ", ".join(f'"{cap}"' for _, cap in added)
        failures.append(
            f"non-default capabilities ({_names('container', names)} must not include {caps} in "
            "securityContext.capabilities.add)"
        )
    host = [f"{k}=true" for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k)]
    if host:
        failures.append(f"host namespaces ({', '.join(host)})")
    host_paths = [v["name"] for v in spec.get("volumes") or [] if "hostPath" in v]
    if host_paths:
        failures.append(f"hostPath volumes ({_names('volume', host_paths)})")
    ports = [
        str(p["hostPort"]) for c in containers for p in c.get("ports") or [] if p.get("hostPort")
    ]
    if ports:
        owners = [
            c["name"] for c in containers if any(p.get("hostPort") for p in c.get("ports") or [])
        ]
        failures.append(
            f"hostPort ({_names('container', owners)} uses hostPort {', '.join(ports)})"
        )
    privileged = [
        c["name"] for c in containers if (c.get("securityContext") or {}).get("privileged")
    ]
    if privileged:
        failures.append(
            f"privileged ({_names('container', privileged)} must not set "
            "securityContext.privileged=true)"
        )
    return failures


def _restricted(spec: JSON) -> list[str]:
    containers = spec.get("containers") or []
    pod_sc = spec.get("securityContext") or {}
    failures = []
    escalation = [
        c["name"]
        for c in containers
        if (c.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False
    ]
    if escalation:
        failures.append(
            f"allowPrivilegeEscalation != false ({_names('container', escalation)} must set "
            "securityContext.allowPrivilegeEscalation=false)"
        )
    no_drop = [
        c["name"]
        for c in containers
        if "ALL"
        not in (((c.get("securityContext") or {}).get("capabilities") or {}).get("drop") or [])
    ]
    if no_drop:
        failures.append(
            f"unrestricted capabilities ({_names('container', no_drop)} must set "
            'securityContext.capabilities.drop=["ALL"])'
        )
    restricted = [
        v["name"]
        for v in spec.get("volumes") or []
        if not any(
            k in v
            for k in (
                "emptyDir",
                "configMap",
                "secret",
                "projected",
                "downwardAPI",
                "persistentVolumeClaim",
                "csi",
                "ephemeral",
            )
        )
    ]
    if restricted:
        kinds = sorted(
            {
                next(k for k in v if k != "name")
                for v in spec.get("volumes") or []
                if v["name"] in restricted
            }
        )
        verb = "uses" if len(restricted) == 1 else "use"
        kind_text = ", ".join(f'"{k}"' for k in kinds)
        failures.append(
            f"restricted volume types ({_names('volume', restricted)} {verb} restricted volume "
            f"type{'s' if len(kinds) > 1 else ''} {kind_text})"
        )
    non_root = [
        c["name"]
        for c in containers
        if (c.get("securityContext") or {}).get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        is not True
    ]
    if non_root:
        failures.append(
            f"runAsNonRoot != true (pod or {_names('container', non_root)} must set "
            "securityContext.runAsNonRoot=true)"
        )
    pod_seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
    seccomp = [
        c["name"]
        for c in containers
        if ((c.get("securityContext") or {}).get("seccompProfile") or {}).get("type", pod_seccomp)
        not in ("RuntimeDefault", "Localhost")
    ]
    if seccomp:
        failures.append(
            f"seccompProfile (pod or {_names('container', seccomp)} must set "
            'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")'
        )
    return failures


def pod_security_violations(level: str, spec: JSON) -> list[str]:
    """The failed checks of a Pod Security level, in the order the admission plugin lists them."""
    if level == "baseline":
        return _baseline(spec)
    if level == "restricted":
        return _baseline(spec) + _restricted(spec)
    return []


def pod_security_level(labels: dict[str, str], mode: str) -> tuple[str, str]:
    """(level, version) of a namespace for enforce/warn/audit; privileged when unlabelled."""
    level = labels.get(f"pod-security.kubernetes.io/{mode}", "privileged")
    version = labels.get(f"pod-security.kubernetes.io/{mode}-version", "latest")
    return level, version


Selector = Callable[[JSON], bool]
