"""Exact tests of the toolkit's pure parts: manifests, port-forward targets, archives, markers."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from pytest_kipik import labels
from pytest_kipik.errors import ConfigError, ImageError
from pytest_kipik.hosts.transfer import ArchiveImage, archive_images
from pytest_kipik.k8s import diagnostics
from pytest_kipik.k8s.manifests import _state, condition_holds, describe, load, ordered
from pytest_kipik.k8s.portforward import container_port, parse_target, pick_pod
from pytest_kipik.kind.driver import get_kubeconfig_argv, load_argv, nodes_loaded
from pytest_kipik.marker import ClusterSpec, marker_spec

DEPLOYMENT = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}
NAMESPACE = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
}


# -- manifests -------------------------------------------------------------------------------


def test_load_reads_dicts_multi_document_yaml_files_folders_and_lists(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "b.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: b}\n")
    (folder / "a.yml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a1}\n---\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a2}\n---\n"
    )
    (folder / "notes.txt").write_text("not a manifest")
    text = "kind: List\napiVersion: v1\nitems:\n"
    text += "- {apiVersion: v1, kind: Secret, metadata: {name: s}}\n"
    found = load([DEPLOYMENT, folder, text, str(folder / "b.yaml")])
    assert [o["metadata"]["name"] for o in found] == ["web", "a1", "a2", "b", "s", "b"]


def test_load_names_the_document_that_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\n---\nkind: Pod\n")
    with pytest.raises(
        ConfigError, match=r"bad\.yaml \(document 2\): the object has no apiVersion, metadata\.name"
    ):
        load(bad)
    with pytest.raises(ConfigError, match="neither an existing file or folder nor YAML"):
        load("no-such-file.yaml")
    with pytest.raises(ConfigError, match="no such file or folder"):
        load(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load("a: [\n")


def test_ordered_puts_namespaces_and_crds_first_and_deletes_them_last() -> None:
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    objects = [widget, DEPLOYMENT, CRD, NAMESPACE]
    assert ordered(objects) == [NAMESPACE, CRD, widget, DEPLOYMENT]
    assert ordered(objects, deleting=True) == [DEPLOYMENT, widget, CRD, NAMESPACE]


def test_the_state_a_timeout_shows() -> None:
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "generation": 2, "managedFields": [{"manager": "x"}]},
        "spec": {"replicas": 1},
        "status": {"replicas": 1},
    }
    # a condition type is judged on the status: the generation and the status
    assert _state(obj) == "metadata:\n  generation: 2\nstatus:\n  replicas: 1"
    # a function may judge any field: the whole object, without the managedFields bookkeeping
    assert _state(obj, whole=True) == (
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  generation: 2\n"
        "spec:\n  replicas: 1\nstatus:\n  replicas: 1"
    )
    assert _state(None) == _state(None, whole=True) == "not found"
    big = {"metadata": {}, "data": {"k": "x" * 5000}}
    assert _state(big, whole=True).endswith("\n...")
    assert len(_state(big, whole=True)) == 4000 + len("\n...")


def test_condition_holds_by_type_and_status() -> None:
    obj = {
        "status": {
            "conditions": [
                {"type": "Available", "status": "True"},
                {"type": "Progressing", "status": "False"},
            ]
        }
    }
    assert condition_holds(obj, "Available")
    assert condition_holds(obj, "available")
    assert not condition_holds(obj, "Progressing")
    assert condition_holds(obj, "Progressing=False")
    assert not condition_holds(obj, "Ready")
    assert not condition_holds({}, "Available")
    assert describe(DEPLOYMENT) == "Deployment web"
    assert describe({**NAMESPACE, "metadata": {"name": "x", "namespace": "ns"}}) == "Namespace ns/x"


# -- port-forward targets -----------------------------------------------------------------------


def _pod(name: str, phase: str, ready: bool, created: str, **extra: Any) -> dict[str, Any]:
    status = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}
    return {"metadata": {"name": name, "creationTimestamp": created, **extra}, "status": status}


def test_parse_target() -> None:
    assert parse_target("svc/web") == ("service", "web")
    assert parse_target("service/web") == ("service", "web")
    assert parse_target("pod/web-0") == ("pod", "web-0")
    assert parse_target("web-0") == ("pod", "web-0")
    assert parse_target("deploy/web") == ("deployment", "web")
    with pytest.raises(ValueError, match="say pod/NAME, svc/NAME or deployment/NAME"):
        parse_target("job/x")


def test_pick_pod_prefers_running_ready_and_old_and_never_a_terminating_one() -> None:
    pods = [
        _pod("pending", "Pending", False, "2026-01-01T00:00:00Z"),
        _pod("young-ready", "Running", True, "2026-01-03T00:00:00Z"),
        _pod("old-unready", "Running", False, "2026-01-01T00:00:00Z"),
        _pod("old-ready", "Running", True, "2026-01-02T00:00:00Z"),
        _pod("going", "Running", True, "2026-01-01T00:00:00Z", deletionTimestamp="x"),
    ]
    assert pick_pod(pods)["metadata"]["name"] == "old-ready"  # type: ignore[index]
    assert pick_pod(pods[:1]) is None


def test_container_port_follows_target_ports_and_names() -> None:
    service = {
        "metadata": {"name": "web"},
        "spec": {
            "ports": [
                {"port": 80, "targetPort": "http"},
                {"port": 81, "targetPort": 9090},
                {"port": 82},
            ]
        },
    }
    pod = {
        "metadata": {"name": "p"},
        "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
    }
    assert container_port(service, pod, 80) == 8080
    assert container_port(service, pod, 81) == 9090
    assert container_port(service, pod, 82) == 82
    with pytest.raises(ValueError, match=r"service web has no port 443 \(its ports: 80, 81, 82\)"):
        container_port(service, pod, 443)
    with pytest.raises(
        ValueError, match="targets the port named 'http', which pod q does not declare"
    ):
        container_port(service, {"metadata": {"name": "q"}, "spec": {"containers": [{}]}}, 80)


# -- image archives ------------------------------------------------------------------------


def _archive(path: Path, files: dict[str, Any]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_archive_images_of_docker_save_and_oci_archives(tmp_path: Path) -> None:
    docker_save = _archive(
        tmp_path / "save.tar",
        {
            "manifest.json": [
                {"Config": "blobs/sha256/" + "a" * 64, "RepoTags": ["app:1"], "Layers": []}
            ]
        },
    )
    assert archive_images(docker_save) == [ArchiveImage("sha256:" + "a" * 64, ("app:1",))]
    old = _archive(
        tmp_path / "old.tar", {"manifest.json": [{"Config": "b" * 64 + ".json", "RepoTags": None}]}
    )
    assert archive_images(old) == [ArchiveImage("sha256:" + "b" * 64, ())]
    oci = _archive(
        tmp_path / "oci.tar",
        {
            "index.json": {
                "manifests": [
                    {
                        "digest": "sha256:" + "c" * 64,
                        "annotations": {"io.containerd.image.name": "docker.io/library/app:2"},
                    }
                ]
            },
            "blobs/sha256/" + "c" * 64: {"config": {"digest": "sha256:" + "d" * 64}, "layers": []},
        },
    )
    assert archive_images(oci) == [ArchiveImage("sha256:" + "d" * 64, ("docker.io/library/app:2",))]
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ImageError, match="cannot read it as an image archive"):
        archive_images(tmp_path / "plain.txt")
    with pytest.raises(ImageError, match="is not an image archive"):
        archive_images(_archive(tmp_path / "other.tar", {"x.json": {}}))


def test_nodes_loaded_from_kind_output() -> None:
    output = (
        'Image: "app:1" with ID "sha256:1" not yet present on node "c-worker", loading...\n'
        'Image: "app:1" with ID "sha256:1" not yet present on node "c-control-plane", loading...\n'
        'Image: "app:2" with ID "sha256:2" not yet present on node "c-worker", loading...\n'
    )
    assert nodes_loaded(output) == ["c-worker", "c-control-plane"]
    assert (
        nodes_loaded('Image: "app:1" with ID "sha256:1" found to be already present on all nodes.')
        == []
    )
    assert load_argv("c", ["a:1", "b:2"]) == [
        "kind",
        "load",
        "docker-image",
        "a:1",
        "b:2",
        "--name",
        "c",
    ]
    assert get_kubeconfig_argv("c", internal=True)[-1] == "--internal"


# -- namespaces, markers, diagnostics -------------------------------------------------------


def test_namespace_name() -> None:
    assert labels.namespace_name("test_deploys[web-1]", "a1b2c3") == "test-deploys-web-1-a1b2c3"
    long = labels.namespace_name("test_" + "x" * 100, "a1b2c3")
    assert len(long) == 63
    assert long.endswith("-a1b2c3")
    assert labels.namespace_name("[]", "a1b2c3") == "test-a1b2c3"


def test_marker_spec(tmp_path: Path) -> None:
    config = tmp_path / "three.yaml"
    config.write_text(
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes: [{role: control-plane}]\n"
    )
    spec = marker_spec((), {"nodes": 3, "node_image": "kindest/node:v1.35.2"}, tmp_path)
    assert spec == ClusterSpec(3, "kindest/node:v1.35.2", None)
    assert spec.id == "kipik-nodes3-node:v1.35.2"
    from_file = marker_spec((), {"kind_config": "three.yaml"}, tmp_path)
    assert from_file.arguments()["kind_config"] == str(config)
    assert from_file.id == "kipik-three"
    inline = marker_spec(
        (), {"kind_config": {"kind": "Cluster", "apiVersion": "kind.x-k8s.io/v1alpha4"}}, tmp_path
    )
    assert inline.arguments()["kind_config"] == {
        "kind": "Cluster",
        "apiVersion": "kind.x-k8s.io/v1alpha4",
    }
    assert hash(inline) == hash(
        marker_spec(
            (),
            {"kind_config": {"apiVersion": "kind.x-k8s.io/v1alpha4", "kind": "Cluster"}},
            tmp_path,
        )
    )
    with pytest.raises(
        ConfigError,
        match="takes only the keyword arguments nodes, node_image, kind_config, fresh; got node",
    ):
        marker_spec((), {"node": 3}, tmp_path)
    with pytest.raises(ConfigError, match="must be a whole number >= 1, not 0"):
        marker_spec((), {"nodes": 0}, tmp_path)
    with pytest.raises(ConfigError, match="positional"):
        marker_spec((3,), {}, tmp_path)
    fresh = marker_spec((), {"nodes": 2, "fresh": True}, tmp_path, "tests/test_a.py::TestOne")
    assert fresh.fresh_for == "tests/test_a.py::TestOne"
    assert fresh.id == "kipik-nodes2-fresh-test_a.py-TestOne"
    other = marker_spec((), {"nodes": 2, "fresh": True}, tmp_path, "tests/test_b.py")
    assert other != fresh  # each marked module or class gets its own cluster
    assert marker_spec((), {"nodes": 2}, tmp_path, "tests/test_b.py").fresh_for is None
    with pytest.raises(ConfigError, match=r"fresh=\.\.\.\) must be True or False, not 'yes'"):
        marker_spec((), {"fresh": "yes"}, tmp_path)


def test_troubled_pods_and_warning_events() -> None:
    crashing = {
        "metadata": {"name": "crash", "namespace": "ns"},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "app",
                    "restartCount": 2,
                    "ready": False,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}},
                }
            ],
        },
    }
    pulling = {
        "metadata": {"name": "pull", "namespace": "ns"},
        "status": {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": "app",
                    "restartCount": 0,
                    "state": {"waiting": {"reason": "ImagePullBackOff"}},
                }
            ],
        },
    }
    fine = {
        "metadata": {"name": "ok", "namespace": "ns"},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {"name": "app", "ready": True, "restartCount": 0, "state": {"running": {}}}
            ],
        },
    }
    done = {"metadata": {"name": "job", "namespace": "ns"}, "status": {"phase": "Succeeded"}}
    assert diagnostics.troubled([crashing, pulling, fine, done]) == [
        (
            "ns/crash",
            "Running",
            ["app: waiting: CrashLoopBackOff back-off 20s, 2 restarts"],
            ["app"],
        ),
        ("ns/pull", "Pending", ["app: waiting: ImagePullBackOff, 0 restarts"], []),
    ]
    events: list[dict[str, Any]] = [
        {"type": "Normal", "reason": "Pulled", "lastTimestamp": "3"},
        {
            "type": "Warning",
            "reason": "BackOff",
            "message": "m1",
            "count": 4,
            "lastTimestamp": "2",
            "involvedObject": {"kind": "Pod", "name": "crash", "namespace": "ns"},
        },
        {
            "type": "Warning",
            "reason": "Failed",
            "message": "m0",
            "lastTimestamp": "1",
            "involvedObject": {"kind": "Pod", "name": "pull", "namespace": "ns"},
        },
    ]
    assert diagnostics.event_lines(events, 5) == [
        "ns Pod/pull Failed: m0",
        "ns Pod/crash BackOff: m1 (x4)",
    ]
    assert diagnostics.event_lines(events, 1) == ["ns Pod/crash BackOff: m1 (x4)"]
    node = {
        "metadata": {"name": "n"},
        "status": {
            "conditions": [{"type": "Ready", "status": "False"}],
            "nodeInfo": {"kubeletVersion": "v1.36.1"},
        },
    }
    assert diagnostics.node_lines([node]) == ["n  NotReady  v1.36.1"]
