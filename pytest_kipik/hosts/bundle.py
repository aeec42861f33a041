"""Air-gapped bundles: the DinD image, the node images and extra images in one archive.

A bundle is a tar with ``kipik-bundle.json`` (what it holds, by reference and image id) and one
``docker save`` archive per image (``images/N.tar``), written by ``kipik bundle OUT.tar``. With
the ``bundle`` setting, the docker backend loads into the local engine every image of the
bundle the engine lacks (so nothing is pulled), and the pod backend takes node and extra images
from it when no local engine has them. ``docker load`` restores tags, not registry digests: a
bundle holds images by tag.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import docker
import docker.errors

from pytest_kipik import paths
from pytest_kipik.errors import ImageError
from pytest_kipik.hosts.engine import STREAM_CHUNK, local_image_id
from pytest_kipik.hosts.transfer import split_reference, spool
from pytest_kipik.progress import Reporter

META = "kipik-bundle.json"
FORMAT = 1


@dataclass(frozen=True)
class Entry:
    """One image of a bundle: its reference, its id and the member holding its archive."""

    reference: str
    id: str
    member: str
    role: str  # dind, node or extra


def _check_reference(reference: str) -> None:
    if split_reference(reference)[2] is not None:
        raise ImageError(
            f"{reference!r} is pinned by digest: a bundle holds images by tag (docker load "
            "restores no registry digests); bundle it by its tag"
        )


def write_bundle(
    client: docker.DockerClient,
    out: Path,
    images: Sequence[tuple[str, str]],
    report: Reporter,
) -> list[Entry]:
    """Write the bundle of ``images`` (``(reference, role)`` pairs, local images) to ``out``.

    Written to a temporary file beside ``out`` and renamed, so ``out`` is whole or absent.
    """
    entries: list[Entry] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{out.name}-", dir=out.parent)
    os.close(fd)
    try:
        with tarfile.open(partial, "w") as archive:
            unique: dict[str, str] = {}
            for reference, role in images:
                unique.setdefault(reference, role)
            for index, (reference, role) in enumerate(unique.items()):
                _check_reference(reference)
                try:
                    image = client.images.get(reference)
                except docker.errors.ImageNotFound:
                    raise ImageError(
                        f"{reference!r} is not on the local Docker engine: pull or build it "
                        "before bundling it"
                    ) from None
                member = f"images/{index}.tar"
                report(f"kipik bundle: {reference} ({role}) -> {out.name}:{member}")
                _add_stream(archive, member, image.save(chunk_size=STREAM_CHUNK, named=False))
                entries.append(Entry(reference, str(image.id), member, role))
            meta = json.dumps({"format": FORMAT, "images": [asdict(e) for e in entries]})
            info = tarfile.TarInfo(META)
            info.size, info.mode = len(meta.encode()), 0o644
            archive.addfile(info, io.BytesIO(meta.encode()))
        Path(partial).replace(out)
    finally:
        Path(partial).unlink(missing_ok=True)
    return entries


def _add_stream(archive: tarfile.TarFile, member: str, chunks: Any) -> None:
    """Spool ``chunks`` to a private file (a tar member needs its size first), then add it."""
    spool = paths.private_dir(paths.cache_home(), "spool")
    with tempfile.TemporaryFile(dir=spool) as handle:
        for chunk in chunks:
            handle.write(chunk)
        info = tarfile.TarInfo(member)
        info.size = handle.tell()
        info.mode = 0o644
        handle.seek(0)
        archive.addfile(info, handle)


def read_bundle(path: Path) -> list[Entry]:
    """The images ``path`` holds; ImageError saying what is wrong when it is not a bundle."""
    try:
        with tarfile.open(path, "r:") as archive:
            member = archive.extractfile(META)
            data = json.load(member) if member is not None else None
    except KeyError:
        data = None
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise ImageError(f"bundle {path}: cannot read it: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ImageError(
            f"{path} is not a kipik bundle (no {META} of format {FORMAT}): write one with "
            "`kipik bundle OUT.tar`"
        )
    try:
        return [Entry(**entry) for entry in data["images"]]
    except (KeyError, TypeError) as exc:
        raise ImageError(f"bundle {path}: {META} is malformed: {exc}") from None


def open_member(archive: tarfile.TarFile, entry: Entry) -> IO[bytes]:
    """The ``docker save`` archive of ``entry``, as a stream."""
    stream = archive.extractfile(entry.member)
    if stream is None:
        raise ImageError(f"bundle member {entry.member} ({entry.reference}) is missing")
    return stream


def load_into_engine(
    client: docker.DockerClient, path: Path, entries: Sequence[Entry], report: Reporter
) -> int:
    """Load every image of the bundle (``entries``, as read) the engine lacks; how many."""
    loaded = 0
    with tarfile.open(path, "r:") as archive:
        for entry in entries:
            if local_image_id(client, entry.reference) == entry.id:
                continue
            report(f"kipik: {entry.reference} from the bundle {path.name}")
            try:
                client.images.load(open_member(archive, entry))
                client.images.get(entry.id).tag(entry.reference)
            except docker.errors.DockerException as exc:
                raise ImageError(
                    f"loading {entry.reference} from the bundle {path} failed: {exc}"
                ) from None
            loaded += 1
    return loaded


def spool_from_bundle(path: Path, entry: Entry) -> Path:
    """A private temporary file with ``entry``'s ``docker save`` archive (see :func:`spool`)."""
    with tarfile.open(path, "r:") as archive:
        source = open_member(archive, entry)
        return spool(iter(lambda: source.read(STREAM_CHUNK), b""))
