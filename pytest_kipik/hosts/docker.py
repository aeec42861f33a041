"""DockerHost: a privileged Docker-in-Docker container on the local Docker engine.

The container gets a labelled volume at ``/var/lib/docker`` (so the inner daemon uses overlay2)
and publishes the nested API server's port to ``127.0.0.1:<ephemeral>`` on the engine's host,
which works on Linux and Docker Desktop alike.
"""

from __future__ import annotations

import io
import os
import shlex
import socket
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast
from urllib.parse import urlparse

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.volumes import Volume
from docker.utils.socket import STDOUT, frames_iter

from pytest_kipik import labels as lbl
from pytest_kipik.errors import DockerUnavailableError, HostError, ImageError
from pytest_kipik.hosts.base import Endpoint, OutputSink
from pytest_kipik.process import CommandResult, bounded, log_command
from pytest_kipik.progress import Reporter
from pytest_kipik.waiting import NotYet, wait_until

#: The inner daemon's log, as the kipik DinD entrypoint writes it.
DAEMON_LOG = "/var/log/dockerd.log"
_STREAM_CHUNK = 4 * 1024 * 1024
#: How long a single Docker API call may block (image save/load and long execs have their own).
_API_TIMEOUT = 600


def engine_location() -> str:
    """Where the Docker SDK looks for the engine, for messages and the report header."""
    host = os.environ.get("DOCKER_HOST")
    if host:
        return f"{host} (from DOCKER_HOST)"
    return "unix:///var/run/docker.sock (the default; DOCKER_HOST is not set)"


def connect() -> docker.DockerClient:
    """A client for the engine the Docker SDK finds from the environment, checked to answer."""
    try:
        probe = docker.from_env(timeout=15)
        probe.ping()
        probe.close()
        return docker.from_env(timeout=_API_TIMEOUT)
    except docker.errors.DockerException as exc:
        raise DockerUnavailableError(
            f"no Docker engine answered at {engine_location()}: {exc}\n"
            "  pytest-kipik needs a Docker engine to run its Docker-in-Docker containers. "
            "Start Docker (e.g. `sudo systemctl start docker`, or Docker Desktop), or point "
            "DOCKER_HOST at a running engine; `docker version` must show a Server section."
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
            f"{exc}\n  Check the name given with --kipik-image (or --kipik-node-image), "
            "build it locally, or log in to its registry."
        ) from None


def _engine_address(client: docker.DockerClient) -> str:
    """The address published ports of this engine are reached at from the test process."""
    url = urlparse(str(client.api.base_url))
    if url.scheme in ("http", "https", "tcp") and url.hostname not in (None, "localhost"):
        return str(url.hostname)
    return "127.0.0.1"


