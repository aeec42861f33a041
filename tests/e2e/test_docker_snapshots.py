"""Snapshots on real kind (docker backend): saved once, restored for every later cluster.

One test, three pytest sessions with one configuration (so one cold cluster serves them all):

1. the example suite and a test on a cold cluster, after the setup hook installed a CRD and loaded
   an image: the cluster is saved as the configuration's snapshot;
2. under xdist, the example suite again on the restored session cluster, and two modules marked
   ``fresh=True``, each on its own restored cluster (restored at the same time): the setup hook's
   CRD and image are there, no object of another cluster is, pods run, DNS resolves, port-forwards
   and kubeconfigs verify TLS, the image the hook pushed into the registry inside runs, which
   is announced at the copy's own address, the controller-manager and the scheduler took their
   leader leases since the restore, and the inner daemon started the node itself (every mount
   was there); the hook ran once in all;
3. after a tree of the snapshot was removed: the restore fails, says why, the snapshot is discarded
   and the cluster created instead; the test passes and a new snapshot (short ttl) is saved, which
   ``kipik gc`` removes once expired.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import docker
import docker.errors
import pytest

from pytest_kipik.hosts.snapshots import volume_name
from pytest_kipik.waiting import NotYet, wait_until
from tests.conftest import APP_IMAGE, Leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

SETUP_PLUGIN = f'''
from pathlib import Path

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: widgets.kipik.test}}
spec:
  group: kipik.test
  names: {{kind: Widget, plural: widgets, singular: widget}}
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
"""


def pytest_kipik_cluster_setup(cluster):
    with (Path(__file__).parent / "setup-calls").open("a") as calls:
        calls.write(cluster.name + "\\n")
    cluster.apply(CRD)
    cluster.wait_for("CustomResourceDefinition", "widgets.kipik.test", "Established")
    cluster.load_image({APP_IMAGE!r})
    cluster.registry.push({APP_IMAGE!r})  # into the registry inside: part of the snapshot
