"""NestedCluster and ClusterFactory: provisioning that cleans up after itself, even half-way."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from filelock import FileLock
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from pytest_kipik import kind, kubeconfig, labels, paths, readiness, sharing
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import ConfigError, ImageError, KipikError
from pytest_kipik.hosts import make_backend
from pytest_kipik.hosts.base import Backend, Hold, Host, OutputSink, in_pod, inner_image_id
from pytest_kipik.image import archive_images
from pytest_kipik.manifests import Manifests, Predicate, Source
from pytest_kipik.portforward import PortForwarder, forward_resolver
from pytest_kipik.process import CommandResult, run
from pytest_kipik.progress import Reporter, log, phase, stderr_reporter
from pytest_kipik.sharing import LEASE_PATH, Lease, Record, Session
from pytest_kipik.signals import deferred_interrupts
from pytest_kipik.waiting import NotYet, wait_until


class NestedCluster:
    """A ready kind cluster inside its own Docker-in-Docker host.

    Usable as a context manager on its own; when created by a :class:`ClusterFactory` the
    factory removes it.
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
    ) -> None:
        self.name = name
        self.kubeconfig_path = kubeconfig_path
        self.server = server
        self.host = host
        self.nodes = nodes
        self.keep = keep
        #: Whether :meth:`close` removes the host (not for a cluster another process removes).
        self.owned = owned
        #: ``created``, ``attached`` (another worker's), ``reused`` (an earlier run's) or ``warm``.
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
        nodes = kind.KindDriver(self.host).load(
            self.name, references, timeout=max(deadline - time.monotonic(), 1.0)
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
            raw = kind.KindDriver(self.host).kubeconfig(self.name, internal=True)
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
                kind.KindDriver(self.host).delete(self.name)
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


@dataclass(frozen=True)
class _Plan:
    """How one cluster's host is had: fresh for the session, kept for reuse, or warm."""

    host_name: str | None = None
    reuse_key: str | None = None
    warm_slot: int | None = None
    kubeconfig_dir: Path | None = None
    owned: bool = True


class ClusterFactory:
    """Creates nested clusters for one session (or one xdist worker) and removes them all.

    ``backend`` makes the hosts (default: the one the config selects). ``workdir`` holds each
    cluster's private kubeconfig directory (a fresh temporary directory when not given; kept
    clusters use the per-user state directory, which nothing prunes). ``report`` receives one
    line per phase, and kind's own progress lines when ``verbose``. ``session`` says who owns
    the session and where its workers meet (default: a session owned by this process).
    """

    def __init__(
        self,
        config: KipikConfig,
        *,
        backend: Backend | None = None,
        workdir: Path | None = None,
        report: Reporter = stderr_reporter,
        worker: str | None = None,
        verbose: bool = False,
        session: Session | None = None,
    ) -> None:
        self.config = config
        self.report = report
        self.session = session or Session.new()
        self.worker = worker or self.session.worker
        self.verbose = verbose
        self.run_id = self.session.run_id
        self._shared: dict[str, NestedCluster] = {}
        self._host_labels: dict[str, Mapping[str, str]] = {}
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="kipik-"))
        self.clusters: list[NestedCluster] = []
        self._backend = backend
        self._lock = threading.Lock()
        self._count = 0
        self._kept = sharing.KeptNotes(self.session)

    # -- shared resources ------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The backend that makes this factory's hosts (chosen on first use)."""
        if self._backend is None:
            self._backend = make_backend(self.config, self.report)
        return self._backend

    def connect(self) -> None:
        """Check now that the backend answers (raises BackendUnavailable saying what to do)."""
        self.backend.connect()
        log.info("kipik: hosts on the %s backend: %s", self.backend.name, self.backend.describe())

    def _next_name(self, name: str | None) -> str:
        with self._lock:
            self._count += 1
            if self._count == 1 and self.worker is None:
                self._count += 1  # the session's shared cluster is prefix-runid
            index = self._count
        if name is None:
            name = labels.cluster_name(self.config.name_prefix, self.run_id, self.worker, index)
        problem = labels.check_cluster_name(name)
        if problem:
            raise ConfigError(problem)
        if any(c.name == name for c in self.clusters):
            raise ConfigError(f"a cluster named {name!r} already exists in this session")
        return name

    def _make_host(self, name: str, plan: _Plan, ports: Sequence[int]) -> Host:
        found = labels.owner_labels(
            run_id=self.run_id,
            cluster=name,
            role="dind",
            worker=self.worker,
            keep=self.config.keep,
            ttl=self.config.ttl,
            owner_pid=self.session.owner_pid,
            owner_pod=os.environ.get("HOSTNAME") if in_pod() else None,
            reuse_key=plan.reuse_key,
            warm_slot=plan.warm_slot,
        )
        host_name = plan.host_name or f"{name}-dind"
        self._host_labels[host_name] = found
        return self.backend.make_host(host_name, found, ports)

    def _kubeconfig_dir(self, name: str) -> Path:
        if self.config.keep:  # outlives pytest's basetemp, which pytest prunes after 3 runs
            return paths.private_dir(paths.state_home(), "clusters", name)
        return self.workdir / name

    def _leased(self, plan: _Plan) -> bool:
        """Whether the host outlives the session on purpose (then it is not held)."""
        return self.config.keep or plan.reuse_key is not None or plan.warm_slot is not None

    def _write_lease(self, host: Host) -> None:
        """Extend a kept/reused/warm host's lease: ``ttl`` from now, held by this session."""
        lease = Lease.new(self.config.ttl, self.session.owner_pid)
        host.write_file(LEASE_PATH, lease.dump(), 0o644)

    # -- creating --------------------------------------------------------------------------

    def create(
        self,
        name: str | None = None,
        *,
        nodes: int | None = None,
        kind_config: Path | str | Mapping[str, Any] | None = None,
        node_image: str | None = None,
    ) -> NestedCluster:
        """Create a ready nested cluster.

        ``nodes``: 1 control plane + ``nodes - 1`` workers (not together with a kind config
        that lists nodes). ``kind_config``: a path or a mapping, validated like kind does,
        instead of the session's ``--kipik-kind-config``. ``node_image``: instead of the
        session's ``--kipik-node-image``.
        """
        name = self._next_name(name)
        user_config = self._user_kind_config(kind_config)
        self._build_config(user_config, name, [], nodes, {})  # fail before anything starts
        image = node_image or self.config.node_image
        deadline = time.monotonic() + self.config.timeout
        cluster = self._provision(name, user_config, nodes, image, deadline=deadline, plan=_Plan())
        self.clusters.append(cluster)
        self._note_kept([cluster])
        return cluster

    def create_connected(
        self,
        count: int = 2,
        *,
        names: Sequence[str] | None = None,
        nodes: int | None = None,
        kind_config: Path | str | Mapping[str, Any] | None = None,
        node_image: str | None = None,
    ) -> list[NestedCluster]:
        """Several ready clusters in one DinD host, made at the same time, that reach each other.

        They share the host's ``kind`` network: each reaches the others' API servers (with
        :meth:`NestedCluster.internal_kubeconfig`) and NodePorts (``<name>-control-plane:PORT``),
        and the node image moves into the host once. ``names`` (default: generated) or
        ``count``; the other arguments as for :meth:`create`, for every cluster.
        """
        wanted = list(names) if names is not None else [None] * count
        if len(wanted) < 1:
            raise ConfigError("create_connected needs at least one cluster")
        chosen = [self._next_name(n) for n in wanted]
        if len(set(chosen)) != len(chosen):
            raise ConfigError(f"create_connected got the same name twice: {chosen}")
        user_config = self._user_kind_config(kind_config)
        self._build_config(user_config, chosen[0], [], nodes, {})  # fail before anything starts
        image = node_image or self.config.node_image
        deadline = time.monotonic() + self.config.timeout * (1 + 0.5 * (len(chosen) - 1))
        clusters = self._provision_many(
            chosen, user_config, nodes, image, deadline=deadline, plan=_Plan()
        )
        self.clusters.extend(clusters)
        self._note_kept(clusters)
        return clusters

    # -- sharing ---------------------------------------------------------------------------

    def shared(
        self,
        *,
        nodes: int | None = None,
        kind_config: Path | str | Mapping[str, Any] | None = None,
        node_image: str | None = None,
    ) -> NestedCluster:
        """The session's cluster of this configuration, shared by every xdist worker.

        The first worker creates it under a file lock in the session directory and leaves a
        hand-off there; the others attach (each holding the host, so that one worker's crash
        never takes it from the others). With ``reuse`` the cluster outlives the session and
        the next run with the same configuration attaches to it; with ``warm`` it is made in
        the session's warm host. Arguments as for :meth:`create`.
        """
        user_config = self._user_kind_config(kind_config)
        image = node_image or self.config.node_image
        key = sharing.cluster_key(
            self.config,
            backend=self.backend.name,
            user_config=user_config,
            nodes=nodes,
            node_image=image,
        )
        if key in self._shared:
            return self._shared[key]
        self._build_config(user_config, "check", [], nodes, {})  # fail before anything starts
        default = nodes is None and kind_config is None and node_image is None
        name = f"{self.config.name_prefix}-{self.run_id}" + ("" if default else f"-{key[:6]}")
        if self.config.reuse:
            cluster = self._reuse(key, user_config, nodes, image)
        else:
            cluster = self._share(key, name, user_config, nodes, image)
        self._shared[key] = cluster
        self.clusters.append(cluster)
        self._note_kept([cluster])
        return cluster

    def _note_kept(self, clusters: Sequence[NestedCluster]) -> None:
        """A worker leaves what to paste for its kept clusters, should it die first."""
        if not self.session.owner:
            for cluster in clusters:
                if cluster.keep:
                    self._kept.leave(cluster.host.name, cluster.name, cluster.how_to_reach())

    def _told_kept(self, host: Host, cluster: NestedCluster | None = None) -> None:
        if not self.session.owner:
            self._kept.told(host.name, cluster.name if cluster else None)

    def _record(self, cluster: NestedCluster) -> Record:
        return Record(
            name=cluster.name,
            host=cluster.host.name,
            labels=dict(self._host_labels.get(cluster.host.name, {})),
            server=cluster.server,
            kubeconfig=str(cluster.kubeconfig_path),
            nodes=cluster.nodes,
        )

    def _attach(self, record: Record, status: str, timeout: float) -> NestedCluster | None:
        """A cluster from another process's record, checked ready; None when it is not."""
        host = self.backend.make_host(record.host, record.labels, [kind.API_SERVER_PORT])
        try:
            if not host.attach():
                self.report(f"kipik {record.name}: its host {record.host} is gone or stopped")
                return None
        except KipikError as exc:
            self.report(f"kipik {record.name}: cannot attach: {exc}")
            return None
        self._host_labels[record.host] = record.labels
        cluster = NestedCluster(
            name=record.name,
            kubeconfig_path=Path(record.kubeconfig),
            server=record.server,
            host=host,
            nodes=record.nodes,
            owned=False,
            status=status,
        )
        try:
            readiness.wait_ready(
                cluster.api_client, nodes=record.nodes, deadline=time.monotonic() + timeout
            )
        except (KipikError, OSError) as exc:
            self.report(f"kipik {record.name}: not usable ({str(exc).splitlines()[0]})")
            cluster.close()
            return None
        return cluster

    def _share(
        self,
        key: str,
        name: str,
        user_config: Mapping[str, Any] | None,
        nodes: int | None,
        image: str | None,
    ) -> NestedCluster:
        directory = self.session.path()
        handoff = directory / f"{key}.json"
        with FileLock(directory / f"{key}.lock", timeout=self.config.timeout + 120):
            record = Record.load(handoff)
            if record is not None:
                start = time.monotonic()
                cluster = self._attach(record, "attached", timeout=30)
                if cluster is not None:
                    self.report(f"kipik {record.name}: attached ({time.monotonic() - start:.1f}s)")
                    return cluster
                name = f"{name}-{labels.new_run_id()[:4]}"  # the old one may still be going
            warm = self._claim_warm(directory, key)
            plan = _Plan(
                host_name=self._warm_host_name() if warm else None,
                warm_slot=self.session.warm_slot if warm else None,
                kubeconfig_dir=None
                if self.config.keep  # in the state directory, which outlives the session
                else paths.private_dir(directory, "clusters", name),
                owned=self.session.owner and not warm,  # a warm host stays
            )
            deadline = time.monotonic() + self.config.timeout
            cluster = self._provision(name, user_config, nodes, image, deadline=deadline, plan=plan)
            self._record(cluster).write(handoff)
        return cluster

    def _claim_warm(self, directory: Path, key: str) -> bool:
        """Whether this configuration gets the session's warm host (the first one does)."""
        if self.session.warm_slot is None or not self.config.warm:
            return False
        claim = directory / "warm-claim"
        with FileLock(directory / "warm.lock", timeout=30):
            if not claim.exists():
                claim.write_text(key, encoding="utf-8")
            return claim.read_text(encoding="utf-8") == key

    def _warm_host_name(self) -> str:
        image = self.config.image or "default"
        host_key = sharing.warm_host_key(self.backend.name, image)[:8]
        return f"{self.config.name_prefix}-warm-{host_key}-{self.session.warm_slot}"

    def _reuse(
        self,
        key: str,
        user_config: Mapping[str, Any] | None,
        nodes: int | None,
        image: str | None,
    ) -> NestedCluster:
        """Attach to the cluster an earlier run kept for this key, or create and keep one."""
        name = reuse_name(self.config.name_prefix, key)
        state = reuse_state(key)
        lock = paths.private_dir(paths.cache_home(), "locks") / f"reuse-{key}.lock"
        with FileLock(lock, timeout=self.config.timeout + 120):
            start = time.monotonic()
            record = Record.load(state)
            if record is not None:
                cluster = self._attach(record, "reused", timeout=10)
                if cluster is not None:
                    self._write_lease(cluster.host)
                    self.report(f"kipik {name}: reused ({time.monotonic() - start:.1f}s)")
                    return cluster
                self.report(f"kipik {name}: the cluster kept for reuse is gone or unhealthy")
                state.unlink(missing_ok=True)
            for stale in self.backend.list_owned():  # ours by key, left without a record
                if stale.labels.get(labels.REUSE_KEY) == key and stale.kind != "volume":
                    self.backend.remove_owned(stale)
            plan = _Plan(
                reuse_key=key,
                kubeconfig_dir=paths.private_dir(paths.state_home(), "clusters", name),
                owned=False,
            )
            deadline = time.monotonic() + self.config.timeout
            cluster = self._provision(name, user_config, nodes, image, deadline=deadline, plan=plan)
            self._record(cluster).write(state)
            self.report(f"kipik {name}: created, kept for reuse ({time.monotonic() - start:.1f}s)")
        return cluster

    def _adopt_warm(self, name: str, plan: _Plan, left: Callable[[], float]) -> Host | None:
        """The session's warm host, emptied of the previous run's cluster; None: make one."""
        assert plan.host_name is not None
        slot = str(plan.warm_slot)
        existing = None
        for found in self.backend.list_owned():
            if found.kind == "volume" or found.labels.get(labels.WARM_SLOT) != slot:
                continue
            prefix = f"{self.config.name_prefix}-warm-"
            if found.name == plan.host_name:
                existing = found
            elif found.name.startswith(prefix):  # this slot's host of another image
                self.backend.remove_owned(found)
        if existing is None:
            return None
        host = self.backend.make_host(existing.name, existing.labels, [kind.API_SERVER_PORT])
        try:
            if not host.attach():
                self.backend.remove_owned(existing)
                return None
            with phase(self.report, name, f"warm host {existing.name} ready"):
                host.wait_ready(left())
            driver = kind.KindDriver(host)
            for old in driver.clusters():
                with phase(self.report, name, f"previous cluster {old} deleted"):
                    driver.delete(old, timeout=left())
        except KipikError as exc:
            self.report(f"kipik {name}: warm host {existing.name} unusable, replacing it: {exc}")
            self.backend.remove_owned(existing)
            return None
        self._host_labels[existing.name] = existing.labels
        return host

    def _user_kind_config(
        self, kind_config: Path | str | Mapping[str, Any] | None
    ) -> dict[str, Any] | None:
        if kind_config is None:
            path = self.config.kind_config
            return kind.load_user_config(path) if path else None
        if isinstance(kind_config, Mapping):
            try:
                return kind.validate_user_config(kind.dump_config(kind_config))
            except ConfigError as exc:
                raise ConfigError(f"kind_config: {exc}") from None
        return kind.load_user_config(Path(kind_config))

    def _build_config(
        self,
        user_config: Mapping[str, Any] | None,
        name: str,
        cert_sans: list[str],
        nodes: int | None,
        images: Mapping[str, str],
        *,
        port: int = kind.API_SERVER_PORT,
    ) -> dict[str, Any]:
        return kind.build_config(
            user_config,
            name=name,
            cert_sans=cert_sans,
            nodes=nodes,
            pod_subnet=self.config.pod_subnet,
            service_subnet=self.config.service_subnet,
            images=images,
            api_server_port=port,
        )

    def _kind_output(self, name: str) -> OutputSink:
        def sink(line: str) -> None:
            log.info("kind %s: %s", name, line)
            if self.verbose and line.strip():
                self.report(f"kipik {name}: kind: {line.strip()}")

        return sink

    def _provision(
        self,
        name: str,
        user_config: Mapping[str, Any] | None,
        nodes: int | None,
        node_image: str | None,
        *,
        deadline: float,
        plan: _Plan,
    ) -> NestedCluster:
        return self._provision_many(
            [name], user_config, nodes, node_image, deadline=deadline, plan=plan
        )[0]

    def _provision_many(
        self,
        names: Sequence[str],
        user_config: Mapping[str, Any] | None,
        nodes: int | None,
        node_image: str | None,
        *,
        deadline: float,
        plan: _Plan,
    ) -> list[NestedCluster]:
        """One host, and in it one kind cluster per name (made at the same time)."""

        def left() -> float:
            return max(deadline - time.monotonic(), 1.0)

        say = self.report
        first = names[0]
        ports = [kind.API_SERVER_PORT + i for i in range(len(names))]
        hold: Hold | None = None
        status = "created"
        with contextlib.ExitStack() as undo:
            host = None
            if plan.warm_slot is not None:
                host = self._adopt_warm(first, plan, left)
                status = "warm" if host is not None else status
            if host is None:
                host = self._make_host(first, plan, ports)
                with phase(say, first, "DinD up"):
                    try:
                        host.start()
                    except BaseException:  # a half-started host is never kept
                        self._remove_quietly(host)
                        raise
                if self.config.keep:
                    undo.callback(self._kept_after_failure, first, host)
                else:
                    undo.callback(self._remove_quietly, host)
                if not self._leased(plan):  # the dead-man switch, right away
                    hold = host.hold()
                    if hold is not None:
                        undo.callback(hold.release)
                        self._owner_holds(host, first)
                with phase(say, first, "inner daemon ready"):
                    host.wait_ready(left())
            if self._leased(plan) and not self.config.keep:
                self._write_lease(host)
            kind.check_no_overlap(
                kind.subnets(user_config, self.config.pod_subnet, self.config.service_subnet),
                host.outer_addresses(),
            )
            images: dict[str, str] = {}
            for image in kind.node_images(user_config, node_image):
                with phase(say, first, f"node image {image} in"):
                    inner = host.load_image(image, left())
                if inner is None:
                    say(f"kipik {first}: {image} is not local; kind will pull it")
                else:
                    images[image] = inner.reference

            def make(name: str, port: int) -> NestedCluster:
                return self._kind_cluster(
                    host=host,
                    name=name,
                    port=port,
                    user_config=user_config,
                    nodes=nodes,
                    node_image=node_image,
                    images=images,
                    deadline=deadline,
                    plan=plan,
                    undo=undo,
                    hold=hold if name == first else None,
                    status=status,
                )

            if len(names) == 1:
                clusters = [make(first, ports[0])]
            else:
                with ThreadPoolExecutor(len(names), thread_name_prefix="kipik-create") as pool:
                    futures = [pool.submit(make, first, ports[0])]
                    # concurrent creates of the docker network kind uses can make two of that
                    # name (a Docker race): the others start once the first one's network exists
                    self._network_made(host, futures[0], deadline)
                    futures += [
                        pool.submit(make, n, port)
                        for n, port in zip(names[1:], ports[1:], strict=True)
                    ]
                    wait(futures)
                    clusters = [f.result() for f in futures]  # the first failure is raised
                share = HostShare(names)
                for cluster in clusters:
                    cluster.share = share
            if self.config.load_images:
                for cluster in clusters:
                    with phase(
                        say, cluster.name, f"{len(self.config.load_images)} image(s) loaded"
                    ):
                        cluster.load_image(*self.config.load_images, timeout=left())
            undo.pop_all()
        return clusters

    def _network_made(self, host: Host, first: Future[NestedCluster], deadline: float) -> None:
        """Wait until kind's network exists in ``host`` (or the first create ended)."""

        def made() -> None:
            if first.done():
                return
            found = host.exec(["docker", "network", "inspect", kind.NETWORK], timeout=30)
            if found.exit_code != 0:
                raise NotYet(f"no docker network {kind.NETWORK!r} yet")

        wait_until(
            made,
            what=f"kind's docker network {kind.NETWORK!r} in {host.name}",
            timeout=max(deadline - time.monotonic(), 1.0),
            hint="the first kind create makes it; look at the daemon log",
            interval=0.2,
        )

    def _kind_cluster(
        self,
        *,
        host: Host,
        name: str,
        port: int,
        user_config: Mapping[str, Any] | None,
        nodes: int | None,
        node_image: str | None,
        images: Mapping[str, str],
        deadline: float,
        plan: _Plan,
        undo: contextlib.ExitStack,
        hold: Hold | None,
        status: str,
    ) -> NestedCluster:
        """``kind create`` in ``host``, API server on ``port`` there, kubeconfig, readiness."""
        say = self.report
        config = self._build_config(user_config, name, host.cert_sans(), nodes, images, port=port)
        driver = kind.KindDriver(host)
        with phase(say, name, "kind create"):
            driver.create(
                config,
                image=images.get(node_image, node_image) if node_image else None,
                timeout=max(deadline - time.monotonic(), 1.0),
                retain=self.config.keep,
                on_output=self._kind_output(name),
            )
        with phase(say, name, "kubeconfig + readiness"):
            endpoint = host.api_endpoint(port)
            raw = kubeconfig.parse(driver.kubeconfig(name))
            reported = kubeconfig.server_of(raw)
            if urlsplit(reported).port != port:
                raise KipikError(
                    f"kind's kubeconfig names {reported}, but kipik asked kind to publish the "
                    f"API server on port {port} (networking.apiServerPort) "
                    "and reaches it there; the kind in the DinD image did not honour it"
                )
            directory = plan.kubeconfig_dir or self._kubeconfig_dir(name)
            if not self.config.keep and plan.reuse_key is None:
                undo.callback(shutil.rmtree, directory, True)
            path = kubeconfig.write_private(
                directory / "kubeconfig",
                kubeconfig.dump(kubeconfig.with_server(raw, endpoint.url)),
            )
            cluster = NestedCluster(
                name=name,
                kubeconfig_path=path,
                server=endpoint.url,
                host=host,
                nodes=kind.node_count(config),
                keep=self.config.keep,
                owned=plan.owned,
                hold=hold,
                status=status,
            )
            undo.callback(cluster.close_client)
            readiness.wait_ready(cluster.api_client, nodes=cluster.nodes, deadline=deadline)
        return cluster

    def _owner_holds(self, host: Host, name: str) -> None:
        """An xdist worker asks the session's owner to hold the host it made too.

        The owner (the controller) outlives every worker: a worker that finishes early or
        crashes never takes the shared host from the others, while the owner's death (SIGKILL
        included) still removes it.
        """
        if self.session.owner:
            return
        if not request_owner_hold(self.session, host.name, self._host_labels[host.name]):
            self.report(
                f"kipik {name}: the session's owner did not hold {host.name}; it lives as long "
                "as this worker"
            )

    def _kept_after_failure(self, name: str, host: Host) -> None:
        """Say how to remove a host kept (``--kipik-keep``) after the cluster in it failed."""
        self.report(f"kipik {name}: kept after a failure; remove with: {host.removal_command()}")
        self._told_kept(host)

    def _remove_quietly(self, host: Host) -> None:
        """Undo a half-made host without hiding the error that got us here."""
        try:
            with (
                deferred_interrupts(reraise=False),
                phase(self.report, host.name, "teardown after a failed start"),
            ):
                host.remove()
        except Exception as exc:  # reported; the error that got us here wins
            self.report(f"kipik {host.name}: {exc}")

    # -- tearing down ----------------------------------------------------------------------

    def close(self) -> list[Exception]:
        """Remove every cluster (kept ones are listed instead); returns teardown problems.

        Every cluster is attempted whatever happened to the others. Ctrl-C and SIGTERM wait
        until the removal is done.
        """
        with deferred_interrupts():
            return self._close_all()

    def _close_all(self) -> list[Exception]:
        problems: list[Exception] = []
        for cluster in self.clusters:
            if cluster.share is not None:
                cluster.share.dissolving = True  # the host goes with the last of them
        try:
            for cluster in reversed(list(self.clusters)):
                if cluster.keep or not cluster.owned:
                    if cluster.keep:
                        self.report(cluster.how_to_reach())
                        self._told_kept(cluster.host, cluster)
                    cluster.close()  # another process (or nobody: kept, reused) removes it
                    self.clusters.remove(cluster)
                    continue
                try:
                    with phase(self.report, cluster.name, "teardown"):
                        cluster.close()
                except Exception as exc:  # every cluster gets its turn
                    problems.append(exc)
                else:
                    self.clusters.remove(cluster)
        finally:
            if self._backend is not None:
                self._backend.close()
                self._backend = None
            if self._own_workdir and not self.clusters:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return problems

    def __enter__(self) -> ClusterFactory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        problems = self.close()
        for problem in problems:
            self.report(f"kipik: teardown problem: {problem}")
        if problems and exc_type is None:  # never hide a leak; never mask the error in flight
            raise KipikError(
                f"{len(problems)} teardown problem(s), first: {problems[0]}"
            ) from problems[0]


