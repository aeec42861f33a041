"""Whole pytest sessions on real kind (docker backend), as users run them.

Each test runs pytest in a subprocess (pytester) on real kind v0.32.0 / Kubernetes v1.22.3 from
../shared/realkind: the fixtures and the kubeconfig rewrite, the marker, ``nested_namespace``, the
report of a failing test, ``--kipik-logs-dir``, a teardown problem, xdist with a killed worker and
``--kipik-keep``, reuse, warm hosts, SIGKILL and Ctrl-C. Sessions are grouped so that few clusters
are made: every real cluster costs one to two minutes here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from pytest_kipik import labels
from pytest_kipik.waiting import NotYet, wait_until
from tests.conftest import (
    APP_IMAGE,
    Leftovers,
    assert_kubectl_sees_a_ready_node,
    kept_cluster,
)

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
CLUSTER_LINE = re.compile(r"kipik (kipik-[a-z0-9-]+): (.+?) \((\d+\.\d+)s\)")
#: Generous: real clusters on a busy 2-core machine.
TIMEOUT = "--kipik-timeout=15m"


def _images_args(test_images: tuple[str, str]) -> list[str]:
    dind, node = test_images
    return [f"--kipik-image={dind}", f"--kipik-node-image={node}", "-p", "no:cacheprovider",
            TIMEOUT]  # fmt: skip


def _phases(out: str) -> list[tuple[str, str, float]]:
    """(cluster, phase, seconds) of every progress line."""
    return [(m[1], m[2], float(m[3])) for m in CLUSTER_LINE.finditer(out)]


def _dind_creations(client: docker.DockerClient, since: float, run_id: str) -> list[str]:
    """Names of the DinD containers the engine created for run ``run_id`` since ``since``."""
    events = client.events(
        since=int(since) - 1,
        until=int(time.time()) + 1,
        filters={"type": "container", "event": "create", "label": [f"{labels.RUN_ID}={run_id}"]},
        decode=True,
    )
    return [e["Actor"]["Attributes"]["name"] for e in events]


def _owned(client: docker.DockerClient, run_id: str) -> list[str]:
    selector: dict[str, str | list[str] | bool] = {"label": f"{labels.RUN_ID}={run_id}"}
    return [str(c.name) for c in client.containers.list(all=True, filters=selector)] + [
        str(v.name) for v in client.volumes.list(filters=selector)
    ]


def _remove(client: docker.DockerClient, *names: str) -> None:
    for name in names:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True, v=True)


def _kipik(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_kipik", *args],
        capture_output=True, text=True, timeout=300, check=False, env=env,
    )  # fmt: skip


# -- one session: fixtures, the marker, namespaces, a failing test, logs, a teardown problem ----

SUITE = """
import json, os, stat
from kubernetes import client

def test_nodes(nested_cluster):
    nodes = nested_cluster.core_v1.list_node().items
    assert [n.metadata.name for n in nodes] == [nested_cluster.name + "-control-plane"]
    # the kubelet (v1.22) asked the Docker answer for a root dir at its start, and was answered
    answered = nested_cluster.host.exec(["docker", "exec", nodes[0].metadata.name, "sh", "-c",
        "systemctl show kipik-cadvisor-docker.socket -p NAccepted --value && grep -ac "
        "-- --docker=unix:///run/kipik/cadvisor-docker.sock "
        "/proc/$(systemctl show kubelet -p MainPID --value)/cmdline"], timeout=60).check()
    accepted, flagged = answered.stdout.split()
    assert int(accepted) > 0 and flagged == "1", answered
    configz = nested_cluster.core_v1.connect_get_node_proxy_with_path(
        nodes[0].metadata.name, "configz", _preload_content=False)
    budget = json.loads(configz.data)["kubeletconfig"]
    assert (budget["kubeAPIQPS"], budget["kubeAPIBurst"]) == (50, 100)  # kipik's, not 5 and 10

def test_configmap(nested_client):
    core = client.CoreV1Api(nested_client)
    core.create_namespaced_config_map(
        "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c1"), data={"k": "v"}))
    assert core.read_namespaced_config_map("c1", "default").data == {"k": "v"}

