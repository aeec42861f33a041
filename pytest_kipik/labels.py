"""Names and ``kipik.io/`` labels: everything kipik creates is owned, and found, by label."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import uuid

PREFIX = "kipik.io/"
RUN_ID = PREFIX + "run-id"
CLUSTER = PREFIX + "cluster"
OWNER_HOST = PREFIX + "owner-host"
OWNER_PID = PREFIX + "owner-pid"
CREATED_AT = PREFIX + "created-at"
WORKER = PREFIX + "worker"
KEEP = PREFIX + "keep"
ROLE = PREFIX + "role"

#: kind's own rule for cluster names (``kind create cluster --name``).
CLUSTER_NAME_RE = re.compile(r"^[a-z0-9.-]+$")
#: kind names node containers ``<cluster>-control-plane``, ``<cluster>-worker2``...; keep the
#: longest of them a valid hostname (63 characters).
MAX_CLUSTER_NAME = 40


def new_run_id() -> str:
    """A short random id shared by everything one session creates."""
    return uuid.uuid4().hex[:8]


def cluster_name(prefix: str, run_id: str, worker: str | None, index: int) -> str:
    """The default name of the ``index``-th (1-based) cluster of a run, e.g. ``kipik-1a2b3c4d``."""
    parts = [prefix, run_id]
    if worker:
        parts.append(worker)
    if index > 1:
        parts.append(str(index))
    return "-".join(parts)


def check_cluster_name(name: str) -> str | None:
    """Return why ``name`` is not a usable cluster name, or None when it is."""
    if not CLUSTER_NAME_RE.match(name):
        return f"{name!r} is not a valid cluster name: kind requires names matching ^[a-z0-9.-]+$"
    if len(name) > MAX_CLUSTER_NAME:
        return f"{name!r} is too long: at most {MAX_CLUSTER_NAME} characters"
    return None


def owner_labels(
    *,
    run_id: str,
    cluster: str,
    role: str,
    worker: str | None,
    keep: bool,
    now: dt.datetime | None = None,
) -> dict[str, str]:
    """The labels every container and volume of one cluster carries."""
    created = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = {
        RUN_ID: run_id,
        CLUSTER: cluster,
        ROLE: role,
        OWNER_HOST: socket.gethostname(),
        OWNER_PID: str(os.getpid()),
        CREATED_AT: created,
        WORKER: worker or "main",
    }
    if keep:
        labels[KEEP] = "true"
    return labels
