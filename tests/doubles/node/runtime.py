"""TEST DOUBLE support: the pure parts of the node double's kubelet (stdlib only).

Image archives (docker-save and OCI layout) and their layers with whiteouts, CRI log lines, the
kubelet's back-off, `$(VAR)` expansion, image pull policies and Go-style durations. Kept apart
from `kubelet.py` so that unit tests exercise them without processes, sockets or root.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

JSON = dict[str, Any]

BACKOFF_INITIAL = 10.0  # kubelet: both image pulls and container restarts
BACKOFF_MAX = 300.0
CRI_MAX_LINE = 16 * 1024  # containerd splits longer lines into partial (P) entries
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# --- $(VAR) expansion (the rules of k8s.io/kubernetes/third_party/forked/golang/expansion) ------
def expand(text: str, env: dict[str, str]) -> str:
    """Replace `$(NAME)` by env[NAME]; `$$` is a literal `$`; unknown names stay as written."""
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "$" or i + 1 >= len(text):
            out.append(char)
            i += 1
            continue
        following = text[i + 1]
        if following == "$":
            out.append("$")
            i += 2
        elif following == "(":
            end = text.find(")", i + 2)
            if end < 0:
                out.append(text[i:])
                break
            name = text[i + 2 : end]
            out.append(env.get(name, f"$({name})"))
            i = end + 1
        else:
            out.append(char + following)
            i += 2
    return "".join(out)


# --- image references and pull policies ------------------------------------------------------
def has_tag(image: str) -> bool:
    """Whether an image reference names a tag (a digest counts as one, like the API server)."""
    if "@" in image:
        return True
    return ":" in image.rsplit("/", 1)[-1]


def default_pull_policy(image: str) -> str:
    """The API server's default: Always for `:latest` or no tag, else IfNotPresent."""
    if "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    if ":" not in last or last.rsplit(":", 1)[1] == "latest":
        return "Always"
    return "IfNotPresent"


def registry_host(normalized: str) -> tuple[str, str, str]:
    """(registry host to ask, repository path, tag or digest) of a fully qualified reference."""
    name, _, digest = normalized.partition("@")
    host, _, rest = name.partition("/")
    repository, _, tag = rest.rpartition(":") if ":" in rest.rsplit("/", 1)[-1] else (rest, "", "")
    if host == "docker.io":
        host = "registry-1.docker.io"
    return host, repository, digest or tag or "latest"


# --- durations and times -----------------------------------------------------------------------
def go_duration(seconds: float) -> str:
    """Go's time.Duration.String() for whole seconds: 10s, 1m20s, 5m0s."""
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rfc3339(epoch: float) -> str:
    """Seconds precision, as metav1.Time serialises."""
    stamp = datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_nano(epoch_ns: int) -> str:
    """RFC 3339 with nanoseconds, as containerd writes CRI log lines."""
    seconds, nanos = divmod(epoch_ns, 1_000_000_000)
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S") + f".{nanos:09d}Z"


def parse_rfc3339_nano(text: str) -> float:
    """Epoch seconds of an RFC 3339 time with up to nanosecond precision."""
    base, _, fraction = text.rstrip("Z").partition(".")
    stamp = datetime.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S")
    epoch = stamp.replace(tzinfo=datetime.timezone.utc).timestamp()
    return epoch + (int(fraction.ljust(9, "0")[:9]) / 1e9 if fraction else 0.0)


# --- back-off (k8s.io/client-go/util/flowcontrol.Backoff as the kubelet uses it) ---------------
@dataclass
class BackOff:
    """Per-key exponential back-off: 10 s doubling up to 300 s.

    `next(key, now)` is called when an attempt is made (restart, pull): the first attempt is not
    delayed, and starts a window of 10 s; each further attempt doubles the window. A key whose
    last attempt is older than twice the cap is forgotten (the kubelet's GC of entries).
    """

    initial: float = BACKOFF_INITIAL
    cap: float = BACKOFF_MAX
    entries: dict[str, tuple[float, float]] = field(default_factory=dict)  # key: (delay, at)

    def next(self, key: str, now: float) -> None:
        delay, at = self.entries.get(key, (0.0, 0.0))
        fresh = not delay or now - at > 2 * self.cap
        delay = self.initial if fresh else min(delay * 2, self.cap)
        self.entries[key] = (delay, now)

    def get(self, key: str) -> float:
        return self.entries.get(key, (0.0, 0.0))[0]

    def in_backoff_since(self, key: str, event_time: float, now: float) -> bool:
        """Whether `now` is still inside the window that started at the last attempt.

        `event_time` is the time of the failure that needs the next attempt (the container's
        finish); the window counts from it, as IsInBackOffSince does.
        """
        entry = self.entries.get(key)
        if entry is None:
            return False
        delay, at = entry
        if now - at > 2 * self.cap:
            return False
        return now - event_time < delay

    def reset(self, key: str) -> None:
        self.entries.pop(key, None)


