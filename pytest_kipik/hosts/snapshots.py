"""Snapshots of nested clusters on the docker backend: a DinD host's Docker data root, saved.

Everything of a nested cluster lives in its DinD's data root (the inner daemon's image layers, the
kind node containers, their ``/var`` volumes with etcd, containerd and kubelet state). A snapshot
is a labelled volume holding a copy of it, taken once while the nodes are paused; a restore fills
a new DinD container's (anonymous) data volume from it before the container starts, and the nodes
start again with the names and addresses they had.

Copies are cheap because most bytes never change: the inner image layers, containerd's content
blobs and its committed snapshots are hard-linked (only the lower directories of overlay mounts,
which nothing writes); the rest (etcd, the node's writable layer, logs, ~150 MB) is copied. Links
need one mount for both sides, so the copy runs in a short-lived helper container that mounts the
engine's volumes directory, with ``CAP_SYS_ADMIN`` so the overlay's ``trusted.*`` attributes are
kept. The copy script and the JSON meta file are the whole format; a snapshot without its meta
file is incomplete and never used.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import posixpath
import secrets
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, cast

import docker
import docker.errors
from docker.models.containers import Container

from pytest_kipik import labels as lbl
from pytest_kipik.errors import HostError, KipikError
from pytest_kipik.hosts.base import Host

#: Bumped when the layout of a snapshot changes (older ones are then never used).
FORMAT = 1
ROLE = "snapshot"
KIND_LABEL = "io.x-k8s.kind.cluster"
META_DIR = ".kipik-snapshot"
#: The inner daemon's data root, as the DinD and kind's nodes see it.
DATA_ROOT = "/var/lib/docker"
#: How long one copy may take (a few seconds; a stuck disk must not hang the session).
COPY_TIMEOUT = 600

#: Copies ``/volumes/$1/_data`` to ``/volumes/$2/_data``: the trees listed (relative paths, one
#: per line in ``$3``) as hard links, everything else as copies; then writes ``$META`` last.
TAKE_SCRIPT = r"""
set -eu
src=/volumes/$1/_data; dst=/volumes/$2/_data; links=$3
cd "$src"
mkdir -p "$dst/.kipik-snapshot"
printf '%s' "$links" > "$dst/.kipik-snapshot/links"
printf '%s\n' "$links" | while IFS= read -r tree; do
  [ -n "$tree" ] && [ -d "$tree" ] || continue
  mkdir -p "$dst/$(dirname "$tree")"
  cp -al "$tree" "$dst/$tree"
done
cp -an . "$dst/"
printf '%s' "$META" > "$dst/.kipik-snapshot/meta.json.part"
mv "$dst/.kipik-snapshot/meta.json.part" "$dst/.kipik-snapshot/meta.json"
"""

#: Fills ``/volumes/$2/_data`` from the snapshot ``/volumes/$1/_data``; prints its meta file.
RESTORE_SCRIPT = r"""
set -eu
src=/volumes/$1/_data; dst=/volumes/$2/_data
[ -s "$src/.kipik-snapshot/meta.json" ] || { echo "no meta.json: incomplete" >&2; exit 3; }
cd "$src"
while IFS= read -r tree; do
  [ -n "$tree" ] || continue
  [ -d "$tree" ] || { echo "$tree is missing" >&2; exit 4; }
  mkdir -p "$dst/$(dirname "$tree")"
  cp -al "$tree" "$dst/$tree"
done < .kipik-snapshot/links
cp -an . "$dst/"
rm -rf "$dst/.kipik-snapshot"
cat .kipik-snapshot/meta.json
"""


@dataclass(frozen=True)
class Meta:
    """What a restore needs to know about the saved cluster(s)."""

    #: The kind cluster names inside the host (the nodes keep their names).
    clusters: list[str]
    #: The API server port of each cluster inside the host.
    ports: list[int]
    nodes: int
    created_at: str
    format: int = FORMAT

    def dump(self) -> str:
        """As JSON."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def parse(cls, text: str) -> Meta:
        """From JSON; raises KipikError when it is not a meta file of this format."""
        try:
            data = json.loads(text)
            meta = cls(**data)
        except (ValueError, TypeError) as exc:
            raise KipikError(f"the snapshot's meta file is unreadable: {exc}") from None
        if meta.format != FORMAT or not meta.clusters:
            raise KipikError(f"the snapshot has format {meta.format}, this kipik reads {FORMAT}")
        return meta


