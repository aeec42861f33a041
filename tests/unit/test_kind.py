from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_kipik.errors import CommandTimeout, ConfigError, KindError
from pytest_kipik.kind import config as kind
from pytest_kipik.kind.driver import (
    ClusterPaths,
    KindDriver,
    create_argv,
    delete_argv,
    get_clusters_argv,
    get_kubeconfig_argv,
)

HEADER = "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n"


def test_build_config_without_user_config() -> None:
    config = kind.build_config(None, name="demo", cert_sans=["127.0.0.1"])
    assert config == {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "name": "demo",
        "networking": {"apiServerAddress": "0.0.0.0", "apiServerPort": 6443},
        "kubeadmConfigPatches": [
            "kind: KubeletConfiguration\nkubeAPIQPS: 50\nkubeAPIBurst: 100\n",
            "kind: ClusterConfiguration\n"
            "apiServer:\n"
            "  certSANs:\n"
            "  - localhost\n"
            "  - 0.0.0.0\n"
            "  - 127.0.0.1\n",
        ],
    }


def test_build_config_keeps_users_nodes_patches_and_networking() -> None:
    user: dict[str, Any] = {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
        "name": "theirs",
        "nodes": [{"role": "control-plane"}, {"role": "worker", "labels": {"a": "b"}}],
        "networking": {
            "podSubnet": "10.250.0.0/16",
            "apiServerAddress": "127.0.0.1",
            "apiServerPort": 1234,
        },
        "featureGates": {"Foo": True},
        "kubeadmConfigPatches": [
            "kind: ClusterConfiguration\napiServer:\n  certSANs: [my.example]\n",
            "kind: InitConfiguration\nnodeRegistration:\n  kubeletExtraArgs: {v: '4'}\n",
        ],
    }
    before = yaml.safe_dump(user)
    config = kind.build_config(user, name="demo", cert_sans=["127.0.0.1"])
    assert yaml.safe_dump(user) == before  # the caller's mapping is not modified
    assert config["name"] == "demo"
    assert config["nodes"] == user["nodes"]
    assert config["featureGates"] == {"Foo": True}
    assert config["networking"] == {
        "podSubnet": "10.250.0.0/16",
        "apiServerAddress": "0.0.0.0",
        "apiServerPort": 6443,
    }
    # the kubelets' API budget first (the user's patches may change it), the user's, the SANs
    assert config["kubeadmConfigPatches"][1:3] == user["kubeadmConfigPatches"]
    assert yaml.safe_load(config["kubeadmConfigPatches"][0]) == {
        "kind": "KubeletConfiguration", "kubeAPIQPS": 50, "kubeAPIBurst": 100}  # fmt: skip
    last = yaml.safe_load(config["kubeadmConfigPatches"][3])
    # a merge patch replaces lists, so the user's SANs must be carried into the last patch
    assert last == {
        "kind": "ClusterConfiguration",
        "apiServer": {"certSANs": ["my.example", "localhost", "0.0.0.0", "127.0.0.1"]},
    }


def test_build_config_nodes_count() -> None:
    config = kind.build_config(None, name="demo", cert_sans=[], nodes=3)
    assert config["nodes"] == [{"role": "control-plane"}, {"role": "worker"}, {"role": "worker"}]
    assert kind.node_count(config) == 3
    assert kind.node_count(kind.build_config(None, name="x", cert_sans=[])) == 1


def test_build_config_rejects_nodes_twice_and_zero() -> None:
    user = {"nodes": [{"role": "control-plane"}]}
    with pytest.raises(ConfigError, match=r"either nodes=\.\.\. or a kind config with nodes"):
        kind.build_config(user, name="demo", cert_sans=[], nodes=2)
    with pytest.raises(ConfigError, match="at least 1, got 0"):
        kind.build_config(None, name="demo", cert_sans=[], nodes=0)


