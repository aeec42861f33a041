"""The pod backend on a real outer cluster (a kind cluster on the local engine, tests/e2e/outer.py).

kipik gets only the kubeconfig of ``examples/rbac.yaml``'s ServiceAccount (applied unchanged);
admin access is for the tests' own setup and checks. From outside, nested clusters are reached
through port-forwards; from inside, a runner pod runs pytest with in-cluster configuration and
its DinD pod pulls the node image from a registry in the outer cluster. Few nested clusters are
made (each costs minutes here): the example suite from outside, one cluster for the toolkit and
the ``kipik`` command, and the example suite from inside; the failure paths stop before kind.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
import yaml
from kubernetes import client as k8s_client

from pytest_kipik.k8s import kubeconfig
from pytest_kipik.waiting import NotYet, wait_until
from tests.conftest import APP_IMAGE, WEB, http_get, output_of_a_pod
from tests.e2e import outer as outer_mod
from tests.e2e.conftest import InCluster, Tenant
from tests.e2e.mirror import Mirror, started
from tests.e2e.outer import OuterCluster, small_pod_template

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
ROOT = Path(__file__).resolve().parents[2]
RUN_ID = "kipik.io/run-id"
#: Generous: a nested cluster costs 2-4 minutes on a busy 2-core machine.
NESTED_TIMEOUT = "15m"


@pytest.fixture
def leftovers(outer: OuterCluster, tenant: Tenant) -> Iterator[Callable[[], list[str]]]:
    """What kipik left in this test's outer namespace (DinD pods); nothing at the end.

    Replaces the engine-wide count of tests/conftest.py: other jobs run kipik on this engine.
    """

    def left() -> list[str]:
        return outer.pods(tenant.namespace, RUN_ID)

    yield left
    assert left() == [], f"DinD pods left in {tenant.namespace}"


def pod_args(tenant: Tenant, *extra: str, kubeconfig: Path | None = None) -> list[str]:
    """The pytest options for the pod backend with the ServiceAccount's kubeconfig."""
    return [
        "--kipik-backend=pod",
        f"--kipik-outer-kubeconfig={kubeconfig or tenant.kubeconfig}",
        f"--kipik-namespace={tenant.namespace}",
        "-p",
        "no:cacheprovider",
        *extra,
    ]


def cli_env(tenant: Tenant, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a ``kipik`` command on the pod backend."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIPIK_")}
    env.update(
        KIPIK_BACKEND="pod",
        KIPIK_OUTER_KUBECONFIG=str(tenant.kubeconfig),
        KIPIK_NAMESPACE=tenant.namespace,
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        **extra,
    )
    return env