# --- CRI log format -------------------------------------------------------------------------
class CriSplitter:
    """Turns a stream's bytes into CRI log entries: full lines `F`, pieces of long lines `P`."""

    def __init__(self, stream: str) -> None:
        self.stream = stream
        self.pending = b""

    def feed(self, data: bytes) -> list[tuple[str, bytes]]:
        self.pending += data
        out: list[tuple[str, bytes]] = []
        while True:
            newline = self.pending.find(b"\n")
            if newline < 0 or newline > CRI_MAX_LINE:
                if len(self.pending) >= CRI_MAX_LINE:
                    out.append(("P", self.pending[:CRI_MAX_LINE]))
                    self.pending = self.pending[CRI_MAX_LINE:]
                    continue
                return out
            out.append(("F", self.pending[:newline]))
            self.pending = self.pending[newline + 1 :]

    def close(self) -> list[tuple[str, bytes]]:
        """What is left at end of stream: an unterminated line is a partial entry."""
        rest, self.pending = self.pending, b""
        return [("P", rest)] if rest else []


def cri_entry(epoch_ns: int, stream: str, tag: str, content: bytes) -> bytes:
    """`2024-01-02T03:04:05.123456789Z stdout F text` + newline."""
    return f"{rfc3339_nano(epoch_ns)} {stream} {tag} ".encode() + content + b"\n"


@dataclass(frozen=True)
class LogLine:
    """One CRI entry as read back."""

    timestamp: str
    stream: str
    tag: str
    content: bytes

    @property
    def epoch(self) -> float:
        return parse_rfc3339_nano(self.timestamp)


def parse_cri(data: bytes) -> list[LogLine]:
    """Entries of a CRI log file; malformed lines are skipped (the kubelet logs and skips them)."""
    lines: list[LogLine] = []
    for raw in data.split(b"\n"):
        parts = raw.split(b" ", 3)
        if len(parts) < 3 or parts[1] not in (b"stdout", b"stderr"):
            continue
        content = parts[3] if len(parts) == 4 else b""
        lines.append(LogLine(parts[0].decode(), parts[1].decode(), parts[2].decode(), content))
    return lines


def render_log(
    entries: list[LogLine],
    *,
    tail: int | None = None,
    since: float | None = None,
    timestamps: bool = False,
    limit: int | None = None,
) -> bytes:
    """What `GET pods/log` answers for entries of a CRI file (kubelet's ReadLogs).

    Partial entries are joined with what follows; `tail` counts whole lines from the end;
    `since` drops lines older than that epoch; `timestamps` prefixes each line with its RFC 3339
    nano timestamp; `limit` truncates the output to that many bytes.
    """
    whole: list[tuple[str, bytes]] = []
    pieces: list[bytes] = []
    first_stamp = ""
    for entry in entries:
        if since is not None and entry.epoch < since:
            continue
        if not pieces:
            first_stamp = entry.timestamp
        pieces.append(entry.content)
        if entry.tag == "F":
            whole.append((first_stamp, b"".join(pieces) + b"\n"))
            pieces = []
    if pieces:
        whole.append((first_stamp, b"".join(pieces)))
    if tail is not None:
        whole = whole[-tail:] if tail > 0 else []
    out = b"".join((f"{s} ".encode() + line) if timestamps else line for s, line in whole)
    return out[:limit] if limit is not None else out


# --- image archives ---------------------------------------------------------------------------
class ArchiveError(Exception):
    """An image archive that cannot be read."""


def _read_json(archive: tarfile.TarFile, name: str) -> Any:
    try:
        member = archive.extractfile(name)
    except KeyError:
        return None
    if member is None:
        return None
    return json.load(member)


def _blob(digest: str) -> str:
    algorithm, _, hexa = digest.partition(":")
    return f"blobs/{algorithm}/{hexa}"


@dataclass(frozen=True)
class ArchivedImage:
    """One image in an archive: its ID (config digest), names, config and layer members."""

    image_id: str
    names: tuple[str, ...]
    config: JSON
    layers: tuple[str, ...]


def _oci_manifests(archive: tarfile.TarFile, index: JSON) -> Iterator[tuple[JSON, JSON]]:
    """(descriptor in the top index, manifest) pairs, following nested indexes."""
    for descriptor in index.get("manifests") or []:
        media = str(descriptor.get("mediaType", ""))
        document = _read_json(archive, _blob(str(descriptor.get("digest", ""))))
        if document is None:
            raise ArchiveError(f"blob {descriptor.get('digest')} is missing")
        if media.endswith("image.index.v1+json") or media.endswith("manifest.list.v2+json"):
            for _, manifest in _oci_manifests(archive, document):
                yield descriptor, manifest
        else:
            yield descriptor, document


