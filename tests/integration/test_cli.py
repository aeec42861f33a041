"""The ``kipik`` command end to end: the real entry point in a subprocess, the real engine.

One ``up`` serves the whole docker flow (up, ls, shell, logs, down); the pod backend's ``kipik``
checks run on a real outer cluster in tests/e2e/test_pod_backend.py. Every check is scoped to
what the test made (its cluster name), since other sessions may run kipik clusters on the same
engine meanwhile.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest
from kubernetes import client as k8s_client

from pytest_kipik import kubeconfig

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


def test_up_ls_shell_logs_down(
    cli_env: dict[str, str], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    try:
        up = kipik(cli_env, "up", "--name", name)
        assert up.returncode == 0, up.stderr
        path = tmp_path / "state" / "pytest-kipik" / "clusters" / name / "kubeconfig"
        assert up.stdout == f"export KUBECONFIG={path}\n"  # exactly what a user pastes
        assert f"remove it: kipik down {name}" in up.stderr
        assert f"kipik {name}: kind create (" in up.stderr  # progress goes to stderr
        assert stat.S_IMODE(path.stat().st_mode) == 0o600

        again = kipik(cli_env, "up", "--name", name, timeout=60)
        assert again.returncode == 1
        assert f"a container named {name}-dind already exists" in again.stderr
        assert again.stdout == ""
        assert path.is_file()  # the clash removed nothing of the first cluster

        rows = [r for r in _ls(cli_env) if r["name"] == name]
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["backend"], row["status"], row["kind"], row["host"]) == (
            "docker", "running", "kept", f"{name}-dind",
        )  # fmt: skip
        assert row["kubeconfig"] == str(path)
        assert _time(row["expires"]) - _time(row["created"]) == dt.timedelta(hours=4)
        table = kipik(cli_env, "ls", timeout=60)
        assert table.stdout.splitlines()[0].split() == [
            "NAME", "BACKEND", "STATUS", "KIND", "CREATED", "EXPIRES", "KUBECONFIG",
        ]  # fmt: skip
        assert any(line.split()[:4] == [name, "docker", "running", "kept"]
                   for line in table.stdout.splitlines())  # fmt: skip

        script = 'echo "$KUBECONFIG $KIPIK_CLUSTER"; exit 7'
        shell = kipik(cli_env, "shell", name, "--", "sh", "-c", script)
        assert (shell.returncode, shell.stdout) == (7, f"{path} {name}\n")
        api = kubeconfig.api_client(path)
        try:
            nodes: list[Any] = k8s_client.CoreV1Api(api).list_node().items
        finally:
            api.close()
        assert [n.metadata.name for n in nodes] == [f"{name}-control-plane"]

        logs = kipik(cli_env, "logs", name, str(tmp_path / "logs"))
        assert logs.returncode == 0, logs.stderr
        exported = tmp_path / "logs" / name
        assert logs.stdout == f"{exported}\n"
        node = f"{name}-control-plane"
        for file in ("kind-version.txt", "docker-info.txt", "dind-daemon.log",
                     f"{node}/serial.log", f"{node}/inspect.json"):  # fmt: skip
            assert (exported / file).stat().st_size > 0, file
        assert "API listen on" in (exported / "dind-daemon.log").read_text()
        inside = docker_client.containers.get(f"{name}-dind").exec_run(["ls", "/kipik"])
        assert b"logs-" not in inside.output  # the temporary tree inside the host is gone

        unknown = kipik(cli_env, "down", f"{name}-nope", timeout=60)
        assert unknown.returncode == 1
        assert f"no kipik cluster named '{name}-nope' on the docker backend" in unknown.stderr
        assert _labelled(docker_client, name) != []  # an unknown name removed nothing

        down = kipik(cli_env, "down", name, timeout=120)
        assert down.returncode == 0, down.stderr
        assert f"removed container {name}-dind" in down.stdout
        assert [r for r in _ls(cli_env) if r["name"] == name] == []
        assert _labelled(docker_client, name) == []
        assert not path.parent.exists()
    finally:
        kipik(cli_env, "down", name, timeout=120)


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