@dataclass(frozen=True)
class Snapshot:
    """One saved data root: a volume on the engine."""

    volume: str
    key: str
    labels: Mapping[str, str]

    @property
    def expires_at(self) -> dt.datetime | None:
        """When ``kipik gc`` removes it."""
        try:
            return lbl.parse_timestamp(self.labels.get(lbl.EXPIRES_AT, ""))
        except ValueError:
            return None


def volume_name(prefix: str, key: str) -> str:
    """The snapshot volume of configuration ``key``."""
    return f"{prefix}-snapshot-{key[:12]}"


#: containerd's unpacked layers inside a node, relative to its ``/var``.
CONTAINERD_SNAPSHOTS = "lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots"
CONTAINERD_BLOBS = "lib/containerd/io.containerd.content.v1.content/blobs"


@dataclass(frozen=True)
class NodeVolume:
    """A kind node's ``/var`` volume inside the DinD, as the snapshot needs to know it."""

    #: Upper directories of the overlay mounts inside the node, relative to ``/var``.
    uppers: Sequence[str]
    #: The ids of containerd's snapshots (directories under :data:`CONTAINERD_SNAPSHOTS`).
    snapshot_ids: Sequence[str]


def linkable(
    layer_dirs: Sequence[str],
    writable_layers: Sequence[str],
    node_volumes: Mapping[str, NodeVolume],
) -> list[str]:
    """The trees of a data root that never change, relative to it (pure).

    ``layer_dirs``: the directory names under ``overlay2/``; ``writable_layers``: those of the
    node containers (their upper and init layers change); ``node_volumes``: each node's
    ``/var`` volume by name. What never changes: every image layer's ``diff``, containerd's
    content blobs and the ``fs`` of every containerd snapshot that is no container's upper
    directory (overlay never writes its lower directories).
    """
    changing = {name for layer in writable_layers for name in (layer, f"{layer}-init")}
    trees = [f"overlay2/{name}/diff" for name in sorted(layer_dirs) if name not in changing | {"l"}]
    for volume, node in sorted(node_volumes.items()):
        base = f"volumes/{volume}/_data"
        trees.append(f"{base}/{CONTAINERD_BLOBS}")
        busy = {posixpath.normpath(upper) for upper in node.uppers}
        trees.extend(
            f"{base}/{CONTAINERD_SNAPSHOTS}/{sid}/fs"
            for sid in sorted(node.snapshot_ids, key=lambda s: (len(s), s))
            if f"{CONTAINERD_SNAPSHOTS}/{sid}/fs" not in busy
            and f"{CONTAINERD_SNAPSHOTS}/{sid}" not in busy
        )
    return trees


