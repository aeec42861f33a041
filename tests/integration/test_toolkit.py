"""The toolkit against the real engine: images, manifests, port-forwards, connected clusters.

kind and its node image are the doubles from tests/doubles: the node double's kubelet runs pods
from the node's image store as real processes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml

from pytest_kipik import ClusterFactory, KipikError, NestedCluster, ReadinessTimeout
from pytest_kipik.config import resolve
from tests.conftest import APP_IMAGE, WEB, http_get, output_of_a_pod

pytestmark = pytest.mark.docker
EXAMPLES = Path(__file__).parents[2] / "examples"


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


@pytest.fixture(scope="module")
def web(cluster: NestedCluster, app_image: str) -> NestedCluster:
    """``cluster`` with the web Deployment available and its Service."""
    cluster.load_image(app_image)
    cluster.apply(WEB)
    cluster.wait_for("Deployment", "web", condition="Available", timeout=60)
    return cluster


def _pods(cluster: NestedCluster, selector: str) -> list[dict[str, Any]]:
    listed = cluster.core_v1.list_namespaced_pod("default", label_selector=selector)
    found: list[dict[str, Any]] = cluster.api_client.sanitize_for_serialization(listed)["items"]
    return found


def test_an_image_is_moved_once_and_a_pod_runs_from_it(
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

    applied = cluster.apply(WEB)
    assert [(o["kind"], o["metadata"]["name"]) for o in applied] == [
        ("Deployment", "web"),
        ("Service", "web"),
    ]
    deployment = cluster.wait_for("Deployment", "web", condition="Available", timeout=60)
    assert deployment["status"]["availableReplicas"] == 1


def test_an_image_built_during_the_test_runs_in_a_pod(
    cluster: NestedCluster, built_image: tuple[str, str]
) -> None:
    image, token = built_image
    [load] = cluster.load_image(image)
    assert load.moved
    assert output_of_a_pod(cluster, image, ["cat", "/token"]) == f"{token}\n"
    [again] = cluster.load_image(image)
    assert (again.moved, again.nodes) == (False, ())


def test_port_forward_to_a_service_serves_many_connections_and_outlives_its_pod(
    web: NestedCluster,
) -> None:
    cluster = web
    with cluster.port_forward("svc/web", 80) as forward:
        with ThreadPoolExecutor(20) as pool:  # 20 at once, one stream each
            bodies = list(pool.map(lambda _: http_get(forward.local_port, 20), range(20)))
        assert set(bodies) == {b"kipik app\n"}
        # the pod goes (its streams drop); the deployment makes another; new connections reach it
        pods = cluster.core_v1.list_namespaced_pod("default", label_selector="app=web").items
        old = str(pods[0].metadata.name)  # type: ignore[union-attr]
        cluster.core_v1.delete_namespaced_pod(old, "default")

        def replaced(obj: dict[str, Any]) -> bool:
            # the Deployment's status can still count the old pod: look at the pods themselves
            pods = _pods(cluster, "app=web")
            return old not in [p["metadata"]["name"] for p in pods] and any(
                c["type"] == "Ready" and c["status"] == "True"
                for p in pods
                for c in p.get("status", {}).get("conditions") or []
            )

        cluster.wait_for("Deployment", "web", condition=replaced, timeout=60)
        assert http_get(forward.local_port, 20) == b"kipik app\n"
        assert forward.connections == 21


def test_port_forward_errors_name_the_target(web: NestedCluster) -> None:
    cluster = web
    no_service = pytest.raises(KipikError, match="port-forward to svc/nope in default: HTTP 404")
    with no_service, cluster.port_forward("svc/nope", 80):
        pass
    no_port = pytest.raises(KipikError, match=r"service web has no port 443 \(its ports: 80\)")
    with no_port, cluster.port_forward("svc/web", 443):
        pass
    no_pod = pytest.raises(KipikError, match="port-forward to pod/nope in default: HTTP 404")
    with no_pod, cluster.port_forward("pod/nope", 80):
        pass
    with pytest.raises(KipikError, match="say pod/NAME, svc/NAME or deployment/NAME"):
        cluster.port_forward("job/x", 80).__enter__()


def test_a_crd_and_its_custom_resources_in_one_apply(
    cluster: NestedCluster, tmp_path: Path
) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer"}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w1"}}
    widget["spec"] = {"size": 3}
    settings = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "widget-settings"}}
    settings["data"] = {"size": "3"}
    # one multi-document file, the custom resource before its CRD: kipik orders the CRD first
    # and waits until it is established
    manifest = tmp_path / "widgets.yaml"
    manifest.write_text(yaml.safe_dump_all([widget, settings, crd]))
    applied = cluster.apply(manifest)
    assert [o["kind"] for o in applied] == ["CustomResourceDefinition", "Widget", "ConfigMap"]
    found = cluster.wait_for("widgets.example.com", "w1", timeout=10)
    assert found["spec"] == {"size": 3}
    stored = cluster.core_v1.read_namespaced_config_map("widget-settings", "default")
    assert stored.data == {"size": "3"}
    assert cluster.delete(manifest, wait=True) == [
        "ConfigMap default/widget-settings",
        "Widget default/w1",
        "CustomResourceDefinition widgets.example.com",
    ]
    with pytest.raises(KipikError, match="serves no resource 'Gadget'"):
        cluster.apply({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}})


def test_wait_for_says_what_it_saw_last(cluster: NestedCluster) -> None:
    broken = yaml.safe_load(WEB.split("---", maxsplit=1)[0])
    broken["metadata"]["name"] = "never"
    broken["spec"]["template"]["spec"]["containers"][0]["image"] = "kipik-test/not-loaded:1"
    cluster.apply(broken, namespace="default")
    with pytest.raises(ReadinessTimeout) as caught:
        cluster.wait_for("Deployment", "never", condition="Available", timeout=3)
    text = str(caught.value)
    assert "waiting for Deployment default/never to be Available" in text
    assert "last state seen:" in text
    assert "status:" in text


def test_connected_clusters_reach_each_others_api_and_node_ports(
    factory: ClusterFactory, app_image: str, docker_client: docker.DockerClient
) -> None:
    east, west = factory.create_connected(names=["east", "west"])
    try:
        _reach_each_other(east, west, app_image)
    finally:
        west.close()  # west first: its nodes go, east and the shared host stay
        names = east.host.exec(["docker", "ps", "--format", "{{.Names}}"], timeout=30)
        east.close()  # the last of them: the host goes
    assert names.stdout.split() == ["east-control-plane"]
    assert not docker_client.containers.list(all=True, filters={"name": "^east-dind$"})


def _reach_each_other(east: NestedCluster, west: NestedCluster, app_image: str) -> None:
    assert east.host is west.host
    east.load_image(app_image)
    east.apply(WEB)
    east.wait_for("Deployment", "web", condition="Available", timeout=60)
    service = east.api_client.sanitize_for_serialization(
        east.core_v1.read_namespaced_service("web", "default")
    )
    node_port = service["spec"]["ports"][0]["nodePort"]
    # from west's node: east's NodePort, and east's API server with east's internal kubeconfig
    internal = yaml.safe_load(east.internal_kubeconfig().read_text())
    server = internal["clusters"][0]["cluster"]["server"]
    assert server == "https://east-control-plane:6443"
    ca = internal["clusters"][0]["cluster"]["certificate-authority-data"]
    # kube-proxy follows the Service's endpoints a moment after the pod is ready, as on any
    # cluster: the NodePort is asked until it answers (30 s at most)
    probe = (
        "import base64, socket, ssl, sys, time, urllib.request\n"
        "deadline = time.monotonic() + 30\n"
        "while True:\n"
        "    try:\n"
        f"        answer = urllib.request.urlopen('http://east-control-plane:{node_port}/', "
        "timeout=10)\n"
        "        break\n"
        "    except OSError:\n"
        "        if time.monotonic() > deadline:\n"
        "            raise\n"
        "        time.sleep(0.5)\n"
        "print(answer.read().decode().strip())\n"
        f"ctx = ssl.create_default_context(cadata=base64.b64decode('{ca}').decode())\n"
        "with socket.create_connection(('east-control-plane', 6443), 10) as raw:\n"
        "    with ctx.wrap_socket(raw, server_hostname='east-control-plane') as tls:\n"
        "        print('verified', tls.version())\n"
    )
    result = west.host.exec(
        ["docker", "exec", "west-control-plane", "python3", "-c", probe], timeout=60
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0] == "kipik app"
    assert result.stdout.splitlines()[1].startswith("verified TLS")


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
NAMES = []

def test_one_node(nested_cluster):
    assert len(nested_cluster.core_v1.list_node().items) == 1

def test_a_namespace(nested_namespace):
    NAMES.append(nested_namespace.name)
    assert nested_namespace.name.startswith("test-a-namespace-")

def test_another_namespace(nested_namespace):
    NAMES.append(nested_namespace.name)
    assert nested_namespace.name.startswith("test-another-namespace-")

def test_both_namespaces_are_gone(nested_cluster):
    assert len(set(NAMES)) == 2
    for name in NAMES:
        nested_cluster.wait_for("Namespace", name, condition="deleted", timeout=60)
"""


