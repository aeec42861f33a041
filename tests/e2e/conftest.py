"""The real outer cluster of the pod-backend tests: one kind cluster per session, made here.

``outer`` creates it with the host's own ``kind`` and the real node image and deletes it at the
end (its node containers must be gone); ``tenant`` is a namespace with ``examples/rbac.yaml``
applied unchanged and a kubeconfig with that ServiceAccount's token, which is all the plugin gets;
``in_cluster`` adds what a runner pod inside needs: a registry in the outer cluster holding the
node image, a DinD image whose daemon trusts it, and the runner image.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from tests.conftest import DIND_IMAGE, NODE_IMAGE, _unavailable
from tests.e2e import outer as outer_mod
from tests.e2e.outer import OuterCluster
from tests.images.build import engine_arch, ensure


@dataclass(frozen=True)
class Tenant:
    """A namespace of the outer cluster and the kubeconfig of its ``kipik-runner`` account."""

    namespace: str
    kubeconfig: Path


@dataclass(frozen=True)
class InCluster:
    """What a runner pod inside the outer cluster uses: images as the outer cluster names them."""

    runner_image: str
    dind_image: str
    node_image: str


def _kind() -> str:
    found = shutil.which("kind")
    if found is None:
        _unavailable(
            'no `kind` on PATH for the outer cluster: export PATH="$(bash '
            '../shared/realkind/build.sh bin):$PATH"'
        )
    assert found is not None
    return found


@pytest.fixture(scope="session")
def outer(
    tmp_path_factory: pytest.TempPathFactory, test_images: tuple[str, str]
) -> Iterator[OuterCluster]:
    """A real kind cluster on the local engine with the DinD image loaded; deleted at the end."""
    kind = _kind()
    if shutil.which("kubectl") is None:
        _unavailable("no `kubectl` on PATH for the outer cluster's setup")
    dind, node = test_images
    with outer_mod.started(kind, tmp_path_factory.mktemp("outer"), node, [dind]) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def tenant(outer: OuterCluster) -> Tenant:
    """A namespace with examples/rbac.yaml applied unchanged, and its account's kubeconfig."""
    return Tenant(*outer_mod.rbac_namespace(outer, "kipik-e2e"))


@pytest.fixture(scope="session")
def in_cluster(outer: OuterCluster, tmp_path_factory: pytest.TempPathFactory) -> InCluster:
    """The registry in the outer cluster with the node image, the trusting DinD, the runner."""
    kubectl = shutil.which("kubectl")
    if shutil.which("docker-registry") is None:
        _unavailable("Debian's docker-registry is not installed: apt-get install docker-registry")
    if os.geteuid() != 0:
        _unavailable("the runner image's root filesystem is made by mmdebstrap, which needs root")
    assert kubectl is not None
    outer_mod.build_images(
        DIND_IMAGE, Path(kubectl).resolve().parent, tmp_path_factory.mktemp("images")
    )
    for image in (outer_mod.REGISTRY_IMAGE, outer_mod.TRUSTING_DIND_IMAGE, outer_mod.RUNNER_IMAGE):
        outer.load(image)
    outer.start_registry(outer_mod.REGISTRY_IMAGE)
    node = outer.push(NODE_IMAGE)
    return InCluster(outer_mod.RUNNER_IMAGE, outer_mod.TRUSTING_DIND_IMAGE, node)


@pytest.fixture(scope="session")
def registry_image(docker_client: docker.DockerClient) -> str:
    """The test registry image (Debian's docker-registry FROM scratch), built when missing."""
    binary = shutil.which("docker-registry")
    if binary is None:
        _unavailable("Debian's docker-registry is not installed: apt-get install docker-registry")
    assert binary is not None
    ensure(
        docker_client, outer_mod.registry_recipe(Path(binary)), engine_arch(docker_client), False
    )
    return outer_mod.REGISTRY_IMAGE
