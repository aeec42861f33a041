"""An example suite: what a project's own tests against a nested cluster look like.

Run it with ``pytest examples/ --kipik-image=... --kipik-node-image=...`` (see the README).
"""

import shutil
import uuid

import pytest
from kubernetes import client

from pytest_kipik import NestedCluster


def test_every_node_is_ready(nested_cluster: NestedCluster) -> None:
    nodes = nested_cluster.core_v1.list_node().items
    assert len(nodes) == 1
    for node in nodes:
        assert node.status is not None
        ready = [c for c in node.status.conditions or [] if c.type == "Ready"]
        assert [c.status for c in ready] == ["True"], node.metadata


def test_configmap_round_trip(nested_client: client.ApiClient) -> None:
    core = client.CoreV1Api(nested_client)
    name = f"example-{uuid.uuid4().hex[:6]}"
    body = client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={"greeting": "hi"})
    core.create_namespaced_config_map("default", body)
    try:
        assert core.read_namespaced_config_map(name, "default").data == {"greeting": "hi"}
    finally:
        core.delete_namespaced_config_map(name, "default")


def test_namespace_create_and_delete(nested_cluster: NestedCluster) -> None:
    core = nested_cluster.core_v1
    name = f"example-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        metadata = core.read_namespace(name).metadata
        assert metadata is not None
        assert metadata.name == name
    finally:
        core.delete_namespace(name)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_sees_the_same_cluster(nested_cluster: NestedCluster) -> None:
    result = nested_cluster.kubectl("get", "nodes", "-o", "name")
    # nodes are named after the kind cluster; one restored from a snapshot keeps the names of
    # the cluster that was saved (kind_name), whatever its own name
    assert result.stdout.strip() == f"node/{nested_cluster.kind_name}-control-plane"
