"""The seam between kind logic and where its Docker daemon runs: a Backend makes Hosts.

A :class:`Backend` (local Docker engine, outer Kubernetes cluster) is chosen once per session
and makes one :class:`Host` per nested cluster. Everything above this seam (the kind driver,
kubeconfig rewrite, readiness, progress, teardown) is shared by every backend.
"""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from pytest_kipik.errors import HostError
from pytest_kipik.hosts.transfer import inner_reference
from pytest_kipik.process import CommandResult

if TYPE_CHECKING:
    from pytest_kipik.hosts.snapshots import Meta, Snapshot

#: Receives output lines of a running command as they come (e.g. kind's progress).
OutputSink = Callable[[str], None]

#: The inner Docker daemon's bridge and address pools: kept out of the ranges outer clusters
#: and Docker engines usually use (10.x, 172.16-31.x, 192.168.x), so that replies to a client
#: in the outer network are never routed into a nested bridge.
INNER_BRIDGE = "100.99.0.1/24"
INNER_ADDRESS_POOL = "100.98.0.0/16"


#: Where a pod's service-account token is mounted (the official client's in-cluster config).
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def in_pod() -> bool:
    """Whether this process runs in a Kubernetes pod with a service-account token."""
    return (
        bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
        and (SERVICE_ACCOUNT_DIR / "token").is_file()
    )


def inner_dockerd_args(extra: Sequence[str] = ()) -> list[str]:
    """Arguments for the DinD image's dockerd (kipik's image and docker:dind pass them on).

    ``extra``: the registry settings' (mirrors; see :mod:`pytest_kipik.kind.registries`).
    """
    return [
        f"--bip={INNER_BRIDGE}",
        f"--default-address-pool=base={INNER_ADDRESS_POOL},size=24",
        *extra,
    ]


@dataclass(frozen=True)
class Endpoint:
    """How the test process reaches a port of the host."""

    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The https URL of this endpoint."""
        return f"https://{self.address}"


@dataclass(frozen=True)
class Owned:
    """One resource kipik made, as a backend lists it (container, volume, pod...)."""

    kind: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


class Hold(Protocol):
    """A dead-man switch on a host, held by this process (see :meth:`Host.hold`)."""

    def release(self) -> None:
        """Let go of the host (it removes itself once no process holds it); idempotent."""
        ...


class Host(Protocol):
    """A Docker-in-Docker environment with a ready inner daemon and kind on its PATH."""

    @property
    def name(self) -> str:
        """The host's name (container or pod name)."""
        ...

    def start(self) -> None:
        """Create the host (its inner daemon may still be starting)."""
        ...

    def wait_ready(self, timeout: float) -> None:
        """Wait until the inner Docker daemon answers."""
        ...

    def exec(
        self, argv: Sequence[str], *, timeout: float, on_output: OutputSink | None = None
    ) -> CommandResult:
        """Run ``argv`` inside the host (no shell), bounded by ``timeout`` seconds.

        stderr lines go to ``on_output`` as they come. When time runs out,
        :class:`~pytest_kipik.errors.CommandTimeout` carries the output seen so far.
        """
        ...

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Create or replace a file inside the host (parent directories are made)."""
        ...

    def write_files(self, files: Mapping[str, tuple[bytes, int]]) -> None:
        """Create or replace files inside the host in one call: path -> (data, mode).

        Missing parent directories are made (0755); existing ones are left as they are.
        """
        ...

    def feed(self, argv: Sequence[str], source: Path, timeout: float) -> CommandResult:
        """Run ``argv`` inside the host (no shell) with the local file ``source`` as its stdin.

        The file is streamed, never read into memory.
        """
        ...

    def load_image(self, image: str, timeout: float) -> Loaded | None:
        """Move ``image`` from the engine where the test runs into the inner daemon.

        Returns the reference the inner daemon knows it by (a digest-pinned reference cannot be
        loaded as such, so it gets a tag) and whether bytes moved, or None (and does nothing)
        when there is no local copy. An image the inner daemon has already (same id) is not
        moved again.
        """
        ...

    def outer_addresses(self) -> dict[str, str]:
        """Addresses (with where they come from) the nested subnets must not contain."""
        ...

    def cert_sans(self) -> list[str]:
        """Addresses the nested API server certificate must carry for :meth:`api_endpoint`.

        Known once the host runs, before kind creates the cluster.
        """
        ...

    def api_endpoint(self, inner_port: int) -> Endpoint:
        """Where the test process reaches ``inner_port`` of the host (held open until removal)."""
        ...

    def daemon_log(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the inner Docker daemon's log (never raises)."""
        ...

    def copy_out(self, path: str, dest: Path, timeout: float) -> Path:
        """Copy the directory ``path`` inside the host to ``dest`` here (created; merged into).

        Only regular files and directories come out, never a path outside ``dest``; bounded by
        ``timeout`` seconds. Returns ``dest``; raises HostError when ``path`` cannot be read.
        """
        ...

    def remove(self) -> None:
        """Remove the host and everything it holds; idempotent, and retried when it failed."""
        ...

    def detach(self) -> None:
        """Let go of what this process holds open to the host (port-forwards); it stays."""
        ...

    def attach(self) -> bool:
        """Adopt the existing, running host of this name carrying this host's run id.

        For a worker or a later run using a host another process started. False (and nothing
        adopted) when there is none, or it is not running, or it belongs to another run.
        """
        ...

    def hold(self) -> Hold | None:
        """Tie the host's life to this process, also against SIGKILL: the dead-man switch.

        While any process holds it, the host lives; once the last holder is gone (released, or
        its process died and its connection dropped), the host removes itself, volumes
        included. Several processes may hold one host (xdist workers sharing a cluster). None
        when the backend has its own backstop instead. Raises HostError when the hold cannot be
        established (e.g. the host is already going away).
        """
        ...

    def how_to_use(self, kubeconfig: str) -> str:
        """A shell command that uses a kept cluster's kubeconfig from outside the session."""
        ...

    def removal_command(self) -> str:
        """A shell command a user can paste to remove the host by hand."""
        ...


