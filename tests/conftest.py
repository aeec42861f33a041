"""Shared test setup: the Docker requirement, the test images, and leak checks.

Tests marked ``docker`` need a real Docker engine. Without one they skip and say why, except
under ``CI=true``, where they fail: CI sets the engine up itself, so a missing engine is a bug.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from pytest_kipik import NestedCluster
from pytest_kipik.hosts.engine import owned_resources
from pytest_kipik.waiting import NotYet, wait_until

#: The real-kind tier's images: a DinD image with a real kind, and a real kind node image.
#: ``bash tests/run.sh`` sets both when ``../shared/realkind`` is beside the checkout.
DIND_IMAGE = os.environ.get("KIPIK_E2E_IMAGE") or "kipik-test/dind:dev"
NODE_IMAGE = os.environ.get("KIPIK_E2E_NODE_IMAGE") or "kipik.local/kind-node:v1.22.3"
APP_IMAGE = "kipik-test/app:dev"
#: Snapshots (on by default) are tested in tests/e2e/test_docker_snapshots.py; everywhere else a
#: test's cluster is created, so that it leaves no 1.7 GB snapshot behind (those tests and the
#: pytest sessions they start inherit this).
os.environ["KIPIK_SNAPSHOTS"] = "no"
#: The test app behind a NodePort Service, as the toolkit tests apply it.
WEB = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: web
        image: kipik-test/app:dev
        imagePullPolicy: IfNotPresent
        ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
"""
BUILD_HINT = (
    "bash tests/run.sh builds them (with ../shared/realkind beside the checkout), or name your "
    "own with KIPIK_E2E_IMAGE (a DinD image with a real kind) and KIPIK_E2E_NODE_IMAGE"
)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of the real Docker engine (skip without one, fail under CI=true)."""
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except docker.errors.DockerException as exc:
        _unavailable(f"no Docker engine answers: {exc}")
    yield client
    client.close()


@pytest.fixture(scope="session")
def test_images(docker_client: docker.DockerClient) -> tuple[str, str]:
    """The DinD image with a real kind and the real node image (skip without them, not in CI)."""
    for image in (DIND_IMAGE, NODE_IMAGE):
        try:
            docker_client.images.get(image)
        except docker.errors.ImageNotFound:
            _unavailable(f"the test image {image} is missing; {BUILD_HINT}")
    return DIND_IMAGE, NODE_IMAGE


@pytest.fixture
def built_image(docker_client: docker.DockerClient) -> Iterator[tuple[str, str]]:
    """An image built now on this engine (from the test app image): its tag and the token in it.

    The token is in ``/token``; the image is removed after the test.
    """
    try:
        docker_client.images.get(APP_IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"the test image {APP_IMAGE} is missing; {BUILD_HINT}")
    token = secrets.token_hex(8)
    tag = f"kipik-test/built:{token}"
    recipe = f"FROM {APP_IMAGE}\nRUN echo {token} > /token\n"
    docker_client.images.build(fileobj=io.BytesIO(recipe.encode()), tag=tag, rm=True)
    yield tag, token
    docker_client.images.remove(tag, force=True)


def http_get(port: int, timeout: float) -> bytes:
    """The body of ``GET /`` at ``127.0.0.1:port`` (e.g. a port-forward's local end)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=timeout) as answer:
        body: bytes = answer.read()
        return body


def output_of_a_pod(cluster: NestedCluster, image: str, command: list[str]) -> str:
    """Run ``command`` in a pod of ``image`` in the nested cluster; its log once it succeeded."""
    name = f"run-{secrets.token_hex(3)}"
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "run", "image": image, "command": command}],
        },
    }
    cluster.apply(pod, namespace="default")
    cluster.wait_for(
        "Pod", name, "default", lambda p: p.get("status", {}).get("phase") == "Succeeded", 120
    )
    log: str = cluster.core_v1.read_namespaced_pod_log(name, "default")
    cluster.delete(pod, namespace="default")
    return log


def owned(client: docker.DockerClient) -> list[str]:
    """Names of every container and volume kipik created (kept ones included)."""
    return sorted(str(resource) for resource in owned_resources(client))


#: Lists what kipik made since the test started that is still there.
Leftovers = Callable[[], list[str]]