def kipik(
    env: dict[str, str], *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """``python -m pytest_kipik ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "pytest_kipik", *args],
        env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def narrow_kubeconfig(
    outer: OuterCluster,
    tenant: Tenant,
    account: str,
    *,
    resource: str,
    verbs: tuple[str, ...],
    path: Path,
) -> Path:
    """A second ServiceAccount: the Role of examples/rbac.yaml minus ``verbs`` on ``resource``."""
    documents = list(yaml.safe_load_all(outer_mod.RBAC.read_text()))
    for document in documents:
        document["metadata"]["name"] = account
        if document["kind"] == "Role":
            for rule in document["rules"]:
                if resource in rule["resources"]:
                    rule["verbs"] = [v for v in rule["verbs"] if v not in verbs]
        if document["kind"] == "RoleBinding":
            document["roleRef"]["name"] = account
            document["subjects"][0]["name"] = account
    outer.apply(tenant.namespace, yaml.safe_dump_all(documents))
    return outer.account_kubeconfig(tenant.namespace, account, path)


def copy_examples(pytester: pytest.Pytester) -> None:
    for example in ("test_example.py", "test_workload.py"):
        shutil.copy(ROOT / "examples" / example, pytester.path / example)


# -- from outside ---------------------------------------------------------------------------------


def test_example_suite_from_outside_through_port_forward(
    pytester: pytest.Pytester,
    tenant: Tenant,
    test_images: tuple[str, str],
    tmp_path: Path,
    leftovers: Callable[[], list[str]],
) -> None:
    dind, node = test_images
    copy_examples(pytester)
    template = small_pod_template(tmp_path / "template.json")
    result = pytester.runpytest_subprocess(
        *pod_args(tenant, f"--kipik-image={dind}", f"--kipik-node-image={node}",
                  f"--kipik-pod-template={template}", f"--kipik-timeout={NESTED_TIMEOUT}",
                  "--log-cli-level=INFO"),
        timeout=1500,
    )  # fmt: skip
    out = result.stdout.str()
    result.assert_outcomes(passed=5)
    assert "kipik: backend pod (from cli)" in out
    assert f"namespace {tenant.namespace}, reached by port-forward" in out
    for step in ("DinD up", "inner daemon ready", f"node image {node} in", "kind create",
                 "kubeconfig + readiness", "teardown"):  # fmt: skip
        assert re.search(rf"kipik kipik-\w+: {re.escape(step)} \(\d+\.\d+s\)", out), step
    assert leftovers() == []


@pytest.fixture
def mirror(
    outer: OuterCluster, docker_client: docker.DockerClient, registry_image: str, tmp_path: Path
) -> Iterator[Mirror]:
    """A mirror (TLS from a private CA, a password) on the outer cluster's network."""
    with started(docker_client, tmp_path / "mirror", ("kind",)) as running:
        yield running


def test_toolkit_registries_and_the_kipik_command_on_one_cluster_from_outside(
    *,
    outer: OuterCluster,
    tenant: Tenant,
    test_images: tuple[str, str],
    built_image: tuple[str, str],
    docker_client: docker.DockerClient,
    mirror: Mirror,
    tmp_path: Path,
) -> None:
    from pytest_kipik import ClusterFactory, KipikConfig

    dind, node = test_images
    # the node image only in the mirror; the registry inside runs too
    mirrored_node = f"kipik-test/mirrored-node:{uuid.uuid4().hex[:8]}"
    mirror.push(docker_client, node, mirrored_node)
    env = cli_env(tenant, tmp_path, KIPIK_IMAGE=dind)
    monkeypatch = pytest.MonkeyPatch()
    for key in ("XDG_STATE_HOME", "XDG_CACHE_HOME"):  # the kipik commands find the kept cluster
        monkeypatch.setenv(key, env[key])
    name = f"toolkit-{uuid.uuid4().hex[:6]}"
    config = KipikConfig(
        backend="pod", image=dind, node_image=mirrored_node, outer_kubeconfig=tenant.kubeconfig,
        namespace=tenant.namespace, timeout=900, keep=True,
        pod_template=small_pod_template(tmp_path / "template.json"),
        registry=outer_mod.REGISTRY_IMAGE, **mirror.settings("kind"),
    )  # fmt: skip
    try:
        with ClusterFactory(config, report=print) as factory:
            cluster = factory.create(name=name)
            assert cluster.server.startswith("https://127.0.0.1:")

            def version(_: int) -> str:
                api = kubeconfig.api_client(cluster.kubeconfig_path)  # a connection of its own
                try:
                    return str(k8s_client.VersionApi(api).get_code().git_version)
                finally:
                    api.close()

            with concurrent.futures.ThreadPoolExecutor(20) as pool:
                assert set(pool.map(version, range(20))) == {"v1.22.3"}

            # an engine image goes through exec into the DinD pod, then into the node, once
            [first] = cluster.load_image(APP_IMAGE)
            [again] = cluster.load_image(APP_IMAGE)
            assert (first.moved, first.nodes) == (True, (f"{name}-control-plane",))
            assert (again.moved, again.nodes) == (False, ())
            image, token = built_image  # built during the test, runs in a nested pod
            [built] = cluster.load_image(image)
            assert built.moved
            assert output_of_a_pod(cluster, image, ["cat", "/token"]) == f"{token}\n"

            # registries: the node image came through the mirror, a workload image comes through
            # it to the nodes, and an image pushed to the registry inside runs
            digests = ["docker", "image", "inspect", "--format", "{{json .RepoDigests}}"]
            inspected = cluster.host.exec([*digests, mirrored_node], timeout=60).check()
            repository = mirrored_node.split(":", maxsplit=1)[0]
            assert f'"{repository}@sha256:' in inspected.stdout  # pulled, not loaded
            mirrored_app = f"kipik-test/mirrored-app:{token}"
            mirror.push(docker_client, image, mirrored_app)
            assert output_of_a_pod(cluster, mirrored_app, ["cat", "/token"]) == f"{token}\n"
            assert cluster.registry.address.startswith("127.0.0.1:")  # a port-forward
            pulled_as = cluster.registry.push(image)
            assert output_of_a_pod(cluster, pulled_as, ["cat", "/token"]) == f"{token}\n"
            cluster.apply(WEB)
            cluster.wait_for("Deployment", "web", condition="Available", timeout=300)
            with cluster.port_forward("svc/web", 80) as forward:
                with concurrent.futures.ThreadPoolExecutor(20) as pool:
                    bodies = list(pool.map(lambda _: http_get(forward.local_port, 60), range(20)))
                assert bodies == [b"kipik app\n"] * 20
                assert forward.connections == 20

            # the kipik command sees the kept cluster and reaches it through a port-forward
            listed = kipik(env, "ls", "--json", timeout=120)
            assert listed.returncode == 0, listed.stderr
            rows = [r for r in json.loads(listed.stdout) if r["name"] == name]
            assert [(r["backend"], r["status"], r["kind"]) for r in rows] == [
                ("pod", "running", "kept")
            ]
            script = (
                'grep -q "server: https://127.0.0.1:" "$KUBECONFIG" && '
                'kubectl --kubeconfig "$KUBECONFIG" get nodes --no-headers -o name'
            )
            shell = kipik(env, "shell", name, "--", "sh", "-c", script)
            assert shell.returncode == 0, shell.stderr + shell.stdout
            assert f"node/{name}-control-plane" in shell.stdout
            logs = kipik(env, "logs", name, str(tmp_path / "logs"))
            assert logs.returncode == 0, logs.stderr
            exported = tmp_path / "logs" / name
            for file in ("kind-version.txt", "dind-daemon.log", f"{name}-control-plane/serial.log"):
                assert (exported / file).stat().st_size > 0, file
        assert outer.pods(tenant.namespace, RUN_ID) == [f"{name}-dind"]  # kept
        down = kipik(env, "down", "--force", name)
        assert down.returncode == 0, down.stderr
        assert f"removed pod {name}-dind" in down.stdout
    finally:
        kipik(env, "down", "--force", name)
        monkeypatch.undo()
    assert outer.pods(tenant.namespace, RUN_ID) == []


# -- failure paths from outside -------------------------------------------------------------------


def test_a_role_without_create_and_list_pods_fails_fast_with_one_clear_line(
    pytester: pytest.Pytester,
    outer: OuterCluster,
    tenant: Tenant,
    test_images: tuple[str, str],
    tmp_path: Path,
) -> None:
    narrow = narrow_kubeconfig(
        outer, tenant, "no-create", resource="pods", verbs=("create", "list"), path=tmp_path / "kc"
    )
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        *pod_args(tenant, f"--kipik-image={test_images[0]}", kubeconfig=narrow)
    )
    assert time.monotonic() - start < 90
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    refused = f"the outer cluster refused to create pods in namespace {tenant.namespace} (HTTP 403)"
    assert refused in out
    assert "system:serviceaccount:" + tenant.namespace + ":no-create" in out
    assert "examples/rbac.yaml" in out
    assert "refused to list pods" not in out  # no second, redundant line from the teardown
    assert outer.pods(tenant.namespace, RUN_ID) == []


