"""The toolkit against the real engine: images, manifests, port-forwards, connected clusters.

kind and its node image are the doubles from tests/doubles: the node double's kubelet runs pods
from the node's image store as real processes.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from pytest_kipik import ClusterFactory, KipikError, NestedCluster
from pytest_kipik.config import resolve

pytestmark = pytest.mark.docker
APP_IMAGE = "kipik-test/app:dev"

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


def _config(test_images: tuple[str, str], tmp: Path) -> Any:
    dind, node = test_images
    return resolve({"image": dind, "node_image": node}, {}, {}, cwd=tmp, ini_dir=tmp)


@pytest.fixture(scope="module")
def app_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(APP_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{APP_IMAGE} is missing: python3 tests/images/build.py", pytrace=False)
    return APP_IMAGE


@pytest.fixture(scope="module")
def factory(
    test_images: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterFactory]:
    with ClusterFactory(_config(test_images, tmp_path_factory.mktemp("cfg"))) as made:
        yield made


@pytest.fixture(scope="module")
def cluster(factory: ClusterFactory) -> NestedCluster:
    return factory.create()


def _get(port: int) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=20) as answer:
        body: bytes = answer.read()
        return body


def _pods(cluster: NestedCluster, selector: str) -> list[dict[str, Any]]:
    listed = cluster.core_v1.list_namespaced_pod("default", label_selector=selector)
    found: list[dict[str, Any]] = cluster.api_client.sanitize_for_serialization(listed)["items"]
    return found


def test_an_image_is_moved_once(
    cluster: NestedCluster, app_image: str, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    first = cluster.load_image(app_image)
    assert [(load.reference, load.moved) for load in first] == [(app_image, True)]
    assert first[0].nodes == (f"{cluster.name}-control-plane",)
    again = cluster.load_image(app_image)
    assert [(load.moved, load.nodes) for load in again] == [(False, ())]
    # the same image as a docker save archive: the host has it by id, nothing moves
    archive = tmp_path / "app.tar"
    with archive.open("wb") as handle:
        for chunk in docker_client.images.get(app_image).save(named=True):
            handle.write(chunk)
    from_archive = cluster.load_image(archive)
    assert [(load.reference, load.moved, load.nodes) for load in from_archive] == [
        (app_image, False, ())
    ]
    local_id = docker_client.images.get(app_image).id
    inner = cluster.host.exec(
        ["docker", "image", "inspect", "-f", "{{.Id}}", app_image], timeout=30
    )
    assert inner.stdout.strip() == local_id


def test_port_forward_errors_name_the_target(cluster: NestedCluster) -> None:
    no_service = pytest.raises(KipikError, match="port-forward to svc/nope in default: HTTP 404")
    with no_service, cluster.port_forward("svc/nope", 80):
        pass
    no_pod = pytest.raises(KipikError, match="port-forward to pod/nope in default: HTTP 404")
    with no_pod, cluster.port_forward("pod/nope", 80):
        pass
    with pytest.raises(KipikError, match="say pod/NAME, svc/NAME or deployment/NAME"):
        cluster.port_forward("job/x", 80).__enter__()


def test_connected_clusters_reach_each_others_api_servers(
    factory: ClusterFactory, docker_client: docker.DockerClient
) -> None:
    east, west = factory.create_connected(names=["east", "west"])
    assert east.host is west.host
    # from west's node: east's API server, verified with east's internal kubeconfig
    internal = yaml.safe_load(east.internal_kubeconfig().read_text())
    server = internal["clusters"][0]["cluster"]["server"]
    assert server == "https://east-control-plane:6443"
    ca = internal["clusters"][0]["cluster"]["certificate-authority-data"]
    probe = (
        "import base64, socket, ssl, sys, urllib.request\n"
        f"ctx = ssl.create_default_context(cadata=base64.b64decode('{ca}').decode())\n"
        "with socket.create_connection(('east-control-plane', 6443), 10) as raw:\n"
        "    with ctx.wrap_socket(raw, server_hostname='east-control-plane') as tls:\n"
        "        print('verified', tls.version())\n"
    )
    result = west.host.exec(
        ["docker", "exec", "west-control-plane", "python3", "-c", probe], timeout=60
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("verified TLS")
    # west goes first: its nodes go, east and the shared host stay until east goes too
    west.close()
    assert east.core_v1.list_node().items
    names = east.host.exec(["docker", "ps", "--format", "{{.Names}}"], timeout=30).stdout.split()
    assert names == ["east-control-plane"]
    east.close()  # the last of them: the host goes
    assert not docker_client.containers.list(all=True, filters={"name": "^east-dind$"})


MODULE_WITH_MARKER = """
import pytest

pytestmark = pytest.mark.kipik(nodes=2)

def test_two_nodes(nested_cluster):
    assert len(nested_cluster.core_v1.list_node().items) == 2

def test_same_cluster_again(nested_cluster, request):
    assert request.node.name == "test_same_cluster_again[kipik-nodes2]"
    assert len(nested_cluster.core_v1.list_node().items) == 2
"""

MODULE_WITHOUT_MARKER = """
def test_one_node(nested_cluster):
    assert len(nested_cluster.core_v1.list_node().items) == 1

def test_namespace_failure_is_explained(nested_namespace):
    nested_namespace.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},
                            "data": {"ready": "no"}}, server_side=False)
    assert nested_namespace.name.startswith("test-namespace-failure-is-explained-")
    nested_namespace.wait_for("ConfigMap", "c", condition=lambda c: c["data"]["ready"] == "yes",
                              timeout=2)
"""


def test_marker_namespace_report_and_logs_dir(
    pytester: pytest.Pytester, test_images: tuple[str, str], tmp_path: Path
) -> None:
    pytester.makepyfile(test_marked=MODULE_WITH_MARKER, test_plain=MODULE_WITHOUT_MARKER)
    logs = tmp_path / "logs"
    dind, node = test_images
    result = pytester.runpytest_subprocess(
        f"--kipik-image={dind}", f"--kipik-node-image={node}", f"--kipik-logs-dir={logs}"
    )
    result.assert_outcomes(passed=3, failed=1)
    out = result.stdout.str()
    made = sorted(set(re.findall(r"kipik (kipik-\w+(?:-\w+)?): kind create", out)))
    assert len(made) == 2, out  # one cluster per configuration, each made once
    # the failed test's report: its namespace's pods and warning events
    section = out[out.index("kipik: namespace test-namespace-failure-is-explained-") :]
    # every collector answers: with what it found, or with why it could not read it
    assert re.search(
        r"pods not running or succeeded in namespace \S+:( could not be read| *\n)", section
    )
    assert re.search(r"recent warning events in namespace \S+:( could not be read| *\n)", section)
    assert "timed out after 2s waiting for ConfigMap" in out
    assert "last state seen:" in out
    # every cluster's logs, and where they are
    for name in made:
        assert f"kipik {name}: logs in {logs / name}" in out
        assert (logs / name / "dind-daemon.log").stat().st_size > 0
        assert list((logs / name).glob("*/kubelet.log")), sorted(logs.rglob("*"))
