"""Foundation hardening against the real Docker engine (kind and its node image are doubles).

Name clashes never remove what is not ours; teardown keeps going past a failure; a certificate
that does not cover the address fails at once; digest-pinned node images work offline; kind
config fields kipik does not read reach kind; kept clusters outlive pytest's basetemp pruning.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from pytest_kipik import ClusterFactory, KipikConfig
from pytest_kipik.errors import ClusterUnusableError, NameClashError
from pytest_kipik.hosts.docker import DockerBackend, DockerHost
from pytest_kipik.waiting import NotYet, wait_until
from tests.conftest import Leftovers, assert_kubectl_sees_a_ready_node, kept_cluster

pytestmark = pytest.mark.docker


def _config(test_images: tuple[str, str], **extra: object) -> KipikConfig:
    dind, node = test_images
    return KipikConfig(image=dind, node_image=node, timeout=180, **extra)  # type: ignore[arg-type]


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


class _Unreachable(docker.DockerClient):
    """An engine client whose connection fails, as when the engine goes away mid-teardown."""

    def __init__(self) -> None:
        super().__init__(base_url="tcp://127.0.0.1:9", version="1.41", timeout=2)


def test_teardown_keeps_going_and_a_failed_removal_can_be_retried(
    test_images: tuple[str, str], docker_client: docker.DockerClient, leftovers: Leftovers
) -> None:
    factory = ClusterFactory(_config(test_images), report=lambda line: None)
    first = factory.create(name="tear-1")
    second = factory.create(name="tear-2")
    assert isinstance(second.host, DockerHost)
    working = second.host.client
    second.host.client = _Unreachable()  # torn down first: the connection fails
    second.host.container = None  # (the container object holds its own client)
    problems = factory.close()
    assert len(problems) == 1
    assert str(problems[0]).startswith("could not remove the DinD container tear-2-dind")
    assert leftovers() == ["container tear-2-dind", "volume " + _volume_of(docker_client)]
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get("tear-1-dind")  # the other one was removed all the same
    assert not first.kubeconfig_path.exists()
    second.host.client = working
    second.close()  # a failed removal is retried, not skipped as "closed"
    assert leftovers() == []


def _volume_of(client: docker.DockerClient) -> str:
    (volume,) = client.volumes.list(filters={"label": "kipik.io/cluster=tear-2"})
    return str(volume.name)


def test_teardown_problem_is_a_warning_in_pytest(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    pytester.makepyfile(
        """
        import docker

        def test_two(nested_cluster_factory):
            nested_cluster_factory.create(name="warn-1")
            second = nested_cluster_factory.create(name="warn-2")
            second.host.client = docker.DockerClient(
                base_url="tcp://127.0.0.1:9", version="1.41"
            )
            second.host.container = None
        """
    )
    dind, node = test_images
    result = pytester.runpytest_subprocess(f"--kipik-image={dind}", f"--kipik-node-image={node}")
    try:
        result.assert_outcomes(passed=1, warnings=1)
        result.stdout.fnmatch_lines(
            ["*PytestWarning: pytest-kipik teardown: could not remove the DinD container "
             "warn-2-dind*"]
        )  # fmt: skip
        assert [r for r in leftovers() if r.startswith("container")] == ["container warn-2-dind"]
    finally:
        docker_client.containers.get("warn-2-dind").remove(force=True, v=True)


class _NoSansHost(DockerHost):
    def cert_sans(self) -> list[str]:
        return []  # the certificate names only kind's own localhost and 0.0.0.0


class _NoSansBackend(DockerBackend):
    def make_host(self, name: str, labels: object, inner_ports: object) -> DockerHost:
        host = super().make_host(name, labels, inner_ports)  # type: ignore[arg-type]
        return _NoSansHost(
            host.client,
            image=host.image,
            name=name,
            labels=host.labels,
            inner_ports=[6443],
            resolve_image=self._image,
        )


def test_certificate_that_does_not_cover_the_address_fails_at_once(
    test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    lines: list[str] = []
    config = _config(test_images)
    backend = _NoSansBackend(config.image, lines.append)
    with (
        ClusterFactory(config, backend=backend, report=lines.append) as factory,
        pytest.raises(ClusterUnusableError) as info,
    ):
        factory.create(name="badsans")
    text = str(info.value)
    assert re.match(r"the nested API server's certificate does not verify for "
                    r"https://127\.0\.0\.1:\d+", text), text  # fmt: skip
    names = re.search(r"names in the certificate: (.+)", text)
    assert names, text
    assert {"localhost", "0.0.0.0"} <= set(names.group(1).split(", "))
    assert "127.0.0.1" not in names.group(1).split(", ")
    assert "address used: 127.0.0.1" in text
    failed = [line for line in lines if "kubeconfig + readiness failed after" in line]
    assert failed, lines
    seconds = float(re.findall(r"failed after (\d+\.\d+)s", failed[0])[0])
    assert seconds < 10
    assert leftovers() == []


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A real local registry (Debian's docker-registry) on 127.0.0.1; yields its address."""
    binary = shutil.which("docker-registry")
    if binary is None:
        message = "docker-registry is not installed (apt-get install docker-registry)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {message}", pytrace=False)
        pytest.skip(message)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "registry.yml"
    config.write_text(
        "version: 0.1\nlog: {level: error}\n"
        f"storage: {{filesystem: {{rootdirectory: {tmp_path / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    proc = subprocess.Popen([binary, "serve", str(config)], stderr=subprocess.DEVNULL)

    def answers() -> None:
        if proc.poll() is not None:
            raise AssertionError(f"docker-registry exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError as exc:
            raise NotYet(str(exc)) from None

    try:
        wait_until(answers, what="the registry", timeout=30, hint="see docker-registry")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_digest_pinned_node_image_works_offline(
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    registry: str,
    leftovers: Leftovers,
) -> None:
    repository = f"{registry}/kipik-test/node"
    node = docker_client.images.get(test_images[1])
    node.tag(repository, "dev")
    try:
        for event in docker_client.images.push(repository, "dev", stream=True, decode=True):
            assert "error" not in event, event
        digests = [d for d in docker_client.images.get(f"{repository}:dev").attrs["RepoDigests"]
                   if d.startswith(repository)]  # fmt: skip
        assert digests, "the push gave no repository digest"
        digest = digests[0].split("@", 1)[1]
        pinned = f"{repository}:dev@{digest}"
        # the registry is unreachable from the DinD anyway (its loopback); now it is gone too
        assert docker_client.images.get(pinned).id == node.id
        config = KipikConfig(image=test_images[0], node_image=pinned, timeout=180)
        lines: list[str] = []
        with ClusterFactory(config, report=lines.append) as factory:
            cluster = factory.create(name="pinned")
            assert cluster.core_v1.read_namespaced_service_account("default", "default")
            kind_ps = cluster.host.exec(
                ["docker", "ps", "--format", "{{.Image}}"], timeout=30
            ).check()
            assert kind_ps.stdout.split() == [f"{repository}:dev"]
        assert any(f"node image {pinned} in (" in line for line in lines), lines
        assert not any("kind will pull it" in line for line in lines), lines
    finally:
        refs = docker_client.images.get(str(node.id)).attrs["RepoDigests"]
        for ref in [f"{repository}:dev", *refs]:
            if ref.startswith(repository):
                with contextlib.suppress(docker.errors.ImageNotFound):  # went with the last tag
                    docker_client.images.remove(ref)
    assert leftovers() == []


def test_kind_config_fields_kipik_does_not_read_reach_kind(
    test_images: tuple[str, str], tmp_path: Path, leftovers: Leftovers
) -> None:
    kind_config = tmp_path / "kind.yaml"
    kind_config.write_text(
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n"
        "nodes:\n- role: control-plane\n  labels: {kipik-test/passthrough: 'yes'}\n"
    )
    with ClusterFactory(_config(test_images), report=lambda line: None) as factory:
        cluster = factory.create(name="passthrough", kind_config=kind_config)
        (node,) = cluster.core_v1.list_node().items
        labels: Any = node.metadata.labels  # type: ignore[union-attr]
        assert labels["kipik-test/passthrough"] == "yes"
    assert leftovers() == []


def test_kept_cluster_survives_basetemp_pruning(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    dind, node = test_images
    env = {
        **os.environ,
        "PYTEST_DEBUG_TEMPROOT": str(pytester.path / "temproot"),
        "XDG_STATE_HOME": str(pytester.path / "state"),
    }
    (pytester.path / "temproot").mkdir()
    outputs = []
    try:
        for _ in range(4):
            done = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--kipik-image={dind}",
                 f"--kipik-node-image={node}", "--kipik-keep"],
                cwd=pytester.path, env=env, capture_output=True, text=True, timeout=300,
                check=False,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            outputs.append(done.stdout)
        first = outputs[0]
        basetemps = sorted((pytester.path / "temproot").glob("pytest-of-*/pytest-[0-9]*"))
        assert [p.name for p in basetemps] == ["pytest-1", "pytest-2", "pytest-3"]  # 0 pruned
        with kept_cluster(first, lambda: []) as kubeconfig:
            assert str(kubeconfig).startswith(str(pytester.path / "state" / "pytest-kipik"))
            assert_kubectl_sees_a_ready_node(kubeconfig)
        assert not kubeconfig.parent.exists()
    finally:
        for out in outputs:  # whatever a failed assertion above left
            removal = re.search(r"remove it: (.+)", out)
            if removal:
                subprocess.run(["bash", "-c", removal.group(1)], check=False, timeout=120)
    assert leftovers() == []
