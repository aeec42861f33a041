"""One DinD container on the local Docker engine: started, held, reached, fed, removed.

The container gets an anonymous, labelled volume at ``/var/lib/docker`` (so the inner daemon
uses overlay2; removed with the container) and publishes the nested API server's port to
``127.0.0.1:<ephemeral>`` on the engine's host, which works on Linux and Docker Desktop alike.
Every process that uses it holds it through a dead-man switch (:data:`DEAD_MAN`).
"""

from __future__ import annotations

import contextlib
import io
import socket
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import Mount
from docker.utils.socket import STDOUT, frames_iter

from pytest_kipik import labels as lbl
from pytest_kipik.errors import HostError, ImageError, KipikError, NameClashError, option
from pytest_kipik.hosts.base import (
    ChunkReader,
    Endpoint,
    Loaded,
    OutputSink,
    extract_tree,
    files_archive,
    inner_dockerd_args,
    load_unless_present,
)
from pytest_kipik.hosts.engine import STREAM_CHUNK, engine_address, image_stream, local_image_id
from pytest_kipik.process import CommandResult, Output, run_in
from pytest_kipik.waiting import NotYet, wait_until

#: The inner daemon's log, as the kipik DinD entrypoint writes it.
DAEMON_LOG = "/var/log/dockerd.log"
#: Where holders of a DinD take their shared lock (see :data:`DEAD_MAN`).
HOLDS_FILE = "/run/kipik-holds"
#: The dead-man switch, run inside the DinD by every process that holds it (argv of
#: ``docker exec -i``). Each holder keeps a shared flock while its stdin is open; the owner's
#: process never writes to it, so stdin ends only when the owner's connection drops (released,
#: or the process died, SIGKILL included: the kernel closes the socket, dockerd closes the
#: exec's stdin). The holder that then gets the lock exclusively is the last one: it stops PID 1
#: (tini), and the container, started with auto-remove, is removed with its anonymous volume.
#: It keeps the exclusive lock until the end, so a late holder cannot attach to a dying host.
DEAD_MAN = [
    "sh",
    "-c",
    f'flock -s {HOLDS_FILE} sh -c "echo held; exec cat >/dev/null"; '
    f'exec flock -n {HOLDS_FILE} sh -c "kill -TERM 1; sleep 10; kill -KILL -1"',
]
_HELD = b"held"


def _missing_modules(exc: docker.errors.APIError) -> bool:
    """Whether the engine refused a container because its host has no ``/lib/modules``."""
    text = str(exc.explanation or exc)
    return "bind source path does not exist" in text and "/lib/modules" in text


def _describe_owner(found: Mapping[str, str]) -> str:
    run = found.get(lbl.RUN_ID)
    if run is None:
        return "it was not made by pytest-kipik (no kipik.io/ labels)"
    keep = " and is kept (kipik.io/keep=true)" if found.get(lbl.KEEP) else ""
    return (
        f"it belongs to kipik run {run} of {found.get(lbl.OWNER_HOST, '?')} "
        f"pid {found.get(lbl.OWNER_PID, '?')}{keep}"
    )


class DockerHold:
    """An open ``docker exec -i`` of :data:`DEAD_MAN`: the host lives while it is open."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def release(self) -> None:
        """Close the connection: the holder's stdin ends (the last holder stops the host)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            raw = getattr(sock, "_sock", sock)
            with contextlib.suppress(OSError):
                raw.shutdown(socket.SHUT_RDWR)
            sock.close()
            raw.close()


