"""The outer Kubernetes cluster the pod backend runs its DinD pods in.

Its client loaded from the settings (an outer kubeconfig and context, else the in-cluster
config), the namespace, whether this process runs inside it, the addresses of its network this
process knows, and the access the pod backend needs there (``examples/rbac.yaml``). The pod
backend and the doctor both use it.
"""

from __future__ import annotations

import contextlib
import os
import socket

from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import BackendUnavailable, option
from pytest_kipik.hosts.base import SERVICE_ACCOUNT_DIR, in_pod

#: The Role and ServiceAccount the pod backend needs, shipped with the examples.
RBAC_EXAMPLE = "examples/rbac.yaml"


def local_outer_addresses() -> dict[str, str]:
    """Outer-network addresses this process knows without asking: its own, the API service."""
    found: dict[str, str] = {}
    if in_pod():
        with contextlib.suppress(OSError):
            found["this pod's IP"] = socket.gethostbyname(socket.gethostname())
        found["the outer API service (KUBERNETES_SERVICE_HOST)"] = os.environ.get(
            "KUBERNETES_SERVICE_HOST", ""
        )
    return {k: v for k, v in found.items() if v}


class OuterCluster:
    """The outer cluster the settings name; its client is loaded on first use."""

    def __init__(self, config: KipikConfig) -> None:
        self.config = config
        self._api: k8s_client.ApiClient | None = None
        #: Where the client's configuration came from (for messages), once loaded.
        self.source = ""
        #: The namespace of the DinD pods (the setting, else the context's, else the pod's own).
        self.namespace = config.namespace or "default"
        #: Whether this process runs inside the outer cluster (it reaches pod IPs directly).
        self.direct = in_pod()
        #: ``--kubeconfig``/``--context`` for kubectl commands printed to the user.
        self.kubectl_flags = ""

    def _load(self) -> k8s_client.ApiClient:
        configuration = k8s_client.Configuration()
        kubeconfig = self.config.outer_kubeconfig
        context = self.config.outer_context
        try:
            if kubeconfig is None and in_pod() and context is None:
                k8s_config.load_incluster_config(client_configuration=configuration)
                self.source = "the in-cluster config (service-account token)"
                namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
            else:
                path = str(kubeconfig) if kubeconfig else None
                k8s_config.load_kube_config(
                    config_file=path,
                    context=context,
                    client_configuration=configuration,
                    persist_config=False,
                )
                shown = path or os.environ.get("KUBECONFIG") or "~/.kube/config"
                self.source = f"kubeconfig {shown}" + (f", context {context}" if context else "")
                _, active = k8s_config.list_kube_config_contexts(config_file=path)
                if context:
                    contexts, _ = k8s_config.list_kube_config_contexts(config_file=path)
                    active = next(c for c in contexts if c["name"] == context)
                namespace = (active.get("context") or {}).get("namespace") or "default"
                flags = [f"--kubeconfig {path}"] if path else []
                flags += [f"--context {context}"] if context else []
                self.kubectl_flags = " ".join(flags) + (" " if flags else "")
        except (k8s_config.ConfigException, OSError, StopIteration) as exc:
            raise BackendUnavailable(
                f"no outer Kubernetes cluster is configured for the pod backend: {exc}\n"
                f"  Give one with {option('outer_kubeconfig')} (and {option('outer_context')}), "
                "set KUBECONFIG, or run inside a pod with a service-account token."
            ) from None
        self.namespace = self.config.namespace or namespace
        return k8s_client.ApiClient(configuration)

    @property
    def api(self) -> k8s_client.ApiClient:
        """The outer cluster's client (its own configuration, never the global default)."""
        if self._api is None:
            self._api = self._load()
        return self._api

    @property
    def core(self) -> k8s_client.CoreV1Api:
        """``CoreV1Api`` of the outer cluster."""
        return k8s_client.CoreV1Api(self.api)

    def describe(self) -> str:
        """Where DinD pods run and how this process reaches them."""
        way = "the pod IP (in-cluster)" if self.direct else "port-forward"
        where = self.source or (
            "the in-cluster config" if self.direct else "the default kubeconfig resolution"
        )
        return f"outer cluster from {where}, namespace {self.namespace}, reached by {way}"

    def close(self) -> None:
        """Close the client."""
        if self._api is not None:
            self._api.close()
            self._api = None
