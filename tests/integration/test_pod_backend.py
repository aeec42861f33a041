"""The pod backend against the outer-cluster double (tests/doubles/outer), unchanged.

The double is an HTTPS Kubernetes API server whose pods are real privileged containers on the
local engine, with the real exec and port-forward WebSocket protocols. kipik talks to it only
through the official client, from outside (port-forward) and from inside (a pod of the double
running pytest with in-cluster config, reaching the DinD pod at its IP).
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from kubernetes import client as k8s_client

from pytest_kipik import kubeconfig
from pytest_kipik.waiting import NotYet, wait_until
from tests.conftest import (
    APP_IMAGE,
    OUTER_NAMESPACE,
    WEB,
    Leftovers,
    http_get,
    output_of_a_pod,
)

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = OUTER_NAMESPACE
SITE_PACKAGES = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()))


@pytest.fixture
def fresh_outer(outer: Any) -> Iterator[Any]:
    outer.allow_all()
    outer.hold_pending(False)
    yield outer
    outer.allow_all()
    outer.hold_pending(False)
    assert _pods(outer) == [], "a test left pods in the outer cluster"


def _pods(outer: Any, namespace: str = NAMESPACE) -> list[str]:
    core: Any = k8s_client.CoreV1Api(outer.admin_client())
    return sorted(str(p.metadata.name) for p in core.list_namespaced_pod(namespace).items)


def _pod_args(outer: Any, test_images: tuple[str, str], *extra: str) -> list[str]:
    dind, node = test_images
    return [
        "--kipik-backend=pod",
        f"--kipik-outer-kubeconfig={outer.kubeconfig_path}",
        f"--kipik-namespace={NAMESPACE}",
        f"--kipik-image={dind}",
        f"--kipik-node-image={node}",
        "-p",
        "no:cacheprovider",
        *extra,
    ]


def test_example_suite_from_outside_through_port_forward(
    pytester: pytest.Pytester,
    fresh_outer: Any,
    test_images: tuple[str, str],
    leftovers: Leftovers,
) -> None:
    pytester.syspathinsert(ROOT)
    for example in ("test_example.py", "test_workload.py"):
        shutil.copy(ROOT / "examples" / example, pytester.path / example)
    result = pytester.runpytest_subprocess(*_pod_args(fresh_outer, test_images))
    result.assert_outcomes(passed=5)
    out = result.stdout.str()
    assert "kipik: backend pod (from cli)" in out
    for phase in ("DinD up", "inner daemon ready", f"node image {test_images[1]} in",
                  "kind create", "kubeconfig + readiness", "teardown"):  # fmt: skip
        assert re.search(rf"kipik kipik-\w+: {re.escape(phase)} \(\d+\.\d+s\)", out), phase
    assert _pods(fresh_outer) == []
    assert leftovers() == []


def test_twenty_concurrent_https_requests_through_one_port_forward_and_the_toolkit(
    fresh_outer: Any,
    test_images: tuple[str, str],
    built_image: tuple[str, str],
    leftovers: Leftovers,
) -> None:
    from pytest_kipik import ClusterFactory, KipikConfig

    dind, node = test_images
    config = KipikConfig(
        backend="pod",
        image=dind,
        node_image=node,
        outer_kubeconfig=Path(fresh_outer.kubeconfig_path),
        namespace=NAMESPACE,
        timeout=240,
    )
    with ClusterFactory(config, report=print) as factory:
        cluster = factory.create(name="forward")
        assert cluster.server.startswith("https://127.0.0.1:")

        def one(_: int) -> str:
            api = kubeconfig.api_client(cluster.kubeconfig_path)  # its own connection
            try:
                return str(k8s_client.VersionApi(api).get_code().git_version)
            finally:
                api.close()

        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            versions = list(pool.map(one, range(20)))
        assert len(versions) == 20
        assert len(set(versions)) == 1
        assert _pods(fresh_outer) == ["forward-dind"]

        # an image of this engine goes through exec into the DinD pod, then into the node;
        # the second time nothing moves
        [first] = cluster.load_image(APP_IMAGE)
        [again] = cluster.load_image(APP_IMAGE)
        assert (first.moved, first.nodes) == (True, ("forward-control-plane",))
        assert (again.moved, again.nodes) == (False, ())
        # an image built during the test runs in a pod of the nested cluster
        image, token = built_image
        [built] = cluster.load_image(image)
        assert built.moved
        assert output_of_a_pod(cluster, image, ["cat", "/token"]) == f"{token}\n"
        # a pod runs from the app image, and its Service answers 20 requests at once
        cluster.apply(WEB)
        cluster.wait_for("Deployment", "web", condition="Available", timeout=120)
        with cluster.port_forward("svc/web", 80) as forward:
            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                bodies = list(pool.map(lambda _: http_get(forward.local_port, 30), range(20)))
            assert bodies == [b"kipik app\n"] * 20
            assert forward.connections == 20
    assert _pods(fresh_outer) == []
    assert leftovers() == []


def test_forbidden_pod_creation_fails_fast_naming_verb_and_resource(
    pytester: pytest.Pytester, fresh_outer: Any, test_images: tuple[str, str]
) -> None:
    fresh_outer.deny("create", "pods")
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    start = time.monotonic()
    result = pytester.runpytest_subprocess(*_pod_args(fresh_outer, test_images))
    assert time.monotonic() - start < 10 + 5  # + pytest's own start-up in a subprocess
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*the outer cluster refused to create pods in namespace kipik-test (HTTP 403)*"]
    )
    assert "examples/rbac.yaml" in result.stdout.str()


def test_pod_security_refusal_names_the_label(
    pytester: pytest.Pytester, fresh_outer: Any, test_images: tuple[str, str]
) -> None:
    fresh_outer.label_namespace(NAMESPACE, {"pod-security.kubernetes.io/enforce": "baseline"})
    try:
        pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
        result = pytester.runpytest_subprocess(*_pod_args(fresh_outer, test_images))
    finally:
        fresh_outer.label_namespace(NAMESPACE, {"pod-security.kubernetes.io/enforce": None})
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "Pod Security admission refused the privileged DinD pod" in out
    assert "pod-security.kubernetes.io/enforce=privileged" in out


def test_pod_that_never_schedules_fails_in_time_with_status_and_events(
    pytester: pytest.Pytester, fresh_outer: Any, test_images: tuple[str, str]
) -> None:
    fresh_outer.hold_pending(True)
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        *_pod_args(fresh_outer, test_images, "--kipik-timeout=15")
    )
    assert time.monotonic() - start < 15 + 20  # the timeout, start-up and the pod's deletion
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "timed out after 15s waiting for the DinD pod kipik-" in out
    assert "phase: Pending" in out
    assert "condition PodScheduled=False Unschedulable" in out
    assert "FailedScheduling" in out


def _runner(outer: Any, name: str, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """A pod of the double that runs pytest inside the outer cluster (in-cluster config)."""
    python_path = f"{SITE_PACKAGES}:{ROOT}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "pytest",
                    "image": "kipik-test/dind:dev",
                    "command": ["python3", "-m", "pytest", *args],
                    "workingDir": "/tmp",
                    "env": [
                        {"name": "PYTHONPATH", "value": python_path},
                        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
                        *({"name": k, "value": v} for k, v in env.items()),
                    ],
                    "volumeMounts": [
                        {"name": "repo", "mountPath": str(ROOT), "readOnly": True},
                        {"name": "site", "mountPath": str(SITE_PACKAGES), "readOnly": True},
                        # node images move from a local engine when there is one
                        {"name": "engine", "mountPath": "/var/run/docker.sock"},
                    ],
                }
            ],
            "volumes": [
                {"name": "repo", "hostPath": {"path": str(ROOT)}},
                {"name": "site", "hostPath": {"path": str(SITE_PACKAGES)}},
                {"name": "engine", "hostPath": {"path": "/var/run/docker.sock"}},
            ],
        },
    }


def _run_inside(
    outer: Any, name: str, args: list[str], env: dict[str, str], timeout: float
) -> tuple[str, str]:
    core: Any = k8s_client.CoreV1Api(outer.admin_client())
    core.create_namespaced_pod(NAMESPACE, _runner(outer, name, args, env))
    try:

        def finished() -> str:
            phase = str(core.read_namespaced_pod(name, NAMESPACE).status.phase)
            if phase not in ("Succeeded", "Failed"):
                raise NotYet(phase)
            return phase

        phase = wait_until(finished, what=f"the runner pod {name}", timeout=timeout, hint="-")
        return phase, str(core.read_namespaced_pod_log(name, NAMESPACE))
    finally:
        core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
        wait_until(
            lambda: _gone(core, name),
            what=f"the runner pod {name} to go",
            timeout=60,
            hint="-",
        )


def _gone(core: Any, name: str) -> None:
    if name in [p.metadata.name for p in core.list_namespaced_pod(NAMESPACE).items]:
        raise NotYet("still there")


def test_example_suite_from_inside_the_outer_cluster_at_the_pod_ip(
    fresh_outer: Any, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    dind, node = test_images
    phase, log = _run_inside(
        fresh_outer,
        "runner",
        [
            str(ROOT / "examples"),
            "-p",
            "no:cacheprovider",
            "--rootdir=/tmp",
            "--log-cli-level=INFO",
            "-rs",
        ],
        {"KIPIK_BACKEND": "pod", "KIPIK_IMAGE": dind, "KIPIK_NODE_IMAGE": node},
        timeout=300,
    )
    assert phase == "Succeeded", log
    # the runner image has no kubectl: the example that needs it says so and skips
    assert "4 passed, 1 skipped" in log, log
    assert "kubectl is not installed" in log
    assert "kipik: backend pod (from env)" in log
    assert (
        "outer cluster from the in-cluster config (service-account token), namespace "
        "kipik-test, reached by the pod IP (in-cluster)" in log
    )
    assert re.search(r"kipik kipik-\w+: kubeconfig \+ readiness \(\d+\.\d+s\)", log), log
    assert _pods(fresh_outer) == []
    assert leftovers() == []


def test_overlapping_subnet_is_a_usage_error_before_any_pod(
    fresh_outer: Any, test_images: tuple[str, str], docker_client: docker.DockerClient
) -> None:
    ipam = docker_client.networks.get(fresh_outer.network).attrs["IPAM"]["Config"]
    network = str(ipam[0]["Subnet"])  # the outer pods' range: the runner's IP is in it
    phase, log = _run_inside(
        fresh_outer,
        "overlap",
        [str(ROOT / "examples"), "-p", "no:cacheprovider", "--rootdir=/tmp"],
        {"KIPIK_BACKEND": "pod", "KIPIK_IMAGE": test_images[0], "KIPIK_POD_SUBNET": network},
        timeout=120,
    )
    assert phase == "Failed", log
    assert f"the nested cluster's podSubnet {network} contains" in log
    assert "(this pod's IP) of the outer network" in log
    assert _pods(fresh_outer) == []


def test_owner_pod_deletion_takes_the_dind_pod_with_it(
    fresh_outer: Any, test_images: tuple[str, str], tmp_path: Path, leftovers: Leftovers
) -> None:
    core: Any = k8s_client.CoreV1Api(fresh_outer.admin_client())
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_wait.py").write_text(
        "import time\n\n"
        "def test_holds_the_cluster(nested_cluster):\n"
        "    deadline = time.monotonic() + 240\n"
        "    while time.monotonic() < deadline:  # until the outer test deletes this pod\n"
        "        nested_cluster.core_v1.list_node()\n"
    )
    dind, node = test_images
    pod = _runner(
        fresh_outer,
        "owner",
        [str(suite), "-p", "no:cacheprovider", "--rootdir=/tmp", "-s"],
        {"KIPIK_BACKEND": "pod", "KIPIK_IMAGE": dind, "KIPIK_NODE_IMAGE": node},
    )
    pod["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "suite", "mountPath": str(suite), "readOnly": True}
    )
    pod["spec"]["volumes"].append({"name": "suite", "hostPath": {"path": str(suite)}})
    core.create_namespaced_pod(NAMESPACE, pod)

    def dind_running() -> str:
        for item in core.list_namespaced_pod(NAMESPACE, label_selector="kipik.io/run-id").items:
            if item.status.phase == "Running":
                refs = item.metadata.owner_references or []
                assert [r.name for r in refs] == ["owner"]
                return str(item.metadata.name)
        raise NotYet("no running DinD pod yet")

    dind_pod = wait_until(dind_running, what="the DinD pod", timeout=180, hint="-")
    core.delete_namespaced_pod("owner", NAMESPACE, grace_period_seconds=0)
    wait_until(
        lambda: _gone(core, dind_pod),
        what="the DinD pod to go with its owner",
        timeout=60,
        hint="the double's garbage collector follows ownerReferences",
    )
    wait_until(lambda: _gone(core, "owner"), what="the owner pod", timeout=60, hint="-")
    assert leftovers() == []


def test_sigkill_leaves_a_pod_that_stops_by_itself_at_its_deadline(
    pytester: pytest.Pytester, fresh_outer: Any, test_images: tuple[str, str]
) -> None:
    pytester.makepyfile(
        """
        import time

        def test_holds(nested_cluster):
            print("CLUSTER READY", flush=True)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # until the outer test kills this process
                nested_cluster.core_v1.list_node()
        """
    )
    args = _pod_args(fresh_outer, test_images, "--kipik-timeout=20", "--kipik-ttl=10", "-s")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *args],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # the cluster is up and in use
        seen.append(line)
        if "CLUSTER READY" in line:
            break
    else:
        pytest.fail("pytest ended before its cluster was ready:\n" + "".join(seen))
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    core: Any = k8s_client.CoreV1Api(fresh_outer.admin_client())
    (name,) = _pods(fresh_outer)
    pod = core.read_namespaced_pod(name, NAMESPACE)
    assert pod.spec.active_deadline_seconds == 30  # --kipik-timeout + --kipik-ttl

    def stopped() -> str:
        status = core.read_namespaced_pod(name, NAMESPACE).status
        if status.phase != "Failed":
            raise NotYet(str(status.phase))
        return str(status.reason)

    reason = wait_until(stopped, what="the orphaned DinD pod to stop", timeout=60, hint="-")
    assert reason == "DeadlineExceeded"
    core.delete_namespaced_pod(name, NAMESPACE, grace_period_seconds=0)
    wait_until(lambda: _gone(core, name), what="the stopped pod to go", timeout=60, hint="-")
