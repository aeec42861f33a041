"""The pytest front door (the pytest11 entry point): pytest's hooks and the fixtures.

Options and ini keys generated from the settings, the report header, the marker's
parametrization, the xdist hand-over of the session (its owner's sweep at the end), the
failure report, and the fixtures, which only call :class:`~pytest_kipik.factory.ClusterFactory`.
Everything that makes or removes clusters runs without pytest.

The plugin is inert until used: pytest loads it in every run of a project, so importing it
imports neither ``kubernetes`` nor ``docker``, and the backend is chosen (and the engine or the
outer cluster looked at) only when a setting is given or a kipik fixture asks for a cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import secrets
import sys
import warnings
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_kipik import hookspecs, labels
from pytest_kipik.config import SETTINGS, KipikConfig, resolve
from pytest_kipik.errors import BackendUnavailable, ConfigError, KipikError
from pytest_kipik.kind import config as kind
from pytest_kipik.marker import ClusterSpec, marker_spec
from pytest_kipik.progress import Reporter, Tail, file_reporter
from pytest_kipik.sharing.session import KeptNotes, Session, WarmSlot, cluster_key
from pytest_kipik.signals import deferred_interrupts, terminate_as_interrupt

if TYPE_CHECKING:  # the modules that import kubernetes and docker load on first use
    from kubernetes import client as k8s_client

    from pytest_kipik.cluster import NestedCluster, NestedNamespace
    from pytest_kipik.factory import ClusterFactory
    from pytest_kipik.hosts.base import Backend
    from pytest_kipik.hosts.choice import Choice
    from pytest_kipik.sharing.holds import OwnerHolds

CONFIG_KEY = pytest.StashKey[KipikConfig]()
CHOICE_KEY: pytest.StashKey[Choice] = pytest.StashKey()
SESSION_KEY = pytest.StashKey[Session]()
WARM_KEY = pytest.StashKey[WarmSlot]()
TAIL_KEY = pytest.StashKey[Tail]()
HOLDS_KEY: pytest.StashKey[OwnerHolds] = pytest.StashKey()
#: The workerinput key that carries the owner's session to xdist workers.
WORKER_SESSION = "kipik_session"
PROGRESS_FILE = "progress.log"


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    """Offer ``pytest_kipik_cluster_setup`` (see :mod:`pytest_kipik.hookspecs`)."""
    pluginmanager.add_hookspecs(hookspecs)


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
    group.addoption(
        "--kipik-gc",
        action="store_true",
        default=False,
        dest="kipik_gc",
        help="remove kipik resources that are expired or whose owner is gone (like `kipik gc`), "
        "print what was removed and exit without running tests",
    )


def _resolve(config: pytest.Config) -> KipikConfig:
    ini_dir = config.inipath.parent if config.inipath else config.rootpath
    cli = {s.name: config.getoption(f"kipik_{s.name}") for s in SETTINGS}
    ini = {s.name: (str(config.getini(s.ini)) or None) for s in SETTINGS}
    return resolve(cli, ini, os.environ, cwd=Path(config.invocation_params.dir), ini_dir=ini_dir)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--kipik-gc``: reap, print, and exit without running tests."""
    if not config.getoption("kipik_gc"):
        return None
    from pytest_kipik.hosts.choice import make_backend
    from pytest_kipik.ops import reaper

    try:
        kipik = _resolve(config)
        backend = make_backend(kipik, print)
        problems = reaper.reap(backend, lambda line: print(f"kipik gc: {line}", flush=True))
        backend.close()
    except KipikError as exc:
        print(f"kipik gc: {exc}", flush=True)
        return int(pytest.ExitCode.USAGE_ERROR)
    return int(pytest.ExitCode.TESTS_FAILED) if problems else int(pytest.ExitCode.OK)


def pytest_configure(config: pytest.Config) -> None:
    """Resolve and validate the settings and choose the backend, before anything starts."""
    config.addinivalue_line(
        "markers",
        "kipik(nodes=None, node_image=None, kind_config=None, fresh=False): the cluster "
        "nested_cluster gives the tests of this module or class (one cluster per distinct "
        "configuration, shared; with fresh=True one of its own, removed after it)",
    )
    try:
        kipik = _resolve(config)
        config.stash[CONFIG_KEY] = kipik
        if kipik.given:  # else nothing is looked at until a fixture asks for a cluster
            _check_for(config)
    except ConfigError as exc:
        raise pytest.UsageError(f"pytest-kipik: {exc}") from None
    config.stash[SESSION_KEY] = _session(config, kipik)
    user = kipik.user_kind_config or {}
    for key in kind.unknown_fields(user):
        config.issue_config_time_warning(
            pytest.PytestWarning(
                f"pytest-kipik: kind config {kipik.kind_config}: kind v0.32.0 has no top-level "
                f"field {key!r}; it is passed on to the kind in the DinD image"
            ),
            stacklevel=2,
        )


