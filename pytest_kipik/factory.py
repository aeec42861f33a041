"""ClusterFactory: makes nested clusters as a sequence of named steps and removes them all.

Making clusters in one host runs these steps (:mod:`pytest_kipik.steps`), the way kind's own
create runs a list of actions: the host up (or a warm host adopted), the subnets checked
against it, the registry settings in, the node images in, one ``kind create`` per cluster (at
the same time), the kubeconfig rewritten and the cluster ready, the registry inside wired to
them, the session's extra images loaded, the setup hook,
the snapshot saved. A configuration with a snapshot is restored instead
(:mod:`pytest_kipik.snapshot_steps`). Whatever a failed step leaves is undone (or kept with
``keep``). How a host is shared between processes and runs is :mod:`pytest_kipik.sharing`'s
business.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_kipik import labels
from pytest_kipik.cluster import NestedCluster
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import ConfigError, KipikError
from pytest_kipik.hosts.base import Backend
from pytest_kipik.kind import config as kind
from pytest_kipik.progress import Reporter, log, phase, stderr_reporter
from pytest_kipik.sharing import flows
from pytest_kipik.sharing.flows import Plan, Shape
from pytest_kipik.sharing.session import KeptNotes, Session, cluster_key
from pytest_kipik.signals import deferred_interrupts
from pytest_kipik.snapshot_steps import SnapshotSteps
from pytest_kipik.steps import Build


class ClusterFactory(SnapshotSteps):
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
            build = Build(names, shape, plan, deadline, undo)
            build.ports = [kind.API_SERVER_PORT + i for i in range(len(names))]
            self._host_up(build)
            self._subnets_checked(build)
            self._node_files_in(build)
            self._node_images_in(build)
            clusters = self._clusters_made(build)
            self._registry_wired(build, clusters)
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

    # -- the steps' order (pytest_kipik.steps holds them) --------------------------

    def _host_up(self, build: Build) -> None:
        """Adopt the session's warm host or start a new one; its inner daemon ready."""
        plan, first = build.plan, build.first
        if plan.warm_slot is not None:
            build.host = flows.adopt_warm(self, first, plan, build.left)
            if build.host is not None:
                build.status = "warm"
                return
        self._started(build, self._new_host(first, plan, build.ports), "DinD up")

    # -- helpers of the public calls -------------------------------------------------------

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