def files_archive(files: Mapping[str, tuple[bytes, int]], mtime: int) -> bytes:
    """An uncompressed tar of ``files`` (absolute path -> (data, mode)) to extract at ``/``.

    Only the files (owned by root, modified at ``mtime``): whoever extracts it makes missing
    parent directories and leaves existing ones alone.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for path, (data, mode) in files.items():
            name = "/".join(part for part in path.split("/") if part)
            if not path.startswith("/") or not name or ".." in name.split("/"):
                raise HostError(f"not an absolute path of a file: {path!r}")
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, mtime
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def inner_image_id(host: Host, reference: str) -> str | None:
    """The id the inner daemon knows ``reference`` (a name or an id) by, if it has it."""
    found = host.exec(["docker", "image", "inspect", "--format", "{{.Id}}", reference], timeout=60)
    return found.stdout.strip() if found.exit_code == 0 else None


@dataclass(frozen=True)
class Loaded:
    """A local image in a host's inner daemon (what :meth:`Host.load_image` returns)."""

    #: The name the inner daemon knows it by.
    reference: str
    #: False: the inner daemon had this very image (same id) already.
    moved: bool


#: Sends one local image into a host (``docker load`` there): the image's id and the load's
#: result, or None when there is no local copy after all.
Move = Callable[[], "tuple[str, CommandResult] | None"]


def load_unless_present(host: Host, image: str, local_id: str | None, move: Move) -> Loaded | None:
    """Both hosts' ``load_image`` around their own ``move``.

    An image the inner daemon has already (same id) is skipped; else it is moved and tagged as
    kind will ask for it.
    """
    if local_id is None:
        return None
    reference = inner_reference(image)
    if inner_image_id(host, reference) == local_id:
        return Loaded(reference, moved=False)
    sent = move()
    if sent is None:
        return None
    image_id, result = sent
    return Loaded(tag_loaded(host, image, image_id, result), moved=True)


def tag_loaded(host: Host, image: str, image_id: str, loaded: CommandResult) -> str:
    """After ``docker load`` of ``image`` (by id) inside ``host``: tag it as kind will ask for it.

    Returns the inner reference (see :func:`~pytest_kipik.hosts.transfer.inner_reference`); raises
    HostError with the inner daemon's log when the load or the tag failed.
    """
    inner = inner_reference(image)
    if loaded.exit_code == 0:
        tagged = host.exec(["docker", "tag", image_id, inner], timeout=60)
        if tagged.exit_code == 0:
            return inner
        loaded = tagged
    raise HostError(
        f"moving {image} into {host.name} failed: {loaded.stderr.strip()}\n"
        f"  inner daemon log:\n{host.daemon_log(20)}"
    )


class ChunkReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks (for streaming ``tarfile`` mode)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        """Always: this file is for reading."""
        return True

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the next chunks; 0 at the end."""
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def extract_tree(archive: BinaryIO, dest: Path, strip: int = 0) -> int:
    """Extract a tar stream into ``dest`` safely; returns how many files were written.

    ``strip`` leading path components are dropped (``.`` components never count). Only regular
    files and directories are extracted; links, devices and fifos are skipped, and so is any
    member whose path is absolute or would leave ``dest`` (``..``). Modes keep only the
    permission bits of the owner (files come out 0600 or 0700, directories 0700).
    """
    root = dest.resolve()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = 0
    with tarfile.open(fileobj=archive, mode="r|") as tar:
        for member in tar:
            parts = [p for p in member.name.split("/") if p not in ("", ".")]
            if member.name.startswith("/") or ".." in parts or len(parts) <= strip:
                continue
            target = root.joinpath(*parts[strip:])
            if not target.resolve().is_relative_to(root):
                continue  # through a directory that is a symlink already in dest
            if member.isdir():
                target.mkdir(mode=0o700, parents=True, exist_ok=True)
            elif member.isfile():
                source = tar.extractfile(member)
                if source is None:
                    continue
                target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                with target.open("wb") as handle:
                    shutil.copyfileobj(source, handle)
                target.chmod(0o700 if member.mode & 0o100 else 0o600)
                written += 1
    return written


class Backend(Protocol):
    """Where DinD hosts run; chosen once per session, makes one :class:`Host` per cluster."""

    #: ``docker`` or ``pod``.
    name: str

    @property
    def forwards_api(self) -> bool:
        """Whether this process reaches hosts' API servers through port-forwards it holds.

        Then a kubeconfig's address ends with the process (see :meth:`Host.api_endpoint`).
        """
        ...

    def connect(self) -> None:
        """Check that the backend answers (raises BackendUnavailable with what to do)."""
        ...

    def preflight(self) -> None:
        """Check, cheaply and before a session starts, what this backend needs of the settings.

        Raises ConfigError (or BackendUnavailable) saying what to do.
        """
        ...

    def describe(self) -> str:
        """Where hosts will run, for the report header and messages."""
        ...

    def make_host(self, name: str, labels: Mapping[str, str], inner_ports: Sequence[int]) -> Host:
        """A host (not started yet) named ``name`` carrying ``labels``."""
        ...

    def list_owned(self, run_id: str | None = None) -> list[Owned]:
        """What kipik made on this backend (all runs, or the run ``run_id``)."""
        ...

    def remove_owned(self, resource: Owned) -> None:
        """Remove one listed resource (with what it holds); gone already is fine.

        Raises HostError when the resource is not kipik's (no ``kipik.io/run-id``) or the
        removal fails.
        """
        ...

    def snapshots(self, prefix: str) -> SnapshotStore | None:
        """Where this backend saves and restores snapshots; None when it has none."""
        ...

    def close(self) -> None:
        """Release connections (hosts are removed by their clusters)."""
        ...


class SnapshotStore(Protocol):
    """Saved clusters of a backend (see :mod:`pytest_kipik.hosts.snapshots`)."""

    def key(self, base: str, node_images: Sequence[str]) -> str:
        """The snapshot key of a configuration (``base``) with this DinD image and nodes."""
        ...

    def find(self, key: str) -> Snapshot | None:
        """The snapshot of ``key``, if one exists."""
        ...

    def take(self, host: Host, key: str, meta: Meta, found: Mapping[str, str]) -> Snapshot:
        """Save ``host``'s cluster(s) as the snapshot of ``key`` (labelled ``found``)."""
        ...

    def prepare(
        self, host: Host, snapshot: Snapshot, then: Callable[[], None] | None = None
    ) -> Callable[[], Meta]:
        """Make ``host.start()`` start from ``snapshot``, running ``then`` before it starts.

        The returned call gives the snapshot's meta.
        """
        ...

    def start_nodes(self, host: Host) -> None:
        """Start the kind nodes of a restored host."""
        ...

    def being_saved(self, snapshot: Snapshot) -> bool:
        """Whether another process may still be writing ``snapshot``."""
        ...

    def discard(self, snapshot: Snapshot) -> None:
        """Remove ``snapshot``."""
        ...
