"""Tests of the TEST DOUBLES of kind and of the kind node image (tests/doubles/).

The doubles must be as strict as real kind v0.32.0 where pytest-kipik can see them, so the texts
below are the ones recorded from real kind (tests/reference/) or read in kind v0.32.0's source
where no recording shows them. Pure parts (config decoding and validation, kubeadm config
rendering and kind's patch merging, image pulls, the fake API server's selectors and patches) are
unit tests; the rest runs the kind double on this machine against the real Docker engine with the
node image double (KIPIK_DOUBLES_NODE_IMAGE, else the kipik-test/node:dev test image) and cleans
up every container it makes.
"""

from __future__ import annotations

import base64
import http.client
import importlib.machinery
import importlib.util
import json
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parent / "reference"  # recordings of real kind v0.32.0
KIND = HERE / "kind" / "kind"
NODE = HERE / "node"
CGROUP_WARNING = (
    "cgroup v1 is deprecated in Kubernetes and will not be supported in a future kind release, "
    "please upgrade to cgroup v2"
)


def load_script(name: str, path: Path) -> ModuleType:
    """Import an executable script (no .py suffix) as a module."""
    loader = importlib.machinery.SourceFileLoader(name, str(path))
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


kind = load_script("kind_double", KIND)
sys.path.insert(0, str(NODE))
apiserver = load_script("apiserver_double", NODE / "apiserver.py")
kubeadm = load_script("kubeadm_double", NODE / "kubeadm")


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# unit tests: configuration


def config_error(text: str) -> str:
    with pytest.raises(kind.KindError) as info:
        kind.load_config(text)
    return str(info.value.message)


def test_yaml_syntax_error_is_reported_like_kind() -> None:
    text = (
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnetworking:\n"
        '  {apiServerAddress: "0.0.0.0"\nnodes:\n- role: control-plane\n'
    )
    assert config_error(text) == (
        "could not determine kind / apiVersion for config: yaml: line 3: did not find expected "
        "',' or '}'"
    )


def test_unknown_api_version_and_kind() -> None:
    assert config_error("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha3\n") == (
        "unknown apiVersion: kind.x-k8s.io/v1alpha3"
    )
    assert config_error("kind: Cluster\n") == "unknown apiVersion: "
    assert config_error("kind: Clustr\napiVersion: kind.x-k8s.io/v1alpha4\n") == (
        "unknown kind Clustr for apiVersion: kind.x-k8s.io/v1alpha4"
    )


def test_unknown_fields_are_rejected_at_every_level() -> None:
    text = (
        "kind: Cluster\n"
        "apiVersion: kind.x-k8s.io/v1alpha4\n"
        "nodez:\n"
        "- role: control-plane\n"
        "networking:\n"
        "  apiServerPort: abc\n"
        "  apiServerAdress: 0.0.0.0\n"
        "nodes:\n"
        "- role: worker\n"
        "  extraPortMappings:\n"
        "  - containerPort: 80\n"
        "    hostport: 8080\n"
        "  imag: x\n"
    )
    assert config_error(text) == (
        "unable to decode config: yaml: unmarshal errors:\n"
        "  line 3: field nodez not found in type v1alpha4.Cluster\n"
        "  line 6: cannot unmarshal !!str `abc` into int32\n"
        "  line 7: field apiServerAdress not found in type v1alpha4.Networking\n"
        "  line 12: field hostport not found in type v1alpha4.PortMapping\n"
        "  line 13: field imag not found in type v1alpha4.Node"
    )


def test_recorded_unknown_field_text() -> None:
    text = "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodez: []\n"
    assert config_error(text) == (
        "unable to decode config: yaml: unmarshal errors:\n"
        "  line 3: field nodez not found in type v1alpha4.Cluster"
    )


def defaulted(text: str, name: str) -> dict[str, Any]:
    cfg = kind.set_defaults(kind.load_config(text))
    cfg["name"] = name
    return dict(cfg)


HEADER = "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n"


def test_defaults_and_valid_config() -> None:
    cfg = defaulted(HEADER, "demo")
    kind.validate(cfg)
    assert cfg["nodes"] == [{"role": "control-plane", "image": kind.DEFAULT_IMAGE}]
    assert cfg["networking"]["apiServerAddress"] == "127.0.0.1"
    assert cfg["networking"]["apiServerPort"] == 0
    assert cfg["networking"]["podSubnet"] == "10.244.0.0/16"
    assert cfg["networking"]["serviceSubnet"] == "10.96.0.0/16"
    assert kind.node_names(
        defaulted(HEADER + "nodes:\n- role: control-plane\n- role: worker\n- role: worker\n", "d")
    ) == ["d-control-plane", "d-worker", "d-worker2"]


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        (
            HEADER,
            "Bad_Name",
            "'Bad_Name' is not a valid cluster name, cluster names must match `^[a-z0-9.-]+$`",
        ),
        (HEADER + "nodes:\n- role: worker\n", "ok", "must have at least one control-plane node"),
        (
            HEADER + "networking:\n  podSubnet: nope\n",
            "ok",
            'invalid pod subnet failed to parse cidr value:"nope" with error: invalid CIDR '
            "address: nope",
        ),
        (
            HEADER + "networking:\n  apiServerPort: 70000\n",
            "ok",
            "invalid apiServerPort: invalid port number: 70000",
        ),
        (
            HEADER + "nodes:\n- role: boss\n",
            "ok",
            '[invalid configuration for node 0: "boss" is not a valid node role, must have at '
            "least one control-plane node]",
        ),
    ],
)
def test_validation_errors(text: str, name: str, message: str) -> None:
    with pytest.raises(kind.KindError) as info:
        kind.validate(defaulted(text, name))
    assert info.value.message == message


def test_merge_patch_replaces_lists_and_deletes_nulls() -> None:
    target = {"a": {"b": [1, 2], "c": 1, "d": {"e": 1}}, "f": 1, "n": None}
    patch = {"a": {"b": [3], "c": None, "d": {"g": 2}}, "n": {"x": None, "y": 1}}
    assert kind.json_merge_patch(target, patch) == {
        "a": {"b": [3], "d": {"e": 1, "g": 2}},
        "f": 1,
        "n": {"y": 1},  # evanphx/json-patch prunes nulls out of what it adds
    }


def test_kubeadm_api_version_follows_the_node_kubernetes_version() -> None:
    """pkg/cluster/internal/kubeadm/config.go: v1beta2 < v1.23 <= v1beta3 < v1.36 <= v1beta4."""
    cases = {
        "v1.22.3": "v1beta2",
        "v1.23.0": "v1beta3",
        "v1.35.9": "v1beta3",
        "v1.36.0": "v1beta4",
        "v1.36.1": "v1beta4",
        "v1.36": "v1beta4",
        "v1.36.0-alpha.1": "v1beta4",  # ParseGeneric ignores what follows the numbers
        "1.40.2": "v1beta4",
    }
    for version, expected in cases.items():
        assert kind.kubeadm_api_version(version) == f"kubeadm.k8s.io/{expected}", version
    with pytest.raises(kind.KindError, match=r'^could not parse "latest" as version$'):
        kind.kubeadm_api_version("latest")


