"""kind's cluster config: validating the user's, building kipik's, subnets and overlaps.

Pure functions of plain data (only :func:`load_user_config` reads its file);
:mod:`pytest_kipik.kind.driver` runs kind.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pytest_kipik.errors import ConfigError, option
from pytest_kipik.kind import kubelet
from pytest_kipik.kind.registries import CONTAINERD_PATCH, NODE_CERTS_DIR, Registries

API_VERSION = "kind.x-k8s.io/v1alpha4"
KIND = "Cluster"
#: The address and port kind publishes the API server on inside the host.
API_SERVER_ADDRESS = "0.0.0.0"
API_SERVER_PORT = 6443
#: The docker network kind puts every cluster's nodes on (in the host).
NETWORK = "kind"
#: Where kipik keeps its files inside the host.
HOST_DIR = "/kipik"

#: The top-level fields of kind v0.32.0's v1alpha4 Cluster. Others reach kind as they are (a
#: newer kind in the DinD image may know them) with a warning.
KNOWN_FIELDS = (
    "kind",
    "apiVersion",
    "name",
    "nodes",
    "networking",
    "featureGates",
    "runtimeConfig",
    "kubeadmConfigPatches",
    "kubeadmConfigPatchesJSON6902",
    "containerdConfigPatches",
    "containerdConfigPatchesJSON6902",
)
_ROLES = ("control-plane", "worker")
#: The networking fields kipik reads or sets, with their types.
_NETWORKING_TYPES: dict[str, type | tuple[type, ...]] = {
    "apiServerAddress": str,
    "apiServerPort": int,
    "podSubnet": str,
    "serviceSubnet": str,
    "ipFamily": str,
}


def _line_of(root: yaml.Node, *path: str | int) -> str:
    """`` (line N)`` of the node at ``path`` in the composed document, or nothing."""
    node: yaml.Node | None = root
    for step in path:
        if isinstance(node, yaml.MappingNode) and isinstance(step, str):
            node = next((v for k, v in node.value if k.value == step), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int):
            node = node.value[step] if step < len(node.value) else None
        else:
            node = None
    return f"line {node.start_mark.line + 1}: " if node is not None else ""


def _check_nodes(root: yaml.Node, nodes: Any) -> None:
    """``nodes``: a list of mappings with known roles and string images, one control plane."""
    if nodes is not None and not isinstance(nodes, list):
        raise ConfigError(f"{_line_of(root, 'nodes')}nodes must be a list")
    for index, node in enumerate(nodes or []):
        where = _line_of(root, "nodes", index)
        if not isinstance(node, dict):
            raise ConfigError(f"{where}nodes[{index}] must be a mapping")
        role = node.get("role", "control-plane")
        if role not in _ROLES:
            raise ConfigError(
                f"{where}nodes[{index}].role is {role!r}: use one of {', '.join(_ROLES)}"
            )
        if "image" in node and not isinstance(node["image"], str):
            raise ConfigError(f"{where}nodes[{index}].image must be a string")
    if nodes and not any(n.get("role", "control-plane") == "control-plane" for n in nodes):
        raise ConfigError("nodes needs at least one node with role control-plane")


def _check_patches(root: yaml.Node, patches: Any) -> None:
    """``kubeadmConfigPatches``: a list of strings that are each valid YAML."""
    if patches is not None and not isinstance(patches, list):
        raise ConfigError(f"{_line_of(root, 'kubeadmConfigPatches')}must be a list of strings")
    for index, patch in enumerate(patches or []):
        where = _line_of(root, "kubeadmConfigPatches", index)
        if not isinstance(patch, str):
            raise ConfigError(f"{where}kubeadmConfigPatches[{index}] must be a YAML string")
        try:
            yaml.safe_load(patch)
        except yaml.YAMLError as exc:
            raise ConfigError(
                f"{where}kubeadmConfigPatches[{index}] is not valid YAML: {exc}"
            ) from None


def validate_user_config(text: str) -> dict[str, Any]:
    """Parse a kind config and check what kipik relies on; return it as plain data.

    Checked: YAML, ``kind``/``apiVersion``, and the fields kipik reads or sets (``nodes`` and
    their roles and images, the ``networking`` fields it sets, ``kubeadmConfigPatches``) with
    their types. Everything else is left to the kind in the DinD image, whose own error is shown
    if it refuses. Raises :class:`ConfigError` saying what is wrong, with the line.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}") from None
    if root is None or not isinstance(data, dict):
        raise ConfigError(f"expected a kind {KIND} mapping with kind and apiVersion")
    if data.get("kind") != KIND:
        raise ConfigError(
            f"{_line_of(root, 'kind')}kind must be {KIND!r}, found {data.get('kind')!r}"
        )
    if data.get("apiVersion") != API_VERSION:
        raise ConfigError(
            f"{_line_of(root, 'apiVersion')}apiVersion must be {API_VERSION!r} (the one kind "
            f"supports), found {data.get('apiVersion')!r}"
        )
    _check_nodes(root, data.get("nodes"))
    networking = data.get("networking")
    if networking is not None and not isinstance(networking, dict):
        raise ConfigError(f"{_line_of(root, 'networking')}networking must be a mapping")
    for key, kind_of in _NETWORKING_TYPES.items():
        value = (networking or {}).get(key)
        if value is not None and (not isinstance(value, kind_of) or isinstance(value, bool)):
            raise ConfigError(
                f"{_line_of(root, 'networking', key)}networking.{key} must be a "
                f"{'number' if kind_of is int else 'string'}, found {value!r}"
            )
    _check_patches(root, data.get("kubeadmConfigPatches"))
    return data