def _choice(config: pytest.Config) -> Choice:
    """The backend the settings select, chosen on first need (it may look at the engine)."""
    if CHOICE_KEY not in config.stash:
        from pytest_kipik.hosts.choice import choose

        config.stash[CHOICE_KEY] = choose(config.stash[CONFIG_KEY])
    return config.stash[CHOICE_KEY]


def _backend_maker(config: pytest.Config, report: Reporter) -> Backend:
    """A new backend of the session's choice (the import of both backends happens here)."""
    from pytest_kipik.hosts.choice import make_backend

    return make_backend(config.stash[CONFIG_KEY], report, _choice(config))


def _session(config: pytest.Config, kipik: KipikConfig) -> Session:
    """The owner's session (handed to xdist workers), or the one a worker was handed."""
    handed = getattr(config, "workerinput", {}).get(WORKER_SESSION)
    if handed:
        return Session.for_worker(handed, os.environ.get("PYTEST_XDIST_WORKER"))
    slot = None
    if kipik.warm and not kipik.reuse:
        try:
            slot = WarmSlot.acquire(kipik.name_prefix)
        except KipikError as exc:
            raise pytest.UsageError(f"pytest-kipik: {exc}") from None
        config.stash[WARM_KEY] = slot
    return Session.new(warm_slot=slot.index if slot else None)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """On the xdist controller: hand the session to each worker, show their progress."""
    config: pytest.Config = node.config
    session = config.stash[SESSION_KEY]
    node.workerinput[WORKER_SESSION] = session.to_json()
    if TAIL_KEY not in config.stash:
        config.stash[TAIL_KEY] = Tail(session.directory / PROGRESS_FILE, _reporter(config))
        from pytest_kipik.sharing.holds import OwnerHolds

        config.stash[HOLDS_KEY] = OwnerHolds(
            session, lambda: _backend_maker(config, _reporter(config))
        )


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """The owner removes what its session made and did not keep, after every worker is done.

    Shared clusters outlive any one xdist worker, and a crashed worker's are found here too.
    """
    config = session.config
    if SESSION_KEY not in config.stash or not config.stash[SESSION_KEY].owner:
        return
    kipik_session = config.stash[SESSION_KEY]
    if TAIL_KEY in config.stash:
        config.stash[TAIL_KEY].stop()
        del config.stash[TAIL_KEY]
    holds = config.stash.get(HOLDS_KEY, None)
    report = _reporter(config)
    problems: list[Exception] = []
    with deferred_interrupts(reraise=False):  # cleanup must not be cut short
        if kipik_session.directory.exists():  # else no cluster was asked for
            from pytest_kipik.ops import reaper

            try:
                backend = _backend_maker(config, report)
                try:
                    problems = reaper.sweep(
                        backend, kipik_session.run_id, report, KeptNotes(kipik_session).untold
                    )
                finally:
                    backend.close()
            except KipikError as exc:
                problems = [exc]
        if holds is not None:
            holds.release()
            del config.stash[HOLDS_KEY]
    for problem in problems:
        report(f"pytest-kipik teardown: {problem}")
    kipik_session.remove_directory()


def pytest_unconfigure(config: pytest.Config) -> None:
    """Let another session take this session's warm host."""
    if WARM_KEY in config.stash:
        config.stash[WARM_KEY].release()
        del config.stash[WARM_KEY]


def _check_for(config: pytest.Config) -> None:
    """What the chosen backend needs from the settings, checked before the session starts."""
    backend = _backend_maker(config, lambda line: None)
    try:
        backend.preflight()
    finally:
        backend.close()