def kind_doc(text: str) -> list[Any]:
    return [yaml.safe_load(part) for part in kind.split_yaml_documents(text)]


# Cases of kind v0.32.0's own pkg/internal/patch/kubeyaml_test.go (inputs and outputs verbatim).
V1BETA4_CONFIG = """apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
metadata:
  name: config
apiServer:
  certSANs: [localhost, "127.0.0.1"]
  extraArgs:
  - name: "v"
    value: "4"
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
metadata:
  name: config
nodeRegistration:
  kubeletExtraArgs:
  - name: "fail-swap-on"
    value: "false"
"""
KIND_PATCH_CASES = [
    (
        V1BETA4_CONFIG,
        """kind: ClusterConfiguration
apiServer:
  extraArgs:
    "v": "5"
    "enable-hostpath-provisioner": "true"
  certSANs:
    - "my-host"
---
kind: InitConfiguration
nodeRegistration:
  kubeletExtraArgs:
    "fail-swap-on": null
    "node-ip": "192.168.9.6"
""",
        """apiServer:
  certSANs:
  - localhost
  - 127.0.0.1
  - my-host
  extraArgs:
  - name: v
    value: "5"
  - name: enable-hostpath-provisioner
    value: "true"
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
metadata:
  name: config
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
metadata:
  name: config
nodeRegistration:
  kubeletExtraArgs:
  - name: node-ip
    value: 192.168.9.6
""",
    ),
    (
        V1BETA4_CONFIG,
        """apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
apiServer:
  extraArgs:
  - name: "enable-hostpath-provisioner"
    value: "true"
  certSANs:
  - "my-host"
""",
        """apiServer:
  certSANs:
  - localhost
  - 127.0.0.1
  - my-host
  extraArgs:
  - name: v
    value: "4"
  - name: enable-hostpath-provisioner
    value: "true"
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
metadata:
  name: config
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
metadata:
  name: config
nodeRegistration:
  kubeletExtraArgs:
  - name: fail-swap-on
    value: "false"
""",
    ),
    (
        """apiVersion: kubeadm.k8s.io/v1beta3
kind: ClusterConfiguration
metadata:
  name: config
apiServer:
  certSANs: [localhost, "127.0.0.1"]
  extraArgs:
    "v": "4"
""",
        """apiVersion: kubeadm.k8s.io/v1beta3
kind: ClusterConfiguration
apiServer:
  extraArgs:
    "enable-hostpath-provisioner": "true"
  certSANs:
    - "my-host"
""",
        """apiServer:
  certSANs:
  - localhost
  - 127.0.0.1
  - my-host
  extraArgs:
    enable-hostpath-provisioner: "true"
    v: "4"
apiVersion: kubeadm.k8s.io/v1beta3
kind: ClusterConfiguration
metadata:
  name: config
""",
    ),
]


@pytest.mark.parametrize(("to_patch", "patch", "expected"), KIND_PATCH_CASES)
def test_kind_source_patch_cases(to_patch: str, patch: str, expected: str) -> None:
    assert kind.kube_yaml(kind_doc(to_patch), [patch], []) == kind_doc(expected)


def test_cert_sans_of_several_patches_are_unioned() -> None:
    """pkg/internal/patch/kubeadm_merge.go: certSANs merge (any API version), never replace."""
    docs = kind_doc(
        "apiVersion: kubeadm.k8s.io/v1beta3\nkind: ClusterConfiguration\n"
        "apiServer:\n  certSANs: [localhost, 0.0.0.0]\n"
    )
    patches = [
        "kind: ClusterConfiguration\napiServer:\n  certSANs: [127.0.0.1, localhost, a.test]\n",
        "kind: ClusterConfiguration\napiServer:\n  certSANs: [b.test, a.test, b.test]\n",
        "kind: ClusterConfiguration\napiServer:\n  certSANs: []\n",  # removes nothing
        "kind: ClusterConfiguration\napiVersion: kubeadm.k8s.io/v1beta4\n"
        "apiServer:\n  certSANs: [other-version.test]\n",  # matches no v1beta3 document
        "apiServer:\n  certSANs: [no-kind.test]\n",  # no kind: matches nothing
    ]
    (patched,) = kind.kube_yaml(docs, patches, [])
    assert patched["apiServer"]["certSANs"] == [
        "localhost",
        "0.0.0.0",
        "127.0.0.1",
        "a.test",
        "b.test",
    ]
    # only a JSON 6902 patch can replace them
    replace = {
        "group": "kubeadm.k8s.io",
        "version": "v1beta3",
        "kind": "ClusterConfiguration",
        "patch": "- op: replace\n  path: /apiServer/certSANs\n  value: [only.test]\n",
    }
    (replaced,) = kind.kube_yaml(docs, patches, [replace])
    assert replaced["apiServer"]["certSANs"] == ["only.test"]
    # null patches keep the target's list; with none there, kind leaves null
    bare = kind_doc("kind: ClusterConfiguration\napiServer: {}\n")
    (nulled,) = kind.kube_yaml(
        bare, ["kind: ClusterConfiguration\napiServer: {certSANs: null}"], []
    )
    assert nulled == {"kind": "ClusterConfiguration", "apiServer": {"certSANs": None}}


