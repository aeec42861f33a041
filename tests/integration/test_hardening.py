"""Foundation hardening against the real Docker engine, before any kind cluster is made.

Name clashes never remove what is not ours; a DinD image that does not exist is named. (What
needs a real cluster, such as a teardown problem or a certificate that does not cover the
address, is in tests/e2e.)
"""

from __future__ import annotations

import docker
import docker.errors
import pytest

from pytest_kipik import ClusterFactory, KipikConfig
from pytest_kipik.errors import NameClashError
from tests.conftest import Leftovers

pytestmark = pytest.mark.docker


def _config(test_images: tuple[str, str], **extra: object) -> KipikConfig:
    dind, node = test_images
    return KipikConfig(image=dind, node_image=node, timeout=180, snapshots=False, **extra)  # type: ignore[arg-type]


def test_name_clash_is_an_error_and_leaves_the_other_resources_alone(
    test_images: tuple[str, str], docker_client: docker.DockerClient, leftovers: Leftovers
) -> None:
    planted = [
        docker_client.containers.create(
            test_images[0],
            name="clash-a-dind",
            labels={"kipik.io/run-id": "someone-else", "kipik.io/owner-pid": "1"},
        ),
        docker_client.containers.create(test_images[0], name="clash-b-dind"),
    ]
    volume = docker_client.volumes.create("clash-a-dind-docker", labels={"other.tool": "x"})
    try:
        with ClusterFactory(_config(test_images), report=lambda line: None) as factory:
            with pytest.raises(NameClashError) as other_run:
                factory.create(name="clash-a")
            with pytest.raises(NameClashError) as not_kipik:
                factory.create(name="clash-b")
        assert str(other_run.value).startswith("a container named clash-a-dind already exists")
        assert "belongs to kipik run someone-else" in str(other_run.value)
        assert "it was not made by pytest-kipik (no kipik.io/ labels)" in str(not_kipik.value)
        for container in planted:
            container.reload()  # still there
        assert docker_client.volumes.get("clash-a-dind-docker").name == volume.name
    finally:
        for container in planted:
            container.remove(force=True, v=True)  # and the image's anonymous volume
        volume.remove(force=True)


def test_unknown_dind_image_is_named(pytester: pytest.Pytester, leftovers: Leftovers) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess("--kipik-image=127.0.0.1:9/kipik-test/no-such-image:v0")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*the image '127.0.0.1:9/kipik-test/no-such-image:v0' is not present on the Docker "
         "engine and pulling it failed*"]
    )  # fmt: skip
    assert leftovers() == []
