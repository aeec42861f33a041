"""kind: validating the user's config, building kipik's config and argv, and driving kind.

The builders are pure functions of plain data. :class:`KindDriver` runs kind only through
``host.exec(...)``, so every host (local DinD container, DinD pod) shares all kind logic.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from pytest_kipik.errors import CommandError, ConfigError, KindError

if TYPE_CHECKING:
    from pytest_kipik.hosts.base import Host, OutputSink

API_VERSION = "kind.x-k8s.io/v1alpha4"
KIND = "Cluster"
#: The address and port kind publishes the API server on inside the host.
API_SERVER_ADDRESS = "0.0.0.0"
API_SERVER_PORT = 6443
#: Where kipik keeps its files inside the host.
HOST_DIR = "/kipik"

# The fields of kind's v1alpha4 types (pkg/apis/config/v1alpha4/types.go): kind rejects others.
_PATCH_JSON6902 = {"group": None, "version": None, "kind": None, "patch": None}
_MOUNT = {
    "containerPath": None,
    "hostPath": None,
    "readOnly": None,
    "selinuxRelabel": None,
    "propagation": None,
}
_PORT_MAPPING = {"containerPort": None, "hostPort": None, "listenAddress": None, "protocol": None}
_NODE: dict[str, Any] = {
    "role": None,
    "image": None,
    "labels": None,
    "extraMounts": [_MOUNT],
    "extraPortMappings": [_PORT_MAPPING],
    "gpus": None,
    "kubeadmConfigPatches": None,
    "kubeadmConfigPatchesJSON6902": [_PATCH_JSON6902],
}
_NETWORKING = {
    "ipFamily": None,
    "apiServerPort": None,
    "apiServerAddress": None,
    "podSubnet": None,
    "serviceSubnet": None,
    "disableDefaultCNI": None,
    "kubeProxyMode": None,
    "dnsSearch": None,
}
_CLUSTER: dict[str, Any] = {
    "kind": None,
    "apiVersion": None,
    "name": None,
    "nodes": [_NODE],
    "networking": _NETWORKING,
    "featureGates": None,
    "runtimeConfig": None,
    "kubeadmConfigPatches": None,
    "kubeadmConfigPatchesJSON6902": [_PATCH_JSON6902],
    "containerdConfigPatches": None,
    "containerdConfigPatchesJSON6902": None,
}
_ROLES = ("control-plane", "worker")


def _check_fields(node: yaml.Node, schema: Mapping[str, Any], where: str) -> None:
    """Reject unknown fields (with their line) the way kind's strict decoder does."""
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"line {node.start_mark.line + 1}: {where} must be a mapping")
    for key_node, value_node in node.value:
        key = key_node.value
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(
                f"line {key_node.start_mark.line + 1}: unknown field {key!r} in {where} "
                f"(known fields: {known})"
            )
        sub = schema[key]
        if isinstance(sub, list):
            if not isinstance(value_node, yaml.SequenceNode):
                raise ConfigError(
                    f"line {value_node.start_mark.line + 1}: {where}.{key} must be a list"
                )
            for index, item in enumerate(value_node.value):
                _check_fields(item, sub[0], f"{where}.{key}[{index}]")
        elif isinstance(sub, dict):
            _check_fields(value_node, sub, f"{where}.{key}")


def validate_user_config(text: str) -> dict[str, Any]:
    """Parse and validate a kind config as kind would; return it as plain data.

    Raises :class:`ConfigError` saying what is wrong (with the line where YAML knows it).
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}") from None
    if root is None or not isinstance(data, dict):
        raise ConfigError(f"expected a kind {KIND} mapping with kind and apiVersion")
    if data.get("kind") != KIND:
        raise ConfigError(f"kind must be {KIND!r}, found {data.get('kind')!r}")
    if data.get("apiVersion") != API_VERSION:
        raise ConfigError(
            f"apiVersion must be {API_VERSION!r} (the one kind supports), "
            f"found {data.get('apiVersion')!r}"
        )
    _check_fields(root, _CLUSTER, "Cluster")
    nodes = data.get("nodes") or []
    for index, node in enumerate(nodes):
        role = node.get("role", "control-plane")
        if role not in _ROLES:
            raise ConfigError(f"nodes[{index}].role is {role!r}: use one of {', '.join(_ROLES)}")
    if nodes and not any(n.get("role", "control-plane") == "control-plane" for n in nodes):
        raise ConfigError("nodes needs at least one node with role control-plane")
    for index, patch in enumerate(data.get("kubeadmConfigPatches") or []):
        if not isinstance(patch, str):
            raise ConfigError(f"kubeadmConfigPatches[{index}] must be a YAML string")
        try:
            yaml.safe_load(patch)
        except yaml.YAMLError as exc:
            raise ConfigError(f"kubeadmConfigPatches[{index}] is not valid YAML: {exc}") from None
    return data


def load_user_config(path: Path) -> dict[str, Any]:
    """Read and validate the user's kind config file; errors name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read kind config file {path}: {exc.strerror}") from None
    try:
        return validate_user_config(text)
    except ConfigError as exc:
        raise ConfigError(f"kind config file {path}: {exc}") from None


def _user_cert_sans(patches: Sequence[str]) -> list[str]:
    sans: list[str] = []
    for patch in patches:
        doc = yaml.safe_load(patch)
        if isinstance(doc, dict) and doc.get("kind") == "ClusterConfiguration":
            sans.extend(str(s) for s in (doc.get("apiServer") or {}).get("certSANs") or [])
    return sans


