"""The real thing: the default DinD image (real kind, real kubectl) and a real kind node image.

These machines cannot download kind, node images or base images, so this tier runs only where
``KIPIK_E2E=1`` says they can be had (``KIPIK_E2E_NODE_IMAGE`` picks the node image, default:
kind's own). Run it with ``pytest -m e2e tests/e2e``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import Leftovers, assert_kubectl_sees_a_ready_node, kept_cluster

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


def test_examples_on_real_kind(pytester: pytest.Pytester, leftovers: Leftovers) -> None:
    result = pytester.runpytest_subprocess(
        str(ROOT / "examples"), *_node_image_args(), "-p", "no:cacheprovider",
        f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"), "--kipik-timeout=10m",
    )  # fmt: skip
    result.assert_outcomes(passed=4)
    assert leftovers() == []


def test_real_kind_kept_cluster_answers_kubectl(
    pytester: pytest.Pytester, leftovers: Leftovers
) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess(
        *_node_image_args(), "--kipik-keep", "--kipik-timeout=10m"
    )
    result.assert_outcomes(passed=1)
    with kept_cluster(result.stdout.str(), leftovers) as kubeconfig:
        assert_kubectl_sees_a_ready_node(kubeconfig)
