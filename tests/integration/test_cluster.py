"""The whole path against the real Docker engine: real DinD, real inner daemon, real TLS.

kind and its node image are the doubles from tests/doubles (built into the test images).
"""

from __future__ import annotations

import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pytest_kipik import ClusterFactory, KindError, KipikConfig
from pytest_kipik.config import resolve
from tests.conftest import Leftovers, assert_kubectl_sees_a_ready_node, kept_cluster

pytestmark = pytest.mark.docker
ROOT = Path(__file__).resolve().parents[2]

SUITE = """
import os, stat
from kubernetes import client

def test_nodes(nested_cluster):
    nodes = nested_cluster.core_v1.list_node().items
    assert [n.metadata.name for n in nodes] == [nested_cluster.name + "-control-plane"]

def test_configmap(nested_client):
    core = client.CoreV1Api(nested_client)
    core.create_namespaced_config_map(
        "default", client.V1ConfigMap(metadata=client.V1ObjectMeta(name="c1"), data={"k": "v"}))
    assert core.read_namespaced_config_map("c1", "default").data == {"k": "v"}

def test_kubeconfig_is_private_and_reachable(nested_cluster, nested_kubeconfig):
    assert stat.S_IMODE(os.stat(nested_kubeconfig).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(nested_kubeconfig.parent).st_mode) == 0o700
    assert nested_cluster.server.startswith("https://127.0.0.1:")
    assert nested_cluster.server in nested_kubeconfig.read_text()
    # the client global default configuration is untouched
    assert client.Configuration.get_default_copy().host == client.Configuration().host
    assert nested_cluster.server not in client.Configuration.get_default_copy().host

def test_second_cluster_from_the_factory(nested_cluster_factory, nested_cluster):
    other = nested_cluster_factory.create(nodes=2)
    assert other.name != nested_cluster.name
    assert other.kubeconfig_path != nested_cluster.kubeconfig_path
    names = sorted(n.metadata.name for n in other.core_v1.list_node().items)
    assert names == [other.name + "-control-plane", other.name + "-worker"]
    # the clusters are separate: the first one's ConfigMap is not in the second
    assert [c.metadata.name for c in other.core_v1.list_namespaced_config_map("default").items
            if c.metadata.name == "c1"] == []
"""


def _images_args(test_images: tuple[str, str]) -> list[str]:
    dind, node = test_images
    return [f"--kipik-image={dind}", f"--kipik-node-image={node}"]


def test_session_clusters_work_and_leave_nothing(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    pytester.makepyfile(SUITE)
    result = pytester.runpytest_subprocess(*_images_args(test_images), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    for phase in ("DinD up", "inner daemon ready", "node image kipik-test/node:dev in",
                  "kind create", "kubeconfig + readiness", "teardown"):  # fmt: skip
        assert re.search(rf"kipik kipik-\w+: {re.escape(phase)} \(\d+\.\d+s\)", out), phase
    assert leftovers() == []


def test_failing_tests_still_tear_down(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    pytester.makepyfile(
        """
        def test_fails(nested_cluster):
            assert nested_cluster.core_v1.list_node().items == []
        """
    )
    result = pytester.runpytest_subprocess(*_images_args(test_images), "-v")
    result.assert_outcomes(failed=1)
    # at a verbose level kind's own progress reaches the terminal too
    result.stdout.re_match_lines([r"kipik kipik-\w+: kind: .*Ensuring node image"])
    assert leftovers() == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_during_kind_create_leaves_nothing(
    pytester: pytest.Pytester,
    test_images: tuple[str, str],
    leftovers: Leftovers,
    signum: signal.Signals,
) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", *_images_args(test_images), "-s"],
        cwd=pytester.path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # the phase before kind create has just finished
        seen.append(line)
        if " in (" in line and "node image" in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        pytest.fail("pytest ended before kind create:\n" + "".join(seen))
    proc.send_signal(signum)
    rest, _ = proc.communicate(timeout=120)
    out = "".join(seen) + rest
    assert "KeyboardInterrupt" in out
    assert re.search(r"teardown after a failed start \(\d+\.\d+s\)", out), out
    assert proc.returncode == pytest.ExitCode.INTERRUPTED
    assert leftovers() == []


def test_keep_prints_a_working_kubeconfig_and_removal(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess(*_images_args(test_images), "--kipik-keep")
    result.assert_outcomes(passed=1)
    with kept_cluster(result.stdout.str(), leftovers) as kubeconfig:
        assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
        assert_kubectl_sees_a_ready_node(kubeconfig)
        assert leftovers() != []
    assert not kubeconfig.parent.exists()


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


def test_unknown_dind_image_is_named(pytester: pytest.Pytester, leftovers: Leftovers) -> None:
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess("--kipik-image=127.0.0.1:9/kipik-test/no-such-image:v0")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*the image '127.0.0.1:9/kipik-test/no-such-image:v0' is not present on the Docker "
         "engine and pulling it failed*"]
    )  # fmt: skip
    assert leftovers() == []


def test_factory_works_without_pytest(
    test_images: tuple[str, str], tmp_path: Path, leftovers: Leftovers
) -> None:
    dind, node = test_images
    config = resolve({"image": dind, "node_image": node}, {}, {}, cwd=tmp_path, ini_dir=tmp_path)
    lines: list[str] = []
    with ClusterFactory(config, report=lines.append) as factory:
        cluster = factory.create(name="standalone")
        assert cluster.core_v1.read_namespaced_service_account("default", "default")
        made = leftovers()
        assert made[0] == "container standalone-dind"
        assert [r.split()[0] for r in made] == ["container", "volume"]  # anonymous, labelled
        workdir = factory.workdir
    assert leftovers() == []
    assert not workdir.exists()
    assert any(line.startswith("kipik standalone: kind create (") for line in lines)


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


def test_examples_pass_against_a_nested_cluster(
    pytester: pytest.Pytester, test_images: tuple[str, str]
) -> None:
    result = pytester.runpytest_subprocess(
        str(ROOT / "examples"), *_images_args(test_images), "-p", "no:cacheprovider",
        f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml"),
    )  # fmt: skip
    result.assert_outcomes(passed=5)  # test_example.py and test_workload.py


def test_readiness_timeout_names_the_check_and_cleans_up(
    pytester: pytest.Pytester, test_images: tuple[str, str], leftovers: Leftovers
) -> None:
    # without a CNI, kind's nodes never become Ready (the double behaves like kind here)
    (pytester.path / "kind.yaml").write_text(
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n"
        "networking:\n  disableDefaultCNI: true\n"
    )
    pytester.makepyfile("def test_x(nested_cluster):\n    pass\n")
    result = pytester.runpytest_subprocess(
        *_images_args(test_images), "--kipik-kind-config=kind.yaml", "--kipik-timeout=30s"
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*timed out after *s waiting for all 1 node(s) to be Ready",
            "*last state seen: 1/1 nodes [[]kipik-*-control-plane: Ready=False[]]",
            "*hint: nodes become Ready once the CNI runs*",
        ]
    )
    assert leftovers() == []