def unknown_fields(config: Mapping[str, Any]) -> list[str]:
    """Top-level fields kind v0.32.0 does not know (passed on; a newer kind may know them)."""
    return [key for key in config if key not in KNOWN_FIELDS]


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
    pod_subnet: str | None = None,
    service_subnet: str | None = None,
    images: Mapping[str, str] | None = None,
    registries: Registries | None = None,
    kubelet_answer: bool = False,
) -> dict[str, Any]:
    """Merge what kipik must set into the user's kind config (which is not modified).

    Kept from the user: nodes, patches, networking (subnets, CNI, ...), feature gates. Set by
    kipik: the name, ``networking.apiServerAddress``/``apiServerPort``, a first kubeadm patch
    with the kubelets' API budget (:mod:`.kubelet`; the user's patches come after it), and one
    whose certSANs are the user's own, kind's defaults (``localhost`` and the API address) and
    ``cert_sans`` (a merge patch replaces lists: the union is written out). ``nodes`` (1 control
    plane + ``nodes - 1`` workers) only when the user's config has no ``nodes``.
    ``pod_subnet``/``service_subnet`` apply where the user set none (IPv4 clusters only).
    ``images`` maps node images to the references the inner daemon knows them by (see
    :meth:`Host.load_image`). Every node mounts the ``registries``' files (see
    :mod:`.registries`) and, with ``kubelet_answer``, those of :mod:`.kubelet`.
    """
    config: dict[str, Any] = copy.deepcopy(dict(user or {}))
    config["kind"] = KIND
    config["apiVersion"] = API_VERSION
    config["name"] = name
    networking = dict(config.get("networking") or {})
    networking["apiServerAddress"] = api_server_address
    networking["apiServerPort"] = api_server_port
    if networking.get("ipFamily", "ipv4") == "ipv4":
        for key, value in (("podSubnet", pod_subnet), ("serviceSubnet", service_subnet)):
            if value and not networking.get(key):
                networking[key] = value
    config["networking"] = networking
    if nodes is not None:
        if nodes < 1:
            raise ConfigError(f"nodes must be at least 1, got {nodes}")
        if config.get("nodes"):
            raise ConfigError("give either nodes=... or a kind config with nodes, not both")
        config["nodes"] = [{"role": "control-plane"}] + [
            {"role": "worker"} for _ in range(nodes - 1)
        ]
    for node in config.get("nodes") or []:
        if node.get("image") in (images or {}):
            node["image"] = (images or {})[node["image"]]
    patches = list(config.get("kubeadmConfigPatches") or [])
    sans = list(dict.fromkeys([*_user_cert_sans(patches), "localhost", api_server_address,
                               *cert_sans]))  # fmt: skip
    config["kubeadmConfigPatches"] = [kubelet.budget_patch(), *patches, cert_sans_patch(sans)]
    if registries is not None and registries.configured:
        _wire_registries(config, registries)
    if kubelet_answer:
        _wire_kubelet_answer(config)
    return config