def test_kubeadm_config_of_the_default_node_image_is_v1beta4() -> None:
    cfg = defaulted(
        HEADER
        + "networking:\n  apiServerAddress: 0.0.0.0\nkubeadmConfigPatches:\n"
        + "- |\n  kind: ClusterConfiguration\n  apiServer:\n    certSANs: [localhost, 10.1.2.3]\n"
        + "    extraArgs: {v: '4'}\n"
        + "- |\n  kind: ClusterConfiguration\n  apiVersion: kubeadm.k8s.io/v1beta3\n"
        + "  clusterName: ignored\n"
        + "- |\n  kind: ClusterConfiguration\n  apiServer:\n    certSANs: [kipik.test]\n",
        "demo",
    )
    cfg["nodes"][0]["kubeadmConfigPatches"] = [
        "kind: InitConfiguration\nnodeRegistration:\n  kubeletExtraArgs:\n    v: '2'\n",
        "kind: ClusterConfiguration\napiServer:\n  certSANs: [node.test]\n",
    ]
    docs = kind.kubeadm_documents(
        cfg, cfg["nodes"][0], "demo-control-plane", "172.18.0.2", "v1.36.1"
    )
    assert [(d["kind"], d["apiVersion"]) for d in docs] == [
        ("ClusterConfiguration", "kubeadm.k8s.io/v1beta4"),
        ("InitConfiguration", "kubeadm.k8s.io/v1beta4"),
        ("JoinConfiguration", "kubeadm.k8s.io/v1beta4"),
        ("KubeletConfiguration", "kubelet.config.k8s.io/v1beta1"),
        ("KubeProxyConfiguration", "kubeproxy.config.k8s.io/v1alpha1"),
    ]
    cluster, init, join, kubelet, _ = docs
    assert all("metadata" not in d for d in docs)
    assert cluster["clusterName"] == "demo"
    assert cluster["kubernetesVersion"] == "v1.36.1"
    assert cluster["controlPlaneEndpoint"] == "demo-control-plane:6443"
    assert cluster["apiServer"] == {
        "certSANs": ["localhost", "0.0.0.0", "10.1.2.3", "kipik.test", "node.test"],
        "extraArgs": [{"name": "runtime-config", "value": ""}, {"name": "v", "value": "4"}],
    }
    assert cluster["controllerManager"] == {
        "extraArgs": [{"name": "enable-hostpath-provisioner", "value": "true"}]
    }
    assert cluster["scheduler"] == {"extraArgs": None}
    assert init["nodeRegistration"]["kubeletExtraArgs"] == [
        {"name": "node-ip", "value": "172.18.0.2"},
        {"name": "provider-id", "value": "kind://docker/demo/demo-control-plane"},
        {"name": "node-labels", "value": ""},
        {"name": "v", "value": "2"},
    ]
    assert init["skipPhases"] == ["preflight"]
    assert join["skipPhases"] == ["preflight"]
    assert join["controlPlane"] == {
        "localAPIEndpoint": {"advertiseAddress": "172.18.0.2", "bindPort": 6443}
    }
    assert kubelet["cgroupDriver"] == "systemd"
    assert "featureGates" not in kubelet
    rendered = kind.render_kubeadm_config(docs)
    assert list(yaml.safe_load_all(rendered)) == docs


def test_kubeadm_config_before_v1_36() -> None:
    cfg = defaulted(HEADER + "networking:\n  kubeProxyMode: none\n", "old")
    node = cfg["nodes"][0]
    v1beta3 = kind.kubeadm_documents(cfg, node, "old-control-plane", "172.18.0.3", "v1.35.2")
    assert [d["apiVersion"] for d in v1beta3[:3]] == ["kubeadm.k8s.io/v1beta3"] * 3
    assert [d["kind"] for d in v1beta3][3:] == ["KubeletConfiguration"]  # no kube-proxy
    assert v1beta3[0]["apiServer"]["extraArgs"] == {"runtime-config": ""}
    assert v1beta3[0]["controllerManager"]["extraArgs"] == {"enable-hostpath-provisioner": "true"}
    assert v1beta3[1]["nodeRegistration"]["kubeletExtraArgs"] == {
        "node-ip": "172.18.0.3",
        "provider-id": "kind://docker/old/old-control-plane",
        "node-labels": "",
    }
    assert v1beta3[1]["skipPhases"] == ["preflight", "addon/kube-proxy"]
    v1beta2 = kind.kubeadm_documents(cfg, node, "old-control-plane", "172.18.0.3", "v1.22.3")
    assert v1beta2[0]["apiVersion"] == "kubeadm.k8s.io/v1beta2"
    assert "skipPhases" not in v1beta2[1]
    assert v1beta2[3]["cgroupDriver"] == "cgroupfs"


def test_kubeadm_double_reads_what_kind_renders_for_its_version() -> None:
    for version, rendered in [
        ("v1.22.3", "v1beta2"),
        ("v1.35.2", "v1beta3"),
        ("v1.36.1", "v1beta4"),
    ]:
        parsed = kubeadm.parse_version(version)
        docs = kind.kubeadm_template(
            defaulted(HEADER, "v"),
            {"role": "control-plane"},
            "v-control-plane",
            "10.0.0.2",
            version,
        )
        assert docs[0]["apiVersion"] == f"kubeadm.k8s.io/{rendered}"
        for doc in docs[:3]:
            kubeadm.check_kubeadm_document(doc, parsed)
    # kubeadm v1.30 has no v1beta4; v1.36 no v1beta2, and a v1beta4 map of extraArgs is refused
    v1beta4 = {"apiVersion": "kubeadm.k8s.io/v1beta4", "kind": "ClusterConfiguration"}
    with pytest.raises(
        kubeadm.KubeadmError, match=r'registered for version "kubeadm\.k8s\.io/v1beta4"'
    ):
        kubeadm.check_kubeadm_document(v1beta4, (1, 30, 8))
    with pytest.raises(
        kubeadm.KubeadmError, match=r'registered for version "kubeadm\.k8s\.io/v1beta2"'
    ):
        kubeadm.check_kubeadm_document(
            {**v1beta4, "apiVersion": "kubeadm.k8s.io/v1beta2"}, (1, 36, 1)
        )
    with pytest.raises(kubeadm.KubeadmError, match="cannot unmarshal object"):
        kubeadm.check_kubeadm_document(
            {**v1beta4, "apiServer": {"extraArgs": {"v": "4"}}}, (1, 36, 1)
        )


DIGEST = "sha256:3489c7674813ba5d8b1a9977baea8a6e553784dab7b84759d1014dbd78f7ebd5"


def test_default_node_image_is_kinds() -> None:
    """pkg/apis/config/defaults/image.go of kind v0.32.0, digest and all."""
    assert f"kindest/node:v1.36.1@{DIGEST}" == kind.DEFAULT_IMAGE
    assert defaulted(HEADER, "d")["nodes"][0]["image"] == kind.DEFAULT_IMAGE


def test_sanitize_image_keeps_the_digest_in_the_reference() -> None:
    """docker/images.go sanitizeImage: only the name shown to the user loses the digest."""
    assert kind.sanitize_image(f"kindest/node:v1.36.1@{DIGEST}") == (
        "kindest/node:v1.36.1",
        f"kindest/node:v1.36.1@{DIGEST}",
    )
    assert kind.sanitize_image("kindest/node:v1.36.1") == ("kindest/node:v1.36.1",) * 2
    assert kind.sanitize_image("x@sha512:ab") == ("x@sha512:ab",) * 2


