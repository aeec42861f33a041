"""The pod backend: a privileged Docker-in-Docker pod in an outer Kubernetes cluster.

Everything goes through the official client: pods are created and deleted through the API,
commands run through the ``pods/exec`` WebSocket (:func:`kubernetes.stream.stream`), and a test
process outside the outer cluster reaches the nested API server through ``pods/portforward``
(:func:`kubernetes.stream.portforward`), one stream per local connection. Inside the outer
cluster it talks to the pod IP directly.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import docker
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from pytest_kipik import labels as lbl
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import BackendUnavailable, ConfigError, HostError, option
from pytest_kipik.hosts import engine
from pytest_kipik.hosts.base import Owned, inner_dockerd_args
from pytest_kipik.hosts.bundle import Entry, read_bundle, spool_from_bundle
from pytest_kipik.hosts.engine import engine_answers, image_stream, local_image_id
from pytest_kipik.hosts.outer import OuterCluster, local_outer_addresses
from pytest_kipik.hosts.pod_api import CREATE_REFUSED, CREATED, REQUEST_TIMEOUT, api_failure
from pytest_kipik.hosts.pod_host import PodHost
from pytest_kipik.hosts.pod_manifest import build_pod, load_template
from pytest_kipik.hosts.transfer import spool
from pytest_kipik.k8s.portforward import streaming
from pytest_kipik.kind import config as kind
from pytest_kipik.progress import Reporter


class PodBackend:
    """DinD pods in an outer Kubernetes cluster, through the official client."""

    name = "pod"

    def __init__(self, config: KipikConfig, report: Reporter) -> None:
        self.config = config
        self.report = report
        self.outer = OuterCluster(config)
        self._owner: dict[str, str] | None = None
        self._template = load_template(config.pod_template) if config.pod_template else None
        self._docker: Any = None

    @property
    def forwards_api(self) -> bool:
        """Outside the outer cluster, API servers are reached through this process's forwards."""
        return not self.direct

    # -- the outer cluster -----------------------------------------------------------------

    @property
    def api(self) -> k8s_client.ApiClient:
        """The outer cluster's client (its own configuration, never the global default)."""
        return self.outer.api

    @property
    def core(self) -> k8s_client.CoreV1Api:
        """``CoreV1Api`` of the outer cluster."""
        return self.outer.core

    @property
    def namespace(self) -> str:
        """The namespace of the DinD pods."""
        return self.outer.namespace

    @property
    def direct(self) -> bool:
        """Whether this process runs inside the outer cluster (it reaches pod IPs)."""
        return self.outer.direct

    @property
    def kubectl_flags(self) -> str:
        """``--kubeconfig``/``--context`` for kubectl commands printed to the user."""
        return self.outer.kubectl_flags

    def streaming(self) -> contextlib.AbstractContextManager[k8s_client.CoreV1Api]:
        """A ``CoreV1Api`` on a client of its own, for one exec stream (see :func:`streaming`)."""
        return streaming(self.api.configuration)

    def preflight(self) -> None:
        """A DinD image, and nested subnets that hide no address of the outer network."""
        if not self.config.image:
            self.connect()  # raises what to do
        kind.check_no_overlap(
            kind.subnets(
                self.config.user_kind_config, self.config.pod_subnet, self.config.service_subnet
            ),
            local_outer_addresses(),
        )

    def connect(self) -> None:
        """Check that the outer API server answers, and find the pod kipik runs in."""
        if not self.config.image:
            raise ConfigError(
                f"the pod backend needs {option('image')}: a DinD image the outer cluster's nodes "
                "can pull. Build pytest-kipik's image/ folder and push it, e.g. "
                "`docker build -t REGISTRY/kipik-dind:1 image/ && docker push "
                f"REGISTRY/kipik-dind:1`, then pass {option('image')}=REGISTRY/kipik-dind:1."
            )
        server = self.api.configuration.host
        try:
            k8s_client.VersionApi(self.api).get_code(_request_timeout=15)
        except Exception as exc:  # any failure here means: unreachable
            raise BackendUnavailable(
                f"the outer Kubernetes cluster at {server} did not answer ({self.outer.source}): "
                f"{exc}\n  Check the outer kubeconfig/context, and that this machine reaches "
                "that address."
            ) from None
        if self.direct:
            self._owner = self._find_own_pod()

    def _find_own_pod(self) -> dict[str, str] | None:
        """The pod this process runs in (HOSTNAME names it), for an ownerReference."""
        own = os.environ.get("HOSTNAME", "")
        try:
            pod: Any = self.core.read_namespaced_pod(own, self.namespace, _request_timeout=15)
        except (ApiException, OSError):
            self.report(
                f"kipik: could not read this pod ({own} in {self.namespace}); DinD pods will "
                "not be garbage-collected with it (they still stop at their deadline)"
            )
            return None
        return {"name": str(pod.metadata.name), "uid": str(pod.metadata.uid)}

    def outer_addresses(self) -> dict[str, str]:
        """Addresses of the outer network that nested subnets must not contain."""
        found = local_outer_addresses()
        server = urlsplit(str(self.api.configuration.host)).hostname
        if server:
            found["the outer API server"] = server
        return found

    def describe(self) -> str:
        """Where DinD pods run."""
        return self.outer.describe()

    # -- hosts -----------------------------------------------------------------------------

    def manifest(self, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
        """The DinD pod for host ``name``."""
        assert self.config.image is not None
        owner_labels = dict(labels)
        if self._owner:
            owner_labels[lbl.PREFIX + "owner-pod"] = lbl.label_value(self._owner["name"])
        return build_pod(
            name=name,
            namespace=self.namespace,
            image=self.config.image,
            args=inner_dockerd_args(self.config.registries.dockerd_args()),
            labels=owner_labels,
            deadline_seconds=int(self.config.timeout + self.config.ttl),
            service_account=self.config.service_account,
            storage_limit=self.config.docker_storage,
            owner=self._owner,
            template=self._template,
        )

    def make_host(self, name: str, labels: Mapping[str, str], inner_ports: Sequence[int]) -> Any:
        """A DinD pod named ``name`` (not created yet)."""
        return PodHost(self, name=name, labels=labels, inner_ports=inner_ports)

    def _local_engine(self) -> docker.DockerClient | None:
        """The Docker engine where the test runs, if one answers (usually none inside a pod)."""
        if self._docker is None and engine_answers():
            self._docker = engine.client()
        found: docker.DockerClient | None = self._docker
        return found

    def local_image_id(self, image: str) -> str | None:
        """The id of ``image`` on the local engine; None without an engine or such an image."""
        engine = self._local_engine()
        found = None if engine is None else local_image_id(engine, image)
        if found is None:
            entry = self._bundled(image)
            found = None if entry is None else entry.id
        return found

    def _bundled(self, image: str) -> Entry | None:
        """``image`` in the bundle (the ``bundle`` setting), if it holds it."""
        return next((e for e in self._bundle_entries if e.reference == image), None)

    @functools.cached_property
    def _bundle_entries(self) -> list[Entry]:
        """The images of the bundle, read once (none without a bundle)."""
        return [] if self.config.bundle is None else read_bundle(self.config.bundle)

    def spool_image(self, image: str) -> tuple[str, Path] | None:
        """``docker save`` of a local image into a private temporary file, or None.

        Without a local Docker engine (the usual case inside a pod) there is nothing to move,
        unless the bundle (the ``bundle`` setting) holds the image.
        """
        engine = self._local_engine()
        found = None if engine is None else image_stream(engine, image)
        if found is not None:
            image_id, chunks = found
            return image_id, spool(chunks)
        entry = self._bundled(image)
        if entry is None or self.config.bundle is None:
            return None
        return entry.id, spool_from_bundle(self.config.bundle, entry)

    def list_owned(self, run_id: str | None = None) -> list[Owned]:
        """Pods kipik made in the namespace."""
        selector = f"{lbl.RUN_ID}={run_id}" if run_id else lbl.RUN_ID
        try:
            pods: list[Any] = self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT
            ).items
        except ApiException as exc:
            nothing_made = self.namespace in CREATE_REFUSED and self.namespace not in CREATED
            if exc.status == 403 and run_id and nothing_made:
                return []  # no pod of this run can exist; the refused creation was reported
            raise api_failure(exc, "list", "pods", self.namespace) from None
        return [Owned("pod", str(p.metadata.name), dict(p.metadata.labels or {})) for p in pods]

    def remove_owned(self, resource: Owned) -> None:
        """Delete a kipik pod (and wait until it is gone)."""
        if lbl.RUN_ID not in resource.labels or resource.kind != "pod":
            raise HostError(f"{resource} is not a kipik pod: left alone")
        PodHost(self, name=resource.name, labels=resource.labels, inner_ports=[]).remove()

    def snapshots(self, prefix: str) -> None:
        """No snapshots on the pod backend (yet: see docs/lifecycle.md, Snapshots)."""
        return None

    def close(self) -> None:
        """Close the clients."""
        self.outer.close()
        if self._docker is not None:
            self._docker.close()
            self._docker = None