def test_argv_builders() -> None:
    assert create_argv(
        "demo",
        config_path="/kipik/demo/kind-config.yaml",
        kubeconfig_path="/kipik/demo/kubeconfig",
        image="kindest/node:v1.31.0",
        retain=False,
    ) == [
        "kind", "create", "cluster", "--name", "demo",
        "--config", "/kipik/demo/kind-config.yaml",
        "--image", "kindest/node:v1.31.0",
        "--kubeconfig", "/kipik/demo/kubeconfig",
    ]  # fmt: skip
    assert create_argv("demo", config_path="c", kubeconfig_path="k", image=None, retain=False) == [
        "kind",
        "create",
        "cluster",
        "--name",
        "demo",
        "--config",
        "c",
        "--kubeconfig",
        "k",
    ]
    assert create_argv(
        "demo", config_path="c", kubeconfig_path="k", image=None, retain=True
    ) == ["kind", "create", "cluster", "--name", "demo", "--config", "c", "--kubeconfig", "k",
          "--retain"]  # fmt: skip
    assert get_kubeconfig_argv("demo") == ["kind", "get", "kubeconfig", "--name", "demo"]
    assert get_clusters_argv() == ["kind", "get", "clusters"]
    assert delete_argv("demo") == [
        "kind", "delete", "cluster", "--name", "demo", "--kubeconfig", "/kipik/demo/kubeconfig"
    ]  # fmt: skip
    assert ClusterPaths.for_cluster("demo") == ClusterPaths(
        config="/kipik/demo/kind-config.yaml", kubeconfig="/kipik/demo/kubeconfig"
    )