def test_doctor_names_a_denied_permission_and_passes_with_the_full_role(
    outer: OuterCluster,
    tenant: Tenant,
    test_images: tuple[str, str],
    tmp_path: Path,
    leftovers: Callable[[], list[str]],
) -> None:
    template = small_pod_template(tmp_path / "template.json")
    env = cli_env(tenant, tmp_path, KIPIK_IMAGE=test_images[0], KIPIK_POD_TEMPLATE=str(template))
    narrow = narrow_kubeconfig(
        outer, tenant, "no-exec", resource="pods/exec", verbs=("create",), path=tmp_path / "kc"
    )
    denied = kipik({**env, "KIPIK_OUTER_KUBECONFIG": str(narrow)}, "doctor")
    assert denied.returncode == 1, denied.stdout
    lines = denied.stdout.splitlines()
    assert f"fail  rbac: missing in namespace {tenant.namespace}: create pods/exec" in lines
    fix = f"kubectl apply -n {tenant.namespace} -f examples/rbac.yaml"
    assert any(line.startswith("      fix: ") and fix in line for line in lines), denied.stdout
    # Kubernetes before 1.31 authorizes exec over a WebSocket (a GET) by `get pods/exec`: the
    # doctor's DinD pod still answers, though the Role lacks the `create` that rbac.yaml grants
    outer.wait_no_pods(tenant.namespace, RUN_ID, 120)  # the doctor's pod is gone

    allowed = kipik(env, "doctor")
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    assert f"ok    rbac: all 12 permissions in namespace {tenant.namespace}" in allowed.stdout
    assert (
        f"ok    privileged: a privileged DinD pod from {test_images[0]} ran and its Docker answered"
    ) in allowed.stdout
    outer.wait_no_pods(tenant.namespace, RUN_ID, 120)
    assert leftovers() == []


