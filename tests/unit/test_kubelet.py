"""The kubelet's Docker answer: which node images get it, the kind config, the answer itself."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pytest_kipik.kind import config as kind
from pytest_kipik.kind import kubelet


@pytest.mark.parametrize(
    ("image", "version"),
    [
        ("kindest/node:v1.22.3", (1, 22)),
        ("kipik.local/kind-node:v1.23.17", (1, 23)),
        ("localhost:5000/kind/node:v1.22.3@sha256:" + "ab" * 32, (1, 22)),
        ("kindest/node:v1.30.0-rc.1", (1, 30)),
        ("kindest/node:v1.24", (1, 24)),
        ("localhost:5000/kind/node", None),
        ("kindest/node:latest", None),
        ("kindest/node:dev@sha256:" + "ab" * 32, None),
        ("kindest/node:1.22.3", None),
    ],
)
def test_the_version_a_node_image_tag_says(image: str, version: tuple[int, int] | None) -> None:
    assert kubelet.kubelet_minor(image) == version


@pytest.mark.parametrize(
    ("images", "needed"),
    [
        (["kindest/node:v1.22.3"], True),
        (["kindest/node:v1.23.0", "kindest/node:v1.21.1"], True),
        (["kindest/node:v1.24.0"], False),  # no Docker plugin, and no --docker flag
        (["kindest/node:v1.22.3", "kindest/node:v1.29.0"], False),
        (["kindest/node:v1.22.3", "my/node:latest"], False),  # unknown: never a flag it lacks
        ([], False),  # kind's default image is newer
    ],
)
def test_only_kubelets_that_wait_for_a_docker_get_the_answer(
    images: list[str], needed: bool
) -> None:
    assert kubelet.needs_answer(images) is needed


def test_the_kind_config_mounts_the_files_into_every_node_and_sets_the_flag() -> None:
    user = {"nodes": [{"role": "control-plane", "extraMounts": [{"hostPath": "/a",
             "containerPath": "/b"}]}, {"role": "worker"}]}  # fmt: skip
    built = kind.build_config(user, name="c", cert_sans=[], kubelet_answer=True)
    mounts = [
        {"hostPath": "/kipik/.kubelet/kipik-cadvisor-docker.socket",
         "containerPath": "/etc/systemd/system/kipik-cadvisor-docker.socket", "readOnly": True},
        {"hostPath": "/kipik/.kubelet/kipik-cadvisor-docker@.service",
         "containerPath": "/etc/systemd/system/kipik-cadvisor-docker@.service", "readOnly": True},
        {"hostPath": "/kipik/.kubelet/kipik-cadvisor-docker.conf",
         "containerPath": "/etc/systemd/system/kubelet.service.d/kipik-cadvisor-docker.conf",
         "readOnly": True},
        {"hostPath": "/kipik/.kubelet/answer.sh",
         "containerPath": "/etc/kipik/cadvisor-docker-answer.sh", "readOnly": True},
    ]  # fmt: skip
    assert built["nodes"][0]["extraMounts"] == [{"hostPath": "/a", "containerPath": "/b"}, *mounts]
    assert built["nodes"][1]["extraMounts"] == mounts
    assert user["nodes"][1] == {"role": "worker"}  # the user's config is not modified
    patches = [yaml.safe_load(p) for p in built["kubeadmConfigPatches"][2:]]
    flag = {"nodeRegistration": {"kubeletExtraArgs": {
        "docker": "unix:///run/kipik/cadvisor-docker.sock"}}}  # fmt: skip
    assert patches == [{"kind": "InitConfiguration", **flag}, {"kind": "JoinConfiguration", **flag}]
    assert set(kubelet.host_files()) == {m["hostPath"] for m in mounts}


def test_without_the_answer_nothing_is_added() -> None:
    built = kind.build_config(None, name="c", cert_sans=[])
    assert "nodes" not in built
    assert len(built["kubeadmConfigPatches"]) == 2  # the kubelets' API budget, the certSANs


def test_the_units_listen_where_the_flag_points_and_start_before_the_kubelet() -> None:
    files = {path.rsplit("/", 1)[1]: data.decode() for path, data in kubelet.host_files().items()}
    assert "ListenStream=/run/kipik/cadvisor-docker.sock\nAccept=yes\n" in files[
        "kipik-cadvisor-docker.socket"]  # fmt: skip
    assert "Before=kubelet.service" in files["kipik-cadvisor-docker.socket"]
    service = files["kipik-cadvisor-docker@.service"]
    assert "StandardInput=socket\nStandardOutput=socket\n" in service
    assert "LogLevelMax=notice\n" in service  # no journal lines for each answer
    assert f"ExecStart=/bin/sh {kubelet.ANSWER}\n" in service
    assert files["kipik-cadvisor-docker.conf"] == (
        "[Unit]\nWants=kipik-cadvisor-docker.socket\nAfter=kipik-cadvisor-docker.socket\n"
    )


@pytest.mark.parametrize("newline", ["\r\n", "\n"])
def test_the_answer_reads_the_request_and_gives_a_docker_root(tmp_path: Path, newline: str) -> None:
    script = tmp_path / "answer.sh"
    script.write_bytes(kubelet.host_files()[f"{kubelet.HOST_DIR}/answer.sh"])
    request = newline.join(["GET /v1.40/info HTTP/1.1", "Host: docker", "User-Agent: Go", "", ""])
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    # a trailing line after the head stays unread: the script stops at the blank line
    done = subprocess.run(
        [sh, str(script)],
        input=(request + "EXTRA").encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    head, body = done.stdout.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 200 OK"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields == {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    assert json.loads(body) == {"DockerRootDir": "/var/lib/docker"}