class Snapshots:
    """The snapshots on one Docker engine, made and used with helper containers."""

    def key(self, base: str, node_images: Sequence[str]) -> str:
        """The key of configuration ``base`` with the engine's images as they are now.

        The DinD image's id and each node image's are part of it: a rebuilt image under the
        same name makes a new snapshot.
        """
        ids = [self._image_id(self.image), *(self._image_id(i) for i in node_images)]
        text = "\n".join([f"format {FORMAT}", base, *ids])
        return hashlib.sha256(text.encode()).hexdigest()

    def _image_id(self, image: str) -> str:
        try:
            return str(self.client.images.get(image).id)
        except docker.errors.ImageNotFound:
            return f"{image} (not local)"

    def __init__(self, client: docker.DockerClient, image: str, prefix: str) -> None:
        self.client = client
        #: The image the helpers run (the DinD image: it has sh and GNU cp).
        self.image = image
        self.prefix = prefix
        self._volumes_dir: str | None = None

    def volumes_dir(self) -> str:
        """The engine's volumes directory (where helpers see every volume in one mount)."""
        if self._volumes_dir is None:
            root = str(self.client.info().get("DockerRootDir") or DATA_ROOT)
            self._volumes_dir = posixpath.join(root, "volumes")
        return self._volumes_dir

    # -- finding ---------------------------------------------------------------------------

    def find(self, key: str) -> Snapshot | None:
        """The snapshot of configuration ``key``, if one exists (complete or not)."""
        try:
            volume = self.client.volumes.get(volume_name(self.prefix, key))
        except docker.errors.NotFound:
            return None
        except docker.errors.DockerException as exc:
            raise HostError(f"could not look for a snapshot: {exc}") from None
        found = dict(volume.attrs.get("Labels") or {})
        if found.get(lbl.SNAPSHOT_KEY) != key[:63]:
            return None
        return Snapshot(str(volume.name), key, found)

    def discard(self, snapshot: Snapshot) -> None:
        """Remove a snapshot (a broken or stale one); gone already is fine."""
        try:
            self.client.volumes.get(snapshot.volume).remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            raise HostError(f"could not remove the snapshot {snapshot.volume}: {exc}") from None

    # -- taking ----------------------------------------------------------------------------

    def take(self, host: Host, key: str, meta: Meta, found: Mapping[str, str]) -> Snapshot:
        """Save ``host``'s data root as the snapshot of ``key``; HostError when it cannot."""
        try:
            return self._take(host, key, meta, found)
        except docker.errors.DockerException as exc:
            raise HostError(f"saving the snapshot failed: {exc}") from None

    def _take(self, host: Host, key: str, meta: Meta, found: Mapping[str, str]) -> Snapshot:
        """Save ``host``'s data root as the snapshot of ``key``.

        The kind nodes are paused meanwhile (a crash-consistent copy: etcd replays its log),
        and resumed whatever happens. ``found``: the labels of the snapshot volume.
        """
        nodes = _inner(host, ["docker", "ps", "-q", "--filter", f"label={KIND_LABEL}"]).split()
        if not nodes:
            raise HostError(f"no kind node runs in {host.name}: nothing to save")
        writable: list[str] = []
        volumes: dict[str, NodeVolume] = {}
        for node in nodes:
            upper = _inner(
                host, ["docker", "inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", node]
            ).strip()
            writable.append(posixpath.basename(posixpath.dirname(upper)))
            var = _inner(host, ["docker", "inspect", "-f", VAR_VOLUME, node]).strip()
            if not var:
                continue
            mounts = _inner(host, ["docker", "exec", node, "cat", "/proc/mounts"])
            ids = _inner(host, ["docker", "exec", node, "ls", f"/var/{CONTAINERD_SNAPSHOTS}"])
            volumes[var] = NodeVolume(_uppers(mounts), ids.split())
        layers = _inner(host, ["ls", f"{DATA_ROOT}/overlay2"]).split()
        trees = linkable(layers, writable, volumes)
        source = _data_volume(_container(host))
        name = volume_name(self.prefix, key)
        self.client.volumes.create(name, labels={**found, lbl.ROLE: ROLE})
        snapshot = Snapshot(name, key, {**found, lbl.ROLE: ROLE})
        _inner(host, ["docker", "pause", *nodes])
        try:
            self._helper(TAKE_SCRIPT, [source, name, "\n".join(trees)], {"META": meta.dump()})
        except BaseException:
            self.discard(snapshot)
            raise
        finally:
            _inner(host, ["docker", "unpause", *nodes], check=False)
        return snapshot

    # -- restoring -------------------------------------------------------------------------

    def prepare(
        self, host: Host, snapshot: Snapshot, then: Callable[[], None] | None = None
    ) -> Callable[[], Meta]:
        """Make ``host.start()`` fill its data volume from ``snapshot`` before it starts.

        ``then`` runs after the copy, still before the start: it writes the files outside the
        data root that the nodes mount, so the inner daemon, which starts the nodes again
        itself (kind's restart policy), finds them. The returned call gives the snapshot's
        meta once the host has started.
        """
        found: list[Meta] = []

        def seed(container: Container) -> None:
            found.append(self.restore_into(snapshot, container))
            if then is not None:
                then()

        cast(Any, host).seed = seed  # a DockerHost: the docker backend makes this store's hosts

        def meta() -> Meta:
            if not found:
                raise KipikError(f"{host.name} did not start from {snapshot.volume}")
            return found[0]

        return meta

    def start_nodes(self, host: Host) -> None:
        """Start every kind node in a restored host (started already is fine).

        The inner daemon usually started them already: kind's nodes restart on failure, and
        the copy's were running.
        """
        nodes = _inner(host, ["docker", "ps", "-aq", "--filter", f"label={KIND_LABEL}"]).split()
        if not nodes:
            raise HostError(f"the snapshot restored into {host.name} has no kind node")
        _inner(host, ["docker", "start", *nodes])

    def being_saved(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` is young enough that its maker may still be copying it."""
        try:
            made = lbl.parse_timestamp(snapshot.labels.get(lbl.CREATED_AT, ""))
        except ValueError:
            return False
        age = dt.datetime.now(dt.timezone.utc) - made
        return age.total_seconds() < COPY_TIMEOUT and not self.complete(snapshot)

    def complete(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` has its meta file (written last)."""
        try:
            self._helper(f'test -s "/volumes/$1/_data/{META_DIR}/meta.json"', [snapshot.volume], {})
        except KipikError:
            return False
        return True

    def restore_into(self, snapshot: Snapshot, container: Container) -> Meta:
        """Fill the data volume of ``container`` (created, not started) from ``snapshot``.

        Raises KipikError saying why when the snapshot is incomplete or broken.
        """
        try:
            target = _data_volume(container)
        except docker.errors.DockerException as exc:
            raise HostError(f"the new DinD container has no data volume: {exc}") from None
        output = self._helper(RESTORE_SCRIPT, [snapshot.volume, target], {})
        return Meta.parse(output)

    def _helper(self, script: str, args: Sequence[str], environment: Mapping[str, str]) -> str:
        """Run ``script`` with ``args`` in a helper that sees every volume; its stdout."""
        name = f"{self.prefix}-snapshot-helper-{secrets.token_hex(3)}"
        try:
            helper = self.client.containers.create(
                self.image,
                entrypoint=["sh", "-c", script, "kipik-snapshot", *args],
                command=[],
                name=name,
                labels=lbl.owner_labels(  # `kipik gc` removes one whose process died
                    run_id=lbl.new_run_id(),
                    cluster=name,
                    role="snapshot-helper",
                    worker=None,
                    keep=False,
                    ttl=COPY_TIMEOUT,
                ),
                cap_add=["SYS_ADMIN"],  # keeps the overlay's trusted.* attributes
                environment=dict(environment),
                volumes={self.volumes_dir(): {"bind": "/volumes", "mode": "rw"}},
                network_mode="none",
            )
        except docker.errors.DockerException as exc:
            raise HostError(f"could not start the snapshot helper: {exc}") from None
        try:
            helper.start()
            status: Any = helper.wait(timeout=COPY_TIMEOUT)
            out = helper.logs(stdout=True, stderr=False).decode("utf-8", "replace")
            err = helper.logs(stdout=False, stderr=True).decode("utf-8", "replace")
        except Exception as exc:  # the engine's own timeout or connection error
            raise HostError(f"the snapshot copy did not finish: {exc}") from None
        finally:
            with contextlib.suppress(docker.errors.DockerException):
                helper.remove(force=True, v=True)  # with the image's anonymous volume
        code = int(status.get("StatusCode", -1))
        if code != 0:
            last = " ".join(err.strip().splitlines()[-3:]) or f"exit code {code}"
            raise KipikError(f"the snapshot copy failed: {last}")
        return out


#: ``docker inspect`` format of the volume at a kind node's ``/var``.
VAR_VOLUME = '{{range .Mounts}}{{if eq .Destination "/var"}}{{.Name}}{{end}}{{end}}'


def _uppers(mounts: str) -> list[str]:
    """The upper directories under ``/var`` of the overlay mounts in ``/proc/mounts`` text."""
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) > 3 and fields[2] == "overlay":
            for option in fields[3].split(","):
                if option.startswith("upperdir=/var/"):
                    found.append(option.removeprefix("upperdir=/var/"))
    return found


def _container(host: Host) -> Container:
    """The DinD container of a docker backend host."""
    container = getattr(host, "container", None)
    if container is None:
        raise HostError(f"{host.name} is not a running DinD container")
    return cast(Container, container)


def _data_volume(container: Container) -> str:
    """The name of the volume at the DinD's data root."""
    container.reload()
    for mount in container.attrs.get("Mounts") or []:
        if mount.get("Destination") == DATA_ROOT and mount.get("Name"):
            return str(mount["Name"])
    raise HostError(f"{container.name} has no volume at {DATA_ROOT}")


def _inner(host: Host, argv: Sequence[str], *, check: bool = True) -> str:
    """Run ``argv`` in the host; its stdout (raises HostError when it fails and ``check``)."""
    done = host.exec(list(argv), timeout=120)
    if check and done.exit_code != 0:
        raise HostError(f"{shlex.join(argv)} in {host.name} failed: {done.stderr.strip()}")
    return done.stdout
