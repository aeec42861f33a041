"""ClusterFactory: makes nested clusters as a sequence of named steps and removes them all.

Making clusters in one host runs these steps, the way kind's own create runs a list of
actions: the host up (or a warm host adopted), the subnets checked against it, the node
images in, one ``kind create`` per cluster (at the same time), the kubeconfig rewritten and
the cluster ready, the session's extra images loaded. Whatever a failed step leaves is undone
(or kept with ``keep``). How a host is shared between processes and runs is
:mod:`pytest_kipik.sharing`'s business.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from filelock import FileLock, Timeout

from pytest_kipik import labels, paths
from pytest_kipik.cluster import HostShare, NestedCluster
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import ConfigError, KipikError
from pytest_kipik.hosts.base import Backend, Hold, Host, OutputSink, SnapshotStore, in_pod
from pytest_kipik.hosts.choice import make_backend
from pytest_kipik.hosts.snapshots import COPY_TIMEOUT, Meta
from pytest_kipik.k8s import kubeconfig, readiness
from pytest_kipik.kind import config as kind
from pytest_kipik.kind.driver import KindDriver
from pytest_kipik.progress import Reporter, log, phase, stderr_reporter
from pytest_kipik.sharing import flows
from pytest_kipik.sharing.flows import Plan, Shape
from pytest_kipik.sharing.holds import request_owner_hold
from pytest_kipik.sharing.session import LEASE_PATH, KeptNotes, Lease, Session, cluster_key
from pytest_kipik.signals import deferred_interrupts
from pytest_kipik.waiting import NotYet, wait_until

#: How long a restored cluster may take to be ready before it is created instead.
RESTORE_READY_BOUND = 180.0


def _one_line(exc: BaseException) -> str:
    """An error as one progress-line part: whitespace folded, at most 300 characters."""
    return " ".join(str(exc).split())[:300]


@dataclass
class _Build:
    """One host and its clusters being made: what every step reads, and what it leaves."""

    names: Sequence[str]
    shape: Shape
    plan: Plan
    deadline: float
    undo: contextlib.ExitStack
    ports: list[int] = field(default_factory=list)
    host: Host | None = None
    hold: Hold | None = None
    status: str = "created"
    #: Node image -> the reference the host's daemon knows it by (moved in by kipik).
    images: dict[str, str] = field(default_factory=dict)

    def left(self) -> float:
        """Seconds left of the deadline (at least one, so a last step still gets a try)."""
        return max(self.deadline - time.monotonic(), 1.0)

    @property
    def first(self) -> str:
        """The first cluster's name, which names the host and its progress lines."""
        return self.names[0]