def test_a_pod_that_never_schedules_fails_within_the_timeout_with_status_and_events(
    pytester: pytest.Pytester,
    tenant: Tenant,
    test_images: tuple[str, str],
    tmp_path: Path,
    leftovers: Callable[[], list[str]],
) -> None:
    template = small_pod_template(
        tmp_path / "template.json", nodeSelector={"kipik.example/no-such-node": "true"}
    )
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    start = time.monotonic()
    result = pytester.runpytest_subprocess(
        *pod_args(tenant, f"--kipik-image={test_images[0]}", f"--kipik-pod-template={template}",
                  "--kipik-timeout=40s"),
    )  # fmt: skip
    took = time.monotonic() - start
    assert 30 < took < 40 + 90, took  # the timeout, start-up and the pod's deletion
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert re.search(r"timed out after \d+s waiting for the DinD pod kipik-\S+ to run", out), out
    assert "phase: Pending" in out
    assert "condition PodScheduled=False Unschedulable" in out
    assert "FailedScheduling" in out
    assert "node(s) didn't match Pod's node affinity/selector" in out
    assert leftovers() == []


def test_an_image_the_nodes_cannot_pull_fails_with_the_pod_status_only(
    pytester: pytest.Pytester,
    tenant: Tenant,
    tmp_path: Path,
    leftovers: Callable[[], list[str]],
) -> None:
    # not loaded into the outer cluster; Never: the node must not try a registry off this machine
    template = small_pod_template(tmp_path / "template.json")
    small = json.loads(template.read_text())
    small["spec"]["containers"][0]["imagePullPolicy"] = "Never"
    template.write_text(json.dumps(small))
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess(
        *pod_args(tenant, "--kipik-image=kipik-test/not-loaded:1",
                  f"--kipik-pod-template={template}", "--kipik-timeout=5m"),
    )  # fmt: skip
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "the DinD pod kipik-" in out
    assert "cannot run" in out
    assert "container dind: waiting: ErrImageNeverPull" in out
    assert "kipik-test/not-loaded:1" in out
    # the status report only: no raw API exception with its HTTP headers after it
    assert "HTTP response headers" not in out
    assert "Reason: Bad Request" not in out
    assert leftovers() == []


