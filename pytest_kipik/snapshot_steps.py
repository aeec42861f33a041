"""The snapshot steps: a configuration's first cluster is saved, later ones are restored.

Restoring reuses the factory's steps (:mod:`pytest_kipik.steps`) on a host whose data root
is seeded from the snapshot, which the backend's :class:`~pytest_kipik.hosts.base.SnapshotStore`
keeps. A snapshot that fails to restore is discarded and the cluster created instead; saving
never fails a test.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Sequence

from filelock import FileLock, Timeout

from pytest_kipik import labels, paths
from pytest_kipik.cluster import NestedCluster
from pytest_kipik.errors import KipikError, NameClashError
from pytest_kipik.hosts.base import SnapshotStore
from pytest_kipik.hosts.snapshots import COPY_TIMEOUT, Meta, Snapshot
from pytest_kipik.k8s import kubeconfig, readiness
from pytest_kipik.kind import config as kind
from pytest_kipik.kind.driver import KindDriver
from pytest_kipik.progress import phase
from pytest_kipik.sharing.flows import Plan, Shape
from pytest_kipik.sharing.session import cluster_key
from pytest_kipik.steps import Build, Steps

#: How long a restored cluster may take to be ready before it is created instead.
RESTORE_READY_BOUND = 180.0


def _one_line(exc: BaseException) -> str:
    """An error as one progress-line part: whitespace folded, at most 300 characters."""
    return " ".join(str(exc).split())[:300]


class SnapshotSteps(Steps):
    """Finding, restoring and saving a configuration's snapshot; see ClusterFactory."""

    setup_key: str

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
        try:
            cluster = self._restore(name, shape, plan, deadline, store=store, snapshot=snapshot)
        except NameClashError:  # not the snapshot's fault, and creating would clash the same
            raise
        except (KipikError, OSError) as exc:
            self.report(
                f"kipik {name}: restoring from snapshot {snapshot.volume} failed "
                f"({_one_line(exc)}); creating the cluster instead"
            )
            if not store.being_saved(snapshot):
                with contextlib.suppress(KipikError):
                    store.discard(snapshot)
            return None
        return cluster

    def _restore(
        self,
        name: str,
        shape: Shape,
        plan: Plan,
        deadline: float,
        *,
        store: SnapshotStore,
        snapshot: Snapshot,
    ) -> NestedCluster:
        """A new host over a copy of ``snapshot``, its nodes started, the cluster ready.

        It must be ready within RESTORE_READY_BOUND; a failure removes the host.
        """
        restored_at = dt.datetime.now(dt.timezone.utc)
        bound = min(deadline, time.monotonic() + RESTORE_READY_BOUND)
        with contextlib.ExitStack() as undo:
            build = Build([name], shape, plan, bound, undo)
            build.ports = [kind.API_SERVER_PORT]
            build.status = "restored"
            host = self._new_host(name, plan, build.ports)
            # the files the nodes mount are outside the saved data root: in before it starts
            saved = store.prepare(host, snapshot, lambda: self._node_files_written(host, shape))
            self._started(build, host, f"DinD up from snapshot {snapshot.volume}", keep=False)
            meta = saved()
            if meta.ports != build.ports or len(meta.clusters) != 1:
                raise KipikError(f"it saved {len(meta.clusters)} cluster(s) on {meta.ports}")
            self._registry_inside(build)
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
                    cluster.api_client, nodes=cluster.nodes, deadline=bound, restored_at=restored_at
                )
            build.deadline = deadline
            self._registry_wired(build, [cluster])  # announced at this host's address
            self._extra_images_loaded(build, [cluster])
            undo.pop_all()
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