class _Lines:
    """Collects one output stream; forwards its complete lines to ``sink``, if any."""

    def __init__(self, sink: OutputSink | None) -> None:
        self.sink = sink
        self.chunks: list[bytes] = []
        self.pending = b""

    def add(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.sink is not None:
            *lines, self.pending = (self.pending + data).split(b"\n")
            for line in lines:
                self.sink(line.decode("utf-8", "replace"))

    def flush(self) -> None:
        if self.pending and self.sink is not None:
            self.sink(self.pending.decode("utf-8", "replace"))
        self.pending = b""

    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")


class DockerHost:
    """One privileged DinD container (plus its volume) for one nested cluster."""

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        image: str,
        name: str,
        labels: dict[str, str],
        inner_ports: Sequence[int],
    ) -> None:
        self.client = client
        self.image = image
        self._name = name
        self.labels = labels
        self.inner_ports = list(inner_ports)
        self.address = _engine_address(client)
        self.container: Container | None = None
        self.volume: Volume | None = None

    @property
    def name(self) -> str:
        """The DinD container's name."""
        return self._name

    @property
    def volume_name(self) -> str:
        """The name of the volume at /var/lib/docker."""
        return f"{self._name}-docker"

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the labelled volume and start the privileged container."""
        self.volume = self.client.volumes.create(
            name=self.volume_name, labels={**self.labels, lbl.ROLE: "docker-data"}
        )
        bind_ip = "127.0.0.1" if self.address == "127.0.0.1" else "0.0.0.0"
        try:
            self.container = self.client.containers.run(  # type: ignore[call-overload]
                self.image,
                name=self._name,
                hostname=self._name,
                detach=True,
                privileged=True,
                labels=self.labels,
                volumes={
                    self.volume_name: {"bind": "/var/lib/docker", "mode": "rw"},
                    # kind binds /lib/modules into its nodes (kube-proxy loads modules)
                    "/lib/modules": {"bind": "/lib/modules", "mode": "ro"},
                },
                ports={f"{port}/tcp": (bind_ip, None) for port in self.inner_ports},
            )
        except docker.errors.ImageNotFound as exc:
            raise ImageError(f"the DinD image {self.image!r} does not exist: {exc}") from None
        except docker.errors.APIError as exc:
            raise HostError(
                f"the Docker engine refused to start the privileged DinD container "
                f"{self._name} from {self.image}: {exc.explanation or exc}"
            ) from None

    def wait_ready(self, timeout: float) -> None:
        """Wait until ``docker version`` inside the container reaches the inner daemon."""
        container = self._running()

        def answers() -> None:
            container.reload()
            if container.status not in ("created", "running"):
                raise HostError(
                    f"the DinD container {self._name} stopped ({container.status}) before its "
                    f"Docker daemon answered; its output:\n{self._container_output()}"
                )
            code, out = container.exec_run(
                ["docker", "version", "--format", "{{.Server.Version}}"], demux=False
            )
            if code != 0:
                text = cast(bytes, out or b"").decode("utf-8", "replace").strip().splitlines()
                raise NotYet(text[-1] if text else f"docker version exited {code}")

        wait_until(
            answers,
            what=f"the Docker daemon inside {self._name} to answer",
            timeout=timeout,
            hint="the DinD image must start dockerd on unix:///var/run/docker.sock; its log: "
            f"docker exec {self._name} tail -n 50 {DAEMON_LOG}",
        )

    def remove(self) -> None:
        """Remove the container (force) and its volume; missing ones are fine."""
        problems: list[str] = []
        try:
            container = self.container or self.client.containers.get(self._name)
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            problems.append(f"container {self._name}: {exc}")
        self.container = None
        try:
            volume = self.volume or self.client.volumes.get(self.volume_name)
            volume.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            problems.append(f"volume {self.volume_name}: {exc}")
        self.volume = None
        if problems:
            raise HostError(
                "could not remove everything: "
                + "; ".join(problems)
                + f"\n  remove by hand: {self.removal_command()}"
            )

    def removal_command(self) -> str:
        """How to remove this host by hand."""
        return f"docker rm --force --volumes {self._name} && docker volume rm {self.volume_name}"

    # -- reaching it -----------------------------------------------------------------------

    def api_endpoint(self, inner_port: int) -> Endpoint:
        """The host address and published port that lead to ``inner_port`` in the DinD."""
        container = self._running()
        container.reload()
        bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{inner_port}/tcp")
        if not bindings:
            raise HostError(f"port {inner_port} of {self._name} is not published")
        return Endpoint(self.address, int(bindings[0]["HostPort"]))

    def cert_sans(self) -> list[str]:
        """The address kubeconfigs name must be in the API server certificate."""
        return [self.address]

    # -- commands and files ----------------------------------------------------------------

    def _running(self) -> Container:
        if self.container is None:
            raise HostError(f"the DinD container {self._name} is not running")
        return self.container

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        on_output: OutputSink | None = None,
        stdin: Iterable[bytes] | None = None,
    ) -> CommandResult:
        """Run ``argv`` in the DinD container; ``stdin`` goes in, stderr lines to ``on_output``."""
        container = self._running()
        args = list(argv)
        where = ["docker", "exec", *(["-i"] if stdin is not None else []), self._name]
        log_command(args, where)
        api = self.client.api

        def run() -> CommandResult:
            exec_id = api.exec_create(
                container.id, args, stdin=stdin is not None, stdout=True, stderr=True
            )["Id"]
            # The SDK hands back the hijacked HTTP connection; the socket beneath it is written
            # to, half-closed so the command sees the end of its input, and closed at the end.
            sock: Any = api.exec_start(exec_id, socket=True)
            raw: Any = getattr(sock, "_sock", sock)
            out = _Lines(None)
            err = _Lines(on_output)
            try:
                if stdin is not None:
                    for chunk in stdin:
                        raw.sendall(chunk)
                    raw.shutdown(socket.SHUT_WR)
                for stream, data in frames_iter(sock, False):  # type: ignore[no-untyped-call]
                    (out if stream == STDOUT else err).add(data)
            finally:
                sock.close()
                raw.close()
            err.flush()
            code = api.exec_inspect(exec_id)["ExitCode"]
            return CommandResult(
                args, -1 if code is None else int(code), out.text(), err.text(), where=where
            )

        return bounded(run, timeout=timeout, what=f"`{shlex.join(where + args)}`")

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Put one file into the DinD container (parent directories included)."""
        container = self._running()
        parts = [p for p in path.split("/") if p]
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for depth in range(1, len(parts)):
                directory = tarfile.TarInfo("/".join(parts[:depth]))
                directory.type = tarfile.DIRTYPE
                directory.mode = 0o755
                directory.mtime = int(time.time())
                archive.addfile(directory)
            info = tarfile.TarInfo("/".join(parts))
            info.size = len(data)
            info.mode = mode
            info.mtime = int(time.time())
            archive.addfile(info, io.BytesIO(data))
        if not container.put_archive("/", buffer.getvalue()):
            raise HostError(f"could not write {path} into {self._name}")

    def load_image(self, image: str, timeout: float) -> bool:
        """Stream ``image`` from the local engine into the inner daemon (``docker load``)."""
        try:
            local = self.client.images.get(image)
        except docker.errors.ImageNotFound:
            return False
        named = image if image in local.tags else (local.tags[0] if local.tags else image)
        chunks: Iterator[bytes] = local.save(chunk_size=_STREAM_CHUNK, named=named)
        result = self.exec(["docker", "load", "--quiet"], stdin=chunks, timeout=timeout)
        if result.exit_code != 0:
            raise HostError(
                f"streaming {image} into {self._name} failed: {result.stderr.strip()}\n"
                f"  inner daemon log:\n{self.daemon_log(20)}"
            )
        return True

    def daemon_log(self, lines: int = 50) -> str:
        """The tail of the inner daemon's log, or of the container's output."""
        if self.container is None:
            return "(the DinD container is gone)"
        try:
            code, out = self.container.exec_run(["tail", "-n", str(lines), DAEMON_LOG])
            if code == 0:
                return cast(bytes, out).decode("utf-8", "replace")
        except docker.errors.DockerException:
            pass
        return self._container_output(lines)

    def _container_output(self, lines: int = 50) -> str:
        try:
            assert self.container is not None
            raw: bytes = self.container.logs(tail=lines)
            return raw.decode("utf-8", "replace") or "(no output)"
        except (docker.errors.DockerException, AssertionError) as exc:
            return f"(container output unavailable: {exc})"


def list_owned(
    client: docker.DockerClient, run_id: str | None = None
) -> tuple[list[Container], list[Volume]]:
    """Containers and volumes kipik created (all runs, or the run ``run_id``)."""
    selector = f"{lbl.RUN_ID}={run_id}" if run_id else lbl.RUN_ID
    containers = client.containers.list(all=True, filters={"label": selector})
    volumes = client.volumes.list(filters={"label": selector})
    return containers, volumes