def pytest_report_header(config: pytest.Config) -> list[str]:
    """Show every setting with where its value came from, and the backend with why."""
    kipik = config.stash[CONFIG_KEY]
    if not kipik.given:
        return ["kipik: idle until a test asks for a nested cluster (no kipik setting given)"]
    choice = _choice(config)
    lines = [
        "kipik: " + ", ".join(kipik.describe()),
        f"kipik: backend {choice.name} ({choice.reason})",
    ]
    if choice.name == "pod":
        lines.append("kipik pod: " + ", ".join(kipik.describe("pod")))
        if kipik.snapshots:
            lines.append("kipik: snapshots: off on the pod backend (every cluster is created)")
    else:
        from pytest_kipik.hosts.engine import engine_location

        lines.append(f"kipik: docker engine: {engine_location()}")
    if kipik.reuse:
        user = kipik.user_kind_config
        key = cluster_key(
            kipik, backend=choice.name, user_config=user, nodes=None, node_image=kipik.node_image
        )
        from pytest_kipik.sharing.flows import reuse_name, reuse_state

        name = reuse_name(kipik.name_prefix, key)
        if reuse_state(key).exists():
            lines.append(f"kipik: reuse: {name} kept by an earlier run: reused when healthy")
        else:
            lines.append(f"kipik: reuse: no cluster kept for this configuration: {name} created")
    session = config.stash[SESSION_KEY]
    if session.warm_slot is not None:
        lines.append(f"kipik: warm host: slot {session.warm_slot} (fresh cluster in a kept host)")
    return lines


def _reporter(config: pytest.Config) -> Reporter:
    """Progress lines straight to the terminal, past output capturing (like live logging)."""
    terminal = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    session = config.stash[SESSION_KEY]
    if not session.owner:  # an xdist worker: the controller tails the session's progress file
        return file_reporter(session.path() / PROGRESS_FILE, session.worker or "worker")
    if terminal is None:
        return lambda line: None

    def report(line: str) -> None:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            writer = getattr(terminal, "_tw", None)
            if getattr(writer, "width_of_current_line", 0):  # after progress dots: a new line
                terminal.write("\n")
            terminal.write_line(line)
            terminal.flush()  # progress must show as it happens, also when piped (CI logs)

    return report


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests under ``@pytest.mark.kipik(...)`` get the cluster of that configuration."""
    if "nested_cluster" not in metafunc.fixturenames:
        return
    found = next(metafunc.definition.iter_markers_with_node("kipik"), None)
    if found is None:
        return
    owner, marker = found
    try:
        spec = marker_spec(
            marker.args, marker.kwargs, metafunc.definition.path.parent, owner.nodeid
        )
    except ConfigError as exc:
        problem = f"pytest-kipik: {metafunc.definition.nodeid}: {exc}"
    else:
        metafunc.parametrize(
            "nested_cluster", [spec], indirect=True, ids=[spec.id], scope="session"
        )
        return
    pytest.fail(problem, pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failed test that used a nested cluster gets that cluster's state in its report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.failed or report.when == "teardown" or "pytest_kipik.cluster" not in sys.modules:
        return  # no cluster was ever made in this process
    from pytest_kipik.cluster import NestedCluster, NestedNamespace
    from pytest_kipik.k8s import diagnostics

    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    namespace = funcargs.get("nested_namespace")
    if isinstance(namespace, NestedNamespace):
        text = diagnostics.snapshot(
            namespace.cluster.api_client, namespace=namespace.name, nodes=False
        )
        report.sections.append((f"kipik: namespace {namespace.name}", text))
    seen: set[str] = set()
    for value in funcargs.values():
        for cluster in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(cluster, NestedCluster) and cluster.name not in seen:
                seen.add(cluster.name)
                report.sections.append(
                    (f"kipik: cluster {cluster.name}", diagnostics.snapshot(cluster.api_client))
                )


@pytest.fixture(scope="session")
def nested_cluster_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterFactory]:
    """Session-wide factory of nested kind clusters, each in its own DinD container.

    ``nested_cluster_factory.create(name=None, nodes=None, kind_config=None, node_image=None)``
    returns a ready :class:`~pytest_kipik.NestedCluster`; every cluster it made is torn down at
    the end of the session (kept and printed instead with ``--kipik-keep``).
    """
    from pytest_kipik.factory import ClusterFactory

    config = request.config
    report = _reporter(config)
    if not config.stash[CONFIG_KEY].given:  # the header did not say which backend
        choice = _choice(config)
        report(f"kipik: backend {choice.name} ({choice.reason})")
    factory = ClusterFactory(
        config.stash[CONFIG_KEY],
        backend=_backend_maker(config, report),
        workdir=tmp_path_factory.mktemp("kipik"),
        report=report,
        worker=os.environ.get("PYTEST_XDIST_WORKER"),
        verbose=int(config.getoption("verbose")) > 0,
        session=config.stash[SESSION_KEY],
        **_setup_hook(config),
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
        logs_dir = config.stash[CONFIG_KEY].logs_dir
        problems = _export_logs(factory, logs_dir, report) if logs_dir else []
        problems += factory.close()
    for failure in problems:
        warnings.warn(pytest.PytestWarning(f"pytest-kipik teardown: {failure}"), stacklevel=1)


def _setup_hook(config: pytest.Config) -> dict[str, Any]:
    """The factory's ``setup`` (every ``pytest_kipik_cluster_setup``) and its ``setup_key``."""
    caller = config.hook.pytest_kipik_cluster_setup
    implementations = caller.get_hookimpls()
    if not implementations:
        return {}
    sources = []
    for implementation in implementations:
        try:
            sources.append(inspect.getsource(implementation.function))
        except (OSError, TypeError):  # no source to read: its name stands for it
            sources.append(f"{implementation.plugin_name}:{implementation.function.__qualname__}")
    key = hashlib.sha256("\n".join(sources).encode()).hexdigest()[:16]
    return {"setup": lambda cluster: caller(cluster=cluster), "setup_key": key}