'''

WIDGETS = """
def widget(name):
    return {"apiVersion": "kipik.test/v1", "kind": "Widget",
            "metadata": {"name": name, "namespace": "default"}}


def widget_names(cluster):
    found = cluster.kubectl("get", "widgets", "-o", "name").stdout.split()
    return sorted(name.split("/")[-1] for name in found)
"""

FIRST = (
    WIDGETS
    + """

def test_the_setup_hook_ran_before_the_tests(nested_cluster):
    assert nested_cluster.status == "created"
    assert widget_names(nested_cluster) == []
    nested_cluster.apply(widget("from-the-first-session"))  # after the snapshot was saved
"""
)

FRESH = (
    WIDGETS
    + f"""
import datetime
import socket
import urllib.request

import pytest
from kubernetes.client import CoordinationV1Api

from pytest_kipik.waiting import NotYet, wait_until

pytestmark = pytest.mark.kipik(fresh=True)

POD = '''
apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web}}}}
spec:
  containers:
  - name: web
    image: {APP_IMAGE}
    imagePullPolicy: Never
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
'''


def test_a_pristine_restored_cluster_of_its_own(nested_cluster):
    assert nested_cluster.status == "restored"
    assert widget_names(nested_cluster) == []  # nothing of the first session, nor of the others
    mine = "from-" + __name__.replace("_", "-")
    nested_cluster.apply(widget(mine))
    assert widget_names(nested_cluster) == [mine]


def test_the_restored_control_plane_leads_and_its_node_was_started_by_the_inner_daemon(
    nested_cluster,
):
    node = nested_cluster.kind_name + "-control-plane"
    started = nested_cluster.host.exec(["docker", "inspect", "-f", "{{{{.State.StartedAt}}}}",
        node], timeout=60).check().stdout.strip()
    started_at = datetime.datetime.fromisoformat(started[:19] + "+00:00")
    for name in ("kube-controller-manager", "kube-scheduler"):  # new holders, since the restore
        lease = CoordinationV1Api(nested_cluster.api_client).read_namespaced_lease(
            name, "kube-system")
        assert lease.spec.acquire_time >= started_at, (name, lease.spec, started)
    # the node files were in before the inner daemon started, so its own restart of the node
    # (kind's restart policy) found every mount
    log = nested_cluster.host.exec(["cat", "/var/log/dockerd.log"], timeout=60).check().stdout
    assert "Loading containers: done" in log
    assert "failed to start container" not in log, log[-3000:]


def test_pods_from_the_setup_hooks_image_dns_and_port_forward(nested_cluster):
    nested_cluster.apply(POD)
    nested_cluster.wait_for("Pod", "web", condition="Ready", timeout=180)
    address = nested_cluster.core_v1.read_namespaced_service("web", "default").spec.cluster_ip

    def resolved():  # DNS learns of a new Service within seconds, not at once
        done = nested_cluster.kubectl(
            "exec", "web", "--", "nslookup", "web.default.svc.cluster.local", check=False,
            timeout=60,
        )
        if address not in done.stdout:
            raise NotYet(done.stdout + done.stderr)

    wait_until(resolved, what="web.default.svc.cluster.local to resolve", timeout=60,
               hint="CoreDNS answers for a Service once it has seen it")
    with nested_cluster.port_forward("svc/web", 80) as forward:
        with urllib.request.urlopen(f"http://127.0.0.1:{{forward.local_port}}/", timeout=30) as r:
            assert r.status == 200
    nodes = nested_cluster.kubectl("get", "nodes", "--no-headers").stdout  # kubectl: TLS
    assert " Ready " in nodes
    # the restarted kubelet (v1.22) was answered by the node's Docker answer at its start
    answered = nested_cluster.host.exec(["docker", "exec", nodes.split()[0], "systemctl", "show",
        "kipik-cadvisor-docker.socket", "-p", "NAccepted", "--value"], timeout=60).check()
    assert int(answered.stdout) > 0, answered


def test_the_registry_inside_kept_the_setup_hooks_image_and_is_announced_here(nested_cluster):
    pulled = POD.split("---")[0].replace("name: web", "name: pulled").replace(
        "image: {APP_IMAGE}", "image: localhost:5001/{APP_IMAGE}").replace("Never", "Always")
    nested_cluster.apply(pulled)
    nested_cluster.wait_for("Pod", "pulled", condition="Ready", timeout=180)
    hosting = nested_cluster.core_v1.read_namespaced_config_map(
        "local-registry-hosting", "kube-public").data["localRegistryHosting.v1"]
    assert f"host: {{nested_cluster.registry.address}}\\n" in hosting  # this copy's port
"""
)


def _env(pytester: pytest.Pytester) -> dict[str, str]:
    return {
        **os.environ,
        "KIPIK_SNAPSHOTS": "yes",
        "XDG_STATE_HOME": str(pytester.path / "state"),
        "XDG_CACHE_HOME": str(pytester.path / "cache"),
        "PYTHONPATH": str(pytester.path),
    }


def _pytest(
    pytester: pytest.Pytester,
    env: dict[str, str],
    images: tuple[str, str],
    prefix: str,
    *args: str,
) -> subprocess.CompletedProcess[str]:
    dind, node = images
    argv = [sys.executable, "-m", "pytest", f"--kipik-image={dind}", f"--kipik-node-image={node}",
            f"--kipik-name-prefix={prefix}", "--kipik-timeout=15m", "-p", "no:cacheprovider",
            "-p", "kipik_setup", "-p", "no:benchmark", f"--rootdir={pytester.path}",
            *args]  # fmt: skip
    return subprocess.run(
        argv, cwd=pytester.path, env=env, capture_output=True, text=True, timeout=1800,
        check=False,
    )  # fmt: skip


def _kipik(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_kipik", *args],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip


def _break(client: docker.DockerClient, image: str, volume: str) -> None:
    """Remove the snapshot's overlay trees (the image's own anonymous volume goes too)."""
    helper = client.containers.run(
        image, entrypoint=["sh", "-c", "rm -rf /s/overlay2/*/diff"],
        volumes={volume: {"bind": "/s", "mode": "rw"}}, detach=True,
    )  # fmt: skip
    try:
        assert helper.wait(timeout=300)["StatusCode"] == 0, helper.logs()
    finally:
        helper.remove(v=True, force=True)


def test_a_snapshot_is_saved_once_restored_for_later_clusters_and_a_broken_one_is_replaced(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    registry_image: str,
    leftovers: Leftovers,
) -> None:
    prefix = f"ksnap{secrets.token_hex(3)}"  # a configuration (and snapshot) of this test only
    pytester.makepyfile(
        kipik_setup=SETUP_PLUGIN,
        test_first=FIRST,
        **{p.stem: p.read_text() for p in EXAMPLES.glob("test_*.py")},  # node ids of their own
    )
    dind = test_images[0]
    env = {**_env(pytester), "KIPIK_REGISTRY": registry_image}  # a registry inside, saved too
    examples = ["test_example.py", "test_workload.py"]
    snapshots: list[str] = []
    try:
        # 1. cold: the setup hook, then the snapshot
        first = _pytest(pytester, env, test_images, prefix, *examples, "test_first.py")
        out = first.stdout
        assert first.returncode == 0, out + first.stderr
        assert "6 passed" in out, out
        assert re.search(rf"kipik {prefix}-\w+: setup hook \(\d+\.\d+s\)", out), out
        saved = re.search(rf"kipik {prefix}-\w+: snapshot saved \((\d+\.\d+)s\)", out)
        assert saved, out
        snapshots = [v.name for v in docker_client.volumes.list(filters={"name": prefix})]
        assert len(snapshots) == 1, snapshots
        assert leftovers() == [f"volume {snapshots[0]}"]  # the snapshot, nothing else
        listed = json.loads(_kipik(env, "ls", "--json").stdout)
        assert [(r["name"], r["kind"], r["status"]) for r in listed if r["name"] in snapshots] == [
            (snapshots[0], "snapshot", "saved")
        ]

        # 2. restored: the session cluster and one per fresh module, two at the same time
        pytester.makepyfile(test_fresh_a=FRESH, test_fresh_b=FRESH)
        second = _pytest(
            pytester, env, test_images, prefix, *examples, "test_fresh_a.py", "test_fresh_b.py",
            "-n", "2", "--dist", "loadfile",
        )  # fmt: skip
        out = second.stdout
        assert second.returncode == 0, out + second.stderr
        assert "13 passed" in out, out
        restores = re.findall(rf"kipik ({prefix}-[\w-]+): DinD up from snapshot", out)
        assert len(set(restores)) == 3, out  # the session's cluster and two fresh ones
        assert "kind create" not in out, out
        ready = [float(t) for t in re.findall(r": kubeconfig \+ readiness \((\d+\.\d+)s\)", out)]
        print(f"restored: kubeconfig + readiness {ready}; first snapshot {saved[1]}s")
        calls = (pytester.path / "setup-calls").read_text().split()
        assert len(calls) == 1, calls  # the first session's cold cluster only
        assert leftovers() == [f"volume {snapshots[0]}"]

        # 3. a broken snapshot: restored no more, discarded, replaced by a new one
        _break(docker_client, dind, snapshots[0])
        third = _pytest(pytester, dict(env, KIPIK_TTL="2s"), test_images, prefix, "test_first.py")
        out = third.stdout
        assert third.returncode == 0, out + third.stderr
        assert re.search(
            rf"restoring from snapshot {snapshots[0]} failed \(.+\); creating the cluster instead",
            out,
        ), out
        assert "kind create" in out
        assert re.search(rf"kipik {prefix}-\w+: snapshot saved", out), out
        replaced = [v.name for v in docker_client.volumes.list(filters={"name": prefix})]
        assert replaced == snapshots  # the same name, a new snapshot (the old one went)

        def expired_and_gone() -> None:
            gc = _kipik(env, "gc")
            assert gc.returncode == 0, gc.stdout + gc.stderr
            if docker_client.volumes.list(filters={"name": prefix}):
                raise NotYet(gc.stdout.strip())

        wait_until(expired_and_gone, what="kipik gc to remove the expired snapshot", timeout=60,
                   hint="its ttl was 2s")  # fmt: skip
        snapshots = []
    finally:
        for name in snapshots or [volume_name(prefix, "")]:
            for volume in docker_client.volumes.list(filters={"name": name}):
                with contextlib.suppress(docker.errors.APIError):
                    volume.remove(force=True)
    assert leftovers() == []