def reuse_name(prefix: str, key: str) -> str:
    """The name of the cluster kept for reuse under ``key``."""
    return f"{prefix}-r{key[:10]}"


def reuse_state(key: str) -> Path:
    """Where the record of the cluster kept for reuse under ``key`` lives (per user)."""
    return paths.private_dir(paths.state_home(), "reuse") / f"{key}.json"


HOLDS = "holds"


def request_owner_hold(session: Session, host: str, found: Mapping[str, str]) -> bool:
    """Ask the owner of ``session`` to hold ``host`` (see :class:`OwnerHolds`); True once held."""
    directory = paths.private_dir(session.path(), HOLDS)
    Record(name=host, host=host, labels=dict(found), server="", kubeconfig="", nodes=0).write(
        directory / f"{host}.json"
    )
    held = directory / f"{host}.held"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if held.exists():
            return held.read_text(encoding="utf-8") == "held"
        time.sleep(0.05)  # polling a file another process writes
    return False


class OwnerHolds:
    """The session owner's side of :func:`request_owner_hold`: holds what its workers made.

    A thread picks up requests from the session directory and holds each host until
    :meth:`release` (after the owner removed the session's hosts, or when it dies).
    """

    def __init__(
        self, session: Session, backend: Callable[[], Backend], interval: float = 0.05
    ) -> None:
        self.session = session
        self._make_backend = backend
        self._backend: Backend | None = None
        self.interval = interval
        self.holds: dict[str, Hold | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kipik-holds", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a failed round is retried by the next one
                self.poll()

    def poll(self) -> None:
        """Hold every host asked for since the last poll."""
        directory = self.session.directory / HOLDS
        if not directory.is_dir():
            return
        for request in sorted(directory.glob("*.json")):
            name = request.stem
            if name in self.holds:
                continue
            record = Record.load(request)
            if record is None:
                continue
            if self._backend is None:
                self._backend = self._make_backend()
            host = self._backend.make_host(name, record.labels, [])
            answer = "gone"
            hold: Hold | None = None
            try:
                if host.attach():
                    hold = host.hold()
                    answer = "held"
            except KipikError:
                pass
            self.holds[name] = hold
            (directory / f"{name}.held").write_text(answer, encoding="utf-8")

    def release(self) -> None:
        """Stop taking requests and let go of every host held."""
        self._stop.set()
        self._thread.join(timeout=5)
        for hold in self.holds.values():
            if hold is not None:
                hold.release()
        self.holds.clear()
        if self._backend is not None:
            self._backend.close()
            self._backend = None
