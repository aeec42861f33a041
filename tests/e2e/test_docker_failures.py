"""Failures on real kind (docker backend): kind's own errors, an image that does not exist.

Real kind v0.32.0 in the project's DinD image fails for real here (a node image nobody can pull),
and kipik must show kind's output and the inner daemon's log, and leave nothing behind.
"""

from __future__ import annotations

import pytest

from pytest_kipik import ClusterFactory, KindError, KipikConfig
from tests.conftest import Leftovers

pytestmark = [pytest.mark.e2e, pytest.mark.docker]


def test_kind_failure_shows_kind_stderr_and_daemon_log(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess(
        f"--kipik-image={test_images[0]}",
        "--kipik-node-image=127.0.0.1:9/kipik-test/missing-node:v0",
    )
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "kind failed to create cluster" in out
    assert 'failed to pull image "127.0.0.1:9/kipik-test/missing-node:v0"' in out
    assert "last 50 lines of the inner Docker daemon's log:" in out
    assert leftovers() == []


def test_kind_error_leaves_nothing_when_used_directly(
    test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    config = KipikConfig(
        image=test_images[0], node_image="127.0.0.1:9/kipik-test/missing-node:v0", timeout=120
    )
    with ClusterFactory(config, report=lambda line: None) as factory:
        with pytest.raises(KindError) as info:
            factory.create()
        assert info.value.error.exit_code == 1
        assert "ERROR: failed to create cluster" in info.value.error.stderr
    assert leftovers() == []
