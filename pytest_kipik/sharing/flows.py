"""The sharing flows: a session's workers share a cluster, runs reuse one, a warm host is adopted.

Each flow decides how a cluster's host is had (a :class:`Plan`) and asks the factory (a
:class:`Maker`) to make it; what the processes leave for each other lives in
:mod:`pytest_kipik.sharing.session`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock

from pytest_kipik import labels, paths
from pytest_kipik.cluster import NestedCluster
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts.base import Backend, Host
from pytest_kipik.k8s import readiness
from pytest_kipik.kind.config import API_SERVER_PORT
from pytest_kipik.kind.driver import KindDriver
from pytest_kipik.progress import Reporter, phase
from pytest_kipik.sharing.session import Record, Session, warm_host_key


@dataclass(frozen=True)
class Shape:
    """What shapes one cluster besides the session's settings."""

    user_config: Mapping[str, Any] | None = None
    nodes: int | None = None
    node_image: str | None = None


@dataclass(frozen=True)
class Plan:
    """How one cluster's host is had: fresh for the session, kept for reuse, or warm."""

    host_name: str | None = None
    reuse_key: str | None = None
    warm_slot: int | None = None
    kubeconfig_dir: Path | None = None
    owned: bool = True


class Maker(Protocol):
    """What the flows need from the factory that makes the clusters."""

    config: KipikConfig
    session: Session
    report: Reporter

    @property
    def backend(self) -> Backend:
        """The backend that makes the hosts."""
        ...

    def provision(
        self, names: Sequence[str], shape: Shape, plan: Plan, deadline: float
    ) -> list[NestedCluster]:
        """Make one host and in it one ready cluster per name."""
        ...

    def adopt(self, host: str, found: Mapping[str, str]) -> None:
        """Note the labels of a host another process (or run) made."""
        ...

    def host_labels(self, host: str) -> Mapping[str, str]:
        """The labels ``host`` carries."""
        ...

    def write_lease(self, host: Host) -> None:
        """Extend a kept/reused/warm host's lease."""
        ...


def attach(maker: Maker, record: Record, status: str, timeout: float) -> NestedCluster | None:
    """A cluster from another process's record, checked ready; None when it is not."""
    host = maker.backend.make_host(record.host, record.labels, [API_SERVER_PORT])
    try:
        if not host.attach():
            maker.report(f"kipik {record.name}: its host {record.host} is gone or stopped")
            return None
    except KipikError as exc:
        maker.report(f"kipik {record.name}: cannot attach: {exc}")
        return None
    maker.adopt(record.host, record.labels)
    cluster = NestedCluster(
        name=record.name,
        kubeconfig_path=Path(record.kubeconfig),
        server=record.server,
        host=host,
        nodes=record.nodes,
        owned=False,
        status=status,
        kind_name=record.kind_name or None,
    )
    try:
        readiness.wait_ready(
            cluster.api_client, nodes=record.nodes, deadline=time.monotonic() + timeout
        )
    except (KipikError, OSError) as exc:
        maker.report(f"kipik {record.name}: not usable ({str(exc).splitlines()[0]})")
        cluster.close()
        return None
    return cluster


def record_of(cluster: NestedCluster, found: Mapping[str, str]) -> Record:
    """What another process needs to attach to ``cluster`` (its host carries ``found``)."""
    return Record(
        name=cluster.name,
        host=cluster.host.name,
        labels=dict(found),
        server=cluster.server,
        kubeconfig=str(cluster.kubeconfig_path),
        nodes=cluster.nodes,
        kind_name=cluster.kind_name,
    )


# -- xdist: the session's workers share one cluster per configuration ---------------------------


def handed_off(maker: Maker, key: str, name: str, shape: Shape) -> NestedCluster:
    """The session's cluster of configuration ``key``, shared by the session's workers.

    The first one makes it under a file lock in the session directory and leaves a hand-off
    record there; the others attach to it.
    """
    config = maker.config
    directory = maker.session.path()
    handoff = directory / f"{key}.json"
    with FileLock(directory / f"{key}.lock", timeout=config.timeout + 120):
        record = Record.load(handoff)
        if record is not None:
            start = time.monotonic()
            cluster = attach(maker, record, "attached", timeout=30)
            if cluster is not None:
                maker.report(f"kipik {record.name}: attached ({time.monotonic() - start:.1f}s)")
                return cluster
            name = f"{name}-{labels.new_run_id()[:4]}"  # the old one may still be going
        warm = _claim_warm(maker, directory, key)
        plan = Plan(
            host_name=warm_host_name(maker) if warm else None,
            warm_slot=maker.session.warm_slot if warm else None,
            kubeconfig_dir=None
            if config.keep  # in the state directory, which outlives the session
            else paths.private_dir(directory, "clusters", name),
            owned=maker.session.owner and not warm,  # a warm host stays
        )
        deadline = time.monotonic() + config.timeout
        (cluster,) = maker.provision([name], shape, plan, deadline)
        record_of(cluster, maker.host_labels(cluster.host.name)).write(handoff)
    return cluster