class DockerHost:
    """One privileged DinD container (plus its anonymous volume) for one nested cluster.

    A session's container is started with auto-remove and held (:meth:`hold`), so it removes
    itself when its owner dies. Kept, reused and warm containers (see ``labels.leased``) are
    neither: they outlive the session on purpose.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        image: str,
        name: str,
        labels: Mapping[str, str],
        inner_ports: Sequence[int],
        resolve_image: Callable[[], str] | None = None,
        dockerd_args: Sequence[str] = (),
    ) -> None:
        self.client = client
        #: More arguments of the inner daemon (registry mirrors).
        self.dockerd_args = list(dockerd_args)
        self.image = image
        self._resolve_image = resolve_image
        self._name = name
        self.labels = dict(labels)
        self.inner_ports = list(inner_ports)
        self.address = engine_address(client)
        self.container: Container | None = None
        #: Fills the new container's data volume before it starts (a snapshot's copy), if set.
        self.seed: Callable[[Container], None] | None = None

    @property
    def name(self) -> str:
        """The DinD container's name."""
        return self._name

    # -- lifecycle -------------------------------------------------------------------------

    def _clash(self, found: Container) -> NameClashError:
        return NameClashError(
            f"a container named {self._name} already exists ({found.short_id}, "
            f"{found.status}): {_describe_owner(found.labels)}. kipik leaves it alone. "
            f"Remove it yourself if it is stale, or choose another {option('name_prefix')}."
        )

    def start(self) -> None:
        """Start the privileged container with a labelled anonymous volume for the daemon."""
        try:
            raise self._clash(self.client.containers.get(self._name))
        except docker.errors.NotFound:
            pass
        if not self.image and self._resolve_image is not None:  # pulled or built only now
            self.image = self._resolve_image()
        try:
            self.container = self._run(modules=True)
        except docker.errors.APIError as exc:
            if not _missing_modules(exc):
                raise self._refused(exc) from None
            # an engine host without /lib/modules (some VMs): kind's nodes still run, only
            # nothing inside can load kernel modules (`kipik doctor` says so)
            try:
                self.container = self._run(modules=False)
            except docker.errors.APIError as again:
                raise self._refused(again) from None

    def _run(self, *, modules: bool) -> Container:
        """``docker run`` the privileged DinD container (with the host's /lib/modules or not)."""
        bind_ip = "127.0.0.1" if self.address == "127.0.0.1" else "0.0.0.0"
        mounts = [
            # anonymous: no name to clash with, removed together with the container
            Mount(
                "/var/lib/docker",
                None,
                type="volume",
                labels={**self.labels, lbl.ROLE: "docker-data"},
            )
        ]
        if modules:  # kind binds /lib/modules into its nodes (kube-proxy loads modules)
            mounts.append(Mount("/lib/modules", "/lib/modules", type="bind", read_only=True))
        ports: Any = {f"{port}/tcp": (bind_ip, None) for port in self.inner_ports}  # any port
        try:
            container: Container = self.client.containers.create(
                self.image,
                command=inner_dockerd_args(self.dockerd_args),
                name=self._name,
                hostname=self._name,
                privileged=True,
                labels=self.labels,
                auto_remove=not lbl.leased(self.labels),
                mounts=mounts,
                ports=ports,
            )
        except docker.errors.ImageNotFound as exc:
            raise ImageError(f"the DinD image {self.image!r} does not exist: {exc}") from None
        self.container = container  # created: write_file works before it starts (seed)
        try:
            if self.seed is not None:
                self.seed(container)
            container.start()
        except BaseException:
            self.container = None
            with contextlib.suppress(docker.errors.DockerException):
                container.remove(force=True, v=True)
            raise
        return container

    def _refused(self, exc: docker.errors.APIError) -> KipikError:
        """The error for an engine that refused the container (a name clash, or else why)."""
        if exc.status_code == 409:  # created meanwhile by someone else
            try:
                return self._clash(self.client.containers.get(self._name))
            except docker.errors.NotFound:
                pass
        return HostError(
            f"the Docker engine refused to start the privileged DinD container "
            f"{self._name} from {self.image}: {exc.explanation or exc}"
        )

    def wait_ready(self, timeout: float) -> None:
        """Wait until ``docker version`` inside the container reaches the inner daemon."""
        container = self._running()

        def answers() -> None:
            try:
                container.reload()
            except docker.errors.NotFound:
                raise HostError(
                    f"the DinD container {self._name} stopped and was removed (auto-remove) "
                    f"before its Docker daemon answered; run the image by hand to see why: "
                    f"docker run --rm --privileged {self.image}"
                ) from None
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

    def _ours(self) -> Container | None:
        """Our container: the one we started, else one of this name carrying our run id."""
        if self.container is not None:
            return self.container
        try:
            found = self.client.containers.get(self._name)
        except docker.errors.NotFound:
            return None
        if found.labels.get(lbl.RUN_ID) != self.labels.get(lbl.RUN_ID):
            return None  # not ours: never remove another run's or another tool's container
        return found

    def attach(self) -> bool:
        """Adopt the running container of this name if it carries our run id."""
        try:
            found = self.client.containers.get(self._name)
        except docker.errors.NotFound:
            return False
        if found.labels.get(lbl.RUN_ID) != self.labels.get(lbl.RUN_ID):
            return False
        if found.status != "running":
            return False
        self.container = found
        return True

    def hold(self) -> DockerHold:
        """Open the dead-man exec (:data:`DEAD_MAN`) and wait until it holds the host."""
        container = self._running()
        api = self.client.api
        try:
            exec_id = api.exec_create(container.id, DEAD_MAN, stdin=True, stdout=True)["Id"]
            sock: Any = api.exec_start(exec_id, socket=True)
        except docker.errors.DockerException as exc:
            raise HostError(f"could not hold {self._name}: {exc}") from None
        raw: Any = getattr(sock, "_sock", sock)
        hold = DockerHold(sock)
        seen = b""
        try:
            raw.settimeout(30)
            while _HELD not in seen:
                data = raw.recv(64)
                if not data:
                    break
                seen += data
            raw.settimeout(None)
        except OSError:
            pass
        if _HELD not in seen:
            hold.release()
            raise HostError(f"could not hold {self._name}: it is going away (its last holder left)")
        return hold

    def detach(self) -> None:
        """Nothing is held open: the published port outlives this process."""

    def remove(self) -> None:
        """Remove our container and its volumes (force); nothing that is not ours."""
        try:
            container = self._ours()
            if container is not None:
                try:
                    container.remove(force=True, v=True)
                except docker.errors.APIError as exc:
                    if exc.status_code != 409:  # 409: auto-removal already under way
                        raise
                self._wait_gone()
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            raise HostError(
                f"could not remove the DinD container {self._name}: {exc}\n"
                f"  remove by hand: {self.removal_command()}"
            ) from None
        except OSError as exc:  # the engine's connection itself failed
            raise HostError(
                f"could not remove the DinD container {self._name}: {exc}\n"
                f"  remove by hand: {self.removal_command()}"
            ) from None
        self.container = None

    def _wait_gone(self, timeout: float = 60) -> None:
        """An auto-removed container may still be on its way out: wait until it is gone."""

        def gone() -> None:
            try:
                self.client.containers.get(self._name)
            except docker.errors.NotFound:
                return
            raise NotYet(f"{self._name} still exists")

        wait_until(
            gone,
            what=f"the DinD container {self._name} to be removed",
            timeout=timeout,
            hint=f"remove it by hand: {self.removal_command()}",
        )

    def removal_command(self) -> str:
        """How to remove this host by hand (its volume goes with it)."""
        return f"docker rm --force --volumes {self._name}"

    def how_to_use(self, kubeconfig: str) -> str:
        """The published port outlives the session: the kubeconfig works as it is."""
        return f"kubectl --kubeconfig {kubeconfig} get nodes"

    # -- reaching it -----------------------------------------------------------------------

    def api_endpoint(self, inner_port: int) -> Endpoint:
        """The host address and published port that lead to ``inner_port`` in the DinD."""
        container = self._running()
        container.reload()
        bindings = (container.attrs["NetworkSettings"]["Ports"] or {}).get(f"{inner_port}/tcp")
        if not bindings:
            raise HostError(f"port {inner_port} of {self._name} is not published")
        return Endpoint(self.address, int(bindings[0]["HostPort"]))

    def outer_addresses(self) -> dict[str, str]:
        """None: the test process reaches the DinD through a published port, never routed."""
        return {}

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
        api = self.client.api

        def run(out: Output, err: Output) -> int:
            exec_id = api.exec_create(
                container.id, args, stdin=stdin is not None, stdout=True, stderr=True
            )["Id"]
            # The SDK hands back the hijacked HTTP connection; the socket beneath it is written
            # to, half-closed so the command sees the end of its input, and closed at the end.
            sock: Any = api.exec_start(exec_id, socket=True)
            raw: Any = getattr(sock, "_sock", sock)
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
            code = api.exec_inspect(exec_id)["ExitCode"]
            return -1 if code is None else int(code)

        return run_in(where, args, run, timeout=timeout, on_output=on_output)

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Put one file into the DinD container (parent directories included)."""
        self.write_files({path: (data, mode)})

    def write_files(self, files: Mapping[str, tuple[bytes, int]]) -> None:
        """Put files into the DinD container in one archive (parent directories included).

        Works on the created container before it starts, too (a restore's :attr:`seed`).
        """
        container = self._running()
        if not container.put_archive("/", files_archive(files, int(time.time()))):
            raise HostError(f"could not write {', '.join(files)} into {self._name}")

    def feed(self, argv: Sequence[str], source: Path, timeout: float) -> CommandResult:
        """Run ``argv`` in the DinD container with the file ``source`` streamed to its stdin."""
        with source.open("rb") as handle:
            chunks: Iterator[bytes] = iter(lambda: handle.read(STREAM_CHUNK), b"")
            return self.exec(argv, stdin=chunks, timeout=timeout)

    def load_image(self, image: str, timeout: float) -> Loaded | None:
        """Stream ``image`` from the local engine into the inner daemon, then tag it there.

        A warm host that has the very same image (same id) already is not sent it again.
        """

        def move() -> tuple[str, CommandResult] | None:
            found = image_stream(self.client, image)
            if found is None:
                return None
            image_id, chunks = found
            return image_id, self.exec(["docker", "load", "--quiet"], stdin=chunks, timeout=timeout)

        return load_unless_present(self, image, local_image_id(self.client, image), move)

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

    def copy_out(self, path: str, dest: Path, timeout: float) -> Path:
        """Copy the directory ``path`` out of the container (the engine's archive endpoint)."""
        container = self._running()
        where = f"{self._name}:{path}"
        outcome: dict[str, Any] = {}

        def fetch() -> None:
            try:
                chunks, _stat = container.get_archive(path.rstrip("/") or "/")
                reader = io.BufferedReader(ChunkReader(chunks))
                outcome["files"] = extract_tree(reader, dest, strip=1)
            except (docker.errors.DockerException, tarfile.TarError, OSError) as exc:
                outcome["error"] = exc

        worker = threading.Thread(target=fetch, name="kipik-copy-out", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            raise HostError(f"copying {where} out did not finish within {timeout:.0f}s")
        if "error" in outcome:
            raise HostError(f"could not copy {where} out to {dest}: {outcome['error']}")
        return dest

    def _container_output(self, lines: int = 50) -> str:
        try:
            assert self.container is not None
            raw: bytes = self.container.logs(tail=lines)
            return raw.decode("utf-8", "replace") or "(no output)"
        except (docker.errors.DockerException, AssertionError) as exc:
            return f"(container output unavailable: {exc})"
