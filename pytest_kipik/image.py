"""The default DinD image: built from the packaged ``image/`` context when not present locally."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import docker
import docker.errors
from filelock import FileLock

from pytest_kipik.errors import ImageError
from pytest_kipik.progress import Reporter

REPOSITORY = "pytest-kipik/dind"


def context_dir() -> Path:
    """The image build context: packaged in the wheel, or ``image/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_image", here.parent / "image"):
        if (candidate / "Dockerfile").is_file():
            return candidate
    raise ImageError(
        "pytest-kipik's image/ build context is missing from this installation; "
        "reinstall pytest-kipik or pass --kipik-image"
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
    lock = FileLock(Path(tempfile.gettempdir()) / "pytest-kipik-image-build.lock")
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
                + "\n  Pass --kipik-image to use an image you built or pulled yourself."
            )
        report(f"kipik: built {tag}")
    return tag