# -- reuse: a later run attaches to the cluster an earlier one kept --------------------------------


def reuse_name(prefix: str, key: str) -> str:
    """The name of the cluster kept for reuse under ``key``."""
    return f"{prefix}-r{key[:10]}"


def reuse_state(key: str) -> Path:
    """Where the record of the cluster kept for reuse under ``key`` lives (per user)."""
    return paths.private_dir(paths.state_home(), "reuse") / f"{key}.json"


def reused(maker: Maker, key: str, shape: Shape) -> NestedCluster:
    """Attach to the cluster an earlier run kept for ``key``, or create and keep one."""
    config = maker.config
    name = reuse_name(config.name_prefix, key)
    state = reuse_state(key)
    lock = paths.private_dir(paths.cache_home(), "locks") / f"reuse-{key}.lock"
    with FileLock(lock, timeout=config.timeout + 120):
        start = time.monotonic()
        record = Record.load(state)
        if record is not None:
            cluster = attach(maker, record, "reused", timeout=10)
            if cluster is not None:
                maker.write_lease(cluster.host)
                maker.report(f"kipik {name}: reused ({time.monotonic() - start:.1f}s)")
                return cluster
            maker.report(f"kipik {name}: the cluster kept for reuse is gone or unhealthy")
            state.unlink(missing_ok=True)
        for stale in maker.backend.list_owned():  # ours by key, left without a record
            if stale.labels.get(labels.REUSE_KEY) == key and stale.kind != "volume":
                maker.backend.remove_owned(stale)
        plan = Plan(
            reuse_key=key,
            kubeconfig_dir=paths.private_dir(paths.state_home(), "clusters", name),
            owned=False,
        )
        (cluster,) = maker.provision([name], shape, plan, time.monotonic() + config.timeout)
        record_of(cluster, maker.host_labels(cluster.host.name)).write(state)
        maker.report(f"kipik {name}: created, kept for reuse ({time.monotonic() - start:.1f}s)")
    return cluster


# -- warm hosts: a fresh cluster in a host a previous session kept --------------------------------


def _claim_warm(maker: Maker, directory: Path, key: str) -> bool:
    """Whether this configuration gets the session's warm host (the first one does)."""
    if maker.session.warm_slot is None or not maker.config.warm:
        return False
    claim = directory / "warm-claim"
    with FileLock(directory / "warm.lock", timeout=30):
        if not claim.exists():
            claim.write_text(key, encoding="utf-8")
        return claim.read_text(encoding="utf-8") == key


def warm_host_name(maker: Maker) -> str:
    """The name of the session's warm host (per name prefix, backend, DinD image and slot)."""
    image = maker.config.image or "default"
    registries = maker.config.registries
    made_with = [*registries.dockerd_args(), *(["registry inside"] if registries.local else [])]
    host_key = warm_host_key(maker.backend.name, image, made_with)[:8]
    return f"{maker.config.name_prefix}-warm-{host_key}-{maker.session.warm_slot}"


def adopt_warm(maker: Maker, name: str, plan: Plan, left: Callable[[], float]) -> Host | None:
    """The session's warm host, emptied of the previous run's cluster; None: make one."""
    assert plan.host_name is not None
    backend = maker.backend
    slot = str(plan.warm_slot)
    existing = None
    for found in backend.list_owned():
        if found.kind == "volume" or found.labels.get(labels.WARM_SLOT) != slot:
            continue
        prefix = f"{maker.config.name_prefix}-warm-"
        if found.name == plan.host_name:
            existing = found
        elif found.name.startswith(prefix):  # this slot's host of another image
            backend.remove_owned(found)
    if existing is None:
        return None
    host = backend.make_host(existing.name, existing.labels, [API_SERVER_PORT])
    try:
        if not host.attach():
            backend.remove_owned(existing)
            return None
        with phase(maker.report, name, f"warm host {existing.name} ready"):
            host.wait_ready(left())
        driver = KindDriver(host)
        for old in driver.clusters():
            with phase(maker.report, name, f"previous cluster {old} deleted"):
                driver.delete(old, timeout=left())
    except KipikError as exc:
        maker.report(f"kipik {name}: warm host {existing.name} unusable, replacing it: {exc}")
        backend.remove_owned(existing)
        return None
    maker.adopt(existing.name, existing.labels)
    return host
