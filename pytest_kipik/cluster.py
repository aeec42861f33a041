"""The cluster handle: a ready kind cluster in its DinD host, and a namespace in it.

:class:`NestedCluster` gives the clients and the toolkit (apply, wait_for, port_forward,
load_image, ...); :mod:`pytest_kipik.factory` makes clusters and removes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from pytest_kipik.errors import ImageError, KipikError, option
from pytest_kipik.hosts.base import Hold, Host, inner_image_id
from pytest_kipik.hosts.registry import ClusterRegistry, has_local
from pytest_kipik.hosts.transfer import archive_images
from pytest_kipik.k8s import kubeconfig
from pytest_kipik.k8s.manifests import Manifests, Predicate, Source
from pytest_kipik.k8s.portforward import PortForwarder, forward_resolver
from pytest_kipik.kind.driver import KindDriver
from pytest_kipik.kind.registries import LOCAL_PORT
from pytest_kipik.process import CommandResult, run


class NestedCluster:
    """A ready kind cluster inside its own Docker-in-Docker host.

    Usable as a context manager on its own; when created by a
    :class:`~pytest_kipik.factory.ClusterFactory` the factory removes it.
    """

    def __init__(
        self,
        *,
        name: str,
        kubeconfig_path: Path,
        server: str,
        host: Host,
        nodes: int,
        keep: bool = False,
        owned: bool = True,
        hold: Hold | None = None,
        status: str = "created",
        kind_name: str | None = None,
    ) -> None:
        self.name = name
        #: The kind cluster's own name in the host (a restored copy keeps its snapshot's).
        self.kind_name = kind_name or name
        self.kubeconfig_path = kubeconfig_path
        self.server = server
        self.host = host
        self.nodes = nodes
        self.keep = keep
        #: Whether :meth:`close` removes the host (not for a cluster another process removes).
        self.owned = owned
        #: ``created``, ``restored`` (from a snapshot), ``attached`` (another worker's),
        #: ``reused`` (an earlier run's) or ``warm``.
        self.status = status
        self.hold = hold
        #: The clusters sharing this one's host (see :meth:`ClusterFactory.create_connected`).
        self.share: HostShare | None = None
        self._forwards: list[PortForwarder] = []
        self._closed = False

    def __repr__(self) -> str:
        return f"NestedCluster(name={self.name!r}, server={self.server!r})"

    @cached_property
    def api_client(self) -> k8s_client.ApiClient:
        """A kubernetes ApiClient for this cluster only (built from its own kubeconfig)."""
        return kubeconfig.api_client(self.kubeconfig_path)

    @cached_property
    def registry(self) -> ClusterRegistry:
        """The registry inside this cluster's host (``--kipik-registry``): push, then pull.

        ``registry.push("app:v1")`` pushes a local image and returns the name a pod pulls it
        by (``localhost:5001/app:v1``); ``registry.address`` is where this process reaches it.
        Raises KipikError when the host runs no registry.
        """
        if not has_local(self.host):
            raise KipikError(
                f"{self.name} has no registry inside: run with {option('registry')}=IMAGE "
                "(a Docker registry image, e.g. registry:2)"
            )
        return ClusterRegistry(self.host.api_endpoint(LOCAL_PORT).address)

    @cached_property
    def core_v1(self) -> k8s_client.CoreV1Api:
        """``CoreV1Api`` on :attr:`api_client`."""
        return k8s_client.CoreV1Api(self.api_client)

    @cached_property
    def manifests(self) -> Manifests:
        """Apply/delete/wait through a DynamicClient (discovery cached in a private file)."""
        cache = self.kubeconfig_path.parent / f".discovery-{os.getpid()}.json"
        return Manifests(self.api_client, cache)

    def _tool(self, tool: str, args: Sequence[str], check: bool, timeout: float) -> CommandResult:
        if shutil.which(tool) is None:
            raise KipikError(
                f"{tool} is not installed (not on PATH); install it to use cluster.{tool}(), "
                "or use cluster.apply() / cluster.api_client"
            )
        return run(
            [tool, "--kubeconfig", str(self.kubeconfig_path), *args], timeout=timeout, check=check
        )

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> CommandResult:
        """Run the local ``kubectl`` against this cluster and capture its output."""
        return self._tool("kubectl", args, check, timeout)

    def helm(self, *args: str, check: bool = True, timeout: float = 600) -> CommandResult:
        """Run the local ``helm`` against this cluster and capture its output."""
        return self._tool("helm", args, check, timeout)

    def apply(
        self,
        source: Source,
        *,
        namespace: str | None = None,
        server_side: bool = True,
        timeout: float = 60,
    ) -> list[dict[str, Any]]:
        """Apply objects: a dict, YAML text (several documents), a file, a folder, or a list.

        Namespaces and CRDs go first and each CRD is awaited until established, so custom
        resources can come in the same call. Server-side apply (field manager
        ``pytest-kipik``), or create-or-replace with ``server_side=False``. ``namespace`` is
        for namespaced objects that name none. Returns the objects as the API stored them.
        """
        return self.manifests.apply(
            source, namespace=namespace, server_side=server_side, timeout=timeout
        )

    def delete(
        self,
        source: Source,
        *,
        namespace: str | None = None,
        wait: bool = False,
        timeout: float = 60,
    ) -> list[str]:
        """Delete the objects of ``source`` (as for :meth:`apply`); missing ones are skipped.

        ``wait``: until each is gone. Returns what was deleted.
        """
        return self.manifests.delete(source, namespace=namespace, wait=wait, timeout=timeout)

    def wait_for(
        self,
        kind: str,
        name: str,
        namespace: str | None = None,
        condition: str | Predicate | None = None,
        timeout: float = 60,
        *,
        api_version: str | None = None,
    ) -> dict[str, Any]:
        """Wait until an object exists and ``condition`` holds; returns it (a dict).

        ``kind``: ``Deployment``, ``deployments``, ``deploy`` or ``deployments.apps``.
        ``condition``: a status condition (``"Available"``, ``"Ready=False"``), ``"deleted"``,
        or a function of the object. A timeout error shows the last state seen.
        """
        return self.manifests.wait_for(
            kind, name, namespace, condition, timeout, api_version=api_version
        )

    def create_namespace(self, name: str, *, timeout: float = 60) -> NestedNamespace:
        """Create namespace ``name``; returns it once pods can be made in it.

        A new namespace refuses pods until its ``default`` ServiceAccount exists, which the
        controller manager makes a moment later: this waits for that too.
        """
        try:
            self.core_v1.create_namespace(
                k8s_client.V1Namespace(metadata=k8s_client.V1ObjectMeta(name=name))
            )
        except ApiException as exc:
            raise KipikError(f"creating namespace {name} failed: {_why(exc)}") from None
        self.wait_for("ServiceAccount", "default", name, timeout=timeout)
        return NestedNamespace(name, self)

    @contextlib.contextmanager
    def port_forward(
        self, target: str, remote_port: int, *, namespace: str = "default", local_port: int = 0
    ) -> Iterator[PortForwarder]:
        """``127.0.0.1:<local_port>`` forwarded to a pod or service port in this cluster.

        ``target``: ``pod/NAME``, ``svc/NAME`` (its port ``remote_port``, forwarded to the
        targetPort of a running pod behind it, as kubectl does) or ``deployment/NAME``. Every
        connection opens its own port-forward stream and picks the pod again, so many
        connections work at once and a dropped stream or a replaced pod costs only the
        connections in flight. Yields the forwarder (``.local_port``); closed on leaving.
        """
        try:
            resolve = forward_resolver(self.api_client, namespace, target, remote_port)
            resolve()  # a wrong name or port fails here, not on the first connection
        except (ApiException, ValueError, KipikError) as exc:
            raise KipikError(
                f"cannot port-forward to {target} in {namespace}: {_why(exc)}"
            ) from None
        forward = PortForwarder(
            self.api_client.configuration,
            resolve,
            name=f"{self.name}-{target}",
            local_port=local_port,
        )
        self._forwards.append(forward)
        try:
            yield forward
        finally:
            forward.close()
            self._forwards.remove(forward)

    def load_image(self, *images: str | os.PathLike[str], timeout: float = 600) -> list[ImageLoad]:
        """Load images into every node of this cluster, without a registry.

        Each is a name on the engine where the test runs, or the path of a ``docker save`` /
        OCI archive. What the host has already (same id) is not moved again, and kind skips
        nodes that have it. Returns what happened to each image.
        """
        deadline = time.monotonic() + timeout
        loads: list[ImageLoad] = []
        for image in images:
            left = max(deadline - time.monotonic(), 1.0)
            if isinstance(image, os.PathLike) or os.path.isfile(image):
                loads += self._load_archive(Path(image), left)
            else:
                loads.append(self._load_engine_image(str(image), left))
        references = list(dict.fromkeys(load.reference for load in loads))
        nodes = KindDriver(self.host).load(
            self.kind_name, references, timeout=max(deadline - time.monotonic(), 1.0)
        )
        return [dataclasses.replace(load, nodes=tuple(nodes)) for load in loads]

    def _load_engine_image(self, image: str, timeout: float) -> ImageLoad:
        loaded = self.host.load_image(image, timeout)
        if loaded is None:
            raise ImageError(
                f"cannot load {image}: the Docker engine where the test runs does not have it "
                "(docker pull or docker build it first, or give a docker save archive's path)"
            )
        return ImageLoad(image, loaded.reference, moved=loaded.moved)

    def _load_archive(self, path: Path, timeout: float) -> list[ImageLoad]:
        found = archive_images(path)
        untagged = [i.id for i in found if not i.tags]
        if untagged or not found:
            raise ImageError(
                f"{path}: images without a name cannot be used by pods ({', '.join(untagged)}); "
                "save them by name: docker save NAME:TAG -o FILE.tar"
            )
        missing = [i for i in found if inner_image_id(self.host, i.id) != i.id]
        if missing:
            loaded = self.host.feed(["docker", "load"], path, timeout)
            if loaded.exit_code != 0:
                raise ImageError(
                    f"loading {path} into {self.host.name} failed: {loaded.stderr.strip()}"
                )
        return [
            ImageLoad(str(path), tag, moved=bool(missing)) for image in found for tag in image.tags
        ]

    def internal_kubeconfig(self) -> Path:
        """A kubeconfig valid inside the clusters that share this one's host (0600).

        Its server is the control-plane container's name on the host's ``kind`` network
        (kind's ``--internal`` kubeconfig); the API server certificate carries that name.
        """
        path = self.kubeconfig_path.parent / "kubeconfig-internal"
        if not path.exists():
            raw = KindDriver(self.host).kubeconfig(self.kind_name, internal=True)
            kubeconfig.write_private(path, kubeconfig.dump(kubeconfig.parse(raw)))
        return path

    def how_to_reach(self) -> str:
        """What to paste to use and to remove a kept cluster."""
        return (
            f"kipik: kept cluster {self.name}\n"
            f"  use it:    {self.host.how_to_use(str(self.kubeconfig_path))}\n"
            f"  remove it: {self.host.removal_command()} && rm -rf {self.kubeconfig_path.parent}"
        )

    def close_client(self) -> None:
        """Close port-forwards and :attr:`api_client` if they were made."""
        for forward in list(self._forwards):
            forward.close()
        if "manifests" in self.__dict__:
            self.manifests.close()
        if "api_client" in self.__dict__:
            self.api_client.close()

    def close(self) -> None:
        """Remove the cluster's host and files (not when kept); idempotent.

        A removal that failed can be retried: the cluster counts as closed only once it is gone.
        """
        if self._closed:
            return
        self.close_client()
        if self.owned and not self.keep:
            if self.share is None or self.share.last(self.name):
                self.host.remove()
            elif not self.share.dissolving:  # the others keep the host
                KindDriver(self.host).delete(self.kind_name)
            shutil.rmtree(self.kubeconfig_path.parent, ignore_errors=True)
            if self.share is not None:
                self.share.leave(self.name)
        if self.hold is not None:
            self.hold.release()
            self.hold = None
        self._closed = True

    def __enter__(self) -> NestedCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class NestedNamespace:
    """A namespace of its own for one test, in the session's nested cluster."""

    name: str
    cluster: NestedCluster

    def __str__(self) -> str:
        return self.name

    def apply(self, source: Any, **options: Any) -> list[dict[str, Any]]:
        """:meth:`NestedCluster.apply` with this namespace for objects that name none."""
        return self.cluster.apply(source, namespace=self.name, **options)

    def wait_for(self, kind: str, name: str, condition: Any = None, timeout: float = 60) -> Any:
        """:meth:`NestedCluster.wait_for` in this namespace."""
        return self.cluster.wait_for(kind, name, self.name, condition, timeout)

    def port_forward(self, target: str, remote_port: int, **options: Any) -> Any:
        """:meth:`NestedCluster.port_forward` in this namespace."""
        return self.cluster.port_forward(target, remote_port, namespace=self.name, **options)

    def delete(self) -> None:
        """Delete the namespace (and so everything in it); gone already is fine."""
        try:
            self.cluster.core_v1.delete_namespace(self.name, propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise KipikError(f"deleting namespace {self.name} failed: {_why(exc)}") from None


@dataclass(frozen=True)
class ImageLoad:
    """What :meth:`NestedCluster.load_image` did with one image."""

    image: str
    #: The name the nodes know it by.
    reference: str
    #: Whether bytes went into the host (False: the host had this very image already).
    moved: bool
    #: The nodes kind loaded it into (empty: every node had it).
    nodes: tuple[str, ...] = ()


class HostShare:
    """The clusters living in one host: the last one to go removes the host."""

    def __init__(self, names: Sequence[str]) -> None:
        self._names = set(names)
        self._lock = threading.Lock()
        #: Set when every cluster of the host goes (the session ends): no one-by-one deletes.
        self.dissolving = False

    def last(self, name: str) -> bool:
        """Whether ``name`` is the only cluster left in the host."""
        with self._lock:
            return self._names <= {name}

    def leave(self, name: str) -> None:
        """``name`` is gone from the host."""
        with self._lock:
            self._names.discard(name)


def _why(exc: Exception) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return str(exc)
