"""The steps that make a host and its clusters, and the helpers they share.

:class:`Steps` is the machinery under :class:`pytest_kipik.factory.ClusterFactory`: each step
reads and extends one :class:`Build` (the host, its ports, the node images moved in) and
registers on ``build.undo`` what undoes it, so a failed step leaves nothing behind (or keeps
the host with ``keep``). The factory runs them in order; restoring from a snapshot
(:mod:`pytest_kipik.snapshot_steps`) reuses them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_kipik import labels, paths
from pytest_kipik.cluster import HostShare, NestedCluster
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts import registry
from pytest_kipik.hosts.base import Backend, Hold, Host, OutputSink, in_pod, inner_image_id
from pytest_kipik.hosts.choice import make_backend
from pytest_kipik.k8s import kubeconfig, manifests, readiness
from pytest_kipik.kind import config as kind
from pytest_kipik.kind import kubelet
from pytest_kipik.kind.driver import KindDriver
from pytest_kipik.kind.registries import LOCAL_INSIDE, LOCAL_PORT
from pytest_kipik.progress import Reporter, log, phase
from pytest_kipik.sharing.flows import Plan, Shape
from pytest_kipik.sharing.holds import request_owner_hold
from pytest_kipik.sharing.session import LEASE_PATH, KeptNotes, Lease, Session
from pytest_kipik.signals import deferred_interrupts
from pytest_kipik.waiting import NotYet, wait_until


@dataclass
class Build:
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


class Steps:
    """The steps of making clusters in one host, and their helpers; see ClusterFactory."""

    config: KipikConfig
    report: Reporter
    session: Session
    worker: str | None
    run_id: str
    verbose: bool
    keep_failures: bool
    workdir: Path
    setup: Callable[[NestedCluster], None] | None
    _backend: Backend | None
    _host_labels: dict[str, Mapping[str, str]]
    _kept: KeptNotes

    @property
    def backend(self) -> Backend:
        """The backend that makes this factory's hosts (chosen on first use)."""
        if self._backend is None:
            self._backend = make_backend(self.config, self.report)
        return self._backend

    def write_lease(self, host: Host) -> None:
        """Extend a kept/reused/warm host's lease: ``ttl`` from now, held by this session."""
        lease = Lease.new(self.config.ttl, self.session.owner_pid)
        host.write_file(LEASE_PATH, lease.dump(), 0o644)

    # -- the steps -------------------------------------------------------------------------

    def _started(self, build: Build, host: Host, step: str, *, keep: bool = True) -> None:
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

    def _subnets_checked(self, build: Build) -> None:
        """The clusters' pod and service subnets must not hide addresses the host reaches."""
        assert build.host is not None
        kind.check_no_overlap(
            kind.subnets(
                build.shape.user_config, self.config.pod_subnet, self.config.service_subnet
            ),
            build.host.outer_addresses(),
        )

    def _node_files_in(self, build: Build) -> None:
        """The files the nodes mount in the host, and the registry inside started."""
        assert build.host is not None
        self._node_files_written(build.host, build.shape)
        self._registry_inside(build)

    def _node_files_written(self, host: Host, shape: Shape) -> None:
        """Write the files the nodes mount into ``host`` (running, or created and not started).

        The files: the registry settings' and the kubelet's Docker answer (kind.kubelet).
        """
        files: dict[str, tuple[bytes, int]] = {}
        if self._kubelet_answer(shape):
            files.update((path, (data, 0o644)) for path, data in kubelet.host_files().items())
        if self.config.registries.configured:
            files.update(registry.files(self.config.registries))
        if files:
            host.write_files(files)  # one call: one exec on the pod backend

    def _registry_inside(self, build: Build) -> None:
        """The registry inside the host started, when the session has one."""
        assert build.host is not None
        if self.config.registries.local:
            local = self.config.registries.local
            with phase(self.report, build.first, f"registry inside from {local}"):
                registry.local_started(build.host, local, build.left())

    def _registry_wired(self, build: Build, clusters: Sequence[NestedCluster]) -> None:
        """The registry inside on kind's network, and announced in each cluster (KEP-1755)."""
        if not self.config.registries.local:
            return
        assert build.host is not None
        registry.local_attached(build.host)
        pushed_to = build.host.api_endpoint(LOCAL_PORT).address
        for cluster in clusters:
            manifests.announce_local_registry(cluster.core_v1, pushed_to, LOCAL_INSIDE)

    def _node_images_in(self, build: Build) -> None:
        """Move each node image into the host (once for every cluster in it)."""
        host = build.host
        assert host is not None
        for image in kind.node_images(build.shape.user_config, build.shape.node_image):
            with phase(self.report, build.first, f"node image {image} in"):
                inner = host.load_image(image, build.left())
            if inner is not None:
                build.images[image] = inner.reference
                continue
            if inner_image_id(host, image) is not None:  # a warm host's, pulled before
                continue
            self.report(f"kipik {build.first}: {image} is not local; the DinD host pulls it")
            with phase(self.report, build.first, f"node image {image} pulled"):
                registry.pulled(host, image, self.config.registries, build.left())

    def _clusters_made(self, build: Build) -> list[NestedCluster]:
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

    def _cluster_made(self, build: Build, name: str, port: int) -> NestedCluster:
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
        build: Build,
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

    def _extra_images_loaded(self, build: Build, clusters: Sequence[NestedCluster]) -> None:
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

    # -- helpers of the steps --------------------------------------------------------------

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
            registries=self.config.registries,
            kubelet_answer=self._kubelet_answer(shape),
        )

    @staticmethod
    def _kubelet_answer(shape: Shape) -> bool:
        """Whether the nodes answer their kubelets' Docker probe (see kind.kubelet)."""
        return kubelet.needs_answer(kind.node_images(shape.user_config, shape.node_image))

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
        if self.config.registry:  # the registry inside, reached like the API server
            ports = [*ports, LOCAL_PORT]
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
