"""Registries on real kind (docker backend): a mirror with credentials and a private CA.

The mirror (tests/e2e/mirror.py) is Debian's docker-registry in a container on this engine's
bridge, serving TLS with a certificate of a CA made here and asking for a password. The node image
exists only there (under a Docker Hub name the engine does not have), so kind's pull in the DinD
must go through the mirror; a workload image too, pulled by the nodes' containerd. One cluster
serves the module; it also runs the registry inside (``--kipik-registry``).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from pytest_kipik import ClusterFactory, KipikConfig, NestedCluster
from pytest_kipik.errors import ImageError
from tests.conftest import output_of_a_pod
from tests.e2e.mirror import Mirror, started

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
TIMEOUT = 900
#: The node image's name in the mirror: a Docker Hub name that no engine here has.
MIRRORED_NODE = f"kipik-test/mirrored-node:{secrets.token_hex(4)}"


@pytest.fixture(scope="module")
def mirror(
    docker_client: docker.DockerClient,
    registry_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Mirror]:
    """The TLS, password-protected mirror on the engine's bridge, for the module."""
    with started(docker_client, tmp_path_factory.mktemp("mirror")) as running:
        yield running


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Made:
    cluster: NestedCluster
    factory: ClusterFactory
    reported: list[str]
    logged: _Records


@pytest.fixture(scope="module")
def made(
    mirror: Mirror,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    registry_image: str,
) -> Iterator[Made]:
    """One cluster whose node image comes through the mirror, with the registry inside."""
    dind, node = test_images
    mirror.push(docker_client, node, MIRRORED_NODE)
    config = KipikConfig(
        image=dind,
        node_image=MIRRORED_NODE,
        timeout=TIMEOUT,
        snapshots=False,
        registry=registry_image,
        **mirror.settings(),
    )
    reported: list[str] = []
    logged = _Records()
    logger = logging.getLogger("pytest_kipik")
    level = logger.level
    logger.addHandler(logged)
    logger.setLevel(logging.DEBUG)
    try:
        with ClusterFactory(config, report=reported.append, verbose=True) as factory:
            yield Made(factory.create(name="registries"), factory, reported, logged)
    finally:
        logger.removeHandler(logged)
        logger.setLevel(level)


def test_the_node_image_comes_through_the_mirror_with_its_ca_and_credentials(made: Made) -> None:
    said = "\n".join(made.reported)
    assert f"{MIRRORED_NODE} is not local; the DinD host pulls it" in said
    assert re.search(rf"node image {re.escape(MIRRORED_NODE)} pulled \(\d+\.\d+s\)", said), said
    pulled = made.cluster.host.exec(
        ["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", MIRRORED_NODE],
        timeout=60,
    ).check()
    repository = MIRRORED_NODE.split(":", 1)[0]
    assert f'"{repository}@sha256:' in pulled.stdout  # pulled from a registry, not loaded
    (node,) = made.cluster.core_v1.list_node().items
    assert node.status.node_info.kubelet_version == "v1.22.3"  # type: ignore[union-attr]


def test_a_workload_image_comes_through_the_mirror_to_the_nodes(
    made: Made, mirror: Mirror, built_image: tuple[str, str], docker_client: docker.DockerClient
) -> None:
    image, token = built_image  # on this engine only: the nodes can get it from the mirror alone
    mirror.push(docker_client, image, image)
    assert output_of_a_pod(made.cluster, image, ["cat", "/token"]) == f"{token}\n"


def test_an_image_pushed_to_the_registry_inside_runs_in_a_pod(
    made: Made, built_image: tuple[str, str]
) -> None:
    image, token = built_image
    registry = made.cluster.registry
    assert registry.address.startswith("127.0.0.1:")
    pulled_as = registry.push(image)
    assert pulled_as == f"localhost:5001/{image}"
    assert output_of_a_pod(made.cluster, pulled_as, ["cat", "/token"]) == f"{token}\n"
    hosting = made.cluster.core_v1.read_namespaced_config_map(
        "local-registry-hosting", "kube-public"
    )
    assert hosting.data == {  # KEP-1755: where tools push, what the nodes pull by
        "localRegistryHosting.v1": f"host: {registry.address}\n"
        "hostFromContainerRuntime: localhost:5001\n"
    }


def test_the_credentials_are_in_no_report_log_or_file_others_can_read(
    made: Made, mirror: Mirror
) -> None:
    said = "\n".join(made.reported + made.logged.lines + [made.cluster.host.daemon_log(400)])
    for secret in mirror.secrets:
        assert secret not in said
    workdir = [p for p in made.factory.workdir.rglob("*") if p.is_file()]
    assert workdir, "the factory's workdir has the kubeconfig"
    for path in workdir:
        for secret in mirror.secrets:
            assert secret.encode() not in path.read_bytes(), path
    host = made.cluster.host
    node = f"{made.cluster.name}-control-plane"
    for where in (
        ["grep", "-rlsF", mirror.secrets[1], "/kipik", "/root", "/etc", "/tmp"],
        [
            "docker",
            "exec",
            node,
            "grep",
            "-rlsF",
            mirror.secrets[1],
            "/var/lib/kubelet",
            "/etc",
            "/tmp",
        ],
    ):
        found = host.exec(where, timeout=120).stdout.split()
        assert found, where  # the two config.json files, which must be private
        for file in found:
            stat = ["stat", "-c", "%a %U", file]
            if where[0] == "docker":
                stat = ["docker", "exec", node, *stat]
            mode, owner = host.exec(stat, timeout=30).check().stdout.split()
            assert (mode, owner) == ("600", "root"), (file, mode, owner)


def test_a_wrong_password_fails_the_pull_saying_what_to_check_and_leaves_nothing(
    made: Made, mirror: Mirror, test_images: tuple[str, str], tmp_path: Path
) -> None:
    # after the module's cluster: its host pulled the node image already, a new one must again
    wrong = tmp_path / "config.json"
    wrong.write_text(json.dumps({"auths": {mirror.host(): {"auth": "a2lwaWs6d3Jvbmc="}}}))
    settings = {**mirror.settings(), "registry_auth": wrong}
    config = KipikConfig(
        image=test_images[0], node_image=MIRRORED_NODE, timeout=300, snapshots=False, **settings
    )
    with (
        ClusterFactory(config, report=lambda _: None) as factory,
        pytest.raises(ImageError) as raised,
    ):
        factory.create(name="wrong-password")
    message = str(raised.value)
    assert f"could not pull the node image {MIRRORED_NODE} through the mirror(s)" in message
    assert f"https://{mirror.host()}" in message
    assert "--kipik-registry-auth" in message
    assert "a2lwaWs6d3Jvbmc=" not in message  # kipik:wrong, base64: no credential in it