def _wire_kubelet_answer(config: dict[str, Any]) -> None:
    """Every node mounts the answer's files; its kubelet's ``--docker`` points there."""
    _mount_on_every_node(config, kubelet.node_mounts())
    config["kubeadmConfigPatches"] += kubelet.flag_patches()


def _mount_on_every_node(config: dict[str, Any], mounts: Sequence[Mapping[str, Any]]) -> None:
    """Add ``mounts`` to every node's ``extraMounts`` (kind's one node when none is listed)."""
    config["nodes"] = config.get("nodes") or [{"role": "control-plane"}]
    for node in config["nodes"]:
        node["extraMounts"] = [*(node.get("extraMounts") or []), *(dict(m) for m in mounts)]


def _wire_registries(config: dict[str, Any], registries: Registries) -> None:
    """Every node mounts the registry files; containerd reads ``hosts.toml`` when there are any."""
    mounts = registries.node_mounts()
    if not mounts:
        return
    _mount_on_every_node(config, mounts)
    if any(m["containerPath"] == NODE_CERTS_DIR for m in mounts):
        config["containerdConfigPatches"] = [
            *(config.get("containerdConfigPatches") or []),
            CONTAINERD_PATCH,
        ]


def node_images(user: Mapping[str, Any] | None, image: str | None) -> list[str]:
    """The node images kind will need: ``image``, else the images the nodes name.

    ``--image`` overrides every node's image. Empty when kind's default decides.
    """
    if image:
        return [image]
    found: list[str] = []
    for node in (user or {}).get("nodes") or []:
        if node.get("image") and node["image"] not in found:
            found.append(node["image"])
    return found


def subnets(user: Mapping[str, Any] | None, pod_subnet: str, service_subnet: str) -> dict[str, str]:
    """The IPv4 pod and service subnets the nested cluster will use (the user's, else ours)."""
    networking = (user or {}).get("networking") or {}
    if networking.get("ipFamily", "ipv4") != "ipv4":
        return {k: v for k in ("podSubnet", "serviceSubnet") if (v := networking.get(k))}
    return {
        "podSubnet": networking.get("podSubnet") or pod_subnet,
        "serviceSubnet": networking.get("serviceSubnet") or service_subnet,
    }


def check_no_overlap(subnets: Mapping[str, str], addresses: Mapping[str, str]) -> None:
    """Raise ConfigError when an outer address lies in a nested subnet (replies would be lost).

    ``subnets``: what the nested cluster uses (see :func:`subnets`); ``addresses``: addresses
    of the outer network, each with where it comes from.
    """
    for field, subnet in subnets.items():
        network = ipaddress.ip_network(subnet, strict=False)
        for where, address in addresses.items():
            try:
                inside = ipaddress.ip_address(address) in network
            except ValueError:  # a host name: nothing to compare
                continue
            if inside:
                raise ConfigError(
                    f"the nested cluster's {field} {subnet} contains {address} ({where}) of the "
                    "outer network: replies to it would be routed into the nested cluster and "
                    f"never arrive. Choose a {field} that does not overlap the outer cluster's "
                    f"ranges ({option('pod_subnet')} / {option('service_subnet')}, or networking "
                    "in your kind config)."
                )


def node_count(config: Mapping[str, Any]) -> int:
    """How many nodes kind will create for ``config``."""
    return len(config.get("nodes") or []) or 1


def dump_config(config: Mapping[str, Any]) -> str:
    """The kind config as YAML text."""
    return yaml.safe_dump(dict(config), default_flow_style=False, sort_keys=False)
