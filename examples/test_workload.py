"""An example of the toolkit: a Service reached from the test, in a namespace of its own.

An image from this machine goes into the nested cluster, a Deployment and a Service run it,
and the test reaches the Service through a port-forward.

The app image is ``kipik-test/app:dev`` (``python3 tests/images/build.py``: busybox httpd on
8080); ``KIPIK_EXAMPLE_APP_IMAGE`` names another image that serves HTTP on 8080.
"""

import os
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import docker
import pytest

from pytest_kipik import NestedCluster, NestedNamespace

APP_IMAGE = os.environ.get("KIPIK_EXAMPLE_APP_IMAGE", "kipik-test/app:dev")


@pytest.fixture(scope="module")
def app_image(nested_cluster: NestedCluster) -> str:
    """The app image, loaded into every node of the session's cluster (moved once)."""
    try:
        engine = docker.from_env()
    except docker.errors.DockerException as exc:  # e.g. in a pod without an engine
        pytest.skip(f"no Docker engine here to take {APP_IMAGE} from: {exc}")
    try:
        engine.images.get(APP_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.skip(f"{APP_IMAGE} is not on this engine: python3 tests/images/build.py")
    finally:
        engine.close()
    nested_cluster.load_image(APP_IMAGE)
    return APP_IMAGE


def web(image: str) -> list[dict[str, object]]:
    labels = {"app": "web"}
    container = {
        "name": "web",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": 8080}],
    }
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": labels, "ports": [{"port": 80, "targetPort": "http"}]},
        },
    ]


def fetch(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as answer:
        return int(answer.status)


def test_a_service_answers_through_a_port_forward(
    nested_namespace: NestedNamespace, app_image: str
) -> None:
    nested_namespace.apply(web(app_image))
    nested_namespace.wait_for("Deployment", "web", condition="Available", timeout=120)
    with nested_namespace.port_forward("svc/web", 80) as forward, ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: fetch(forward.local_port), range(20)))
    assert statuses == [200] * 20
