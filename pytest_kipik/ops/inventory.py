"""What kipik left on a backend, grouped by cluster: found, described, tabled and removed.

The ``kipik`` command's ``ls``, ``down``, ``shell`` and ``logs`` find clusters here by their
``kipik.io/`` labels; a cluster is its DinD host (container or pod) and its volumes, or a
snapshot volume.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kipik import labels as lbl
from pytest_kipik import paths
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts.base import Backend, Host, Owned
from pytest_kipik.kind.config import API_SERVER_PORT
from pytest_kipik.kind.driver import KindDriver
from pytest_kipik.sharing.session import LEASE_PATH, Lease


class CommandFailed(KipikError):
    """A subcommand cannot do what was asked (unknown cluster, ...): exit 1 with the message."""


@dataclass
class FoundCluster:
    """The resources of one cluster (by its ``kipik.io/cluster`` label) on a backend."""

    name: str
    resources: list[Owned] = field(default_factory=list)

    @property
    def host(self) -> Owned | None:
        """The DinD container or pod (not a volume)."""
        return next((r for r in self.resources if r.kind != "volume"), None)

    @property
    def labels(self) -> Mapping[str, str]:
        """The labels of the host (else of any resource)."""
        first = self.host or self.resources[0]
        return first.labels

    @property
    def kind(self) -> str:
        """``snapshot``, ``kept``, ``reused``, ``warm`` or ``session``."""
        found = self.labels
        if found.get(lbl.SNAPSHOT_KEY):
            return "snapshot"
        if found.get(lbl.KEEP):
            return "kept"
        if found.get(lbl.REUSE_KEY):
            return "reused"
        if found.get(lbl.WARM_SLOT):
            return "warm"
        return "session"


def kubeconfig_of(name: str) -> Path:
    """Where a kept (or reused) cluster's kubeconfig lives for this user."""
    return paths.state_home() / "clusters" / name / "kubeconfig"


def find_clusters(backend: Backend) -> dict[str, FoundCluster]:
    """The clusters on the backend, by name (resources without a cluster label by their own).

    Snapshots are listed by their volume's name. A warm host's label names the first cluster
    made in it; each run makes a fresh one, so a running warm host is named by the kind
    cluster it holds now.
    """
    found: dict[str, FoundCluster] = {}
    for resource in backend.list_owned():
        name = resource.labels.get(lbl.CLUSTER) or resource.name
        if lbl.SNAPSHOT_KEY in resource.labels:  # a snapshot is listed by its own name
            name = resource.name
        found.setdefault(name, FoundCluster(name)).resources.append(resource)
    for label_name, cluster in list(found.items()):
        if cluster.kind == "warm":
            current = _current_warm_cluster(backend, cluster)
            if current is not None and current != label_name:
                del found[label_name]
                cluster.name = current
                found[current] = cluster
    return found


def _current_warm_cluster(backend: Backend, cluster: FoundCluster) -> str | None:
    """The kind cluster a running warm host holds now (None: stopped, or none in it)."""
    host = attached(backend, cluster)
    if host is None:
        return None
    try:
        names = KindDriver(host).clusters()
    except KipikError:
        return None
    return names[0] if len(names) == 1 else None


def find_cluster(backend: Backend, name: str) -> FoundCluster:
    """One cluster by its name or its host's name; CommandFailed when there is none."""
    clusters = find_clusters(backend)
    if name in clusters:
        return clusters[name]
    for cluster in clusters.values():
        if any(r.name == name for r in cluster.resources if r.kind != "volume"):
            return cluster
    known = ", ".join(sorted(clusters)) or "none"
    raise CommandFailed(
        f"no kipik cluster named {name!r} on the {backend.name} backend ({backend.describe()}); "
        f"clusters there: {known}"
    )


def attached(backend: Backend, cluster: FoundCluster) -> Host | None:
    """The cluster's running host, adopted (None: stopped or gone)."""
    owned = cluster.host
    if owned is None:
        return None
    host = backend.make_host(owned.name, owned.labels, [API_SERVER_PORT])
    try:
        return host if host.attach() else None
    except KipikError:
        return None


def _shown_time(text: str | None) -> str:
    try:
        return lbl.parse_timestamp(text or "").strftime("%Y-%m-%d %H:%M:%SZ")
    except ValueError:
        return "-"


def describe_cluster(backend: Backend, cluster: FoundCluster) -> dict[str, Any]:
    """One row of ``kipik ls``."""
    host = attached(backend, cluster)
    expires = cluster.labels.get(lbl.EXPIRES_AT)
    if host is not None and cluster.kind in ("reused", "warm"):  # their lease is inside
        with contextlib.suppress(KipikError, OSError):
            result = host.exec(["cat", LEASE_PATH], timeout=15)
            lease = Lease.parse(result.stdout) if result.exit_code == 0 else None
            expires = lease.expires_at if lease is not None else expires
    config = kubeconfig_of(cluster.name)
    return {
        "name": cluster.name,
        "backend": backend.name,
        "host": cluster.host.name if cluster.host else "-",
        "status": "saved"
        if cluster.kind == "snapshot"
        else ("running" if host is not None else ("stopped" if cluster.host else "gone")),
        "kind": cluster.kind,
        "created": _shown_time(cluster.labels.get(lbl.CREATED_AT)),
        "expires": _shown_time(expires),
        "kubeconfig": str(config) if config.is_file() else None,
    }


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain text table with a header (``-`` for missing values)."""
    cells = [[c.upper() for c in columns]]
    cells += [[str(row.get(c) if row.get(c) is not None else "-") for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def remove_cluster(backend: Backend, cluster: FoundCluster) -> list[str]:
    """Remove a cluster's resources (host first) and its state files; returns what went."""
    removed = []
    for resource in sorted(cluster.resources, key=lambda r: r.kind == "volume"):
        if lbl.RUN_ID not in resource.labels:  # list_owned only lists kipik's; never others
            continue
        backend.remove_owned(resource)
        removed.append(str(resource))
    shutil.rmtree(kubeconfig_of(cluster.name).parent, ignore_errors=True)
    key = cluster.labels.get(lbl.REUSE_KEY)
    if key:
        (paths.state_home() / "reuse" / f"{key}.json").unlink(missing_ok=True)
    return removed


# -- subcommands ------------------------------------------------------------------------------
