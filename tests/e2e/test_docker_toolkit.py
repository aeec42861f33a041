"""The toolkit on real kind (docker backend): images, manifests, port-forwards, DNS, connected.

One cluster serves the module (a digest-pinned node image from a local registry and a kind config
with a field kipik does not read); connected clusters and a certificate that does not cover the
address get their own. kind v0.32.0 and Kubernetes v1.22.3 are real (../shared/realkind).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
import yaml

from pytest_kipik import ClusterFactory, KipikConfig, KipikError, NestedCluster, WaitTimeout
from pytest_kipik.errors import ClusterUnusableError
from pytest_kipik.hosts.docker import DockerBackend, DockerHost
from tests.conftest import APP_IMAGE, WEB, Leftovers, http_get, output_of_a_pod

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
#: Generous: real clusters on a busy 2-core machine.
TIMEOUT = 900


def _config(test_images: tuple[str, str], **extra: Any) -> KipikConfig:
    dind, node = test_images
    return KipikConfig(
        image=dind, node_image=node, timeout=TIMEOUT, snapshots=False, **extra
    )  # created: snapshots are tested in test_docker_snapshots.py


@pytest.fixture(scope="module")
def app_image(docker_client: docker.DockerClient) -> str:
    try:
        docker_client.images.get(APP_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{APP_IMAGE} is missing: python3 tests/images/build.py", pytrace=False)
    return APP_IMAGE


@pytest.fixture(scope="module")
def factory(test_images: tuple[str, str]) -> Iterator[ClusterFactory]:
    with ClusterFactory(_config(test_images)) as made:
        yield made


@pytest.fixture(scope="module")
def pinned_node_image(
    test_images: tuple[str, str], docker_client: docker.DockerClient, registry: str
) -> Iterator[str]:
    """The real node image as ``REGISTRY/kipik-test/node:dev@sha256:...`` (pushed, then offline).

    The registry listens on this machine's loopback, which the DinD cannot reach: the image must
    come from the local engine by its digest.
    """
    repository = f"{registry}/kipik-test/node"
    node = docker_client.images.get(test_images[1])
    node.tag(repository, "dev")
    try:
        for event in docker_client.images.push(repository, "dev", stream=True, decode=True):
            assert "error" not in event, event
        digests = [d for d in docker_client.images.get(f"{repository}:dev").attrs["RepoDigests"]
                   if d.startswith(repository)]  # fmt: skip
        assert digests, "the push gave no repository digest"
        pinned = f"{repository}:dev@{digests[0].split('@', 1)[1]}"
        assert docker_client.images.get(pinned).id == node.id
        yield pinned
    finally:
        refs = docker_client.images.get(str(node.id)).attrs["RepoDigests"]
        for ref in [f"{repository}:dev", *refs]:
            if ref.startswith(repository):
                with contextlib.suppress(docker.errors.ImageNotFound):  # went with the last tag
                    docker_client.images.remove(ref)


@pytest.fixture(scope="module")
def cluster(
    factory: ClusterFactory, pinned_node_image: str, tmp_path_factory: pytest.TempPathFactory
) -> NestedCluster:
    kind_config = tmp_path_factory.mktemp("kind") / "kind.yaml"
    kind_config.write_text(
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n"
        "nodes:\n- role: control-plane\n  labels: {kipik-test/passthrough: 'yes'}\n"
    )
    return factory.create(name="toolkit", node_image=pinned_node_image, kind_config=kind_config)


@pytest.fixture(scope="module")
def web(cluster: NestedCluster, app_image: str) -> NestedCluster:
    """``cluster`` with the web Deployment available and its Service."""
    cluster.load_image(app_image)
    cluster.apply(WEB)
    cluster.wait_for("Deployment", "web", condition="Available", timeout=180)
    return cluster


def test_a_digest_pinned_node_image_and_a_kind_config_field_kipik_does_not_read(
    cluster: NestedCluster, pinned_node_image: str
) -> None:
    repository = pinned_node_image.split("@", 1)[0]
    kind_ps = cluster.host.exec(["docker", "ps", "--format", "{{.Image}}"], timeout=30).check()
    assert kind_ps.stdout.split() == [repository]  # kind ran the node from the pinned image
    (node,) = cluster.core_v1.list_node().items
    labels: Any = node.metadata.labels  # type: ignore[union-attr]
    assert labels["kipik-test/passthrough"] == "yes"
    assert node.status.node_info.kubelet_version == "v1.22.3"  # type: ignore[union-attr]
    # a digest-pinned image's tag ("dev") says no version: no Docker answer, no --docker flag
    unit = cluster.host.exec(
        ["docker", "exec", f"{cluster.name}-control-plane", "systemctl", "cat",
         "kipik-cadvisor-docker.socket"], timeout=60,
    )  # fmt: skip
    assert unit.exit_code != 0, unit
    assert cluster.server.startswith("https://127.0.0.1:")


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
    web: NestedCluster, caplog: pytest.LogCaptureFixture
) -> None:
    cluster = web
    caplog.set_level(logging.WARNING, logger="urllib3")
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

        cluster.wait_for("Deployment", "web", condition=replaced, timeout=180)
        assert http_get(forward.local_port, 20) == b"kipik app\n"
        assert forward.connections == 21
    # the client's connection pool holds what the forward opens at once (it used to discard
    # connections with "Connection pool is full" warnings)
    assert [r.getMessage() for r in caplog.records if "pool" in r.getMessage()] == []


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
    broken["spec"]["template"]["spec"]["containers"][0]["image"] = (
        "127.0.0.1:9/kipik-test/not-loaded:1"
    )
    cluster.apply(broken, namespace="default")
    with pytest.raises(WaitTimeout) as caught:
        cluster.wait_for("Deployment", "never", condition="Available", timeout=3)
    text = str(caught.value)
    assert "waiting for Deployment default/never to be Available" in text
    assert "last state seen:" in text
    assert "status:" in text
    assert (
        "127.0.0.1:9/kipik-test/not-loaded:1" not in text
    )  # a condition type is judged on the status

    def three_replicas(obj: dict[str, Any]) -> bool:
        return bool(obj["spec"]["replicas"] == 3)

    with pytest.raises(WaitTimeout) as judged:
        cluster.wait_for("Deployment", "never", condition=three_replicas, timeout=3)
    text = str(judged.value)
    assert "waiting for Deployment default/never to satisfy three_replicas" in text
    # a function may judge any field: the timeout shows the whole object it judged
    assert "replicas: 1" in text
    assert "image: 127.0.0.1:9/kipik-test/not-loaded:1" in text
    assert "managedFields" not in text
    cluster.delete(broken, namespace="default")


def test_pods_resolve_services_by_name(web: NestedCluster) -> None:
    service: Any = web.core_v1.read_namespaced_service("web", "default")
    address = str(service.spec.cluster_ip)
    answer = output_of_a_pod(web, APP_IMAGE, ["nslookup", "web.default.svc.cluster.local"])
    assert address in answer, answer


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
    east.wait_for("Deployment", "web", condition="Available", timeout=180)
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
    # cluster: the NodePort is asked until it answers; then east's API server must verify
    # against east's CA by its internal name (the node image has curl, not python)
    probe = (
        f"curl -sS --retry 30 --retry-delay 1 --retry-all-errors --max-time 10 "
        f"http://east-control-plane:{node_port}/ && "
        f"echo '{ca}' | base64 -d > /tmp/east-ca.crt && "
        "curl -sS --max-time 10 --cacert /tmp/east-ca.crt -o /dev/null "
        "-w 'verified %{http_code} %{ssl_verify_result}\\n' https://east-control-plane:6443/version"
    )
    result = west.host.exec(
        ["docker", "exec", "west-control-plane", "sh", "-c", probe], timeout=120
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == ["kipik app", "verified 200 0"], result.stdout


class _NoSansHost(DockerHost):
    """A DOUBLE of the docker host: it asks kind for no extra certificate names."""

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
    # at once: not after the readiness budget (the margin is for a busy machine)
    assert float(re.findall(r"failed after (\d+\.\d+)s", failed[0])[0]) < 60
    assert leftovers() == []
