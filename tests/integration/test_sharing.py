"""Sharing, reuse, warm hosts and crash safety against the real Docker engine.

One cluster for all xdist workers; reuse across runs; a warm host that keeps its node image; a
session killed with SIGKILL leaves nothing within 60 s (the dead-man switch); ``kipik gc``.
kind and its node image are the doubles from tests/doubles.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from pytest_kipik import labels
from tests.conftest import Leftovers

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]
CLUSTER_LINE = re.compile(r"kipik (kipik-[a-z0-9-]+): (.+?) \((\d+\.\d+)s\)")


def _images_args(test_images: tuple[str, str]) -> list[str]:
    dind, node = test_images
    return [f"--kipik-image={dind}", f"--kipik-node-image={node}", "-p", "no:cacheprovider"]


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


def _wait_for(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.5)  # polling the engine


def test_xdist_workers_share_one_cluster_and_it_is_removed(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.parametrize("i", range(8))
        def test_cluster(nested_cluster, i):
            assert nested_cluster.core_v1.list_node().items
            print(nested_cluster.name, os.environ["PYTEST_XDIST_WORKER"])
        """
    )
    start = time.time()
    result = pytester.runpytest_subprocess(*_images_args(test_images), "-n", "4")
    result.assert_outcomes(passed=8)
    out = result.stdout.str()
    names = {cluster for cluster, _, _ in _phases(out)}
    assert len(names) == 1, out
    (name,) = names
    run_id = name.removeprefix("kipik-")
    assert _dind_creations(docker_client, start, run_id) == [f"{name}-dind"]
    # progress reaches the terminal from the workers, and the controller removes the cluster
    assert re.search(rf"\[gw\d\] kipik {name}: DinD up \(\d+\.\d+s\)", out), out
    assert re.search(rf"\[gw\d\] kipik {name}: attached \(\d+\.\d+s\)", out), out
    assert re.search(rf"^kipik {name}: teardown \(\d+\.\d+s\)", out, re.MULTILINE), out
    assert leftovers() == []