def test_kubeconfig_is_private_and_reachable(nested_cluster, nested_kubeconfig):
    assert stat.S_IMODE(os.stat(nested_kubeconfig).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(nested_kubeconfig.parent).st_mode) == 0o700
    # kind wrote https://0.0.0.0:<port inside the DinD>; kipik rewrote it for this process
    assert nested_cluster.server.startswith("https://127.0.0.1:")
    assert nested_cluster.server in nested_kubeconfig.read_text()
    assert "0.0.0.0" not in nested_kubeconfig.read_text()
    # the client's global default configuration is untouched
    assert nested_cluster.server not in client.Configuration.get_default_copy().host
"""

MARKED = """
import pytest

pytestmark = pytest.mark.kipik(nodes=2)

def test_two_nodes(nested_cluster):
    names = sorted(n.metadata.name for n in nested_cluster.core_v1.list_node().items)
    assert names == [nested_cluster.name + "-control-plane", nested_cluster.name + "-worker"]

def test_same_cluster_again(nested_cluster, request):
    assert request.node.name == "test_same_cluster_again[kipik-nodes2]"
    assert len(nested_cluster.core_v1.list_node().items) == 2

def test_its_removal_fails_at_teardown(nested_cluster_factory, nested_cluster):
    import docker
    from pathlib import Path
    Path("marked-cluster").write_text(nested_cluster.name)
    # the engine is unreachable for this cluster's host from now on: teardown must go on with
    # the other cluster and report this one as a warning
    nested_cluster.host.client = docker.DockerClient(base_url="tcp://127.0.0.1:9", version="1.41")
    nested_cluster.host.container = None
"""

NAMESPACES = """
NAMES = []

def test_a_namespace(nested_namespace):
    NAMES.append(nested_namespace.name)
    assert nested_namespace.name.startswith("test-a-namespace-")
    nested_namespace.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}})

def test_another_namespace(nested_namespace):
    NAMES.append(nested_namespace.name)
    assert nested_namespace.name.startswith("test-another-namespace-")

def test_both_namespaces_are_gone(nested_cluster):
    assert len(set(NAMES)) == 2
    for name in NAMES:
        nested_cluster.wait_for("Namespace", name, condition="deleted", timeout=180)
