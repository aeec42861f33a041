"""The plugin's wiring, driven through pytest itself (no Docker needed)."""

import time

import pytest

from pytest_kipik.config import SETTINGS

USES_CLUSTER = """
def test_one(nested_cluster):
    pass

def test_two(nested_cluster):
    pass

def test_three(nested_kubeconfig):
    pass

def test_without_cluster():
    pass
"""


def test_help_lists_every_option_with_env_and_ini(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    text = result.stdout.str()
    assert "nested Kubernetes clusters (pytest-kipik):" in text
    for setting in SETTINGS:
        assert setting.cli in text
        assert f"{setting.ini} (string):" in text
    result.stdout.fnmatch_lines(["*--kipik-timeout=DURATION*", "*env KIPIK_TIMEOUT*"])


def test_header_shows_values_and_their_sources(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeini("[pytest]\nkipik_node_image = node:ini\nkipik_timeout = 10\n")
    monkeypatch.setenv("KIPIK_TIMEOUT", "2m")
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    result = pytester.runpytest("--kipik-image=dind:cli", "--kipik-keep", "--co")
    result.stdout.fnmatch_lines(
        [
            "kipik: backend=auto (default), image=dind:cli (cli), node_image=node:ini (ini), "
            "kind_config=- (default), timeout=120s (env), keep=True (cli), "
            "name_prefix=kipik (default), pod_subnet=100.96.0.0/16 (default), "
            "service_subnet=100.97.0.0/16 (default), reuse=False (default), "
            "warm=False (default), snapshots=False (env), ttl=14400s (default), "
            "load_images=- (default), logs_dir=- (default), bundle=- (default), "
            "registry_mirror=- (default), registry_ca=- (default), registry_auth=- (default), "
            "registry=- (default)",
            "kipik: backend docker (auto: not running in a Kubernetes pod)",
            "kipik: docker engine: unix:///var/run/docker.sock "
            "(the default; DOCKER_HOST is not set)",
        ]
    )


def test_header_shows_the_pod_settings_with_the_pod_backend(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KIPIK_NAMESPACE", "ci")
    result = pytester.runpytest("--kipik-backend=pod", "--kipik-image=reg/dind:1", "--co")
    result.stdout.fnmatch_lines(
        [
            "kipik: backend pod (from cli)",
            "kipik pod: outer_kubeconfig=- (default), outer_context=- (default), "
            "namespace=ci (env), pod_template=- (default), service_account=- (default), "
            "docker_storage=- (default)",
        ]
    )


def test_pod_backend_without_an_image_says_how_to_make_one(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USES_CLUSTER)
    result = pytester.runpytest("--kipik-backend=pod")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*the pod backend needs --kipik-image: a DinD image the outer cluster's nodes can pull*"]
    )
    assert "docker build -t REGISTRY/kipik-dind:1 image/" in result.stderr.str()


def test_unknown_top_level_kind_field_warns_and_passes(pytester: pytest.Pytester) -> None:
    pytester.makefile(
        ".yaml", kind="kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nfutureField: 1\n"
    )
    result = pytester.runpytest("--kipik-kind-config=kind.yaml", "--co", "-W", "default")
    assert result.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    result.stdout.fnmatch_lines(
        ["*kind v0.32.0 has no top-level field 'futureField'; it is passed on to the kind in "
         "the DinD image*"]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--kipik-backend=podman"], {},
         "*pytest-kipik: invalid backend from command-line option --kipik-backend: 'podman' is "
         "not a backend: use one of auto, docker, pod*"),
        ([], {"KIPIK_TIMEOUT": "soon"},
         "*invalid timeout from environment variable KIPIK_TIMEOUT: 'soon' is not a duration*"),
        ([], {"KIPIK_KEEP": "perhaps"},
         "*invalid keep from environment variable KIPIK_KEEP: 'perhaps' is not a yes/no value*"),
    ],
)  # fmt: skip
def test_bad_values_are_usage_errors(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    pytester.makepyfile(USES_CLUSTER)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_ini_values_are_validated_and_named(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nkipik_name_prefix = Not_OK\n")
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*invalid name_prefix from ini key kipik_name_prefix: 'Not_OK'*"])


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes: [\n", "not valid YAML: *"),
        ("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha3\n",
         "line 2: apiVersion must be 'kind.x-k8s.io/v1alpha4' (the one kind supports), found*"),
        ("kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes: {}\n",
         "line 3: nodes must be a list*"),
    ],
)  # fmt: skip
def test_broken_kind_config_fails_fast_naming_file_and_problem(
    pytester: pytest.Pytester, content: str, problem: str
) -> None:
    path = pytester.path / "kind.yaml"
    path.write_text(content)
    pytester.makepyfile(USES_CLUSTER)
    start = time.monotonic()
    result = pytester.runpytest_subprocess("--kipik-kind-config=kind.yaml")
    assert time.monotonic() - start < 60  # bounded with room for a busy machine: no cluster
    assert "DinD up" not in result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*invalid kind_config from command-line option --kipik-kind-config: kind config file "
         f"{path}: {problem}"]
    )  # fmt: skip
    assert "Traceback" not in result.stderr.str()


def test_no_docker_engine_is_one_clear_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = pytester.path / "no-such-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{missing}")
    pytester.makepyfile(USES_CLUSTER)
    start = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    assert time.monotonic() - start < 30
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    out = result.stdout.str()
    assert out.count(f"no Docker engine answered at unix://{missing} (from DOCKER_HOST)") == 1
    assert "Start Docker" in out
    assert "Traceback" not in out
    assert "test_one" not in out.split("short test summary")[-1] or "ERROR" not in out


def test_fixtures_are_documented(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--fixtures")
    for name, doc in [
        ("nested_cluster_factory", "Session-wide factory of nested kind clusters*"),
        ("nested_cluster", "A ready nested kind cluster shared by the whole session*"),
        ("nested_kubeconfig", "Path of the session cluster's kubeconfig*"),
        ("nested_client", "A ``kubernetes.client.ApiClient`` for the session cluster*"),
    ]:
        result.stdout.fnmatch_lines([f"{name} [[]session scope[]]*", f"    {doc}"])


NOT_USING_KIPIK = """
import sys

def test_plain():
    assert "kubernetes" not in sys.modules, "the kipik plugin imported kubernetes"
    assert "docker" not in sys.modules, "the kipik plugin imported docker"
"""


def _no_kipik_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for setting in SETTINGS:
        monkeypatch.delenv(setting.env, raising=False)


def test_a_run_that_uses_nothing_of_kipik_imports_neither_client_and_says_one_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_kipik_settings(monkeypatch)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/kipik-inert.sock")  # never looked at
    pytester.makepyfile(NOT_USING_KIPIK)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    kipik_lines = [line for line in result.stdout.lines if line.startswith("kipik")]
    assert kipik_lines == [
        "kipik: idle until a test asks for a nested cluster (no kipik setting given)"
    ]


def test_a_given_setting_shows_the_full_header_and_no_kipik_turns_it_off(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_kipik_settings(monkeypatch)
    pytester.makepyfile("def test_plain():\n    pass\n")
    given = pytester.runpytest_subprocess("--kipik-backend=docker", "--co")
    given.stdout.fnmatch_lines(["kipik: backend docker (from cli)"])
    off = pytester.runpytest_subprocess("-p", "no:kipik", "--co")
    assert not [line for line in off.stdout.lines if line.startswith("kipik")]
    off.assert_outcomes()