@contextmanager
def kept_cluster(output: str, leftovers: Leftovers) -> Iterator[Path]:
    """Read what ``--kipik-keep`` printed; yield the kubeconfig, then run the printed removal.

    Afterwards nothing kipik made may remain.
    """
    use = re.search(r"use it:\s+kubectl --kubeconfig (\S+) get nodes", output)
    remove = re.search(r"remove it: (.+)", output)
    assert use, output
    assert remove, output
    try:
        yield Path(use.group(1))
    finally:
        subprocess.run(["bash", "-c", remove.group(1)], check=True, timeout=120)
    assert leftovers() == []


def assert_kubectl_sees_a_ready_node(kubeconfig: Path) -> None:
    """``kubectl get nodes`` with this kubeconfig lists a Ready control-plane node."""
    nodes = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), "get", "nodes", "--no-headers"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert re.search(r"-control-plane\s+Ready\s", nodes.stdout), nodes.stdout


@pytest.fixture
def leftovers(docker_client: docker.DockerClient) -> Iterator[Leftovers]:
    """What kipik made during this test and is still there; must be nothing at its end.

    Counted against what existed before the test, so kept clusters of other runs do not count.
    """
    before = set(owned(docker_client))

    def new() -> list[str]:
        return sorted(set(owned(docker_client)) - before)

    yield new
    assert not new(), f"the test left these behind: {new()}"


@pytest.fixture(autouse=True)
def _docker_marker(request: pytest.FixtureRequest) -> None:
    """Every ``docker`` test needs the engine and checks that it leaks nothing."""
    if request.node.get_closest_marker("docker"):
        request.getfixturevalue("leftovers")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real local registry (Debian's docker-registry) on 127.0.0.1; yields its address."""
    binary = shutil.which("docker-registry")
    if binary is None:
        _unavailable("docker-registry is not installed (apt-get install docker-registry)")
    assert binary is not None
    data = tmp_path_factory.mktemp("registry")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = data / "registry.yml"
    config.write_text(
        "version: 0.1\nlog: {level: error, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {data / 'data'}}}}}\n"
        f"http: {{addr: 127.0.0.1:{port}}}\n"
    )
    proc = subprocess.Popen(
        [binary, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

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


#: Wall time of each test tier in this run (setup, call and teardown of its tests).
_TIER_SECONDS: dict[str, float] = {}


def _tier(nodeid: str) -> str:
    parts = nodeid.split("/")
    if len(parts) > 2 and parts[1] == "e2e":
        return "e2e pod" if "test_pod" in parts[2] else "e2e docker"
    return parts[1] if len(parts) > 2 else parts[0]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add each phase's duration to its tier."""
    tier = _tier(report.nodeid)
    _TIER_SECONDS[tier] = _TIER_SECONDS.get(tier, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line with the time each tier took (for CI logs and the closing note)."""
    if _TIER_SECONDS:
        shown = ", ".join(f"{tier} {seconds:.0f}s" for tier, seconds in _TIER_SECONDS.items())
        terminalreporter.write_line(f"time per tier: {shown}")


#: What kipik (and kind, for the tests' outer clusters) had on the engine when the run started.
_ENGINE_BEFORE: set[str] | None = None
_KIND_CLUSTER = "io.x-k8s.kind.cluster"


def _engine_resources() -> set[str] | None:
    """The engine's kipik containers and volumes and kind node containers (None: no engine)."""
    try:
        client = docker.from_env(timeout=30)
        try:
            kind_nodes = client.api.containers(all=True, filters={"label": _KIND_CLUSTER})
            found = {str(r) for r in owned_resources(client)} | {
                f"kind node {str(c['Names'][0]).lstrip('/')}" for c in kind_nodes
            }
        finally:
            client.close()
    except docker.errors.DockerException:
        return None
    return found


def pytest_sessionstart(session: pytest.Session) -> None:
    """Note what is on the engine before any test ran (only where tests use the engine)."""
    global _ENGINE_BEFORE  # noqa: PLW0603 (one run, one process)
    if not hasattr(session.config, "workerinput"):
        _ENGINE_BEFORE = _engine_resources()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """The run fails if it left anything on the engine: kipik's resources or an outer cluster."""
    if _ENGINE_BEFORE is None or hasattr(session.config, "workerinput"):
        return
    after = _engine_resources()
    left = sorted((after or set()) - _ENGINE_BEFORE)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        shown = ", ".join(left) if left else "nothing labelled kipik.io/, no kind node"
        if getattr(getattr(reporter, "_tw", None), "width_of_current_line", 0):
            reporter.write("\n")  # after the progress dots
        reporter.write_line(f"left on the Docker engine by this run: {shown}")
    if left:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