class FakeDocker:
    """Stands in for the kind double's `docker` runner: records calls, fails pulls."""

    def __init__(self, present: set[str], pulls_fail: int) -> None:
        self.present, self.pulls_fail = present, pulls_fail
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, *args: str, stdin: bytes | None = None) -> str:
        self.calls.append(args)
        if args[:2] == ("inspect", "--type=image") and args[2] not in self.present:
            raise kind.KindError(
                f'command "docker {" ".join(args)}" failed with error: exit status 1',
                f"Error: No such image: {args[2]}\n",
            )
        if args[0] == "pull":
            self.pulls_fail -= 1
            if self.pulls_fail >= 0:
                raise kind.KindError(
                    f'command "docker pull {args[1]}" failed with error: exit status 1',
                    f"attempt {len(self.calls)}: Error response from daemon: refused\n",
                )
        return ""


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Replace time.sleep for the kind double's pull retries; record what it slept."""
    slept: list[float] = []
    monkeypatch.setattr(kind.time, "sleep", slept.append)
    return slept


def test_pull_retries_like_kind(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    """docker/images.go: inspect, then pull and 4 retries after sleeping 1, 2, 3, 4 s."""
    image = f"kindest/node:v1.36.1@{DIGEST}"
    fake = FakeDocker(present=set(), pulls_fail=99)
    monkeypatch.setattr(kind, "docker", fake)
    monkeypatch.setattr(kind, "LOG", kind.Logger(verbosity=1))
    cfg = defaulted(HEADER, "d")
    with pytest.raises(kind.KindError) as info:
        kind.ensure_node_images(cfg)
    assert fake.calls == [("inspect", "--type=image", image)] + [("pull", image)] * 5
    assert sleeps == [1, 2, 3, 4]
    assert info.value.message == (
        f'failed to pull image "{image}": command "docker pull {image}" failed with error: '
        "exit status 1"
    )
    assert info.value.output == "attempt 6: Error response from daemon: refused\n"
    failed = f'command "docker pull {image}" failed with error: exit status 1'
    assert capsys.readouterr().err.splitlines() == [
        " • Ensuring node image (kindest/node:v1.36.1) 🖼  ...",
        f"DEBUG: docker/images.go:67] Pulling image: {image} ...",
        *(f'DEBUG: docker/images.go:73] Trying again to pull image: "{image}" ... {failed}',) * 4,
        " ✗ Ensuring node image (kindest/node:v1.36.1) 🖼",
    ]


def test_pull_stops_at_the_first_success_and_present_images_are_not_pulled(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    fake = FakeDocker(present={"b:1"}, pulls_fail=2)
    monkeypatch.setattr(kind, "docker", fake)
    monkeypatch.setattr(kind, "LOG", kind.Logger(quiet=True))
    cfg = defaulted(HEADER + "nodes:\n- role: control-plane\n  image: b:1\n- role: worker\n", "d")
    cfg["nodes"][1]["image"] = f"a:1@{DIGEST}"
    kind.ensure_node_images(cfg)
    assert fake.calls == [  # sorted, like kind's sets.String
        ("inspect", "--type=image", f"a:1@{DIGEST}"),
        ("pull", f"a:1@{DIGEST}"),
        ("pull", f"a:1@{DIGEST}"),
        ("pull", f"a:1@{DIGEST}"),
        ("inspect", "--type=image", "b:1"),
    ]
    assert sleeps == [1, 2]


def test_api_server_certificate_names_are_kubeadms() -> None:
    cluster = {
        "controlPlaneEndpoint": "demo-control-plane:6443",
        "networking": {"serviceSubnet": "10.96.0.0/16"},
        "apiServer": {"certSANs": ["localhost", "0.0.0.0", "127.0.0.1"]},
    }
    assert kubeadm.api_server_sans(cluster, "demo-control-plane", "172.18.0.2") == [
        "DNS:demo-control-plane",
        "DNS:kubernetes",
        "DNS:kubernetes.default",
        "DNS:kubernetes.default.svc",
        "DNS:kubernetes.default.svc.cluster.local",
        "IP:10.96.0.1",
        "IP:172.18.0.2",
        "DNS:localhost",
        "IP:0.0.0.0",
        "IP:127.0.0.1",
    ]


def test_durations_and_flags() -> None:
    assert kind.parse_duration("3m") == 180
    assert kind.parse_duration("1m30s") == 90
    assert kind.parse_duration("500ms") == 0.5
    assert kind.format_duration(180) == "3m0s"
    assert kind.format_duration(9.4) == "9s"
    with pytest.raises(ValueError, match='time: invalid duration "3x"'):
        kind.parse_duration("3x")
    flags = kind.COMMANDS[("create", "cluster")]
    values, rest = kind.parse_flags(["--name=a", "--wait", "1m", "--retain", "-q"], flags)
    assert values == {"name": "a", "wait": 60.0, "retain": True, "quiet": True}
    assert rest == []
    with pytest.raises(kind.KindError, match=r"^unknown flag: --bogus-flag$"):
        kind.parse_flags(["--bogus-flag"], flags)


# ---------------------------------------------------------------------------------------------
# unit tests: the fake API server's semantics


def test_label_selectors() -> None:
    labels = {"app": "web", "tier": "front"}
    assert apiserver.label_selector_matcher("app=web,tier")(labels)
    assert apiserver.label_selector_matcher("app in (db, web),!missing")(labels)
    assert not apiserver.label_selector_matcher("app!=web")(labels)
    assert not apiserver.label_selector_matcher("tier notin (front)")(labels)
    assert apiserver.label_selector_matcher("")(labels)


def test_json_patch_and_conflict_status() -> None:
    doc = {"data": {"a": "1"}}
    patched = apiserver.json_patch(
        doc, [{"op": "add", "path": "/data/b", "value": "2"}, {"op": "remove", "path": "/data/a"}]
    )
    assert patched == {"data": {"b": "2"}}
    err = apiserver.not_found("configmaps", "x")
    assert err.status() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'configmaps "x" not found',
        "reason": "NotFound",
        "details": {"name": "x", "kind": "configmaps"},
        "code": 404,
    }


# ---------------------------------------------------------------------------------------------
# Docker: the kind double against the real engine


@pytest.fixture(scope="module")
def node_image(request: pytest.FixtureRequest) -> str:
    """The node image double to run (an explicit one, else the project's test image)."""
    explicit = os.environ.get("KIPIK_DOUBLES_NODE_IMAGE")
    if explicit:
        return explicit
    return str(request.getfixturevalue("test_images")[1])


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    """A HOME and KUBECONFIG for the kind double, so no real kubeconfig is touched."""
    with tempfile.TemporaryDirectory(prefix="kind-double-") as directory:
        yield Path(directory)


def run_kind(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "KUBECONFIG": str(home / "kubeconfig")}
    env.pop("KIND_CLUSTER_NAME", None)
    return subprocess.run(
        [sys.executable, str(KIND), *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=180,
        check=False,
    )


def create_cluster(
    home: Path, name: str, *, config: str, image: str, kubeconfig: str, wait: str
) -> subprocess.CompletedProcess[str]:
    """``kind create cluster`` with every flag the plugin passes (and --wait)."""
    return run_kind(
        home, "create", "cluster", "--name", name, "--config", config, "--image", image,
        "--kubeconfig", kubeconfig, "--wait", wait,
    )  # fmt: skip


def docker_out(*args: str) -> str:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=True, timeout=120
    ).stdout


def remove_cluster_containers(name: str) -> None:
    ids = docker_out("ps", "-aq", "--filter", f"label=io.x-k8s.kind.cluster={name}").split()
    if ids:
        docker_out("rm", "-f", "-v", *ids)


@pytest.fixture
def cluster_name() -> Iterator[str]:
    """A unique cluster name whose containers are removed after the test, whatever happens."""
    name = f"kdbl-{uuid.uuid4().hex[:8]}"
    yield name
    remove_cluster_containers(name)


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def recorded(transcript: str) -> dict[str, tuple[int, list[str]]]:
    """`$ command` -> (exit code, output lines) of a transcript in tests/reference."""
    blocks: dict[str, tuple[int, list[str]]] = {}
    command, lines = "", list[str]()
    for line in (REFERENCE / transcript).read_text().splitlines():
        if line.startswith("$ "):
            command, lines = line[2:], []
        elif line.startswith("[exit ") and command:
            blocks[command] = (int(line[6:-1]), lines)
            command = ""
        elif command:
            lines.append(line)
    return blocks


@pytest.mark.docker
def test_cli_errors_match_recordings(home: Path, node_image: str, cluster_name: str) -> None:
    errors = recorded("transcript-errors.txt")
    result = run_kind(home, "create", "cluster", "--name", "bad", "--bogus-flag")
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (
        *errors["kind create cluster --name bad --bogus-flag"][:1],
        "",
        errors["kind create cluster --name bad --bogus-flag"][1],
    )

    bad2 = write(home / "bad2.yaml", "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha3\n")
    result = run_kind(home, "create", "cluster", "--name", "bad", "--config", bad2)
    assert (result.returncode, result.stderr.splitlines()) == errors[
        "kind create cluster --name bad --config /bad2.yaml --image kindest/node:v1.22.3"
    ]

    bad3 = write(home / "bad3.yaml", HEADER + "nodez: []\n")
    result = run_kind(home, "create", "cluster", "--name", "bad", "--config", bad3)
    assert (result.returncode, result.stderr.splitlines()) == errors[
        "kind create cluster --name bad --config /bad3.yaml --image kindest/node:v1.22.3"
    ]

    result = run_kind(home, "create", "cluster", "--name", "Bad_Name", "--image", node_image)
    assert (result.returncode, result.stderr.splitlines()[-1]) == (
        errors["kind create cluster --name Bad_Name --image kindest/node:v1.22.3"][0],
        errors["kind create cluster --name Bad_Name --image kindest/node:v1.22.3"][1][-1],
    )

    code, lines = errors["kind delete cluster --name nope"]
    result = run_kind(home, "delete", "cluster", "--name", cluster_name)
    assert (result.returncode, result.stdout, result.stderr) == (
        code,
        "",
        "\n".join(lines).replace('"nope"', f'"{cluster_name}"') + "\n",
    )

    code, lines = errors["kind get kubeconfig --name nope"]
    result = run_kind(home, "get", "kubeconfig", "--name", cluster_name)
    assert (result.returncode, result.stdout, result.stderr) == (
        code,
        "",
        "\n".join(lines).replace("'nope'", f"'{cluster_name}'") + "\n",
    )

    result = run_kind(home, "export", "logs", str(home / "logs"), "--name", cluster_name)
    assert (result.returncode, result.stderr) == (1, f'ERROR: unknown cluster "{cluster_name}"\n')

    result = run_kind(home, "load", "docker-image", node_image, "--name", cluster_name)
    assert (result.returncode, result.stderr) == (
        1,
        f'ERROR: no nodes found for cluster "{cluster_name}"\n',
    )

    result = run_kind(home, "get", "nodes", "--name", cluster_name)
    assert (result.returncode, result.stdout) == (0, "")
    assert result.stderr == f'No kind nodes found for cluster "{cluster_name}".\n'


@pytest.mark.docker
def test_digest_pinned_image_is_found_only_by_its_digest(
    home: Path, node_image: str, cluster_name: str
) -> None:
    """Kind inspects, pulls and runs `name:tag@sha256:...` as given: a loaded image is not it.

    The node image double is tagged into a registry on 127.0.0.1:9 (nothing listens there, so
    every pull fails on this machine). By tag it is present; pinned to a digest it is not (the
    engine resolves `name:tag@digest` by the digest alone, and `docker load` or `docker tag`
    never record one), so kind pulls: once, then 4 retries after 1 + 2 + 3 + 4 s.
    """
    local = f"127.0.0.1:9/kipik-doubles-test/node:{cluster_name}"
    image_id = docker_out("image", "inspect", "-f", "{{.Id}}", node_image).strip()
    docker_out("tag", node_image, local)
    try:
        pinned = f"{local}@{image_id}"
        assert (
            subprocess.run(
                ["docker", "inspect", "--type=image", pinned], capture_output=True, check=False
            ).returncode
            != 0
        )
        result = run_kind(
            home, "create", "cluster", "--name", cluster_name, "--image", pinned, "-v", "1"
        )
    finally:
        docker_out("rmi", local)
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    shown = f" • Ensuring node image ({local}) 🖼  ..."
    assert lines[lines.index(shown) + 1 :][:7] == [
        f"DEBUG: docker/images.go:67] Pulling image: {pinned} ...",
        *[
            f'DEBUG: docker/images.go:73] Trying again to pull image: "{pinned}" ... command '
            f'"docker pull {pinned}" failed with error: exit status 1'
        ]
        * 4,
        f" ✗ Ensuring node image ({local}) 🖼",
        f'ERROR: failed to create cluster: failed to pull image "{pinned}": command "docker '
        f'pull {pinned}" failed with error: exit status 1',
    ]
    assert "\nCommand Output: Error response from daemon:" in result.stderr
    assert docker_out("ps", "-aq", "--filter", f"label=io.x-k8s.kind.cluster={cluster_name}") == ""


@pytest.mark.docker
def test_delete_removes_nodes_when_the_kubeconfig_lock_fails(
    home: Path, node_image: str, cluster_name: str
) -> None:
    """delete.go: nodes listed, kubeconfig update fails and is printed, nodes removed, exit 1."""
    node = f"{cluster_name}-control-plane"
    docker_out(
        "run", "-d", "--name", node, "--label", f"io.x-k8s.kind.cluster={cluster_name}",
        "--label", "io.x-k8s.kind.role=control-plane", "--tty", "--init=false", node_image,
    )  # fmt: skip
    kubeconfig = home / "locked" / "kubeconfig"
    kubeconfig.parent.mkdir()
    lock = Path(f"{kubeconfig}.lock")
    lock.touch()
    result = run_kind(
        home, "delete", "cluster", "--name", cluster_name, "--kubeconfig", str(kubeconfig)
    )
    failure = f"failed to lock config file: open {lock}: file exists"
    assert (result.returncode, result.stdout, result.stderr.splitlines()) == (
        1,
        "",
        [
            f'Deleting cluster "{cluster_name}" ...',
            f"failed to update kubeconfig: {failure}",
            f'Deleted nodes: ["{node}"]',
            f'ERROR: failed to delete cluster "{cluster_name}": {failure}',
        ],
    )
    assert docker_out("ps", "-aq", "--filter", f"label=io.x-k8s.kind.cluster={cluster_name}") == ""
    assert lock.exists()  # another process's lock: left alone
    assert not kubeconfig.exists()
    # a kubeconfig that does not exist is still locked (its folder made), as kind does
    fresh = home / "fresh" / "kubeconfig"
    result = run_kind(home, "delete", "cluster", "--name", cluster_name, "--kubeconfig", str(fresh))
    assert (result.returncode, result.stderr) == (0, f'Deleting cluster "{cluster_name}" ...\n')
    assert sorted(p.name for p in fresh.parent.iterdir()) == []


def api_client(kubeconfig: str) -> Any:
    import kubernetes

    return kubernetes.config.new_client_from_config(config_file=kubeconfig)


@pytest.mark.docker
def test_cluster_lifecycle(home: Path, node_image: str, cluster_name: str) -> None:
    from kubernetes import client

    config = write(
        home / "good.yaml",
        HEADER + "kubeadmConfigPatches:\n- |\n  kind: ClusterConfiguration\n  apiServer:\n"
        "    certSANs: [localhost, 127.0.0.1, kipik.test]\n",
    )
    kubeconfig = str(home / "created.kubeconfig")
    start = time.monotonic()
    result = create_cluster(
        home, cluster_name, config=config, image=node_image, kubeconfig=kubeconfig, wait="1m"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    if lines[0] == CGROUP_WARNING:
        lines = lines[1:]
    assert lines[:18] == [
        f'Creating cluster "{cluster_name}" ...',
        f" • Ensuring node image ({node_image}) 🖼  ...",
        f" ✓ Ensuring node image ({node_image}) 🖼",
        " • Preparing nodes 📦   ...",
        " ✓ Preparing nodes 📦 ",
        " • Writing configuration 📜  ...",
        " ✓ Writing configuration 📜",
        " • Starting control-plane 🕹️  ...",
        " ✓ Starting control-plane 🕹️",
        " • Installing CNI 🔌  ...",
        " ✓ Installing CNI 🔌",
        " • Installing StorageClass 💾  ...",
        " ✓ Installing StorageClass 💾",
        " • Waiting ≤ 1m0s for control-plane = Ready ⏳  ...",
        " ✓ Waiting ≤ 1m0s for control-plane = Ready ⏳",
        lines[15],
        f'Set kubectl context to "kind-{cluster_name}"',
        "You can now use your cluster with:",
    ]
    assert lines[15].startswith(" • Ready after ")
    assert lines[15].endswith("s 💚")
    assert (
        lines[19] == f"kubectl cluster-info --context kind-{cluster_name} --kubeconfig {kubeconfig}"
    )
    assert time.monotonic() - start < 60
    assert stat.S_IMODE(os.stat(kubeconfig).st_mode) == 0o600

    node = f"{cluster_name}-control-plane"
    inspect = json.loads(docker_out("inspect", node))[0]
    image_labels = json.loads(
        docker_out("inspect", "--format", "{{json .Config.Labels}}", inspect["Image"])
    )
    container_labels = {
        k: v for k, v in inspect["Config"]["Labels"].items() if k not in (image_labels or {})
    }
    assert container_labels == {
        "io.x-k8s.kind.cluster": cluster_name,
        "io.x-k8s.kind.role": "control-plane",
    }
    assert inspect["Config"]["Hostname"] == node
    host = inspect["HostConfig"]
    assert host["Privileged"] is True
    assert host["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 1}
    assert host["Tmpfs"] == {"/run": "", "/tmp": ""}
    assert host["NetworkMode"] == "kind"
    assert host["Binds"] == ["/lib/modules:/lib/modules:ro"]
    assert {"seccomp=unconfined", "apparmor=unconfined"} <= set(host["SecurityOpt"])
    assert "KUBECONFIG=/etc/kubernetes/admin.conf" in inspect["Config"]["Env"]
    assert [m["Destination"] for m in inspect["Mounts"] if m["Type"] == "volume"] == ["/var"]
    # the default node image double is v1.36.1, so kind renders kubeadm v1beta4
    assert docker_out("exec", node, "cat", "/kind/version") == "v1.36.1\n"
    kubeadm_conf = list(yaml.safe_load_all(docker_out("exec", node, "cat", "/kind/kubeadm.conf")))
    assert [d["apiVersion"] for d in kubeadm_conf[:3]] == ["kubeadm.k8s.io/v1beta4"] * 3
    assert kubeadm_conf[0]["apiServer"]["certSANs"] == [
        "localhost",
        "127.0.0.1",
        "kipik.test",
    ]
    binding = host["PortBindings"]["6443/tcp"][0]
    assert binding["HostIp"] == "127.0.0.1"
    assert int(binding["HostPort"]) > 0
    port = int(binding["HostPort"])

    result = run_kind(home, "get", "kubeconfig", "--name", cluster_name)
    assert result.returncode == 0
    assert result.stderr == ""
    external = yaml.safe_load(result.stdout)
    assert external["clusters"][0]["cluster"]["server"] == f"https://127.0.0.1:{port}"
    assert external["current-context"] == f"kind-{cluster_name}"
    assert [c["name"] for c in external["contexts"]] == [f"kind-{cluster_name}"]
    written = yaml.safe_load(Path(kubeconfig).read_text())
    assert written["clusters"] == external["clusters"]
    internal = yaml.safe_load(
        run_kind(home, "get", "kubeconfig", "--name", cluster_name, "--internal").stdout
    )
    assert internal["clusters"][0]["cluster"]["server"] == f"https://{node}:6443"
    assert run_kind(home, "get", "nodes", "--name", cluster_name).stdout == f"{node}\n"
    assert cluster_name in run_kind(home, "get", "clusters").stdout.split()

    again = run_kind(home, "create", "cluster", "--name", cluster_name, "--image", node_image)
    assert again.returncode == 1
    assert again.stderr.splitlines()[-1] == (
        "ERROR: failed to create cluster: node(s) already exist for a cluster with the name "
        f'"{cluster_name}"'
    )

    # the official client, through the kubeconfig kind wrote
    core: Any = client.CoreV1Api(api_client(kubeconfig))
    nodes = core.list_node().items
    assert [(n.metadata.name, n.status.conditions[-1].type) for n in nodes] == [(node, "Ready")]
    assert nodes[0].status.conditions[-1].status == "True"
    assert "node-role.kubernetes.io/control-plane" in nodes[0].metadata.labels
    assert {ns.metadata.name for ns in core.list_namespace().items} >= {
        "default",
        "kube-system",
        "kube-public",
        "kube-node-lease",
    }
    namespace = "doubles"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    accounts = wait_until(
        lambda: core.list_namespaced_service_account(namespace).items, 10, "default SA"
    )
    assert [a.metadata.name for a in accounts] == ["default"]

    body = client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="cm", labels={"app": "x"}), data={"k": "v"}
    )
    created = core.create_namespaced_config_map(namespace, body)
    assert created.metadata.uid
    assert created.metadata.creation_timestamp
    created.data["k"] = "w"
    updated = core.replace_namespaced_config_map("cm", namespace, created)
    assert int(updated.metadata.resource_version) > int(created.metadata.resource_version)
    patched = core.patch_namespaced_config_map("cm", namespace, {"data": {"z": "1"}})
    assert patched.data == {"k": "w", "z": "1"}
    listed = core.list_config_map_for_all_namespaces(label_selector="app=x").items
    assert [(c.metadata.namespace, c.metadata.name) for c in listed] == [(namespace, "cm")]
    with pytest.raises(client.ApiException) as conflict:
        core.replace_namespaced_config_map("cm", namespace, created)
    assert conflict.value.status == 409
    assert json.loads(str(conflict.value.body))["reason"] == "Conflict"
    with pytest.raises(client.ApiException) as exists:
        core.create_namespaced_config_map(namespace, body)
    assert json.loads(str(exists.value.body)) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'configmaps "cm" already exists',
        "reason": "AlreadyExists",
        "details": {"name": "cm", "kind": "configmaps"},
        "code": 409,
    }
    core.delete_namespaced_config_map("cm", namespace)
    with pytest.raises(client.ApiException) as missing:
        core.read_namespaced_config_map("cm", namespace)
    assert missing.value.status == 404

    # TLS: the cluster CA verifies names in the certificate and rejects others
    ca = base64.b64decode(external["clusters"][0]["cluster"]["certificate-authority-data"])
    context = ssl.create_default_context(cadata=ca.decode())
    for name in ("localhost", "127.0.0.1", "kipik.test"):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            context.wrap_socket(raw, server_hostname=name).close()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        context.wrap_socket(raw, server_hostname="not-in-the-cert.test")
    # no client certificate: anonymous, forbidden
    anonymous = http.client.HTTPSConnection("localhost", port, timeout=5, context=context)
    try:
        anonymous.request("GET", "/api/v1/namespaces")
        response = anonymous.getresponse()
        status, answer = response.status, json.loads(response.read())
    finally:
        anonymous.close()
    assert status == 403
    assert answer["reason"] == "Forbidden"
    assert answer["message"] == (
        'namespaces is forbidden: User "system:anonymous" cannot list resource "namespaces" in '
        'API group "" at the cluster scope'
    )

    # load docker-image, twice
    tiny = f"kipik-doubles-test/tiny:{cluster_name}"
    subprocess.run(
        ["docker", "import", "-", tiny], input=tiny_tar(), check=True, capture_output=True
    )
    try:
        image_id = docker_out("image", "inspect", "-f", "{{.Id}}", tiny).strip()
        first = run_kind(home, "load", "docker-image", tiny, "--name", cluster_name)
        assert (first.returncode, first.stdout, first.stderr) == (
            0,
            "",
            f'Image: "{tiny}" with ID "{image_id}" not yet present on node "{node}", loading...\n',
        )
        second = run_kind(home, "load", "docker-image", tiny, "--name", cluster_name)
        assert second.stderr == (
            f'Image: "{tiny}" with ID "{image_id}" found to be already present on all nodes.\n'
        )
        assert "kipik-doubles-test/tiny" in docker_out("exec", node, "crictl", "images")
    finally:
        docker_out("rmi", tiny)

    logs = home / "logs"
    exported = run_kind(home, "export", "logs", str(logs), "--name", cluster_name)
    assert (exported.returncode, exported.stdout, exported.stderr) == (
        0,
        f"{logs}\n",
        f'Exporting logs for cluster "{cluster_name}" to:\n',
    )
    assert (logs / "kind-version.txt").read_text().startswith("kind v0.32.0")
    assert (logs / "docker-info.txt").exists()
    assert json.loads((logs / node / "inspect.json").read_text())[0]["Name"] == f"/{node}"
    assert (logs / node / "kubernetes-version.txt").read_text().startswith("v1.")
    apiserver_logs = list((logs / node / "containers").glob("kube-apiserver-*.log"))
    assert len(apiserver_logs) == 1
    assert "GET /api/v1/namespaces 403" in apiserver_logs[0].read_text()

    volumes = json.loads(docker_out("inspect", node))[0]["Mounts"]
    deleted = run_kind(
        home, "delete", "cluster", "--name", cluster_name, "--kubeconfig", kubeconfig
    )
    assert (deleted.returncode, deleted.stdout, deleted.stderr) == (
        0,
        "",
        f'Deleting cluster "{cluster_name}" ...\nDeleted nodes: ["{node}"]\n',
    )
    assert docker_out("ps", "-aq", "--filter", f"label=io.x-k8s.kind.cluster={cluster_name}") == ""
    left = docker_out("volume", "ls", "-q").split()
    assert not [v["Name"] for v in volumes if v["Type"] == "volume" and v["Name"] in left]
    after = yaml.safe_load(Path(kubeconfig).read_text())
    assert after["clusters"] == []
    assert after["current-context"] == ""
    assert "kind" in docker_out("network", "ls", "--format", "{{.Name}}").split()


