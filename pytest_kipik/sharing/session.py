"""What the processes of a session (and later runs) leave for each other.

The :class:`Session` identity handed from the process that owns a session to its workers, the
key of a cluster configuration (pure), the hand-off and reuse records and the lease a kept
host carries (small files), the warm-host slots (file locks) and the notes of kept clusters.
The flows that use them live in :mod:`pytest_kipik.sharing.flows`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pytest_kipik import labels, paths
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import KipikError

#: Bumped when what kipik makes of the same settings changes (a kept cluster is then stale).
KEY_VERSION = 1
#: Settings that do not shape the cluster (left out of its key).
NOT_SHAPING = ("timeout", "keep", "reuse", "warm", "snapshots", "ttl", "kind_config")
#: Where a kept, reused or warm host carries its lease (read by ``kipik gc``).
LEASE_PATH = "/kipik/lease.json"
#: How many warm hosts one user may have per name prefix (one per concurrent session).
WARM_SLOTS = 16


@dataclass(frozen=True)
class Session:
    """Who owns a session and where its processes meet.

    Made once by the process that owns the session (pytest without xdist, or xdist's
    controller, which outlives its workers) and handed to the workers. ``owner_pid`` goes into
    every label; ``directory`` (created on first use) holds hand-offs, kubeconfigs and progress
    lines; ``owner`` says whether this process removes the session's shared clusters.
    """

    run_id: str
    owner_pid: int
    directory: Path
    owner: bool = True
    worker: str | None = None
    warm_slot: int | None = None

    @classmethod
    def new(cls, *, warm_slot: int | None = None) -> Session:
        """A session owned by this process."""
        run_id = labels.new_run_id()
        directory = paths.cache_home() / "sessions" / run_id
        return cls(run_id, os.getpid(), directory, owner=True, warm_slot=warm_slot)

    def to_json(self) -> str:
        """What a worker needs (see :meth:`for_worker`)."""
        data = dataclasses.asdict(self)
        data["directory"] = str(self.directory)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def for_worker(cls, text: str, worker: str | None) -> Session:
        """The owner's session as seen by one of its workers (which is not the owner)."""
        data = json.loads(text)
        data["directory"] = Path(data["directory"])
        return dataclasses.replace(cls(**data), owner=False, worker=worker)

    def path(self) -> Path:
        """The session directory, made private on first use."""
        return paths.private_dir(self.directory.parent, self.directory.name)

    def remove_directory(self) -> None:
        """Remove the session directory (the owner, at the end)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


def cluster_key(
    config: KipikConfig,
    *,
    backend: str,
    user_config: Mapping[str, Any] | None,
    nodes: int | None,
    node_image: str | None,
) -> str:
    """A hash of everything that shapes a cluster: settings, kind config content, nodes, image.

    Clusters with the same key are interchangeable: xdist workers share one, and a reused
    cluster is attached to only when the key is unchanged.
    """
    material: dict[str, Any] = {
        "version": KEY_VERSION,
        "backend": backend,
        "kind_config": user_config or {},
        "nodes": nodes,
        "node_image": node_image or config.node_image,
    }
    for item in dataclasses.fields(config):
        if item.metadata.get("setting") and item.name not in NOT_SHAPING:
            material.setdefault(item.name, _plain(getattr(config, item.name)))
    text = json.dumps(material, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def warm_host_key(backend: str, image: str, made_with: Sequence[str] = ()) -> str:
    """What a warm host is made of (backend, DinD image, ``made_with``): another key, another host.

    ``made_with``: what else a host gets when it starts (its daemon's arguments, its ports).
    """
    text = "\0".join([backend, image, *made_with])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Record:
    """How to attach to a cluster another process made (hand-off file, reuse state file)."""

    name: str
    host: str
    labels: Mapping[str, str]
    server: str
    kubeconfig: str
    nodes: int
    extra: Mapping[str, str] = field(default_factory=dict)
    kind_name: str = ""  # kind's name for it (a restored cluster keeps its snapshot's); "": name

    def dump(self) -> str:
        """JSON text."""
        data = dataclasses.asdict(self)
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> Record | None:
        """The record in ``path``, or None when it is missing or unreadable."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None

    def write(self, path: Path) -> None:
        """Write atomically, mode 0600."""
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(self.dump())
        os.replace(temporary, path)


@dataclass(frozen=True)
class Lease:
    """Until when a kept, reused or warm host is wanted, and by which process last."""

    expires_at: str
    holder_host: str
    holder_pid: int

    @classmethod
    def new(cls, ttl: float, holder_pid: int, now: dt.datetime | None = None) -> Lease:
        """A lease for ``ttl`` seconds from ``now``, held by ``holder_pid`` on this machine."""
        moment = now or dt.datetime.now(dt.timezone.utc)
        return cls(
            labels.timestamp(moment + dt.timedelta(seconds=ttl)),
            labels.label_value(socket.gethostname()),
            holder_pid,
        )

    def dump(self) -> bytes:
        """JSON bytes, as written into the host."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def parse(cls, text: str) -> Lease | None:
        """The lease in ``text`` (None when it is not one)."""
        try:
            data = json.loads(text)
            lease = cls(str(data["expires_at"]), str(data["holder_host"]), int(data["holder_pid"]))
            labels.parse_timestamp(lease.expires_at)
        except (ValueError, TypeError, KeyError):
            return None
        return lease


class WarmSlot:
    """One warm host slot, locked for the whole session (concurrent sessions take others)."""

    def __init__(self, prefix: str, index: int, lock: FileLock) -> None:
        self.prefix = prefix
        self.index = index
        self._lock = lock

    @classmethod
    def acquire(cls, prefix: str, slots: int = WARM_SLOTS) -> WarmSlot:
        """The first slot no other session holds."""
        directory = paths.private_dir(paths.cache_home(), "locks")
        for index in range(slots):
            lock = FileLock(directory / f"warm-{prefix}-{index}.lock")
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            return cls(prefix, index, lock)
        raise KipikError(f"all {slots} warm slots of prefix {prefix!r} are in use")

    def release(self) -> None:
        """Let another session take the slot."""
        self._lock.release()


class KeptNotes:
    """What to paste to use and remove each kept cluster an xdist worker made.

    The worker leaves its note in the session directory when the cluster is ready and takes
    it back when it has printed it at its end; ``told`` with only the host says the worker
    spoke of a host it could not finish. The session's owner prints what is left: a worker
    may be killed before its end.
    """

    def __init__(self, session: Session) -> None:
        self._session = session

    def _host(self, host: str) -> Path:
        return paths.private_dir(paths.private_dir(self._session.path(), "kept"), host)

    def leave(self, host: str, cluster: str, text: str) -> None:
        """Note a kept cluster in ``host`` and what to paste for it."""
        (self._host(host) / cluster).write_text(text)

    def told(self, host: str, cluster: str | None = None) -> None:
        """``cluster`` (or, with None, only the host) has been told about by its maker."""
        path = self._host(host)
        if cluster is not None:
            (path / cluster).unlink(missing_ok=True)

    def untold(self, host: str) -> list[str] | None:
        """The notes nobody printed for ``host``; None when its maker never noted it."""
        path = self._session.directory / "kept" / host
        if not path.is_dir():
            return None
        return [note.read_text() for note in sorted(path.iterdir())]
