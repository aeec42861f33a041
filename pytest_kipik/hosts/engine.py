"""The local Docker engine: finding it, connecting, and what kipik asks of it.

Both backends and the doctor use it: does an engine answer, which images it has, an image's
bytes, what kipik left on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlparse

import docker
import docker.errors

from pytest_kipik import labels as lbl
from pytest_kipik.errors import DockerUnavailableError, ImageError, option
from pytest_kipik.hosts.base import Owned
from pytest_kipik.progress import Reporter

STREAM_CHUNK = 4 * 1024 * 1024
#: How long a single Docker API call may block (image save/load and long execs have their own).
API_TIMEOUT = 600


def engine_location() -> str:
    """Where the Docker SDK looks for the engine, for messages and the report header."""
    host = os.environ.get("DOCKER_HOST")
    if host:
        return f"{host} (from DOCKER_HOST)"
    return "unix:///var/run/docker.sock (the default; DOCKER_HOST is not set)"


def _no_socket_file() -> bool:
    """Whether the engine is a unix socket that does not exist (as in most pods).

    The SDK's client asks the engine for its API version when it is made and leaks its socket
    when that fails, so where there is nothing to connect to, kipik does not try.
    """
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    url = urlparse(host)
    return url.scheme == "unix" and not os.path.exists(url.path)


def engine_answers(timeout: float = 3) -> bool:
    """Whether a Docker engine answers where the Docker SDK looks (a quick ping)."""
    if _no_socket_file():
        return False
    try:
        probe = client(max(timeout, 1))
    except docker.errors.DockerException:
        return False
    try:
        return bool(probe.ping())
    except docker.errors.DockerException:
        return False
    finally:
        probe.close()


def client(timeout: float = API_TIMEOUT) -> docker.DockerClient:
    """A client for the engine the Docker SDK finds from the environment (not yet checked).

    ``timeout``: how long one API call of the client may block. Raises the SDK's
    ``DockerException`` when no engine is configured.
    """
    return docker.from_env(timeout=int(timeout))


def connect(timeout: float = API_TIMEOUT) -> docker.DockerClient:
    """A :func:`client` checked to answer; else an error saying how to get an engine."""
    try:
        probe = client(timeout=15)
        probe.ping()
        probe.close()
        return client(timeout)
    except docker.errors.DockerException as exc:
        raise DockerUnavailableError(
            f"no Docker engine answered at {engine_location()}: {exc}\n"
            "  pytest-kipik needs a Docker engine to run its Docker-in-Docker containers. "
            "Start Docker (e.g. `sudo systemctl start docker`, or Docker Desktop), or point "
            "DOCKER_HOST at a running engine; `docker version` must show a Server section. "
            f"Inside a Kubernetes pod, use {option('backend')}=pod."
        ) from None


def ensure_image(client: docker.DockerClient, image: str, report: Reporter) -> None:
    """Make sure the engine has ``image``, pulling it when it does not."""
    try:
        client.images.get(image)
        return
    except docker.errors.ImageNotFound:
        pass
    report(f"kipik: image {image} is not present locally; pulling it")
    try:
        client.images.pull(image)
    except docker.errors.DockerException as exc:
        raise ImageError(
            f"the image {image!r} is not present on the Docker engine and pulling it failed: "
            f"{exc}\n  Check the name given with {option('image')} (or {option('node_image')}), "
            "build it locally, or log in to its registry."
        ) from None


def local_image_id(client: docker.DockerClient, image: str) -> str | None:
    """The id of ``image`` on this engine, or None when the engine lacks it."""
    try:
        return str(client.images.get(image).id)
    except docker.errors.ImageNotFound:
        return None


def image_stream(client: docker.DockerClient, image: str) -> tuple[str, Iterator[bytes]] | None:
    """``(image id, docker save stream)`` of a local image, or None when the engine lacks it.

    The archive names the image by id only: a digest-pinned reference cannot be loaded under
    its name, so whoever loads it tags it afterwards.
    """
    try:
        local = client.images.get(image)
    except docker.errors.ImageNotFound:
        return None
    return str(local.id), local.save(chunk_size=STREAM_CHUNK, named=False)


def engine_address(client: docker.DockerClient) -> str:
    """The address published ports of this engine are reached at from the test process."""
    url = urlparse(str(client.api.base_url))
    if url.scheme in ("http", "https", "tcp") and url.hostname not in (None, "localhost"):
        return str(url.hostname)
    return "127.0.0.1"


def owned_resources(client: docker.DockerClient, run_id: str | None = None) -> list[Owned]:
    """Containers and volumes kipik created (all runs, or the run ``run_id``)."""
    selector = f"{lbl.RUN_ID}={run_id}" if run_id else lbl.RUN_ID
    # the low-level listing: the models' list() inspects each container and fails on one that
    # is removed meanwhile (another session's teardown)
    containers = client.api.containers(all=True, filters={"label": selector})
    volumes = client.api.volumes(filters={"label": selector}).get("Volumes") or []
    return [
        Owned("container", str(c["Names"][0]).lstrip("/"), dict(c.get("Labels") or {}))
        for c in containers
    ] + [Owned("volume", str(v["Name"]), dict(v.get("Labels") or {})) for v in volumes]
