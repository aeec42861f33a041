"""Names and ``kipik.io/`` labels: everything kipik creates is owned, and found, by label."""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import uuid
from collections.abc import Mapping

PREFIX = "kipik.io/"
RUN_ID = PREFIX + "run-id"
CLUSTER = PREFIX + "cluster"
OWNER_HOST = PREFIX + "owner-host"
OWNER_PID = PREFIX + "owner-pid"
CREATED_AT = PREFIX + "created-at"
WORKER = PREFIX + "worker"
KEEP = PREFIX + "keep"
ROLE = PREFIX + "role"
OWNER_POD = PREFIX + "owner-pod"
EXPIRES_AT = PREFIX + "expires-at"
#: A cluster kept for reuse across runs: the hash of its configuration (see ``sharing.py``).
REUSE_KEY = PREFIX + "reuse-key"
#: A warm DinD host kept between runs: its slot number.
WARM_SLOT = PREFIX + "warm-slot"
#: On a snapshot volume: the configuration it saves (see :mod:`pytest_kipik.hosts.snapshots`).
SNAPSHOT_KEY = PREFIX + "snapshot-key"
#: Resources with one of these labels outlive their session on purpose, until their lease ends.
LEASED = (KEEP, REUSE_KEY, WARM_SLOT, SNAPSHOT_KEY)

#: Kubernetes label values: at most 63 characters, alphanumeric at both ends, ``-_.`` inside.
LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
#: Timestamps in labels: ``20261123T075500Z`` (ISO 8601 basic format, valid as a label value).
TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"

#: kind's own rule for cluster names (``kind create cluster --name``).
CLUSTER_NAME_RE = re.compile(r"^[a-z0-9.-]+$")
#: kind names node containers ``<cluster>-control-plane``, ``<cluster>-worker2``...; keep the
#: longest of them a valid hostname (63 characters).
MAX_CLUSTER_NAME = 40
#: How long a resource lives without an owner when no TTL is given (the ``ttl`` setting's default).
DEFAULT_TTL = 4 * 3600.0


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


def label_value(text: str) -> str:
    """``text`` made a valid label value for Docker and Kubernetes alike (lossy, deterministic)."""
    value = re.sub(r"[^-A-Za-z0-9_.]", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


def namespace_name(test_name: str, suffix: str) -> str:
    """A namespace name (DNS-1123 label) from a test's name and a short unique ``suffix``.

    ``test_deploys[web-1]`` becomes ``test-deploys-web-1-<suffix>``; long names are cut so that
    the whole stays within 63 characters.
    """
    stem = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-") or "test"
    stem = stem[: 62 - len(suffix)].rstrip("-")
    return f"{stem}-{suffix}"


def timestamp(moment: dt.datetime | None = None) -> str:
    """A UTC time as a label value (:data:`TIMESTAMP_FORMAT`)."""
    return (moment or dt.datetime.now(dt.timezone.utc)).strftime(TIMESTAMP_FORMAT)


def parse_timestamp(text: str) -> dt.datetime:
    """The inverse of :func:`timestamp` (raises ValueError for other text)."""
    return dt.datetime.strptime(text, TIMESTAMP_FORMAT).replace(tzinfo=dt.timezone.utc)


def owner_labels(
    *,
    run_id: str,
    cluster: str,
    role: str,
    worker: str | None,
    keep: bool,
    now: dt.datetime | None = None,
    ttl: float = DEFAULT_TTL,
    owner_pid: int | None = None,
    owner_pod: str | None = None,
    reuse_key: str | None = None,
    warm_slot: int | None = None,
) -> dict[str, str]:
    """The labels every container, volume and pod of one cluster carries.

    ``owner_pid`` is the process that owns the session (under xdist the controller, which
    outlives the workers; default: this process). ``expires-at`` is ``now + ttl``: kept, reused
    and warm resources extend it with a lease inside the host (see :mod:`pytest_kipik.ops.reaper`).
    Every value is valid both as a Docker label and as a Kubernetes label value.
    """
    moment = now or dt.datetime.now(dt.timezone.utc)
    labels = {
        RUN_ID: run_id,
        CLUSTER: cluster,
        ROLE: role,
        OWNER_HOST: label_value(socket.gethostname()),
        OWNER_PID: str(owner_pid or os.getpid()),
        CREATED_AT: timestamp(moment),
        EXPIRES_AT: timestamp(moment + dt.timedelta(seconds=ttl)),
        WORKER: label_value(worker or "main"),
    }
    if owner_pod:
        labels[OWNER_POD] = label_value(owner_pod)
    if keep:
        labels[KEEP] = "true"
    if reuse_key:
        labels[REUSE_KEY] = reuse_key
    if warm_slot is not None:
        labels[WARM_SLOT] = str(warm_slot)
    return labels


def leased(found: Mapping[str, str] | None) -> bool:
    """Whether a resource with these labels outlives its session on purpose (kept/reused/warm)."""
    return any(key in (found or {}) for key in LEASED)