def test_killing_one_worker_keeps_the_others_cluster(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    barrier = pytester.path / "barrier"
    barrier.mkdir()
    pytester.makepyfile(
        test_a=f"""
        import os, signal, time
        from pathlib import Path

        BARRIER = Path({str(barrier)!r})

        def test_killed(nested_cluster):
            (BARRIER / "killer").write_text(str(os.getpid()))
            deadline = time.monotonic() + 120
            while not (BARRIER / "survivor").exists():  # the other worker has attached
                assert time.monotonic() < deadline
                time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
        test_b=f"""
        import os, time
        from pathlib import Path

        BARRIER = Path({str(barrier)!r})

        def test_survives(nested_cluster):
            deadline = time.monotonic() + 120
            while not (BARRIER / "killer").exists():
                assert time.monotonic() < deadline
                time.sleep(0.1)
            (BARRIER / "survivor").write_text(str(os.getpid()))
            killer = int((BARRIER / "killer").read_text())
            stat = Path(f"/proc/{{killer}}/stat")
            while stat.exists() and stat.read_text().split()[2] != "Z":  # until it is dead
                assert time.monotonic() < deadline
                time.sleep(0.1)
            for _ in range(10):  # the cluster stays usable for a while after the crash
                assert nested_cluster.core_v1.list_node().items
                time.sleep(0.3)
        """,
    )
    result = pytester.runpytest_subprocess(
        *_images_args(test_images), "-n", "2", "--dist", "loadfile", "--max-worker-restart=0"
    )
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "test_a.py::test_killed" in out
    assert re.search(r"kipik kipik-\w+: teardown \(\d+\.\d+s\)", out), out
    assert leftovers() == []


def _run_id(line_source: Iterator[str], seen: list[str], marker: str, timeout: float) -> str:
    """Read output until ``marker`` shows; return the session's run id."""
    deadline = time.monotonic() + timeout
    run_id = None
    for line in line_source:
        seen.append(line)
        found = re.search(r"kipik kipik-([0-9a-f]{8})", line)
        if found:
            run_id = found[1]
        if marker in line and run_id:
            return run_id
        assert time.monotonic() < deadline, "".join(seen)
    pytest.fail("pytest ended before " + marker + ":\n" + "".join(seen))


@pytest.mark.parametrize("moment", ["creation", "tests"])
def test_sigkill_of_pytest_leaves_nothing_within_60s(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
    moment: str,
) -> None:
    pytester.makepyfile(
        """
        import time

        def test_x(nested_cluster):
            print("TESTS RUNNING", flush=True)
            time.sleep(300)  # killed before this ends
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *_images_args(test_images), "-s"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    marker = "inner daemon ready" if moment == "creation" else "TESTS RUNNING"
    run_id = _run_id(iter(proc.stdout), seen, marker, timeout=120)
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close()
    killed = time.monotonic()
    _wait_for(
        "the killed session's resources to disappear",
        lambda: not [str(r) for r in _owned(docker_client, run_id)],
        timeout=60,
    )
    print(f"gone {time.monotonic() - killed:.1f}s after SIGKILL")
    assert leftovers() == []


def _owned(client: docker.DockerClient, run_id: str) -> list[str]:
    selector: dict[str, str | list[str] | bool] = {"label": f"{labels.RUN_ID}={run_id}"}
    return [str(c.name) for c in client.containers.list(all=True, filters=selector)] + [
        str(v.name) for v in client.volumes.list(filters=selector)
    ]


def _remove_leased(client: docker.DockerClient, *names: str) -> None:
    for name in names:
        with contextlib.suppress(docker.errors.NotFound):
            client.containers.get(name).remove(force=True, v=True)


def test_reuse_attaches_fast_and_recreates_when_changed_or_gone(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    pytester.makepyfile(
        "def test_x(nested_cluster):\n    assert nested_cluster.core_v1.list_node().items\n"
    )
    args = [*_images_args(test_images), "--kipik-reuse"]
    made: list[str] = []
    try:
        first = pytester.runpytest_subprocess(*args)
        first.assert_outcomes(passed=1)
        first.stdout.fnmatch_lines(["kipik: reuse: no cluster kept for this configuration: *"])
        created = re.search(r"kipik (kipik-r[0-9a-f]{10}): created, kept", first.stdout.str())
        assert created, first.stdout.str()
        name = created[1]
        made.append(f"{name}-dind")
        assert f"container {name}-dind" in leftovers()

        second = pytester.runpytest_subprocess(*args)
        second.assert_outcomes(passed=1)
        out = second.stdout.str()
        assert f"kipik: reuse: {name} kept by an earlier run: reused when healthy" in out
        reused = re.search(rf"kipik {name}: reused \((\d+\.\d+)s\)", out)
        assert reused, out
        assert float(reused[1]) <= 2.0
        assert "DinD up" not in out

        # another configuration: another cluster (the first one stays kept)
        (pytester.path / "kind.yaml").write_text(
            "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nfeatureGates: {Demo: true}\n"
        )
        third = pytester.runpytest_subprocess(*args, "--kipik-kind-config=kind.yaml")
        third.assert_outcomes(passed=1)
        other = re.search(r"kipik (kipik-r[0-9a-f]{10}): created, kept", third.stdout.str())
        assert other, third.stdout.str()
        assert other[1] != name
        made.append(f"{other[1]}-dind")

        # the kept container removed by hand: the next run creates it again
        docker_client.containers.get(f"{name}-dind").remove(force=True, v=True)
        fourth = pytester.runpytest_subprocess(*args)
        fourth.assert_outcomes(passed=1)
        out = fourth.stdout.str()
        assert f"kipik {name}: the cluster kept for reuse is gone or unhealthy" in out
        assert f"kipik {name}: created, kept for reuse" in out
    finally:
        _remove_leased(docker_client, *made)
    assert leftovers() == []


def test_warm_host_keeps_its_node_image_and_gives_a_fresh_cluster(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    pytester.makepyfile(
        """
        from kubernetes import client

        def test_fresh(nested_cluster):
            core = nested_cluster.core_v1
            assert [c.metadata.name for c in core.list_namespaced_config_map("default").items
                    if c.metadata.name == "from-earlier-run"] == []
            core.create_namespaced_config_map("default", client.V1ConfigMap(
                metadata=client.V1ObjectMeta(name="from-earlier-run")))
        """
    )
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
        steps = {step: seconds for _, step, seconds in phases}
        assert "DinD up" not in steps
        assert any(step.startswith("previous cluster kipik-") for step in steps), steps
        ready = sum(steps.values())
        print(f"warm: time to ready {ready:.1f}s, kind create {steps['kind create']:.1f}s")
        assert ready <= steps["kind create"] + 3.0
        image_step = next(s for s in steps if s.startswith("node image"))
        assert steps[image_step] < 1.0  # found in the warm host, not moved again
    finally:
        _remove_leased(docker_client, *hosts)
    assert leftovers() == []


def test_four_sessions_at_once_pass_and_keep_only_what_reuse_and_warm_keep(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    pytester.makepyfile(
        "def test_x(nested_cluster):\n    assert nested_cluster.core_v1.list_node().items\n"
        "def test_y(nested_cluster_factory):\n"
        "    assert nested_cluster_factory.create().core_v1.list_node().items\n"
    )
    modes = [[], ["-n", "2"], ["--kipik-reuse"], ["--kipik-warm"]]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pytest", *_images_args(test_images), *mode],
            cwd=pytester.path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for mode in modes
    ]
    kept: list[str] = []
    try:
        outputs = [proc.communicate(timeout=400)[0] for proc in procs]
        for proc, out in zip(procs, outputs, strict=True):
            assert proc.returncode == 0, out
        kept = sorted(r.split()[1] for r in leftovers() if r.startswith("container"))
        assert len(kept) == 2, kept
        assert kept[0].startswith("kipik-r"), kept
        assert kept[1].startswith("kipik-warm-"), kept
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        _remove_leased(docker_client, *kept)
    assert leftovers() == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_gc_lists_and_removes_exactly_the_expired_and_orphaned(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    docker_client: docker.DockerClient,
    leftovers: Leftovers,
) -> None:
    me = labels.label_value(socket.gethostname())
    past = labels.timestamp(dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
    future = labels.timestamp(dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1))
    tag = labels.new_run_id()

    def plant(suffix: str, extra: dict[str, str] | None, volume: bool = False) -> str:
        name = f"gc-{tag}-{suffix}"
        found = None if extra is None else {
            labels.RUN_ID: f"gc{tag}", labels.OWNER_HOST: me,
            labels.OWNER_PID: str(os.getpid()), labels.EXPIRES_AT: future, **extra,
        }  # fmt: skip
        if volume:
            docker_client.volumes.create(name, labels=found or {})
        else:
            docker_client.containers.create(test_images[0], name=name, labels=found or {})
        return name

    dead = str(_dead_pid())
    expired = plant("expired", {labels.OWNER_HOST: "elsewhere", labels.EXPIRES_AT: past})
    orphan = plant("orphan", {labels.OWNER_PID: dead})
    orphan_volume = plant("orphan-volume", {labels.OWNER_PID: dead}, volume=True)
    live = plant("live", {labels.EXPIRES_AT: past})  # our own pid: a live session
    kept = plant("kept", {labels.OWNER_PID: dead, labels.KEEP: "true"})
    foreign = plant("foreign", None)
    planted = [expired, orphan, orphan_volume, live, kept, foreign]
    try:
        kipik = [sys.executable, "-m", "pytest_kipik", "gc"]
        dry = subprocess.run(
            [*kipik, "--dry-run"], capture_output=True, text=True, timeout=120, check=False
        )
        assert dry.returncode == 0, dry.stderr
        listed = sorted(line for line in dry.stdout.splitlines() if f"gc-{tag}-" in line)
        assert listed == sorted([
            f"would remove container {expired} (expired at {past})",
            f"would remove container {orphan} (its owner pid {dead} on {me} is gone)",
            f"would remove volume {orphan_volume} (its owner pid {dead} on {me} is gone)",
        ])  # fmt: skip
        for name in planted:  # nothing removed yet
            assert _exists(docker_client, name), name
        done = subprocess.run(kipik, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert sorted(x for x in done.stdout.splitlines() if f"gc-{tag}-" in x) == [
            line.replace("would remove", "removed") for line in listed
        ]
        assert [n for n in planted if _exists(docker_client, n)] == [live, kept, foreign]
        # the pytest run mode does the same and runs no tests
        pytester.makepyfile("def test_never():\n    raise AssertionError\n")
        result = pytester.runpytest_subprocess("--kipik-gc")
        assert result.ret == 0
        result.stdout.fnmatch_lines(["kipik gc: *"])
        assert "test_never" not in result.stdout.str()
    finally:
        for name in planted:
            _remove_leased(docker_client, name)
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.volumes.get(name).remove(force=True)
    assert leftovers() == []


def _exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.containers.get(name)
        return True
    except docker.errors.NotFound:
        pass
    try:
        client.volumes.get(name)
        return True
    except docker.errors.NotFound:
        return False