"""


def test_one_session_fixtures_marker_namespaces_a_failing_test_logs_and_teardown(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    tmp_path: Path,
    leftovers: Leftovers,
) -> None:
    pytester.makepyfile(
        test_suite=SUITE,
        test_marked=MARKED,
        test_namespaces=NAMESPACES,
        # the deliberately failing example of docs/fixtures.md, collected here as a test module
        test_failing_example=(EXAMPLES / "failing_example.py").read_text(),
    )
    logs = tmp_path / "logs"
    result = pytester.runpytest_subprocess(
        *_images_args(test_images), "-v", f"--kipik-logs-dir={logs}",
        f"--kipik-load-images={APP_IMAGE}",
    )  # fmt: skip
    out = result.stdout.str()
    named = pytester.path / "marked-cluster"
    marked = named.read_text() if named.exists() else None
    try:
        result.assert_outcomes(passed=9, failed=1, warnings=2)
        made = sorted(set(re.findall(r"kipik (kipik-\w+(?:-\w+)?): kind create", out)))
        assert len(made) == 2, out  # one cluster per configuration, each made once
        assert marked, out
        for phase in ("DinD up", "inner daemon ready", f"node image {test_images[1]} in",
                      "kind create", "kubeconfig + readiness", "teardown"):  # fmt: skip
            assert re.search(rf"kipik kipik-\w+: {re.escape(phase)} \(\d+\.\d+s\)", out), phase
        # at a verbose level kind's own progress reaches the terminal too
        assert re.search(r"kipik kipik-\w+: kind: .*Ensuring node image", out), out
        # the failed test's report: its namespace's pods, warning events and crash logs
        section = out[out.index("kipik: namespace test-a-pod-that-never-starts-") :]
        assert "pods not running or succeeded in namespace" in section
        assert "/lost  Pending" in section
        assert "recent warning events in namespace" in section
        assert "127.0.0.1:9/never-pushed:1" in section
        assert "boom" in section
        # the cluster's logs, and where they are
        (plain,) = [name for name in made if name != marked]
        assert f"kipik {plain}: logs in {logs / plain}" in out
        assert (logs / plain / "dind-daemon.log").stat().st_size > 0
        assert list((logs / plain).glob("*/kubelet.log")), sorted(logs.rglob("*"))
        # the unreachable engine of the marked cluster: a warning for its logs and one for its
        # removal, and teardown went on: the other cluster is gone
        result.stdout.fnmatch_lines(
            [f"*PytestWarning: pytest-kipik teardown: logs of {marked} not exported*"]
        )
        result.stdout.fnmatch_lines(
            [f"*PytestWarning: pytest-kipik teardown: could not remove the DinD container "
             f"{marked}-dind*"]
        )  # fmt: skip
        assert not [r for r in leftovers() if plain in r], leftovers()
        # and the dead-man switch removes that container once the session's process is gone

        def removed() -> None:
            if leftovers():
                raise NotYet(", ".join(leftovers()))

        wait_until(removed, what=f"{marked}-dind to go by itself", timeout=120, hint="-")
    finally:
        if marked:
            _remove(docker_client, f"{marked}-dind")
    assert leftovers() == []


# -- xdist, a killed worker, --kipik-keep and pytest's basetemp pruning --------------------------


def test_xdist_workers_share_one_kept_cluster_a_killed_worker_and_basetemp_pruning(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    barrier = pytester.path / "barrier"
    barrier.mkdir()
    pytester.makepyfile(
        test_a=f"""
        import os, signal, time
        from pathlib import Path

        BARRIER = Path({str(barrier)!r})

        def test_killed(nested_cluster):  # makes the kept cluster, then dies
            (BARRIER / "creator").write_text(str(os.getpid()))
            deadline = time.monotonic() + 900
            while not (BARRIER / "survivor").exists():  # the other worker has attached
                assert time.monotonic() < deadline
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        test_b=f"""
        import os, time
        from pathlib import Path

        BARRIER = Path({str(barrier)!r})

        def test_survives(request):
            deadline = time.monotonic() + 900
            while not (BARRIER / "creator").exists():  # the other worker made the cluster
                assert time.monotonic() < deadline
                time.sleep(0.1)
            nested_cluster = request.getfixturevalue("nested_cluster")  # attaches
            (BARRIER / "survivor").write_text(str(os.getpid()))
            killer = int((BARRIER / "creator").read_text())
            stat = Path(f"/proc/{{killer}}/stat")
            while stat.exists() and stat.read_text().split()[2] != "Z":  # until it is dead
                assert time.monotonic() < deadline
                time.sleep(0.1)
            for _ in range(10):  # the cluster stays usable after its maker's crash
                assert nested_cluster.core_v1.list_node().items
        """,
    )
    temproot = pytester.path / "temproot"
    temproot.mkdir()
    env = {
        **os.environ,
        "PYTEST_DEBUG_TEMPROOT": str(temproot),
        "XDG_STATE_HOME": str(pytester.path / "state"),
    }
    start = time.time()
    first = subprocess.run(
        [sys.executable, "-m", "pytest", *_images_args(test_images), "-n", "2",
         "--dist", "loadfile", "--max-worker-restart=0", "--kipik-keep"],
        cwd=pytester.path, env=env, capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    out = first.stdout
    try:
        assert first.returncode == 1, out + first.stderr  # the killed worker's test failed
        assert "test_a.py::test_killed" in out
        assert re.search(r"1 failed, 1 passed", out), out
        names = {cluster for cluster, _, _ in _phases(out)}
        assert len(names) == 1, out
        (name,) = names
        run_id = name.removeprefix("kipik-")
        assert _dind_creations(docker_client, start, run_id) == [f"{name}-dind"]
        # progress reaches the terminal from the workers: the killed worker made the cluster,
        # the survivor attached to it; the session's owner says how to use and remove the kept
        # cluster, which its maker could not
        maker = re.search(rf"\[(gw\d)\] kipik {name}: DinD up \(\d+\.\d+s\)", out)
        attacher = re.search(rf"\[(gw\d)\] kipik {name}: attached \(\d+\.\d+s\)", out)
        assert maker, out
        assert attacher, out
        assert maker[1] != attacher[1], out
        assert f"worker '{maker[1]}' crashed while running 'test_a.py::test_killed'" in out
        assert out.count(f"kipik: kept cluster {name}\n") == 1, out
        assert out.count("remove it: ") == 1, out
        # three more sessions make pytest prune the oldest basetemp; the kept cluster's
        # kubeconfig lives elsewhere and still works
        pytester.makepyfile(test_plain="def test_nothing(tmp_path):\n    pass\n")
        for _ in range(3):
            again = subprocess.run(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_plain.py"],
                cwd=pytester.path, env=env, capture_output=True, text=True, timeout=120,
                check=False,
            )  # fmt: skip
            assert again.returncode == 0, again.stdout
        basetemps = sorted(temproot.glob("pytest-of-*/pytest-[0-9]*"))
        assert [p.name for p in basetemps] == ["pytest-1", "pytest-2", "pytest-3"]  # 0 pruned
        with kept_cluster(out, leftovers) as kubeconfig:
            assert str(kubeconfig).startswith(str(pytester.path / "state" / "pytest-kipik"))
            assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
            assert_kubectl_sees_a_ready_node(kubeconfig)
        assert not kubeconfig.parent.exists()
    finally:
        removal = re.search(r"remove it: (.+)", out)
        if removal:  # whatever a failed assertion above left
            subprocess.run(["bash", "-c", removal.group(1)], check=False, timeout=120)
    assert leftovers() == []


# -- reuse, with the example suite ---------------------------------------------------------------


def test_reuse_runs_the_examples_then_attaches_to_the_same_cluster(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(pytester.path / "state")}
    args = [str(EXAMPLES), *_images_args(test_images), "--kipik-reuse",
            f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml")]  # fmt: skip
    name = None
    try:
        first = subprocess.run(
            [sys.executable, "-m", "pytest", *args],
            cwd=pytester.path, env=env, capture_output=True, text=True, timeout=1200, check=False,
        )  # fmt: skip
        assert first.returncode == 0, first.stdout + first.stderr
        assert "5 passed" in first.stdout  # test_example.py and test_workload.py
        assert "kipik: reuse: no cluster kept for this configuration: " in first.stdout
        created = re.search(r"kipik (kipik-r[0-9a-f]{10}): created, kept", first.stdout)
        assert created, first.stdout
        name = created[1]
        assert f"container {name}-dind" in leftovers()

        second = subprocess.run(
            [sys.executable, "-m", "pytest", *args],
            cwd=pytester.path, env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        out = second.stdout
        assert second.returncode == 0, out + second.stderr
        assert f"kipik: reuse: {name} kept by an earlier run: reused when healthy" in out
        reused = re.search(rf"kipik {name}: reused \((\d+\.\d+)s\)", out)
        assert reused, out
        assert "DinD up" not in out
        assert "kind create" not in out
        print(f"reuse: attached in {reused[1]}s")

        listed = _kipik("ls", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        rows = [r for r in json.loads(listed.stdout) if r["name"] == name]
        assert [(r["status"], r["kind"]) for r in rows] == [("running", "reused")]
        down = _kipik("down", name, env=env)
        assert down.returncode == 0, down.stderr
        assert f"removed container {name}-dind" in down.stdout
        name = None
    finally:
        if name:
            _remove(docker_client, f"{name}-dind")
    assert leftovers() == []


# -- warm hosts ----------------------------------------------------------------------------------

WARM_SUITE = """
from kubernetes import client

def test_fresh(nested_cluster):
    core = nested_cluster.core_v1
    assert [c.metadata.name for c in core.list_namespaced_config_map("default").items
            if c.metadata.name == "from-earlier-run"] == []
    core.create_namespaced_config_map("default", client.V1ConfigMap(
        metadata=client.V1ObjectMeta(name="from-earlier-run")))
"""


def test_warm_host_keeps_its_node_image_gives_a_fresh_cluster_and_ls_names_it(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    pytester.makepyfile(WARM_SUITE)
    args = [*_images_args(test_images), "--kipik-warm"]
    hosts: list[str] = []
    try:
        first = pytester.runpytest_subprocess(*args)
        first.assert_outcomes(passed=1)
        first.stdout.fnmatch_lines(["kipik: warm host: slot 0 *"])
        warm = docker_client.containers.list(filters={"label": f"{labels.WARM_SLOT}=0"})
        hosts = sorted(str(c.name) for c in warm if str(c.name).startswith("kipik-warm-"))
        assert len(hosts) == 1
        second = pytester.runpytest_subprocess(*args)
        second.assert_outcomes(passed=1)
        phases = _phases(second.stdout.str())
        names = {cluster for cluster, _, _ in phases}
        assert len(names) == 1
        (current,) = names
        steps = {step: seconds for _, step, seconds in phases}
        assert "DinD up" not in steps
        assert any(step.startswith("previous cluster kipik-") for step in steps), steps
        image_step = next(s for s in steps if s.startswith("node image"))
        print(f"warm: node image {steps[image_step]:.1f}s, kind create {steps['kind create']}s")
        assert steps[image_step] < steps["kind create"]  # found in the warm host, not moved
        # `kipik ls` names the cluster the warm host holds now, not the first one made in it
        listed = _kipik("ls", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [r for r in json.loads(listed.stdout) if r["host"] == hosts[0]]
        assert [(r["name"], r["kind"], r["status"]) for r in rows] == [
            (current, "warm", "running")
        ], rows
        down = _kipik("down", current)
        assert down.returncode == 0, down.stderr
        assert f"removed container {hosts[0]}" in down.stdout
    finally:
        _remove(docker_client, *hosts)
    assert leftovers() == []


# -- SIGKILL and Ctrl-C --------------------------------------------------------------------------


def _run_id(lines: Iterator[str], seen: list[str], marker: str, timeout: float) -> str:
    """Read output until ``marker`` shows; return the session's run id."""
    deadline = time.monotonic() + timeout
    run_id = None
    for line in lines:
        seen.append(line)
        found = re.search(r"kipik kipik-([0-9a-f]{8})", line)
        if found:
            run_id = found[1]
        if marker in line and run_id:
            return run_id
        assert time.monotonic() < deadline, "".join(seen)
    pytest.fail("pytest ended before " + marker + ":\n" + "".join(seen))


@contextlib.contextmanager
def _pytest(
    pytester: pytest.Pytester, test_images: tuple[str, str]
) -> Iterator[subprocess.Popen[str]]:
    """A pytest session whose one test holds its cluster; killed and reaped if still running."""
    pytester.makepyfile(
        """
        import time

        def test_x(nested_cluster):
            print("TESTS RUNNING", flush=True)
            time.sleep(600)  # stopped before this ends
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *_images_args(test_images), "-s"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as from a terminal: a run started in the background by a non-interactive shell
        # passes SIGINT on ignored, and Ctrl-C would never arrive
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509
    )
    try:
        yield proc
    finally:  # a failed assertion must not leave the session (and its cluster) running
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        assert proc.stdout is not None
        proc.stdout.close()


def test_sigkill_during_kind_create_leaves_nothing_within_a_minute(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    with _pytest(pytester, test_images) as proc:
        assert proc.stdout is not None
        seen: list[str] = []
        # the node image is in: kind create runs inside the DinD now
        run_id = _run_id(iter(proc.stdout), seen, " in (", timeout=600)
        proc.kill()
    killed = time.monotonic()

    def gone() -> None:
        left = _owned(docker_client, run_id)
        if left:
            raise NotYet(", ".join(left))

    wait_until(gone, what="the killed session's resources to go", timeout=120, hint="-")
    print(f"gone {time.monotonic() - killed:.1f}s after SIGKILL")
    assert leftovers() == []


def test_ctrl_c_during_kind_create_tears_down_and_leaves_nothing(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    with _pytest(pytester, test_images) as proc:
        assert proc.stdout is not None
        seen: list[str] = []
        _run_id(iter(proc.stdout), seen, " in (", timeout=600)
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=300)
    out = "".join(seen) + rest
    assert "KeyboardInterrupt" in out
    assert re.search(r"teardown after a failed start \(\d+\.\d+s\)", out), out
    assert proc.returncode == pytest.ExitCode.INTERRUPTED
    assert leftovers() == []
