"""The pytest11 entry point: options, ini keys, the report header and thin fixtures only.

Everything that does work lives in :mod:`pytest_kipik.cluster` and runs without pytest.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client as k8s_client

from pytest_kipik import kind
from pytest_kipik.cluster import ClusterFactory, NestedCluster
from pytest_kipik.config import SETTINGS, KipikConfig, resolve
from pytest_kipik.errors import BackendUnavailable, ConfigError, KipikError
from pytest_kipik.hosts import Choice, choose, make_backend
from pytest_kipik.hosts.docker import engine_location
from pytest_kipik.hosts.pod import local_outer_addresses
from pytest_kipik.progress import Reporter
from pytest_kipik.signals import terminate_as_interrupt

CONFIG_KEY = pytest.StashKey[KipikConfig]()
CHOICE_KEY = pytest.StashKey[Choice]()


def pytest_addoption(parser: pytest.Parser) -> None:
    """Declare every setting as ``--kipik-*`` option and ``kipik_*`` ini key."""
    group = parser.getgroup("kipik", "nested Kubernetes clusters (pytest-kipik)")
    for setting in SETTINGS:
        text = f"{setting.help} [env {setting.env}, ini {setting.ini}, default: "
        text += f"{setting.default or 'see help'}]"
        if setting.flag:
            group.addoption(
                setting.cli,
                action="store_const",
                const="true",
                default=None,
                dest=f"kipik_{setting.name}",
                help=text,
            )
        else:
            group.addoption(
                setting.cli,
                action="store",
                default=None,
                metavar=setting.metavar,
                dest=f"kipik_{setting.name}",
                help=text,
            )
        parser.addini(setting.ini, help=setting.help, type="string", default="")


def pytest_configure(config: pytest.Config) -> None:
    """Resolve and validate the settings and choose the backend, before anything starts."""
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    cli = {s.name: config.getoption(f"kipik_{s.name}") for s in SETTINGS}
    ini = {s.name: (str(config.getini(s.ini)) or None) for s in SETTINGS}
    try:
        kipik = resolve(
            cli, ini, os.environ, cwd=Path(config.invocation_params.dir), ini_dir=ini_dir
        )
        choice = choose(kipik)
        _check_for(kipik, choice)
    except ConfigError as exc:
        raise pytest.UsageError(f"pytest-kipik: {exc}") from None
    config.stash[CONFIG_KEY] = kipik
    config.stash[CHOICE_KEY] = choice
    user = kind.load_user_config(kipik.kind_config) if kipik.kind_config else {}
    for key in kind.unknown_fields(user):
        config.issue_config_time_warning(
            pytest.PytestWarning(
                f"pytest-kipik: kind config {kipik.kind_config}: kind v0.32.0 has no top-level "
                f"field {key!r}; it is passed on to the kind in the DinD image"
            ),
            stacklevel=2,
        )


def _check_for(kipik: KipikConfig, choice: Choice) -> None:
    """What the chosen backend needs, checked now: an image, subnets that cannot collide."""
    if choice.name != "pod":
        return
    if not kipik.image:
        make_backend(kipik, lambda line: None, choice).connect()  # raises what to do
    user = kind.load_user_config(kipik.kind_config) if kipik.kind_config else {}
    kind.check_no_overlap(
        kind.subnets(user, kipik.pod_subnet, kipik.service_subnet), local_outer_addresses()
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Show every setting with where its value came from, and the backend with why."""
    kipik = config.stash[CONFIG_KEY]
    choice = config.stash[CHOICE_KEY]
    lines = [
        "kipik: " + ", ".join(kipik.describe()),
        f"kipik: backend {choice.name} ({choice.reason})",
    ]
    if choice.name == "pod":
        lines.append("kipik pod: " + ", ".join(kipik.describe("pod")))
    else:
        lines.append(f"kipik: docker engine: {engine_location()}")
    return lines


def _reporter(config: pytest.Config) -> Reporter:
    """Progress lines straight to the terminal, past output capturing (like live logging)."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if terminal is None:  # e.g. an xdist worker: progress goes to the log only
        return lambda line: None

    def report(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            terminal.write_line(line)
            terminal.flush()  # progress must show as it happens, also when piped (CI logs)

    return report


@pytest.fixture(scope="session")
def nested_cluster_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterFactory]:
    """Session-wide factory of nested kind clusters, each in its own DinD container.

    ``nested_cluster_factory.create(name=None, nodes=None, kind_config=None, node_image=None)``
    returns a ready :class:`~pytest_kipik.NestedCluster`; every cluster it made is torn down at
    the end of the session (kept and printed instead with ``--kipik-keep``).
    """
    config = request.config
    report = _reporter(config)
    factory = ClusterFactory(
        config.stash[CONFIG_KEY],
        backend=make_backend(config.stash[CONFIG_KEY], report, config.stash[CHOICE_KEY]),
        workdir=tmp_path_factory.mktemp("kipik"),
        report=report,
        worker=os.environ.get("PYTEST_XDIST_WORKER"),
        verbose=config.get_verbosity() > 0,
    )
    problem = None
    try:
        factory.connect()
    except (BackendUnavailable, ConfigError) as exc:
        problem = f"pytest-kipik: {exc}"
    if problem:  # outside the except block: one message, no chained traceback
        pytest.exit(problem, returncode=pytest.ExitCode.TESTS_FAILED)
    with terminate_as_interrupt():
        yield factory
        problems = factory.close()
    for failure in problems:
        warnings.warn(pytest.PytestWarning(f"pytest-kipik teardown: {failure}"), stacklevel=1)


@pytest.fixture(scope="session")
def nested_cluster(nested_cluster_factory: ClusterFactory) -> NestedCluster:
    """A ready nested kind cluster shared by the whole session (one per xdist worker).

    Has ``name``, ``kubeconfig_path``, ``server``, ``api_client``, ``core_v1`` and
    ``kubectl(*args)``. Configure it with the ``--kipik-*`` options.
    """
    try:
        return nested_cluster_factory.create()
    except KipikError as exc:
        problem = f"pytest-kipik could not create the nested cluster:\n{exc}"
    pytest.fail(problem, pytrace=False)  # outside the except block: the error shows once


@pytest.fixture(scope="session")
def nested_kubeconfig(nested_cluster: NestedCluster) -> Path:
    """Path of the session cluster's kubeconfig (mode 0600, server reachable from here)."""
    return nested_cluster.kubeconfig_path


@pytest.fixture(scope="session")
def nested_client(nested_cluster: NestedCluster) -> k8s_client.ApiClient:
    """A ``kubernetes.client.ApiClient`` for the session cluster (not the global default)."""
    return nested_cluster.api_client