@pytest.fixture(scope="module")
def node_image_of_version(node_image: str) -> Iterator[Callable[[str], str]]:
    """Build node image doubles of other Kubernetes versions: the double plus /kind/version.

    That file is where kind reads a node image's version from (nodeutils.KubeVersion), so the
    derived image is what a kind node image of that version looks like to kind.
    """
    built: list[str] = []

    def build(version: str) -> str:
        tag = f"kipik-doubles-test/node:{version}-{uuid.uuid4().hex[:6]}"
        dockerfile = f"FROM {node_image}\nRUN mkdir -p /kind && echo {version} > /kind/version\n"
        subprocess.run(
            ["docker", "build", "--quiet", "-t", tag, "-"],
            input=dockerfile,
            text=True,
            capture_output=True,
            check=True,
            timeout=120,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
        built.append(tag)
        return tag

    yield build
    if built:
        subprocess.run(["docker", "rmi", *built], capture_output=True, check=False)


@pytest.mark.docker
@pytest.mark.parametrize(
    "case",
    [
        ("v1.35.2", "v1beta3", "--config=/kind/kubeadm.conf --skip-token-print --v=6"),
        (
            "v1.22.3",
            "v1beta2",
            "--config=/kind/kubeadm.conf --skip-token-print --v=6 --skip-phases=preflight",
        ),
    ],
    ids=["v1.35.2", "v1.22.3"],
)
def test_node_doubles_of_older_versions_get_their_kubeadm_api(
    home: Path,
    cluster_name: str,
    node_image_of_version: Callable[[str], str],
    case: tuple[str, str, str],
) -> None:
    """Kind renders the kubeadm API of the node's /kind/version; its kubeadm reads it."""
    from kubernetes import client

    version, api, init_argv = case
    image = node_image_of_version(version)
    config = write(
        home / f"{version}.yaml", HEADER + "nodes:\n- role: control-plane\n- role: worker\n"
    )
    kubeconfig = str(home / f"{version}.kubeconfig")
    result = run_kind(
        home, "create", "cluster", "--name", cluster_name, "--config", config, "--image", image,
        "--kubeconfig", kubeconfig, "-v", str(kind.TRACE_COMMANDS),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    node = f"{cluster_name}-control-plane"
    assert f"kubeadm init {init_argv}" in result.stderr
    assert docker_out("exec", node, "cat", "/kind/version") == f"{version}\n"
    for name in (node, f"{cluster_name}-worker"):
        docs = list(yaml.safe_load_all(docker_out("exec", name, "cat", "/kind/kubeadm.conf")))
        assert [d["apiVersion"] for d in docs[:3]] == [f"kubeadm.k8s.io/{api}"] * 3
        assert isinstance(docs[0]["apiServer"]["extraArgs"], dict)
    core: Any = client.CoreV1Api(api_client(kubeconfig))
    nodes = core.list_node().items
    assert sorted(n.metadata.name for n in nodes) == [node, f"{cluster_name}-worker"]
    assert {n.status.node_info.kubelet_version for n in nodes} == {version}


def tiny_tar() -> bytes:
    """A one-file root filesystem for a tiny local image."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        data = b"kipik test double image\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.docker
def test_workers_labels_and_no_cni(home: Path, node_image: str, cluster_name: str) -> None:
    from kubernetes import client

    config = write(
        home / "multi.yaml",
        HEADER + "networking:\n  disableDefaultCNI: true\n  podSubnet: 10.240.0.0/16\n"
        "nodes:\n- role: control-plane\n- role: worker\n  labels: {tier: a}\n- role: worker\n",
    )
    kubeconfig = str(home / "multi.kubeconfig")
    result = create_cluster(
        home, cluster_name, config=config, image=node_image, kubeconfig=kubeconfig, wait="2s"
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert " • Preparing nodes 📦 📦 📦   ..." in lines
    assert " • Installing CNI 🔌  ..." not in lines
    assert " ✓ Joining worker nodes 🚜" in lines
    assert lines[lines.index(" ✗ Waiting ≤ 2s for control-plane = Ready ⏳") + 1] == (
        " • WARNING: Timed out waiting for Ready ⚠️"
    )
    names = [f"{cluster_name}-control-plane", f"{cluster_name}-worker", f"{cluster_name}-worker2"]
    assert run_kind(home, "get", "nodes", "--name", cluster_name).stdout.split() == names
    roles = [
        docker_out("inspect", "-f", '{{index .Config.Labels "io.x-k8s.kind.role"}}', n).strip()
        for n in names
    ]
    assert roles == ["control-plane", "worker", "worker"]
    core: Any = client.CoreV1Api(api_client(kubeconfig))
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert sorted(nodes) == names
    assert nodes[names[1]].metadata.labels["tier"] == "a"
    assert "node-role.kubernetes.io/control-plane" not in nodes[names[1]].metadata.labels
    assert {n.spec.pod_cidr for n in nodes.values()} == {
        "10.240.0.0/24",
        "10.240.1.0/24",
        "10.240.2.0/24",
    }
    assert {n.status.conditions[-1].status for n in nodes.values()} == {"False"}
    deleted = run_kind(
        home, "delete", "cluster", "--name", cluster_name, "--kubeconfig", kubeconfig
    )
    assert deleted.returncode == 0
    assert deleted.stderr.splitlines()[1].startswith("Deleted nodes: [")
    assert sorted(json.loads(deleted.stderr.splitlines()[1][15:].replace('" "', '", "'))) == names


@pytest.mark.docker
def test_failed_create_removes_its_nodes(home: Path, node_image: str, cluster_name: str) -> None:
    config = write(
        home / "broken.yaml",
        HEADER + "kubeadmConfigPatches:\n- |\n  kind: ClusterConfiguration\n  networking:\n"
        "    serviceSubnet: not-a-subnet\n",
    )
    result = run_kind(
        home, "create", "cluster", "--name", cluster_name, "--config", config, "--image", node_image
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    node = f"{cluster_name}-control-plane"
    assert " ✗ Starting control-plane 🕹️" in lines
    assert f'Deleted nodes: ["{node}"]' in lines
    assert (
        'ERROR: failed to create cluster: failed to init node with kubeadm: command "docker exec '
        f'--privileged {node} kubeadm init --config=/kind/kubeadm.conf --skip-token-print --v=6" '
        "failed with error: exit status 1"
    ) in lines
    assert "Command Output: " in result.stderr
    assert "serviceSubnet" in result.stderr
    assert docker_out("ps", "-aq", "--filter", f"label=io.x-k8s.kind.cluster={cluster_name}") == ""


@pytest.mark.docker
@pytest.mark.parametrize("stop_signal", ["SIGTERM", "SIGRTMIN+3"])
def test_node_init_stops_promptly(node_image: str, stop_signal: str) -> None:
    name = f"kdbl-init-{uuid.uuid4().hex[:8]}"
    try:
        docker_out("run", "-d", "--name", name, "--tty", "--init=false", node_image)
        wait_until(
            lambda: "Multi-User System" in docker_out("logs", name), 20, "the node's init to boot"
        )
        start = time.monotonic()
        docker_out("kill", "--signal", stop_signal, name)
        exit_code = subprocess.run(
            ["docker", "wait", name], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        assert exit_code == "0"
        assert time.monotonic() - start < 5
        signum = signal.SIGTERM if stop_signal == "SIGTERM" else signal.SIGRTMIN + 3
        assert f"Received signal {int(signum)}" in docker_out("logs", name)
    finally:
        subprocess.run(["docker", "rm", "-f", "-v", name], capture_output=True, check=False)