def read_archive(archive: tarfile.TarFile) -> list[ArchivedImage]:
    """Images of a `docker save` archive (legacy or OCI-based) or of an OCI image layout."""
    images: list[ArchivedImage] = []
    manifest = _read_json(archive, "manifest.json")
    if isinstance(manifest, list):
        for entry in manifest:
            config_name = str(entry["Config"])
            config = _read_json(archive, config_name)
            if config is None:
                raise ArchiveError(f"{config_name} is missing")
            hexa = config_name.rsplit("/", 1)[-1].removesuffix(".json")
            images.append(
                ArchivedImage(
                    image_id=f"sha256:{hexa}",
                    names=tuple(str(t) for t in entry.get("RepoTags") or []),
                    config=config,
                    layers=tuple(str(layer) for layer in entry.get("Layers") or []),
                )
            )
        return images
    index = _read_json(archive, "index.json")
    if not isinstance(index, dict):
        raise ArchiveError("neither manifest.json nor index.json: not an image archive")
    for descriptor, document in _oci_manifests(archive, index):
        annotations = descriptor.get("annotations") or {}
        name = str(annotations.get("io.containerd.image.name", ""))
        ref = str(annotations.get("org.opencontainers.image.ref.name", ""))
        if not name and ("/" in ref or ":" in ref):
            name = ref
        config_digest = str((document.get("config") or {}).get("digest", ""))
        config = _read_json(archive, _blob(config_digest))
        if config is None:
            raise ArchiveError(f"config blob {config_digest} is missing")
        images.append(
            ArchivedImage(
                image_id=config_digest,
                names=(name,) if name else (),
                config=config,
                layers=tuple(_blob(str(layer["digest"])) for layer in document.get("layers") or []),
            )
        )
    return images


def _safe_parts(name: str) -> list[str] | None:
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        return None
    return parts


def resolve_in_root(root: str, path: str, follow_last: bool = True) -> str:
    """`path` as seen from a chroot at `root`, with symlinks resolved inside `root`."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate) and (parts or follow_last):
            hops += 1
            if hops > 40:
                raise OSError(f"too many levels of symbolic links: {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p not in ("", ".")] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_layer(layer: tarfile.TarFile, root: str) -> None:
    """Unpack one layer onto `root`: whiteouts first (they hide lower layers only), then files.

    Paths are resolved inside `root`, so links in the image never lead outside of it; device
    nodes are skipped (containers get the node's /dev).
    """
    members = layer.getmembers()
    for member in members:
        parts = _safe_parts(member.name)
        if not parts:
            continue
        base = parts[-1]
        if not base.startswith(WHITEOUT):
            continue
        parent = resolve_in_root(root, "/".join(parts[:-1]))
        if base == OPAQUE:
            if os.path.isdir(parent):
                for child in os.listdir(parent):
                    _remove(os.path.join(parent, child))
        else:
            _remove(os.path.join(parent, base[len(WHITEOUT) :]))
    hardlinks: list[tarfile.TarInfo] = []
    for member in members:
        parts = _safe_parts(member.name)
        if not parts or parts[-1].startswith(WHITEOUT):
            continue
        parent = resolve_in_root(root, "/".join(parts[:-1]))
        os.makedirs(parent, exist_ok=True)
        target = os.path.join(parent, parts[-1])
        if member.isdir():
            if os.path.lexists(target) and not os.path.isdir(target):
                _remove(target)
            os.makedirs(target, exist_ok=True)
            os.chmod(target, member.mode & 0o7777)
            continue
        if member.islnk():
            hardlinks.append(member)
            continue
        if os.path.lexists(target):
            _remove(target)
        if member.issym():
            os.symlink(member.linkname, target)
        elif member.isfile():
            source = layer.extractfile(member)
            assert source is not None
            with open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            os.chmod(target, member.mode & 0o7777)
        elif member.isfifo():
            os.mkfifo(target, member.mode & 0o777)
        else:
            continue  # character/block devices
        _chown(target, member)
    for member in hardlinks:
        parts = _safe_parts(member.name) or []
        link_parts = _safe_parts(member.linkname)
        if not parts or not link_parts:
            continue
        target = os.path.join(resolve_in_root(root, "/".join(parts[:-1])), parts[-1])
        linked = resolve_in_root(root, "/".join(link_parts), follow_last=False)
        if os.path.lexists(target):
            _remove(target)
        if os.path.lexists(linked):
            os.link(linked, target, follow_symlinks=False)


def _chown(path: str, member: tarfile.TarInfo) -> None:
    if os.geteuid() == 0:
        try:
            os.chown(path, member.uid, member.gid, follow_symlinks=False)
            if not member.issym() and member.mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, member.mode & 0o7777)
        except OSError:
            pass


def unpack_image(archive_path: str, image_id: str, root: str) -> JSON:
    """Unpack the image `image_id` of an archive onto `root`, layer by layer; return its config."""
    with tarfile.open(archive_path) as archive:
        for image in read_archive(archive):
            if image.image_id == image_id:
                break
        else:
            raise ArchiveError(f"image {image_id} is not in {archive_path}")
        os.makedirs(root, exist_ok=True)
        for name in image.layers:
            member: IO[bytes] | None = archive.extractfile(name)
            if member is None:
                raise ArchiveError(f"layer {name} is missing")
            with tarfile.open(fileobj=member, mode="r:*") as layer:
                apply_layer(layer, root)
        return image.config
