"""Files into a real DinD container: before it starts (a restore's files), and through tar.

The docker backend puts one archive into the container (``put_archive``), which also works on a
created container that has not started; the pod backend pipes the same archive through an exec
into ``tar``, which this test runs in the same container with the same script.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import docker
import pytest
from docker.models.containers import Container

from pytest_kipik import labels as lbl
from pytest_kipik.hosts.base import files_archive
from pytest_kipik.hosts.docker_host import DockerHost
from pytest_kipik.hosts.pod_host import UNTAR
from tests.conftest import DIND_IMAGE, NODE_IMAGE

pytestmark = pytest.mark.docker

FILES = {
    "/kipik/.kubelet/answer.sh": (b"echo answer\n", 0o644),
    "/etc/kipik/secret.json": (b'{"auth": "x"}', 0o600),
    "/tmp/kipik-in-tmp": (b"t", 0o644),  # /tmp exists (1777) and must stay so
}


@pytest.fixture
def host(docker_client: docker.DockerClient, test_images: tuple[str, str]) -> Iterator[DockerHost]:
    """A DinD host that got :data:`FILES` while created, before it started."""
    assert test_images == (DIND_IMAGE, NODE_IMAGE)
    name = f"kipik-files-{secrets.token_hex(3)}"
    found = lbl.owner_labels(
        run_id=lbl.new_run_id(), cluster=name, role="dind", worker=None, keep=False, ttl=600
    )
    made = DockerHost(docker_client, image=DIND_IMAGE, name=name, labels=found, inner_ports=[])
    seen_before_start: list[str] = []

    def seed(container: Container) -> None:
        container.reload()
        seen_before_start.append(container.status)
        made.write_files(FILES)

    made.seed = seed
    try:
        made.start()
        assert seen_before_start == ["created"]
        yield made
    finally:
        made.remove()


def _listing(host: DockerHost, *paths: str) -> list[str]:
    done = host.exec(["stat", "-c", "%n %a %U", *paths], timeout=60)
    assert done.exit_code == 0, done.stderr
    return done.stdout.split("\n")[:-1]


def test_files_put_in_before_the_start_are_there_with_their_modes(host: DockerHost) -> None:
    assert _listing(host, *FILES, "/tmp", "/kipik/.kubelet") == [
        "/kipik/.kubelet/answer.sh 644 root",
        "/etc/kipik/secret.json 600 root",
        "/tmp/kipik-in-tmp 644 root",
        "/tmp 1777 root",
        "/kipik/.kubelet 755 root",
    ]
    done = host.exec(["cat", "/etc/kipik/secret.json"], timeout=60)
    assert done.stdout == '{"auth": "x"}'


def test_the_pod_backends_tar_pipe_writes_the_same_files(host: DockerHost) -> None:
    moved = {f"/srv/piped{path}": spec for path, spec in FILES.items()}
    archive = files_archive(moved, mtime=1700000000)
    done = host.exec(["sh", "-c", UNTAR, "sh", str(len(archive))], timeout=60, stdin=[archive])
    assert done.exit_code == 0, done.stderr
    assert _listing(host, *moved) == [
        "/srv/piped/kipik/.kubelet/answer.sh 644 root",
        "/srv/piped/etc/kipik/secret.json 600 root",
        "/srv/piped/tmp/kipik-in-tmp 644 root",
    ]
