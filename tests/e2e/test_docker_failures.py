"""Failures on real kind (docker backend): kind's own errors, a node image nobody can pull.

Real kind v0.32.0 in the project's DinD image fails for real here (a kube-proxy mode it does not
know), and kipik must show kind's output and the inner daemon's log; a node image that no
registry serves fails the pull in the DinD host, naming it. Either way nothing is left behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kipik import ClusterFactory, ImageError, KindError, KipikConfig
from tests.conftest import Leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
#: A kind config that kipik passes on and kind refuses.
REFUSED = "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnetworking: {kubeProxyMode: bogus}\n"
MISSING = "127.0.0.1:9/kipik-test/missing-node:v0"


def test_kind_failure_shows_kind_stderr_and_daemon_log(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    (pytester.path / "kind.yaml").write_text(REFUSED)
    result = pytester.runpytest_subprocess(
        f"--kipik-image={test_images[0]}",
        f"--kipik-node-image={test_images[1]}",
        "--kipik-kind-config=kind.yaml",
    )
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "kind failed to create cluster" in out
    assert "kubeProxyMode" in out  # kind's own words
    assert "last 50 lines of the inner Docker daemon's log:" in out
    assert leftovers() == []


def test_kind_error_leaves_nothing_when_used_directly(
    test_images: tuple[str, str], tmp_path: Path, leftovers: Leftovers
) -> None:
    (tmp_path / "kind.yaml").write_text(REFUSED)
    config = KipikConfig(
        image=test_images[0],
        node_image=test_images[1],
        kind_config=tmp_path / "kind.yaml",
        timeout=300,
    )
    with ClusterFactory(config, report=lambda line: None) as factory:
        with pytest.raises(KindError) as info:
            factory.create()
        assert info.value.error.exit_code == 1
        assert "ERROR: failed to create cluster" in info.value.error.stderr
    assert leftovers() == []


def test_a_node_image_nobody_serves_fails_the_pull_naming_it(
    test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    config = KipikConfig(image=test_images[0], node_image=MISSING, timeout=120)
    with (
        ClusterFactory(config, report=lambda line: None) as factory,
        pytest.raises(ImageError) as info,
    ):
        factory.create()
    message = str(info.value)
    assert f"could not pull the node image {MISSING}: " in message
    assert "127.0.0.1:9" in message.split(": ", 2)[-1]  # the daemon's own error follows
    assert "Load it into your Docker engine" in message
    assert leftovers() == []
