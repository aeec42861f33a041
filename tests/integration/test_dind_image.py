"""The test DinD image against the real Docker engine: a real nested daemon, real image streaming.

Needs the DinD test image and the real kind node image (``bash tests/run.sh`` builds both; see
tests/conftest.py). ``kipik-test/dind:dev`` starts exactly like
the default image (same entrypoint, runc wrapper, volume, healthcheck), so what holds here holds for
the image users get. Times are recorded as test properties (``--junitxml``) and printed (``-s``).
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import docker.types
import pytest
from docker.models.containers import Container

from tests.conftest import DIND_IMAGE, NODE_IMAGE

pytestmark = pytest.mark.docker

SOCKET = "unix:///var/run/docker.sock"
READY_MARKER = "/run/kipik-dind-ready"
CAPFIX_RUNTIME = "kipik-runc-capfix"
OWNER_LABEL = "kipik-test.owner"
OWNER = "tests/integration/test_dind_image.py"
CAP_SYS_RESOURCE = 24


def wait_for(what: str, check: Callable[[], object], timeout: float, interval: float = 0.05) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` and the last value."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


def inner_docker(*args: str) -> list[str]:
    """Argv of a docker CLI call against the nested daemon.

    ``--host`` is explicit because ``docker exec`` inherits the container's environment, and a
    DOCKER_HOST given to the container must not steer calls away from the unix socket.
    """
    return ["docker", "--host", SOCKET, *args]


def run_in(container: Container, argv: list[str]) -> str:
    """Run argv in the container; return its output, fail with it on a non-zero exit."""
    code, output = container.exec_run(argv)
    assert isinstance(output, bytes)
    text = output.decode(errors="replace")
    assert code == 0, f"{argv} exited {code}:\n{text}"
    return text


@dataclass
class Dind:
    container: Container
    ready_seconds: float
    node_image_loaded: bool = False
    measurements: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def client(docker_client: docker.DockerClient, test_images: tuple[str, str]) -> docker.DockerClient:
    """The engine, once the test images are known to be there (see tests/conftest.py)."""
    assert test_images == (DIND_IMAGE, NODE_IMAGE)
    return docker_client


def remove(container: Container) -> None:
    """Remove the container and its anonymous volumes, whatever state it is in."""
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True, v=True)


def is_ready(container: Container) -> bool:
    """Whether the entrypoint has announced a ready nested daemon."""
    container.reload()
    if container.status != "running":
        logs = container.logs().decode(errors="replace")
        pytest.fail(f"the DinD container is {container.status}:\n{logs}")
    return container.exec_run(["test", "-e", READY_MARKER]).exit_code == 0


def start_dind(client: docker.DockerClient, created: list[Container], **options: Any) -> Container:
    """Start a privileged DinD container the way the plugin does, and remember it for cleanup."""
    container = client.containers.run(
        DIND_IMAGE,
        detach=True,
        privileged=True,
        mounts=[docker.types.Mount(target="/var/lib/docker", source=None, type="volume")],
        labels={OWNER_LABEL: OWNER},
        **options,
    )
    created.append(container)
    return container


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    """Containers a test starts; removed with their volumes afterwards, even when it fails."""
    created: list[Container] = []
    yield created
    for container in created:
        remove(container)


@pytest.fixture(scope="module")
def dind(client: docker.DockerClient) -> Iterator[Dind]:
    """One DinD container shared by the read-only checks (told to listen on TCP: it must not)."""
    created: list[Container] = []
    try:
        started = time.monotonic()
        container = start_dind(client, created, environment={"DOCKER_HOST": "tcp://0.0.0.0:2375"})
        wait_for("the ready marker of the nested daemon", lambda: is_ready(container), 60)
        yield Dind(container=container, ready_seconds=time.monotonic() - started)
    finally:
        for container in created:
            remove(container)


@pytest.fixture(scope="module")
def loaded(dind: Dind) -> Dind:
    """The shared DinD with the node image streamed into its daemon."""
    assert dind.container.id is not None
    started = time.monotonic()
    save = subprocess.Popen(["docker", "save", NODE_IMAGE], stdout=subprocess.PIPE)
    assert save.stdout is not None
    try:
        load = subprocess.run(
            ["docker", "exec", "-i", dind.container.id, *inner_docker("load")],
            stdin=save.stdout,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        save.stdout.close()
        save_code = save.wait(timeout=60)
    assert save_code == 0, "docker save failed"
    assert load.returncode == 0, f"docker load failed:\n{load.stdout}\n{load.stderr}"
    dind.measurements["node_image_stream_seconds"] = time.monotonic() - started
    dind.node_image_loaded = True
    return dind


def test_inner_daemon_answers_within_seconds(
    dind: Dind, record_property: Callable[[str, object], None]
) -> None:
    record_property("inner_daemon_ready_seconds", round(dind.ready_seconds, 2))
    print(f"\ninner daemon ready {dind.ready_seconds:.2f} s after docker run")
    assert dind.ready_seconds < 15
    version = run_in(dind.container, inner_docker("version", "--format", "{{.Server.Version}}"))
    assert version.strip()


def test_inner_daemon_uses_overlay2(dind: Dind) -> None:
    driver = run_in(dind.container, inner_docker("info", "--format", "{{.Driver}}"))
    assert driver.strip() == "overlay2"


def test_inner_daemon_listens_on_no_tcp_port(dind: Dind) -> None:
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in run_in(dind.container, ["cat", table]).splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                listening.append(f"{table}: {fields[1]}")
    assert listening == []
    assert "tcp://" not in run_in(dind.container, ["cat", "/proc/1/cmdline"])


def test_capfix_runtime_is_default_exactly_where_the_capability_is_missing(dind: Dind) -> None:
    status = run_in(dind.container, ["cat", "/proc/self/status"])
    bounding = int(
        next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapBnd:")), 16
    )
    missing = not bounding >> CAP_SYS_RESOURCE & 1
    runtime = run_in(dind.container, inner_docker("info", "--format", "{{.DefaultRuntime}}"))
    assert (runtime.strip() == CAPFIX_RUNTIME) is missing


def test_node_image_streams_into_the_inner_daemon(
    loaded: Dind, record_property: Callable[[str, object], None]
) -> None:
    seconds = loaded.measurements["node_image_stream_seconds"]
    record_property("node_image_stream_seconds", round(seconds, 2))
    print(f"\nnode image streamed in {seconds:.2f} s")
    stop_signal = run_in(
        loaded.container,
        inner_docker("image", "inspect", "--format", "{{.Config.StopSignal}}", NODE_IMAGE),
    )
    assert stop_signal.strip() == "SIGRTMIN+3"


def test_privileged_container_runs_inside(loaded: Dind) -> None:
    output = run_in(
        loaded.container,
        inner_docker(
            "run",
            "--rm",
            "--privileged",
            "--entrypoint",
            "/bin/sh",
            NODE_IMAGE,
            "-c",
            "grep ^CapEff: /proc/self/status && mount -t tmpfs none /mnt",
        ),
    )
    effective = int(output.split()[1], 16)
    assert effective >> 21 & 1, "CAP_SYS_ADMIN missing from a privileged nested container"


def test_exited_containers_leave_no_zombies(loaded: Dind) -> None:
    for _ in range(5):
        run_in(
            loaded.container, inner_docker("run", "--rm", "--entrypoint", "/bin/true", NODE_IMAGE)
        )

    def zombies() -> list[str]:
        table = run_in(loaded.container, ["ps", "-eo", "stat=,pid=,ppid=,comm="])
        return [line.strip() for line in table.splitlines() if line.strip().startswith("Z")]

    # Reaping is asynchronous: poll until none is left, and name them if some stay.
    seen: list[str] = []

    def none_left() -> bool:
        seen[:] = zombies()
        return not seen

    wait_for("no zombie processes in the DinD container", none_left, 10)
    assert seen == []


def test_docker_stop_is_quick_and_clean(
    client: docker.DockerClient,
    containers: list[Container],
    record_property: Callable[[str, object], None],
) -> None:
    container = start_dind(client, containers)
    wait_for("the ready marker of the nested daemon", lambda: is_ready(container), 60)
    started = time.monotonic()
    container.stop(timeout=10)
    seconds = time.monotonic() - started
    record_property("docker_stop_seconds", round(seconds, 2))
    print(f"\ndocker stop took {seconds:.2f} s")
    container.reload()
    logs = container.logs().decode(errors="replace")
    assert seconds < 5, f"docker stop took {seconds:.1f} s:\n{logs}"
    assert container.attrs["State"]["ExitCode"] == 0, logs
    assert "dockerd exited with status 0" in logs


def test_a_tcp_host_argument_is_refused(
    client: docker.DockerClient, containers: list[Container]
) -> None:
    container = start_dind(client, containers, command=["-H", "tcp://0.0.0.0:2375"])

    def exited() -> bool:
        container.reload()
        return container.status == "exited"

    wait_for("the DinD container to refuse the argument and exit", exited, 30)
    assert container.attrs["State"]["ExitCode"] != 0
    assert "refusing dockerd argument" in container.logs().decode(errors="replace")