def cert_sans_patch(sans: Sequence[str]) -> str:
    """A kubeadm ClusterConfiguration merge patch that sets the API server's certSANs."""
    body = {"kind": "ClusterConfiguration", "apiServer": {"certSANs": list(sans)}}
    return yaml.safe_dump(body, default_flow_style=False, sort_keys=False)


def build_config(
    user: Mapping[str, Any] | None,
    *,
    name: str,
    cert_sans: Sequence[str],
    nodes: int | None = None,
    api_server_address: str = API_SERVER_ADDRESS,
    api_server_port: int = API_SERVER_PORT,
) -> dict[str, Any]:
    """Merge what kipik must set into the user's kind config (which is not modified).

    Kept from the user: nodes, patches, networking (subnets, CNI, ...), feature gates. Set by
    kipik: the name, ``networking.apiServerAddress``/``apiServerPort``, and a last kubeadm patch
    whose certSANs are the user's own, kind's defaults (``localhost`` and the API address) and
    ``cert_sans``: a merge patch replaces lists, so the union must be written out.
    ``nodes`` (1 control plane + ``nodes - 1`` workers) may only be given when the user's config
    has no ``nodes``.
    """
    config: dict[str, Any] = copy.deepcopy(dict(user or {}))
    config["kind"] = KIND
    config["apiVersion"] = API_VERSION
    config["name"] = name
    networking = dict(config.get("networking") or {})
    networking["apiServerAddress"] = api_server_address
    networking["apiServerPort"] = api_server_port
    config["networking"] = networking
    if nodes is not None:
        if nodes < 1:
            raise ConfigError(f"nodes must be at least 1, got {nodes}")
        if config.get("nodes"):
            raise ConfigError("give either nodes=... or a kind config with nodes, not both")
        config["nodes"] = [{"role": "control-plane"}] + [{"role": "worker"}] * (nodes - 1)
    patches = list(config.get("kubeadmConfigPatches") or [])
    sans: list[str] = []
    for san in [*_user_cert_sans(patches), "localhost", api_server_address, *cert_sans]:
        if san not in sans:
            sans.append(san)
    config["kubeadmConfigPatches"] = [*patches, cert_sans_patch(sans)]
    return config


def node_count(config: Mapping[str, Any]) -> int:
    """How many nodes kind will create for ``config``."""
    return len(config.get("nodes") or []) or 1


def dump_config(config: Mapping[str, Any]) -> str:
    """The kind config as YAML text."""
    return yaml.safe_dump(dict(config), default_flow_style=False, sort_keys=False)


@dataclass(frozen=True)
class ClusterPaths:
    """Where kipik keeps one cluster's files inside the host."""

    config: str
    kubeconfig: str

    @classmethod
    def for_cluster(cls, name: str) -> ClusterPaths:
        """The paths for cluster ``name``."""
        base = f"{HOST_DIR}/{name}"
        return cls(config=f"{base}/kind-config.yaml", kubeconfig=f"{base}/kubeconfig")


def create_argv(
    name: str,
    *,
    config_path: str,
    kubeconfig_path: str,
    image: str | None,
    retain: bool,
) -> list[str]:
    """``kind create cluster`` for one cluster.

    No ``--wait``: kind's wait exits 0 when it times out, so kipik's own readiness checks do the
    waiting, with the time that is left, and say precisely what they waited for.
    """
    argv = ["kind", "create", "cluster", "--name", name, "--config", config_path]
    if image:
        argv += ["--image", image]
    argv += ["--kubeconfig", kubeconfig_path]
    if retain:
        argv.append("--retain")
    return argv


def get_kubeconfig_argv(name: str) -> list[str]:
    """``kind get kubeconfig`` (the external address, as kind publishes it in the host)."""
    return ["kind", "get", "kubeconfig", "--name", name]


def delete_argv(name: str) -> list[str]:
    """``kind delete cluster``."""
    return ["kind", "delete", "cluster", "--name", name]


def export_logs_argv(name: str, directory: str) -> list[str]:
    """``kind export logs`` into ``directory`` inside the host."""
    return ["kind", "export", "logs", directory, "--name", name]


class KindDriver:
    """Runs kind inside a host, only through ``host.exec`` and ``host.write_file``."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def _fail(self, action: str, error: CommandError) -> KindError:
        return KindError(action, error, self.host.daemon_log(lines=50))

    def create(
        self,
        config: Mapping[str, Any],
        *,
        image: str | None,
        timeout: float,
        retain: bool,
        on_output: OutputSink | None = None,
    ) -> None:
        """Write ``config`` into the host and run ``kind create cluster`` with it."""
        name = str(config["name"])
        paths = ClusterPaths.for_cluster(name)
        self.host.write_file(paths.config, dump_config(config).encode())
        argv = create_argv(
            name,
            config_path=paths.config,
            kubeconfig_path=paths.kubeconfig,
            image=image,
            retain=retain,
        )
        try:
            self.host.exec(argv, timeout=timeout, on_output=on_output).check()
        except CommandError as exc:
            raise self._fail(f"create cluster {name!r}", exc) from None

    def kubeconfig(self, name: str) -> str:
        """The kubeconfig kind reports for the cluster (server as published inside the host)."""
        try:
            return self.host.exec(get_kubeconfig_argv(name), timeout=60).check().stdout
        except CommandError as exc:
            raise self._fail(f"get the kubeconfig of {name!r}", exc) from None

    def delete(self, name: str) -> None:
        """Delete the cluster (kind succeeds when it does not exist)."""
        try:
            self.host.exec(delete_argv(name), timeout=120).check()
        except CommandError as exc:
            raise self._fail(f"delete cluster {name!r}", exc) from None