def test_sigkill_outside_leaves_a_dind_pod_that_stops_at_its_deadline_and_gc_removes(
    pytester: pytest.Pytester,
    outer: OuterCluster,
    tenant: Tenant,
    test_images: tuple[str, str],
    tmp_path: Path,
) -> None:
    dind, node = test_images
    template = small_pod_template(tmp_path / "template.json")
    pytester.makepyfile("def test_holds(nested_cluster):\n    pass\n")
    args = pod_args(tenant, f"--kipik-image={dind}", f"--kipik-node-image={node}",
                    f"--kipik-pod-template={template}", "--kipik-timeout=40s",
                    "--kipik-ttl=20s")  # fmt: skip
    env = cli_env(tenant, tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *args], cwd=pytester.path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def running() -> str:
            with outer.core() as core:
                for pod in core.list_namespaced_pod(tenant.namespace, label_selector=RUN_ID).items:
                    if pod.status.phase == "Running":
                        return str(pod.metadata.name)
            raise NotYet("no running DinD pod yet")

        name = wait_until(running, what="the DinD pod to run", timeout=120, hint="-", interval=0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    with outer.core() as core:
        pod: Any = core.read_namespaced_pod(name, tenant.namespace)
        assert pod.spec.active_deadline_seconds == 60  # --kipik-timeout + --kipik-ttl

    def stopped() -> str:
        with outer.core() as core:
            status: Any = core.read_namespaced_pod(name, tenant.namespace).status
        if status.phase != "Failed":
            raise NotYet(str(status.phase))
        return str(status.reason)

    # the deadline counts from the pod's start, a few seconds before the kill
    reason = wait_until(stopped, what="the orphaned pod to stop", timeout=60 + 120, hint="-")
    assert reason == "DeadlineExceeded"
    gc = kipik(env, "gc")  # the owner pid is gone: `kipik gc` removes what is left
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert f"removed pod {name}" in gc.stdout
    assert outer.pods(tenant.namespace, RUN_ID) == []


# -- from inside: a runner pod with in-cluster configuration --------------------------------------


def runner_pod(
    name: str, cluster: InCluster, command: list[str], env: dict[str, str], grace: int = 30
) -> dict[str, Any]:
    """A pod of the runner image as ServiceAccount kipik-runner, without a Docker engine."""
    settings = {
        "KIPIK_IMAGE": cluster.dind_image,
        "KIPIK_NODE_IMAGE": cluster.node_image,
        "KIPIK_POD_TEMPLATE": outer_mod.RUNNER_TEMPLATE,
        "KIPIK_TIMEOUT": NESTED_TIMEOUT,
        **env,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "kipik-e2e-runner"}},
        "spec": {
            "serviceAccountName": outer_mod.SERVICE_ACCOUNT,
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace,
            "containers": [
                {
                    "name": "pytest",
                    "image": cluster.runner_image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "env": [{"name": k, "value": v} for k, v in settings.items()],
                    "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}},
                }
            ],
        },
    }


def pytest_in_runner(*extra: str) -> list[str]:
    return ["python3", "-m", "pytest", outer_mod.RUNNER_SUITE, "-p", "no:cacheprovider",
            "-rs", "--rootdir=/work", "--log-cli-level=INFO", *extra]  # fmt: skip


def run_to_the_end(
    outer: OuterCluster, namespace: str, pod: dict[str, Any], timeout: float
) -> tuple[str, str]:
    """Create the runner pod, wait until it ends; its phase and log; then delete it."""
    name = pod["metadata"]["name"]
    with outer.core() as core:
        core.create_namespaced_pod(namespace, pod)
    try:
        phase = outer_mod.wait_phase(outer, namespace, name, ("Succeeded", "Failed"), timeout)
        with outer.core() as core:
            return phase, str(core.read_namespaced_pod_log(name, namespace))
    finally:
        with outer.core() as core:
            core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
        outer.wait_no_pods(namespace, "app=kipik-e2e-runner", 120)


def test_example_suite_from_a_runner_pod_inside_pulling_from_the_registry_inside(
    outer: OuterCluster,
    tenant: Tenant,
    in_cluster: InCluster,
    leftovers: Callable[[], list[str]],
) -> None:
    pod = runner_pod("runner", in_cluster, pytest_in_runner(), {})
    phase, log = run_to_the_end(outer, tenant.namespace, pod, timeout=1500)
    assert phase == "Succeeded", log
    assert "kipik: backend pod (auto: in a Kubernetes pod with a service-account token and no " \
        "Docker)" in log  # fmt: skip
    assert (
        "outer cluster from the in-cluster config (service-account token), namespace "
        f"{tenant.namespace}, reached by the pod IP (in-cluster)"
    ) in log
    # no Docker engine in the pod: the workload example has no image to load and says so
    assert "4 passed, 1 skipped" in log, log
    assert "no Docker engine here to take kipik-test/app:dev from" in log
    assert re.search(r"kipik kipik-\w+: kind create \(\d+\.\d+s\)", log), log
    assert leftovers() == []