def _export_logs(factory: ClusterFactory, directory: Path, report: Reporter) -> list[Exception]:
    """``kind export logs`` + the daemon log of every cluster this process made; never raises."""
    problems: list[Exception] = []
    from pytest_kipik.ops import logs

    for cluster in factory.clusters:
        if cluster.status == "attached":
            continue  # the process that made it exports its logs
        try:
            path = logs.export_logs(
                cluster.host, cluster.name, directory, timeout=120, kind_name=cluster.kind_name
            )
        except Exception as exc:  # the next cluster's logs still get written
            problems.append(KipikError(f"logs of {cluster.name} not exported: {exc}"))
        else:
            report(f"kipik {cluster.name}: logs in {path}")
    return problems


@pytest.fixture(scope="session")
def nested_cluster(
    request: pytest.FixtureRequest, nested_cluster_factory: ClusterFactory
) -> Iterator[NestedCluster]:
    """A ready nested kind cluster shared by the whole session (all xdist workers share one).

    Has ``name``, ``kubeconfig_path``, ``server``, ``api_client``, ``core_v1``, ``apply()``,
    ``delete()``, ``wait_for()``, ``port_forward()``, ``load_image()``, ``kubectl()`` and
    ``helm()``. Configure it with the ``--kipik-*`` options, or per module or class with
    ``@pytest.mark.kipik(nodes=..., node_image=..., kind_config=...)``; with ``fresh=True``
    the marked module, class or test gets a pristine cluster of its own (restored from the
    configuration's snapshot), removed after it. ``--kipik-reuse`` keeps it for the next run,
    ``--kipik-warm`` makes it in a DinD host kept between runs.
    """
    spec: ClusterSpec = getattr(request, "param", ClusterSpec())
    try:
        if spec.fresh_for is None:
            cluster = nested_cluster_factory.shared(**spec.arguments())
        else:  # restored from the configuration's snapshot when there is one
            cluster = nested_cluster_factory.create(**spec.arguments())
    except KipikError as exc:
        problem = f"pytest-kipik could not create the nested cluster:\n{exc}"
    else:
        yield cluster
        if spec.fresh_for is not None:
            nested_cluster_factory.remove(cluster)
        return
    pytest.fail(problem, pytrace=False)  # outside the except block: the error shows once


@pytest.fixture(scope="session")
def nested_kubeconfig(nested_cluster: NestedCluster) -> Path:
    """Path of the session cluster's kubeconfig (mode 0600, server reachable from here)."""
    return nested_cluster.kubeconfig_path


@pytest.fixture(scope="session")
def nested_client(nested_cluster: NestedCluster) -> k8s_client.ApiClient:
    """A ``kubernetes.client.ApiClient`` for the session cluster (not the global default)."""
    return nested_cluster.api_client


@pytest.fixture
def nested_namespace(
    request: pytest.FixtureRequest, nested_cluster: NestedCluster
) -> Iterator[NestedNamespace]:
    """A fresh namespace in ``nested_cluster`` for this test (named after it), deleted after.

    ``.name``, ``.cluster``, and ``apply()``, ``wait_for()``, ``port_forward()`` working in it.
    When the test fails, its events and the state of its pods are added to the report.
    """
    namespace = nested_cluster.create_namespace(
        labels.namespace_name(request.node.name, secrets.token_hex(3))
    )
    yield namespace
    namespace.delete()
