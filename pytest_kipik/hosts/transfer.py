"""Image references, and the default DinD image (built from the packaged ``image/`` context)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from filelock import FileLock

from pytest_kipik import paths
from pytest_kipik.errors import ImageError, option
from pytest_kipik.progress import Reporter

REPOSITORY = "pytest-kipik/dind"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def split_reference(image: str) -> tuple[str, str | None, str | None]:
    """``name[:tag][@digest]`` split into its parts (a registry port is part of the name)."""
    rest, _, digest = image.partition("@")
    name, tag = rest, None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1 :]
    return name, tag, digest or None


def inner_reference(image: str) -> str:
    """The reference a loaded copy of ``image`` gets in an inner daemon.

    ``docker load`` restores tags only, never the repository digest a registry gave, so a
    digest-pinned ``name:tag@sha256:...`` (which the local engine resolved, verifying it)
    becomes ``name:tag`` inside, or ``name:sha256-<first 16 hex digits>`` without a tag.
    Other references stay as they are.
    """
    name, tag, digest = split_reference(image)
    if digest is None:
        return image
    if not _DIGEST_RE.match(digest):
        raise ImageError(f"{image!r} has an invalid digest: expected sha256: and 64 hex digits")
    return f"{name}:{tag or 'sha256-' + digest[len('sha256:') :][:16]}"


@dataclass(frozen=True)
class ArchiveImage:
    """One image in a ``docker save`` or OCI archive: its id and the names it carries."""

    id: str
    tags: tuple[str, ...]


def _json_member(archive: tarfile.TarFile, name: str) -> Any:
    try:
        member = archive.extractfile(name.lstrip("./"))
    except KeyError:
        return None
    return None if member is None else json.load(member)


def _blob(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    return f"blobs/{algorithm}/{hex_digest}"


def archive_images(path: Path) -> list[ArchiveImage]:
    """The images in an image archive (``docker save``, plain or gzipped, or an OCI layout).

    An image's id is the digest of its config, as Docker and containerd name it. Raises
    ImageError when ``path`` is not such an archive.
    """
    try:
        with tarfile.open(path, "r:*") as archive:
            manifest = _json_member(archive, "manifest.json")
            if isinstance(manifest, list):
                found = []
                for entry in manifest:
                    config = str(entry["Config"])
                    digest = config.rsplit("/", 1)[-1].removesuffix(".json")
                    found.append(
                        ArchiveImage(f"sha256:{digest}", tuple(entry.get("RepoTags") or ()))
                    )
                return found
            index = _json_member(archive, "index.json")
            if isinstance(index, dict):
                found = []
                for entry in index.get("manifests") or []:
                    annotations = entry.get("annotations") or {}
                    name = annotations.get("io.containerd.image.name") or annotations.get(
                        "org.opencontainers.image.ref.name", ""
                    )
                    image_manifest = _json_member(archive, _blob(entry["digest"]))
                    if not isinstance(image_manifest, dict) or "config" not in image_manifest:
                        continue  # a nested index (multi-platform): not loadable by docker
                    tags = (name,) if ":" in name or "/" in name else ()
                    found.append(ArchiveImage(image_manifest["config"]["digest"], tags))
                return found
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{path}: cannot read it as an image archive: {exc}") from None
    raise ImageError(
        f"{path} is not an image archive (no manifest.json or index.json): make one with "
        "`docker save IMAGE -o FILE.tar` (or an OCI layout archive)"
    )


def spool(chunks: Iterable[bytes]) -> Path:
    """``chunks`` written to a new private temporary file (an image archive on its way).

    The caller removes it; nothing is left when writing fails.
    """
    directory = paths.private_dir(paths.cache_home(), "spool")
    fd, name = tempfile.mkstemp(prefix="image-", suffix=".tar", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in chunks:
                handle.write(chunk)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def context_dir() -> Path:
    """The image build context: packaged in the wheel, or ``image/`` of a source checkout."""
    package = Path(__file__).resolve().parents[1]  # pytest_kipik/
    for candidate in (package / "_image", package.parent / "image"):
        if (candidate / "Dockerfile").is_file():
            return candidate
    raise ImageError(
        "pytest-kipik's image/ build context is missing from this installation; "
        f"reinstall pytest-kipik or pass {option('image')}"
    )


def context_hash(directory: Path) -> str:
    """A short hash over every file (path and content) of the build context."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def default_image_tag(directory: Path | None = None) -> str:
    """The tag of the default image for this version of the build context."""
    return f"{REPOSITORY}:{context_hash(directory or context_dir())}"


def _has(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        return False
    return True


def ensure_default_image(
    client: docker.DockerClient, report: Reporter, directory: Path | None = None
) -> str:
    """Return the default image's tag, building it first when the engine lacks it.

    ``directory`` is the build context (default: :func:`context_dir`). One build at a time per
    machine: pytest-xdist workers wait on a file lock, then find the image built.
    """
    directory = directory or context_dir()
    tag = default_image_tag(directory)
    if _has(client, tag):
        return tag
    lock = FileLock(paths.private_dir(paths.cache_home(), "locks") / "image-build.lock")
    with lock:
        if _has(client, tag):
            return tag
        report(f"kipik: building the default DinD image {tag} from {directory} (once)")
        lines: list[str] = []
        error = ""
        try:
            stream: Any = client.api.build(
                path=str(directory), tag=tag, rm=True, forcerm=True, decode=True, pull=False
            )
            for event in stream:  # read to the end, so the connection is released
                error = error or str(event.get("error", "")).strip()
                text = str(event.get("stream", "")).rstrip()
                if text:
                    lines.append(text)
                    if text.startswith("Step "):
                        report(f"kipik: image build: {text}")
        except docker.errors.DockerException as exc:
            error = str(exc)
        if error:
            raise ImageError(
                f"building the default DinD image {tag} failed: {error}\n  last build output:\n"
                + "\n".join(f"    {line}" for line in lines[-20:])
                + f"\n  Pass {option('image')} to use an image you built or pulled yourself."
            )
        report(f"kipik: built {tag}")
    return tag