def test_validate_accepts_a_full_config() -> None:
    text = HEADER + (
        "name: x\n"
        "nodes:\n"
        "- role: control-plane\n"
        "  extraPortMappings:\n"
        "  - {containerPort: 80, hostPort: 8080, listenAddress: 127.0.0.1, protocol: TCP}\n"
        "  extraMounts: [{hostPath: /tmp, containerPath: /data, readOnly: true}]\n"
        "- role: worker\n"
        "  labels: {tier: db}\n"
        "networking: {podSubnet: 10.1.0.0/16, disableDefaultCNI: true, kubeProxyMode: ipvs}\n"
        "featureGates: {Foo: true}\n"
        "kubeadmConfigPatches:\n"
        "- |\n"
        "  kind: ClusterConfiguration\n"
    )
    data = kind.validate_user_config(text)
    assert data["nodes"][1] == {"role": "worker", "labels": {"tier": "db"}}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("nodes: [", "not valid YAML: "),
        ("- a\n- b\n", "expected a kind Cluster mapping with kind and apiVersion"),
        ("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha3\n",
         "line 2: apiVersion must be 'kind.x-k8s.io/v1alpha4' (the one kind supports), "
         "found 'kind.x-k8s.io/v1alpha3'"),
        ("kind: Config\napiVersion: kind.x-k8s.io/v1alpha4\n",
         "line 1: kind must be 'Cluster', found 'Config'"),
        (HEADER + "networking:\n  apiServerPort: '1'\n",
         "line 4: networking.apiServerPort must be a number, found '1'"),
        (HEADER + "networking:\n  podSubnet: 10\n",
         "line 4: networking.podSubnet must be a string, found 10"),
        (HEADER + "networking: []\n", "line 3: networking must be a mapping"),
        (HEADER + "nodes:\n- role: worker\n  image: [x]\n",
         "line 4: nodes[0].image must be a string"),
        (HEADER + "nodes:\n- role: boss\n", "line 4: nodes[0].role is 'boss': use one of"),
        (HEADER + "nodes:\n- role: worker\n",
         "nodes needs at least one node with role control-plane"),
        (HEADER + "nodes: {role: worker}\n", "line 3: nodes must be a list"),
        (HEADER + "kubeadmConfigPatches:\n- 'a: [b'\n",
         "line 4: kubeadmConfigPatches[0] is not valid YAML"),
    ],
)  # fmt: skip
def test_validate_rejects_like_kind(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        kind.validate_user_config(body)
    assert str(info.value).startswith(message)


def test_load_user_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kind.yaml"
    path.write_text(HEADER + "nodes: {}\n")
    with pytest.raises(ConfigError) as info:
        kind.load_user_config(path)
    assert str(info.value) == f"kind config file {path}: line 3: nodes must be a list"


def test_fields_kipik_does_not_read_pass_through_with_unknown_ones_named() -> None:
    text = HEADER + (
        "nodes:\n- role: control-plane\n  extraMounts: [{hostPath: /a, containerPath: /b}]\n"
        "  someNewNodeField: true\n"
        "containerdConfigPatches: ['x']\nfutureTopLevel: {a: 1}\n"
    )
    user = kind.validate_user_config(text)
    assert kind.unknown_fields(user) == ["futureTopLevel"]
    config = kind.build_config(user, name="demo", cert_sans=[])
    assert config["futureTopLevel"] == {"a": 1}
    assert config["nodes"][0]["someNewNodeField"] is True
    assert config["nodes"][0]["extraMounts"] == [{"hostPath": "/a", "containerPath": "/b"}]


def test_build_config_sets_subnets_only_where_the_user_set_none() -> None:
    user = kind.validate_user_config(HEADER + "networking:\n  podSubnet: 10.250.0.0/16\n")
    config = kind.build_config(
        user, name="d", cert_sans=[], pod_subnet="100.96.0.0/16", service_subnet="100.97.0.0/16"
    )
    assert config["networking"]["podSubnet"] == "10.250.0.0/16"
    assert config["networking"]["serviceSubnet"] == "100.97.0.0/16"
    assert kind.subnets(user, "100.96.0.0/16", "100.97.0.0/16") == {
        "podSubnet": "10.250.0.0/16",
        "serviceSubnet": "100.97.0.0/16",
    }
    ipv6 = kind.validate_user_config(HEADER + "networking:\n  ipFamily: ipv6\n")
    config = kind.build_config(ipv6, name="d", cert_sans=[], pod_subnet="100.96.0.0/16")
    assert "podSubnet" not in config["networking"]


def test_build_config_names_loaded_images_as_the_inner_daemon_knows_them() -> None:
    pinned = "kindest/node:v1.31.0@sha256:" + "a" * 64
    user = kind.validate_user_config(
        HEADER + f"nodes:\n- role: control-plane\n  image: {pinned}\n- role: worker\n"
        "  image: other:1\n"
    )
    assert kind.node_images(user, None) == [pinned, "other:1"]
    assert kind.node_images(user, "given:2") == ["given:2"]
    config = kind.build_config(
        user, name="d", cert_sans=[], images={pinned: "kindest/node:v1.31.0"}
    )
    assert [n["image"] for n in config["nodes"]] == ["kindest/node:v1.31.0", "other:1"]
    assert user["nodes"][0]["image"] == pinned  # the caller's config is not modified


@pytest.mark.parametrize(
    ("subnets", "addresses", "problem"),
    [
        ({"podSubnet": "10.244.0.0/16"}, {"this pod's IP": "10.244.3.7"},
         "the nested cluster's podSubnet 10.244.0.0/16 contains 10.244.3.7 (this pod's IP)"),
        ({"serviceSubnet": "10.96.0.0/12"}, {"the outer API service": "10.96.0.1"},
         "the nested cluster's serviceSubnet 10.96.0.0/12 contains 10.96.0.1"),
        ({"podSubnet": "100.96.0.0/16"}, {"a": "10.244.0.5", "b": "kubernetes.default"}, None),
    ],
)  # fmt: skip
def test_check_no_overlap(
    subnets: dict[str, str], addresses: dict[str, str], problem: str | None
) -> None:
    if problem is None:
        kind.check_no_overlap(subnets, addresses)
        return
    with pytest.raises(ConfigError) as info:
        kind.check_no_overlap(subnets, addresses)
    assert str(info.value).startswith(problem)
    assert "--kipik-pod-subnet" in str(info.value)


class _TimingOutHost:
    """Just enough of a Host for KindDriver: kind's exec runs out of time."""

    name = "h"

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        self.files[path] = data

    def exec(self, argv: list[str], *, timeout: float, on_output: object = None) -> object:
        raise CommandTimeout(
            argv, timeout, "", "Creating cluster \"demo\" ...\n ✓ Ensuring node image\n",
            where=["docker", "exec", "h"],
        )  # fmt: skip

    def daemon_log(self, lines: int = 50) -> str:
        return 'level=info msg="inner daemon line"'


def test_kind_create_timeout_reports_kinds_partial_output_and_the_daemon_log() -> None:
    host = _TimingOutHost()
    config = kind.build_config(None, name="demo", cert_sans=[])
    with pytest.raises(KindError) as info:
        KindDriver(host).create(config, image=None, timeout=7, retain=False)  # type: ignore[arg-type]
    text = str(info.value)
    assert text.startswith("kind failed to create cluster 'demo' (did not finish within 7s): ")
    assert "✓ Ensuring node image" in text
    assert "inner daemon line" in text
    assert yaml.safe_load(host.files["/kipik/demo/kind-config.yaml"])["name"] == "demo"