class ClusterFactory:
    """Creates nested clusters for one session (or one xdist worker) and removes them all.

    ``backend`` makes the hosts (default: the one the config selects). ``workdir`` holds each
    cluster's private kubeconfig directory (a fresh temporary directory when not given; kept
    clusters use the per-user state directory, which nothing prunes). ``report`` receives one
    line per phase, and kind's own progress lines when ``verbose``. ``session`` says who owns
    the session and where its workers meet (default: a session owned by this process).
    ``keep_failures=False`` removes a cluster that failed half-way even with ``keep``.
    ``setup`` runs on every new cluster before it is saved as its configuration's snapshot
    (``setup_key`` says what it does; a different one makes a different snapshot).
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
        keep_failures: bool = True,
        setup: Callable[[NestedCluster], None] | None = None,
        setup_key: str = "",
    ) -> None:
        self.config = config
        #: Run on each new (not restored) cluster before it is saved as a snapshot.
        self.setup = setup
        #: What ``setup`` does (its source's hash): part of the snapshot key.
        self.setup_key = setup_key
        #: With ``keep``: whether a cluster that failed half-way is kept to be looked at.
        self.keep_failures = config.keep and keep_failures
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
        self._kept = KeptNotes(self.session)

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

    # -- what users call -------------------------------------------------------------------

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
        instead of the session's kind config. ``node_image``: instead of the session's node
        image.
        """
        name = self._next_name(name)
        shape = self._shape(kind_config, nodes, node_image, name)
        deadline = time.monotonic() + self.config.timeout
        (cluster,) = self.provision([name], shape, Plan(), deadline)
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
        shape = self._shape(kind_config, nodes, node_image, chosen[0])
        deadline = time.monotonic() + self.config.timeout * (1 + 0.5 * (len(chosen) - 1))
        clusters = self.provision(chosen, shape, Plan(), deadline)
        self.clusters.extend(clusters)
        self._note_kept(clusters)
        return clusters

    def shared(
        self,
        *,
        nodes: int | None = None,
        kind_config: Path | str | Mapping[str, Any] | None = None,
        node_image: str | None = None,
    ) -> NestedCluster:
        """The session's cluster of this configuration, shared by every xdist worker.

        The first worker creates it and the others attach (each holding the host, so that one
        worker's crash never takes it from the others). With ``reuse`` the cluster outlives
        the session and the next run with the same configuration attaches to it; with
        ``warm`` it is made in the session's warm host. Arguments as for :meth:`create`.
        """
        shape = self._shape(kind_config, nodes, node_image, "check")
        key = cluster_key(
            self.config,
            backend=self.backend.name,
            user_config=shape.user_config,
            nodes=nodes,
            node_image=shape.node_image,
        )
        if key in self._shared:
            return self._shared[key]
        default = nodes is None and kind_config is None and node_image is None
        name = f"{self.config.name_prefix}-{self.run_id}" + ("" if default else f"-{key[:6]}")
        if self.config.reuse:
            cluster = flows.reused(self, key, shape)
        else:
            cluster = flows.handed_off(self, key, name, shape)
        self._shared[key] = cluster
        self.clusters.append(cluster)
        self._note_kept([cluster])
        return cluster

    # -- what the sharing flows call (see pytest_kipik.sharing.flows.Maker) ----------------

    def provision(
        self, names: Sequence[str], shape: Shape, plan: Plan, deadline: float
    ) -> list[NestedCluster]:
        """One host, and in it one ready kind cluster per name (made at the same time).

        With snapshots, a single cluster is restored from its configuration's snapshot when
        there is one; a new one runs the setup hook and is saved.
        """
        store, key = self._snapshots_for(names, shape, plan)
        if store is not None and key is not None:
            restored = self._restored(names[0], shape, plan, deadline, store=store, key=key)
            if restored is not None:
                return [restored]
        with contextlib.ExitStack() as undo:
            build = _Build(names, shape, plan, deadline, undo)
            build.ports = [kind.API_SERVER_PORT + i for i in range(len(names))]
            self._host_up(build)
            self._subnets_checked(build)
            self._node_images_in(build)
            clusters = self._clusters_made(build)
            self._extra_images_loaded(build, clusters)
            self._set_up(clusters)
            if store is not None and key is not None:
                self._saved(clusters[0], store, key)
            undo.pop_all()
        return clusters

    def adopt(self, host: str, found: Mapping[str, str]) -> None:
        """Note the labels of a host another process (or an earlier run) made."""
        self._host_labels[host] = found

    def host_labels(self, host: str) -> Mapping[str, str]:
        """The labels ``host`` carries (as this factory made or adopted it)."""
        return self._host_labels.get(host, {})

    def write_lease(self, host: Host) -> None:
        """Extend a kept/reused/warm host's lease: ``ttl`` from now, held by this session."""
        lease = Lease.new(self.config.ttl, self.session.owner_pid)
        host.write_file(LEASE_PATH, lease.dump(), 0o644)

    # -- the steps -------------------------------------------------------------------------

    def _host_up(self, build: _Build) -> None:
        """Adopt the session's warm host or start a new one; its inner daemon ready."""
        plan, first = build.plan, build.first
        if plan.warm_slot is not None:
            build.host = flows.adopt_warm(self, first, plan, build.left)
            if build.host is not None:
                build.status = "warm"
                return
        self._started(build, self._new_host(first, plan, build.ports), "DinD up")

    def _started(self, build: _Build, host: Host, step: str, *, keep: bool = True) -> None:
        """Start ``host``, hold it and wait for its inner daemon.

        A later failure removes it (or keeps it, with ``keep`` and the session's keep).
        """
        plan, first = build.plan, build.first
        with phase(self.report, first, step):
            try:
                host.start()
            except BaseException:  # a half-started host is never kept
                self._remove_quietly(host)
                raise
        build.host = host
        if self.keep_failures and keep:
            build.undo.callback(self._kept_after_failure, first, host)
        else:
            build.undo.callback(self._remove_quietly, host)
        if not self._leased(plan):  # the dead-man switch, right away
            build.hold = host.hold()
            if build.hold is not None:
                build.undo.callback(build.hold.release)
                self._owner_holds(host, first)
        with phase(self.report, first, "inner daemon ready"):
            host.wait_ready(build.left())
        if self._leased(plan) and not self.config.keep:
            self.write_lease(host)

    def _subnets_checked(self, build: _Build) -> None:
        """The clusters' pod and service subnets must not hide addresses the host reaches."""
        assert build.host is not None
        kind.check_no_overlap(
            kind.subnets(
                build.shape.user_config, self.config.pod_subnet, self.config.service_subnet
            ),
            build.host.outer_addresses(),
        )

    def _node_images_in(self, build: _Build) -> None:
        """Move each node image into the host (once for every cluster in it)."""
        host = build.host
        assert host is not None
        for image in kind.node_images(build.shape.user_config, build.shape.node_image):
            with phase(self.report, build.first, f"node image {image} in"):
                inner = host.load_image(image, build.left())
            if inner is None:
                self.report(f"kipik {build.first}: {image} is not local; kind will pull it")
            else:
                build.images[image] = inner.reference

    def _clusters_made(self, build: _Build) -> list[NestedCluster]:
        """One ready cluster per name; several are made at the same time."""
        assert build.host is not None
        pairs = list(zip(build.names, build.ports, strict=True))
        if len(pairs) == 1:
            return [self._cluster_made(build, *pairs[0])]
        with ThreadPoolExecutor(len(pairs), thread_name_prefix="kipik-create") as pool:
            futures = [pool.submit(self._cluster_made, build, *pairs[0])]
            # concurrent creates of the docker network kind uses can make two of that name (a
            # Docker race): the others start once the first one's network exists
            self._network_made(build.host, futures[0], build.deadline)
            futures += [pool.submit(self._cluster_made, build, *pair) for pair in pairs[1:]]
            wait(futures)
            clusters = [f.result() for f in futures]  # the first failure is raised
        share = HostShare(build.names)
        for cluster in clusters:
            cluster.share = share
        return clusters

    def _cluster_made(self, build: _Build, name: str, port: int) -> NestedCluster:
        """``kind create`` in the host with the API server on ``port`` there, then ready."""
        host = build.host
        assert host is not None
        config = self._kind_config(
            build.shape, name, host.cert_sans(), port=port, images=build.images
        )
        driver = KindDriver(host)
        image = build.shape.node_image
        with phase(self.report, name, "kind create"):
            driver.create(
                config,
                image=build.images.get(image, image) if image else None,
                timeout=build.left(),
                retain=self.keep_failures,
                on_output=self._kind_output(name),
            )
        with phase(self.report, name, "kubeconfig + readiness"):
            cluster = self._kubeconfig_written(build, driver, name, port, kind.node_count(config))
            build.undo.callback(cluster.close_client)
            readiness.wait_ready(cluster.api_client, nodes=cluster.nodes, deadline=build.deadline)
        return cluster

    def _kubeconfig_written(
        self,
        build: _Build,
        driver: KindDriver,
        name: str,
        port: int,
        nodes: int,
        *,
        kind_name: str | None = None,
        tls_server_name: str | None = None,
    ) -> NestedCluster:
        """Kind's kubeconfig with the address this process reaches the API server at (0600)."""
        assert build.host is not None
        endpoint = build.host.api_endpoint(port)
        raw = kubeconfig.parse(driver.kubeconfig(kind_name or name))
        reported = kubeconfig.server_of(raw)
        if urlsplit(reported).port != port:
            raise KipikError(
                f"kind's kubeconfig names {reported}, but kipik asked kind to publish the "
                f"API server on port {port} (networking.apiServerPort) "
                "and reaches it there; the kind in the DinD image did not honour it"
            )
        directory = build.plan.kubeconfig_dir or self._kubeconfig_dir(name)
        if not self.keep_failures and build.plan.reuse_key is None:
            build.undo.callback(shutil.rmtree, directory, True)
        rewritten = kubeconfig.with_server(raw, endpoint.url, tls_server_name=tls_server_name)
        path = kubeconfig.write_private(directory / "kubeconfig", kubeconfig.dump(rewritten))
        return NestedCluster(
            name=name,
            kubeconfig_path=path,
            server=endpoint.url,
            host=build.host,
            nodes=nodes,
            keep=self.config.keep,
            owned=build.plan.owned,
            hold=build.hold if name == build.first else None,
            status=build.status,
            kind_name=kind_name,
        )

    def _extra_images_loaded(self, build: _Build, clusters: Sequence[NestedCluster]) -> None:
        """The session's ``load_images`` in every new cluster."""
        images = self.config.load_images
        if images:
            for cluster in clusters:
                with phase(self.report, cluster.name, f"{len(images)} image(s) loaded"):
                    cluster.load_image(*images, timeout=build.left())

    def _set_up(self, clusters: Sequence[NestedCluster]) -> None:
        """Run the setup hook (``pytest_kipik_cluster_setup``) on each new cluster."""
        if self.setup is not None:
            for cluster in clusters:
                with phase(self.report, cluster.name, "setup hook"):
                    self.setup(cluster)

    # -- snapshots -------------------------------------------------------------------------

    def _snapshots_for(
        self, names: Sequence[str], shape: Shape, plan: Plan
    ) -> tuple[SnapshotStore | None, str | None]:
        """Where this cluster's snapshot lives and its key; (None, None): no snapshots here."""
        if not self.config.snapshots or plan.reuse_key is not None or plan.warm_slot is not None:
            return None, None
        store = self.backend.snapshots(self.config.name_prefix)
        if store is None:
            return None, None
        if len(names) > 1:
            self.report(
                f"kipik {names[0]}: connected clusters are created, not restored (they reach "
                "each other by node names, which a snapshot's copy cannot change)"
            )
            return None, None
        base = cluster_key(
            self.config,
            backend=self.backend.name,
            user_config=shape.user_config,
            nodes=shape.nodes,
            node_image=shape.node_image,
        )
        images = kind.node_images(shape.user_config, shape.node_image)
        return store, store.key(f"{base}:{self.setup_key}", images)

    def _restored(
        self,
        name: str,
        shape: Shape,
        plan: Plan,
        deadline: float,
        *,
        store: SnapshotStore,
        key: str,
    ) -> NestedCluster | None:
        """A cluster restored from ``key``'s snapshot; None (with the reason said) to create it.

        A snapshot that fails to restore is discarded, unless another process is still saving
        it; the half-restored host is removed.
        """
        try:
            snapshot = store.find(key)
        except KipikError as exc:
            self.report(f"kipik {name}: {exc}; creating the cluster")
            return None
        if snapshot is None:
            return None
        restored_at = dt.datetime.now(dt.timezone.utc)
        bound = min(deadline, time.monotonic() + RESTORE_READY_BOUND)
        try:
            with contextlib.ExitStack() as undo:
                build = _Build([name], shape, plan, bound, undo)
                build.ports = [kind.API_SERVER_PORT]
                build.status = "restored"
                host = self._new_host(name, plan, build.ports)
                saved = store.prepare(host, snapshot)
                self._started(build, host, f"DinD up from snapshot {snapshot.volume}", keep=False)
                meta = saved()
                if meta.ports != build.ports or len(meta.clusters) != 1:
                    raise KipikError(f"it saved {len(meta.clusters)} cluster(s) on {meta.ports}")
                with phase(self.report, name, f"{meta.nodes} node(s) started"):
                    store.start_nodes(host)
                with phase(self.report, name, "kubeconfig + readiness"):
                    cluster = self._kubeconfig_written(
                        build,
                        KindDriver(host),
                        name,
                        build.ports[0],
                        meta.nodes,
                        kind_name=meta.clusters[0],
                        tls_server_name=kubeconfig.STABLE_SERVER_NAME,
                    )
                    undo.callback(cluster.close_client)
                    readiness.wait_ready(
                        cluster.api_client,
                        nodes=cluster.nodes,
                        deadline=bound,
                        restored_at=restored_at,
                    )
                build.deadline = deadline
                self._extra_images_loaded(build, [cluster])
                undo.pop_all()
        except (KipikError, OSError) as exc:
            self.report(
                f"kipik {name}: restoring from snapshot {snapshot.volume} failed "
                f"({_one_line(exc)}); "
                "creating the cluster instead"
            )
            if not store.being_saved(snapshot):
                with contextlib.suppress(KipikError):
                    store.discard(snapshot)
            return None
        return cluster

    def _saved(self, cluster: NestedCluster, store: SnapshotStore, key: str) -> None:
        """Save ``cluster`` as the snapshot of ``key`` (unless there is one); never fails."""
        lock = paths.private_dir(paths.cache_home(), "locks") / f"snapshot-{key[:32]}.lock"
        try:
            with FileLock(lock, timeout=COPY_TIMEOUT + 60):
                if store.find(key) is None:  # else another process saved it meanwhile
                    self._save(cluster, store, key)
        except (KipikError, Timeout) as exc:
            self.report(
                f"kipik {cluster.name}: no snapshot ({_one_line(exc)}); later ones are created"
            )

    def _save(self, cluster: NestedCluster, store: SnapshotStore, key: str) -> None:
        found = {
            **labels.owner_labels(
                run_id=self.run_id,
                cluster=cluster.kind_name,
                role="snapshot",
                worker=self.worker,
                keep=False,
                ttl=self.config.ttl,
                owner_pid=self.session.owner_pid,
            ),
            labels.SNAPSHOT_KEY: key[:63],
        }
        meta = Meta(
            clusters=[cluster.kind_name],
            ports=[kind.API_SERVER_PORT],
            nodes=cluster.nodes,
            created_at=labels.timestamp(),
        )
        with phase(self.report, cluster.name, "snapshot saved"):
            store.take(cluster.host, key, meta, found)

    # -- helpers of the steps --------------------------------------------------------------

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

    def _shape(
        self,
        kind_config: Path | str | Mapping[str, Any] | None,
        nodes: int | None,
        node_image: str | None,
        name: str,
    ) -> Shape:
        """The cluster's shape, checked now: a bad one fails before anything starts."""
        if kind_config is None:
            user_config = self.config.user_kind_config
        elif isinstance(kind_config, Mapping):
            try:
                user_config = kind.validate_user_config(kind.dump_config(kind_config))
            except ConfigError as exc:
                raise ConfigError(f"kind_config: {exc}") from None
        else:
            user_config = kind.load_user_config(Path(kind_config))
        shape = Shape(user_config, nodes, node_image or self.config.node_image)
        self._kind_config(shape, name, [])
        return shape

    def _kind_config(
        self,
        shape: Shape,
        name: str,
        cert_sans: list[str],
        *,
        port: int = kind.API_SERVER_PORT,
        images: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        return kind.build_config(
            shape.user_config,
            name=name,
            cert_sans=cert_sans,
            nodes=shape.nodes,
            pod_subnet=self.config.pod_subnet,
            service_subnet=self.config.service_subnet,
            images=images or {},
            api_server_port=port,
        )

    def _new_host(self, name: str, plan: Plan, ports: Sequence[int]) -> Host:
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

    def _leased(self, plan: Plan) -> bool:
        """Whether the host outlives the session on purpose (then it is not held)."""
        return self.config.keep or plan.reuse_key is not None or plan.warm_slot is not None

    def _kind_output(self, name: str) -> OutputSink:
        def sink(line: str) -> None:
            log.info("kind %s: %s", name, line)
            if self.verbose and line.strip():
                self.report(f"kipik {name}: kind: {line.strip()}")

        return sink

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

    def _note_kept(self, clusters: Sequence[NestedCluster]) -> None:
        """A worker leaves what to paste for its kept clusters, should it die first."""
        if not self.session.owner:
            for cluster in clusters:
                if cluster.keep:
                    self._kept.leave(cluster.host.name, cluster.name, cluster.how_to_reach())

    def _told_kept(self, host: Host, cluster: NestedCluster | None = None) -> None:
        if not self.session.owner:
            self._kept.told(host.name, cluster.name if cluster else None)

    def _kept_after_failure(self, name: str, host: Host) -> None:
        """Say how to remove a host kept (``keep``) after the cluster in it failed."""
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

    def remove(self, cluster: NestedCluster) -> None:
        """Remove one cluster this factory made now (kept ones are listed instead)."""
        if cluster not in self.clusters:
            return
        if cluster.keep:
            self.report(cluster.how_to_reach())
            self._told_kept(cluster.host, cluster)
            cluster.close()
        else:
            with deferred_interrupts(), phase(self.report, cluster.name, "teardown"):
                cluster.close()
        self.clusters.remove(cluster)

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