def test_marker_namespace_report_and_logs_dir(
    pytester: pytest.Pytester, test_images: tuple[str, str], tmp_path: Path
) -> None:
    pytester.makepyfile(test_marked=MODULE_WITH_MARKER, test_plain=MODULE_WITHOUT_MARKER)
    # the README's deliberately failing example, collected here as a test module
    failing = (EXAMPLES / "failing_example.py").read_text()
    pytester.makepyfile(test_failing_example=failing)
    logs = tmp_path / "logs"
    dind, node = test_images
    result = pytester.runpytest_subprocess(
        f"--kipik-image={dind}",
        f"--kipik-node-image={node}",
        f"--kipik-logs-dir={logs}",
        f"--kipik-load-images={APP_IMAGE}",
    )
    result.assert_outcomes(passed=6, failed=1)
    out = result.stdout.str()
    made = sorted(set(re.findall(r"kipik (kipik-\w+(?:-\w+)?): kind create", out)))
    assert len(made) == 2, out  # one cluster per configuration, each made once
    # the failed test's report: its namespace's pods and warning events
    section = out[out.index("kipik: namespace test-a-pod-that-never-starts-") :]
    assert "pods not running or succeeded in namespace" in section
    assert "/lost  Pending" in section
    assert "recent warning events in namespace" in section
    assert "example.invalid/never-pushed:1" in section
    assert "ImagePullBackOff" in section or "ErrImagePull" in section
    # the crashing container's last lines
    assert "boom" in section
    assert "timed out after 5s waiting for Pod" in out
    # every cluster's logs, and where they are
    for name in made:
        assert f"kipik {name}: logs in {logs / name}" in out
        assert (logs / name / "dind-daemon.log").stat().st_size > 0
        assert list((logs / name).glob("*/kubelet.log")), sorted(logs.rglob("*"))