def test_an_overlapping_pod_subnet_is_a_usage_error_inside_before_any_pod(
    outer: OuterCluster,
    tenant: Tenant,
    in_cluster: InCluster,
    leftovers: Callable[[], list[str]],
) -> None:
    subnet = (
        "10.244.0.0/16"  # kind's default pod subnet: the outer cluster's, the runner's IP in it
    )
    pod = runner_pod("overlap", in_cluster, pytest_in_runner(), {"KIPIK_POD_SUBNET": subnet})
    phase, log = run_to_the_end(outer, tenant.namespace, pod, timeout=300)
    assert phase == "Failed", log
    assert f"the nested cluster's podSubnet {subnet} contains" in log
    assert "(this pod's IP) of the outer network" in log
    assert leftovers() == []


def _dind_pod_of(outer: OuterCluster, namespace: str, owner: str, timeout: float) -> str:
    """The running DinD pod whose ownerReference names ``owner``."""

    def found() -> str:
        with outer.core() as core:
            pods = core.list_namespaced_pod(namespace, label_selector=RUN_ID).items
        for pod in pods:
            refs = [r.name for r in pod.metadata.owner_references or []]
            if pod.status.phase == "Running" and refs == [owner]:
                return str(pod.metadata.name)
        raise NotYet(f"pods: {[(p.metadata.name, p.status.phase) for p in pods]}")

    return wait_until(found, what=f"a running DinD pod owned by {owner}", timeout=timeout, hint="-")


def test_deleting_the_runner_pod_takes_its_dind_pod_with_it(
    outer: OuterCluster,
    tenant: Tenant,
    in_cluster: InCluster,
    leftovers: Callable[[], list[str]],
) -> None:
    # sh as PID 1 never passes SIGTERM on: nothing but the ownerReference removes the DinD pod
    command = ["sh", "-c", " ".join(pytest_in_runner())]
    pod = runner_pod("owner", in_cluster, command, {}, grace=1)
    with outer.core() as core:
        core.create_namespaced_pod(tenant.namespace, pod)
    try:
        dind = _dind_pod_of(outer, tenant.namespace, "owner", timeout=300)
    finally:
        with outer.core() as core:
            core.delete_namespaced_pod("owner", tenant.namespace)
    outer.wait_no_pods(tenant.namespace, "app=kipik-e2e-runner", 120)
    # DESIGN.md measured 37-41 s (most of it the grace period, here 1 s)
    wait_until(
        lambda: _absent(outer, tenant.namespace, dind),
        what=f"the DinD pod {dind} to be garbage-collected",
        timeout=180,
        hint="the garbage collector follows ownerReferences",
        interval=1,
    )
    assert leftovers() == []


def _absent(outer: OuterCluster, namespace: str, name: str) -> None:
    if name in outer.pods(namespace):
        raise NotYet(f"{name} is still there")


def test_the_argo_step_hands_sigterm_to_pytest_which_removes_its_dind_pod(
    outer: OuterCluster,
    tenant: Tenant,
    in_cluster: InCluster,
    leftovers: Callable[[], list[str]],
) -> None:
    workflow = yaml.safe_load((ROOT / "examples" / "argo" / "workflow.yaml").read_text())
    [step] = workflow["spec"]["templates"]
    container = step["container"]
    params = {"image": in_cluster.dind_image, "node-image": in_cluster.node_image}
    script = container["args"][0]
    for key, value in params.items():
        script = script.replace("{{workflow.parameters." + key + "}}", value)
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    env = {k: v.replace("{{workflow.parameters.node-image}}", params["node-image"])
           for k, v in env.items()}  # fmt: skip
    # the step's own command and script; a long grace period: only pytest's exit ends it early
    pod = runner_pod("argo-step", in_cluster, [*container["command"], script], env, grace=150)
    with outer.core() as core:
        core.create_namespaced_pod(tenant.namespace, pod)
    try:
        dind = _dind_pod_of(outer, tenant.namespace, "argo-step", timeout=300)
    finally:
        with outer.core() as core:
            core.delete_namespaced_pod("argo-step", tenant.namespace)
    start = time.monotonic()
    wait_until(
        lambda: _absent(outer, tenant.namespace, "argo-step"),
        what="the step pod to end before its 150 s grace period",
        timeout=110,
        hint="pytest must get SIGTERM: `exec pytest` in the step's script",
        interval=1,
    )
    assert time.monotonic() - start < 110
    wait_until(lambda: _absent(outer, tenant.namespace, dind), what="the DinD pod", timeout=60,
               hint="-", interval=1)  # fmt: skip
    assert leftovers() == []
