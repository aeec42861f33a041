"""The real thing: the default DinD image (real kind, real kubectl) and a real kind node image.

These machines cannot download kind, node images or base images, so this tier runs only where
``KIPIK_E2E=1`` says they can be had (``KIPIK_E2E_NODE_IMAGE`` picks the node image, default:
kind's own). Run it with ``pytest -m e2e tests/e2e``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import docker
import pytest

from tests.conftest import owned

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.docker,
    pytest.mark.skipif(
        os.environ.get("KIPIK_E2E") != "1",
        reason="needs real kind and a kind node image (and registry access to build the default "
        "image), which cannot be obtained on this machine; set KIPIK_E2E=1 where they can",
    ),
]


def _node_image_args() -> list[str]:
    image = os.environ.get("KIPIK_E2E_NODE_IMAGE")
    return [f"--kipik-node-image={image}"] if image else []


def test_examples_on_real_kind(
    pytester: pytest.Pytester, docker_client: docker.DockerClient
) -> None:
    result = pytester.runpytest_subprocess(
        str(ROOT / "examples"), *_node_image_args(), "-p", "no:cacheprovider",
        f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"), "--kipik-timeout=10m",
    )  # fmt: skip
    result.assert_outcomes(passed=4)
    assert owned(docker_client) == []


def test_real_kind_kept_cluster_answers_kubectl(
    pytester: pytest.Pytester, docker_client: docker.DockerClient
) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess(
        *_node_image_args(), "--kipik-keep", "--kipik-timeout=10m"
    )
    result.assert_outcomes(passed=1)
    out = result.stdout.str()
    use = re.search(r"use it:\s+kubectl --kubeconfig (\S+) get nodes", out)
    remove = re.search(r"remove it: (.+)", out)
    assert use, out
    assert remove, out
    try:
        nodes = subprocess.run(
            ["kubectl", "--kubeconfig", use.group(1), "get", "nodes", "--no-headers"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert re.search(r"-control-plane\s+Ready\s", nodes.stdout), nodes.stdout
    finally:
        subprocess.run(["bash", "-c", remove.group(1)], check=True, timeout=120)
    assert owned(docker_client) == []
