"""The ``kipik`` command end to end: the real entry point in a subprocess, the real engine.

One ``up`` serves the whole docker flow (up, ls, shell, logs, down); the pod backend's ``kipik``
checks run on a real outer cluster in tests/e2e/test_pod_backend.py. Every check is scoped to
what the test made (its cluster name), since other sessions may run kipik clusters on the same
engine meanwhile.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from pytest_kipik import labels
from tests.conftest import Leftovers

pytestmark = pytest.mark.docker


def kipik(
    env: dict[str, str], *args: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``python -m pytest_kipik ARGS`` with ``env``; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pytest_kipik", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def cli_env(tmp_path: Path, test_images: tuple[str, str]) -> dict[str, str]:
    """The environment of a ``kipik`` run: the test images and private state/cache dirs."""
    dind, node = test_images
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIPIK_")}
    env.update(
        KIPIK_IMAGE=dind,
        KIPIK_NODE_IMAGE=node,
        KIPIK_SNAPSHOTS="no",  # as in tests/conftest.py: created, no snapshot left behind
        XDG_STATE_HOME=str(tmp_path / "state"),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    return env


def _labelled(client: docker.DockerClient, cluster: str) -> list[str]:
    """Containers and volumes carrying ``kipik.io/cluster=<cluster>``."""
    selector = {"label": f"kipik.io/cluster={cluster}"}
    containers = [c["Names"][0] for c in client.api.containers(all=True, filters=selector)]
    volumes = client.api.volumes(filters=selector).get("Volumes") or []
    return sorted(containers + [v["Name"] for v in volumes])


def _ls(env: dict[str, str], *extra: str) -> list[dict[str, Any]]:
    listed = kipik(env, "ls", "--json", *extra, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows: list[dict[str, Any]] = json.loads(listed.stdout)
    return rows


def _time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%SZ")


def _doctor_lines(out: str) -> dict[str, str]:
    """``check -> status`` from doctor's lines."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status.strip() in ("ok", "warn", "fail"):
            found[rest.strip().split(":")[0]] = status.strip()
    return found


def test_doctor_on_this_machine(
    cli_env: dict[str, str], docker_client: docker.DockerClient
) -> None:
    since = int(time.time()) - 1
    done = kipik(cli_env, "doctor", timeout=120)
    until = int(time.time()) + 1
    checks = _doctor_lines(done.stdout)
    assert list(checks) == [
        "backend", "engine", "privileged", "cgroup", "/lib/modules", "inotify", "disk", "subnets",
    ]  # fmt: skip
    assert done.returncode == (1 if "fail" in checks.values() else 0), done.stdout
    assert checks["engine"] == checks["privileged"] == checks["subnets"] == "ok", done.stdout
    assert checks["cgroup"] == "ok", done.stdout  # DinD runs here, so nesting works
    summary = done.stdout.splitlines()[-1]
    assert summary == (
        f"{sum(s == 'ok' for s in checks.values())} ok, "
        f"{sum(s == 'warn' for s in checks.values())} warn, "
        f"{sum(s == 'fail' for s in checks.values())} fail"
    )
    # the privileged check really started a container, and left none
    events = docker_client.events(
        since=since,
        until=until,
        filters={"type": "container", "event": "start", "label": "kipik.io/role=doctor"},
        decode=True,
    )
    started = [e["Actor"]["Attributes"]["name"] for e in events]
    assert len(started) == 1, started
    assert started[0].startswith("kipik-doctor-")
    assert docker_client.api.containers(all=True, filters={"name": started[0]}) == []

    as_json = json.loads(kipik(cli_env, "doctor", "--json", timeout=120).stdout)
    assert as_json["passed"] is (done.returncode == 0)
    assert [c["check"] for c in as_json["checks"]] == list(checks)


def test_doctor_names_a_missing_image(cli_env: dict[str, str]) -> None:
    env = {**cli_env, "KIPIK_IMAGE": "kipik-test/absent:1"}
    done = kipik(env, "doctor", timeout=60)
    assert done.returncode == 1
    assert "fail  privileged: the DinD image kipik-test/absent:1 is not on the engine" in (
        done.stdout
    )
    assert "docker build -t kipik-test/absent:1 image/" in done.stdout


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
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.containers.get(name).remove(force=True, v=True)
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
