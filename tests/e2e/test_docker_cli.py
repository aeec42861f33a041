"""``kipik up``, ``ls``, ``shell``, ``logs`` and ``down`` on real kind (docker backend).

One ``up`` serves the whole flow; the real entry point runs in a subprocess. Every check is scoped
to the cluster this test made, since other sessions may run kipik clusters on the same engine.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import stat
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest
from kubernetes import client as k8s_client

from pytest_kipik.k8s import kubeconfig
from tests.integration.test_cli import _labelled, _ls, _time, cli_env, kipik

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
__all__ = ["cli_env"]  # the fixture, used by name


def _node_names(kubeconfig_path: Path) -> list[str]:
    """The nodes of the cluster a kubeconfig reaches, by name."""
    api = kubeconfig.api_client(kubeconfig_path)
    try:
        nodes: list[Any] = k8s_client.CoreV1Api(api).list_node().items
    finally:
        api.close()
    return [n.metadata.name for n in nodes]


def test_up_ls_shell_logs_down(
    cli_env: dict[str, str],
    tmp_path: Path,
    docker_client: docker.DockerClient,
    registry_image: str,
) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    env = {**cli_env, "KIPIK_SNAPSHOTS": "yes", "KIPIK_REGISTRY": registry_image}
    snapshot = ""
    try:
        up = kipik(env, "up", "--name", name)
        assert up.returncode == 0, up.stderr
        path = tmp_path / "state" / "pytest-kipik" / "clusters" / name / "kubeconfig"
        assert up.stdout == f"export KUBECONFIG={path}\n"  # exactly what a user pastes
        assert f"remove it: kipik down {name}" in up.stderr
        pushed_to = re.search(
            r"registry:  push to (127\.0\.0\.1:\d+); pods pull localhost:5001/NAME:TAG", up.stderr
        )
        assert pushed_to, up.stderr
        with urllib.request.urlopen(f"http://{pushed_to[1]}/v2/", timeout=30) as answer:
            assert answer.status == 200  # the registry inside answers this machine
        assert f"kipik {name}: kind create (" in up.stderr  # progress goes to stderr
        assert f"kipik {name}: snapshot saved (" in up.stderr
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        (snapshot,) = [v for v in _labelled(docker_client, name) if "-snapshot-" in v]

        # the same configuration: a restore, which clashes with the name and keeps the snapshot
        again = kipik(env, "up", "--name", name, timeout=60)
        assert again.returncode == 1
        assert f"a container named {name}-dind already exists" in again.stderr
        assert "creating the cluster instead" not in again.stderr
        assert again.stdout == ""
        assert path.is_file()  # the clash removed nothing of the first cluster
        assert snapshot in _labelled(docker_client, name)  # nor the snapshot

        rows = [r for r in _ls(env) if r["name"] == name]
        assert len(rows) == 1, rows
        row = rows[0]
        assert (row["backend"], row["status"], row["kind"], row["host"]) == (
            "docker", "running", "kept", f"{name}-dind",
        )  # fmt: skip
        assert row["kubeconfig"] == str(path)
        assert _time(row["expires"]) - _time(row["created"]) == dt.timedelta(hours=4)
        table = kipik(env, "ls", timeout=60)
        assert table.stdout.splitlines()[0].split() == [
            "NAME", "BACKEND", "STATUS", "KIND", "CREATED", "EXPIRES", "KUBECONFIG",
        ]  # fmt: skip
        assert any(line.split()[:4] == [name, "docker", "running", "kept"]
                   for line in table.stdout.splitlines())  # fmt: skip

        script = 'echo "$KUBECONFIG $KIPIK_CLUSTER"; exit 7'
        shell = kipik(env, "shell", name, "--", "sh", "-c", script)
        assert (shell.returncode, shell.stdout) == (7, f"{path} {name}\n")
        assert _node_names(path) == [f"{name}-control-plane"]

        logs = kipik(env, "logs", name, str(tmp_path / "logs"))
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

        unknown = kipik(env, "down", f"{name}-nope", timeout=60)
        assert unknown.returncode == 1
        assert f"no kipik cluster named '{name}-nope' on the docker backend" in unknown.stderr
        assert _labelled(docker_client, name) != []  # an unknown name removed nothing

        down = kipik(env, "down", name, timeout=120)
        assert down.returncode == 0, down.stderr
        assert f"removed container {name}-dind" in down.stdout
        listed = {r["name"]: r["kind"] for r in _ls(env)}
        assert name not in listed
        assert listed[snapshot] == "snapshot"  # listed, and removed, by its own name
        assert _labelled(docker_client, name) == [snapshot]
        assert not path.parent.exists()
        gone = kipik(env, "down", snapshot, timeout=120)
        assert gone.returncode == 0, gone.stderr
        assert f"removed volume {snapshot}" in gone.stdout
        assert _labelled(docker_client, name) == []
    finally:
        kipik(env, "down", name, timeout=120)
        if snapshot:
            kipik(env, "down", snapshot, timeout=120)


def test_up_from_a_bundle_with_its_images_gone_from_the_engine(
    cli_env: dict[str, str], tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """``kipik bundle``, both images' names removed, then ``kipik up --bundle`` pulls nothing.

    The images are bundled under names of their own (tags of the test images, whose ids other
    tests still use, so removing the names is what this engine can afford to remove).
    """
    token = uuid.uuid4().hex[:8]
    dind, node = f"kipik-bundle-e2e/dind:{token}", f"kipik-bundle-e2e/node:{token}"
    ids = {}
    for source, tag in ((cli_env["KIPIK_IMAGE"], dind), (cli_env["KIPIK_NODE_IMAGE"], node)):
        image = docker_client.images.get(source)
        image.tag(tag)
        ids[tag] = str(image.id)
    env = {k: v for k, v in cli_env.items() if k not in ("KIPIK_IMAGE", "KIPIK_NODE_IMAGE")}
    env["KIPIK_SNAPSHOTS"] = "no"  # a cold create: the node image must come from the bundle
    bundle = tmp_path / "air-gapped.tar"
    name = f"bundle-{token}"
    try:
        made = kipik(env, "bundle", str(bundle), "--image", dind, "--node-image", node)
        assert made.returncode == 0, made.stderr
        assert made.stdout == f"{bundle}\n"
        assert f"use it with --bundle={bundle} and --node-image={node}" in made.stderr
        for tag in (dind, node):
            docker_client.images.remove(tag)
        up = kipik(env, "up", "--name", name, "--bundle", str(bundle), "--node-image", node)
        assert up.returncode == 0, up.stderr
        assert f"kipik: {dind} from the bundle air-gapped.tar" in up.stderr
        assert f"kipik: {node} from the bundle air-gapped.tar" in up.stderr
        assert "pulling" not in up.stderr
        for tag, image_id in ids.items():
            assert str(docker_client.images.get(tag).id) == image_id
        host: Any = docker_client.containers.get(f"{name}-dind")
        assert host.attrs["Image"] == ids[dind]
        inner = host.exec_run(["docker", "image", "inspect", "-f", "{{.Id}}", node])
        assert inner.output.decode().strip() == ids[node]
        path = Path(up.stdout.strip().removeprefix("export KUBECONFIG="))
        assert _node_names(path) == [f"{name}-control-plane"]
    finally:
        kipik(env, "down", name, timeout=120)
        for tag in (dind, node):
            with contextlib.suppress(docker.errors.ImageNotFound):
                docker_client.images.remove(tag)
    assert _labelled(docker_client, name) == []
