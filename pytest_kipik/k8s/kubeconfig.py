"""Kubeconfig hygiene: parse, rewrite the server, write atomically 0600, build a client.

Nothing here touches ``~/.kube/config`` or the kubernetes client's global default configuration.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from pytest_kipik.errors import KipikError


def parse(text: str) -> dict[str, Any]:
    """Parse a kubeconfig, checking it has the parts kipik relies on."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KipikError(f"kind returned a kubeconfig that is not YAML: {exc}") from None
    if not isinstance(data, dict) or data.get("kind") != "Config" or not data.get("clusters"):
        raise KipikError("kind returned a kubeconfig without clusters")
    return data


def server_of(kubeconfig: Mapping[str, Any]) -> str:
    """The API server URL of the current context's cluster."""
    contexts = {c["name"]: c["context"] for c in kubeconfig.get("contexts") or []}
    current = contexts.get(kubeconfig.get("current-context", ""))
    clusters = {c["name"]: c["cluster"] for c in kubeconfig["clusters"]}
    if current is not None and current.get("cluster") in clusters:
        return str(clusters[current["cluster"]]["server"])
    return str(kubeconfig["clusters"][0]["cluster"]["server"])


#: A name every kube-apiserver certificate carries (kubeadm always adds it): a restored copy
#: of a cluster is verified by it at whatever address the copy is reached.
STABLE_SERVER_NAME = "kubernetes"


def with_server(
    kubeconfig: Mapping[str, Any], server: str, *, tls_server_name: str | None = None
) -> dict[str, Any]:
    """A copy of ``kubeconfig`` whose clusters all point at ``server``.

    kind writes exactly one cluster entry; its server (e.g. ``https://0.0.0.0:6443``) is only
    valid inside the host, so it is replaced by an address the test process can reach. With
    ``tls_server_name`` the certificate is verified by that name instead of the address.
    """
    rewritten = copy.deepcopy(dict(kubeconfig))
    for entry in rewritten["clusters"]:
        entry["cluster"]["server"] = server
        if tls_server_name:
            entry["cluster"]["tls-server-name"] = tls_server_name
    return rewritten


def dump(kubeconfig: Mapping[str, Any]) -> str:
    """The kubeconfig as YAML text."""
    return yaml.safe_dump(dict(kubeconfig), default_flow_style=False, sort_keys=False)


def write_private(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically with mode 0600, in a directory only we can enter."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


#: Connections a cluster's client keeps open at most (port-forwards use one per connection).
POOL_SIZE = 64


def api_client(kubeconfig_path: Path) -> k8s_client.ApiClient:
    """A client for this kubeconfig only (the global default configuration is not touched).

    The client needs its certificates as files: they go beside the kubeconfig, in its private
    directory, so they are removed with it. Its connection pool holds :data:`POOL_SIZE`
    connections: a port-forward opens a stream per connection at once (the client's default,
    five per CPU, made urllib3 discard connections with a warning under 20 at once).
    """
    configuration = k8s_client.Configuration()
    k8s_config.load_kube_config(
        config_file=str(kubeconfig_path),
        client_configuration=configuration,
        persist_config=False,
        temp_file_path=str(kubeconfig_path.parent),
    )
    configuration.connection_pool_maxsize = max(POOL_SIZE, configuration.connection_pool_maxsize)
    return k8s_client.ApiClient(configuration=configuration)
