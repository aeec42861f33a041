"""NestedCluster and ClusterFactory: provisioning that cleans up after itself, even half-way."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client as k8s_client

from pytest_kipik import kind, kubeconfig, labels, paths, readiness
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import ConfigError, KipikError
from pytest_kipik.hosts import make_backend
from pytest_kipik.hosts.base import Backend, Host, OutputSink
from pytest_kipik.process import CommandResult, run
from pytest_kipik.progress import Reporter, log, phase, stderr_reporter
from pytest_kipik.signals import deferred_interrupts


class NestedCluster:
    """A ready kind cluster inside its own Docker-in-Docker host.

    Usable as a context manager on its own; when created by a :class:`ClusterFactory` the
    factory removes it.
    """

    def __init__(
        self,
        *,
        name: str,
        kubeconfig_path: Path,
        server: str,
        host: Host,
        nodes: int,
        keep: bool = False,
    ) -> None:
        self.name = name
        self.kubeconfig_path = kubeconfig_path
        self.server = server
        self.host = host
        self.nodes = nodes
        self.keep = keep
        self._closed = False

    def __repr__(self) -> str:
        return f"NestedCluster(name={self.name!r}, server={self.server!r})"

    @cached_property
    def api_client(self) -> k8s_client.ApiClient:
        """A kubernetes ApiClient for this cluster only (built from its own kubeconfig)."""
        return kubeconfig.api_client(self.kubeconfig_path)

    @cached_property
    def core_v1(self) -> k8s_client.CoreV1Api:
        """``CoreV1Api`` on :attr:`api_client`."""
        return k8s_client.CoreV1Api(self.api_client)

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> CommandResult:
        """Run the local ``kubectl`` against this cluster and capture its output."""
        if shutil.which("kubectl") is None:
            raise KipikError(
                "kubectl is not installed (not on PATH); install it to use cluster.kubectl(), "
                "or use cluster.api_client / cluster.core_v1"
            )
        return run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig_path), *args],
            timeout=timeout,
            check=check,
        )

    def how_to_reach(self) -> str:
        """What to paste to use and to remove a kept cluster."""
        return (
            f"kipik: kept cluster {self.name}\n"
            f"  use it:    {self.host.how_to_use(str(self.kubeconfig_path))}\n"
            f"  remove it: {self.host.removal_command()} && rm -rf {self.kubeconfig_path.parent}"
        )

    def close_client(self) -> None:
        """Close :attr:`api_client` if it was made (its connection pool and threads)."""
        if "api_client" in self.__dict__:
            self.api_client.close()

    def close(self) -> None:
        """Remove the cluster's host and files (not when kept); idempotent.

        A removal that failed can be retried: the cluster counts as closed only once it is gone.
        """
        if self._closed:
            return
        self.close_client()
        if not self.keep:
            self.host.remove()
            shutil.rmtree(self.kubeconfig_path.parent, ignore_errors=True)
        self._closed = True

    def __enter__(self) -> NestedCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ClusterFactory:
    """Creates nested clusters for one session (or one xdist worker) and removes them all.

    ``backend`` makes the hosts (default: the one the config selects). ``workdir`` holds each
    cluster's private kubeconfig directory (a fresh temporary directory when not given; kept
    clusters use the per-user state directory, which nothing prunes). ``report`` receives one
    line per phase, and kind's own progress lines when ``verbose``.
    """

    def __init__(
        self,
        config: KipikConfig,
        *,
        backend: Backend | None = None,
        workdir: Path | None = None,
        report: Reporter = stderr_reporter,
        worker: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.config = config
        self.report = report
        self.worker = worker
        self.verbose = verbose
        self.run_id = labels.new_run_id()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="kipik-"))
        self.clusters: list[NestedCluster] = []
        self._backend = backend
        self._lock = threading.Lock()
        self._count = 0

    # -- shared resources ------------------------------------------------------------------

    @property
    def backend(self) -> Backend:
        """The backend that makes this factory's hosts (chosen on first use)."""
        if self._backend is None:
            self._backend = make_backend(self.config, self.report)
        return self._backend

    def connect(self) -> None:
        """Check now that the backend answers (raises BackendUnavailable saying what to do)."""
        self.backend.connect()

    def _next_name(self, name: str | None) -> str:
        with self._lock:
            self._count += 1
            index = self._count
        if name is None:
            name = labels.cluster_name(self.config.name_prefix, self.run_id, self.worker, index)
        problem = labels.check_cluster_name(name)
        if problem:
            raise ConfigError(problem)
        if any(c.name == name for c in self.clusters):
            raise ConfigError(f"a cluster named {name!r} already exists in this session")
        return name

    def _make_host(self, name: str) -> Host:
        return self.backend.make_host(
            f"{name}-dind",
            labels.owner_labels(
                run_id=self.run_id,
                cluster=name,
                role="dind",
                worker=self.worker,
                keep=self.config.keep,
            ),
            [kind.API_SERVER_PORT],
        )

    def _kubeconfig_dir(self, name: str) -> Path:
        if self.config.keep:  # outlives pytest's basetemp, which pytest prunes after 3 runs
            return paths.private_dir(paths.state_home(), "clusters", name)
        return self.workdir / name

    # -- creating --------------------------------------------------------------------------

    def create(
        self,
        name: str | None = None,
        *,
        nodes: int | None = None,
        kind_config: Path | str | Mapping[str, Any] | None = None,
        node_image: str | None = None,
    ) -> NestedCluster:
        """Create a ready nested cluster.

        ``nodes``: 1 control plane + ``nodes - 1`` workers (not together with a kind config
        that lists nodes). ``kind_config``: a path or a mapping, validated like kind does,
        instead of the session's ``--kipik-kind-config``. ``node_image``: instead of the
        session's ``--kipik-node-image``.
        """
        name = self._next_name(name)
        user_config = self._user_kind_config(kind_config)
        self._build_config(user_config, name, [], nodes, {})  # fail before anything starts
        image = node_image or self.config.node_image
        deadline = time.monotonic() + self.config.timeout
        cluster = self._provision(name, user_config, nodes, image, deadline)
        self.clusters.append(cluster)
        return cluster

    def _user_kind_config(
        self, kind_config: Path | str | Mapping[str, Any] | None
    ) -> dict[str, Any] | None:
        if kind_config is None:
            path = self.config.kind_config
            return kind.load_user_config(path) if path else None
        if isinstance(kind_config, Mapping):
            try:
                return kind.validate_user_config(kind.dump_config(kind_config))
            except ConfigError as exc:
                raise ConfigError(f"kind_config: {exc}") from None
        return kind.load_user_config(Path(kind_config))

    def _build_config(
        self,
        user_config: Mapping[str, Any] | None,
        name: str,
        cert_sans: list[str],
        nodes: int | None,
        images: Mapping[str, str],
    ) -> dict[str, Any]:
        return kind.build_config(
            user_config,
            name=name,
            cert_sans=cert_sans,
            nodes=nodes,
            pod_subnet=self.config.pod_subnet,
            service_subnet=self.config.service_subnet,
            images=images,
        )

    def _kind_output(self, name: str) -> OutputSink:
        def sink(line: str) -> None:
            log.info("kind %s: %s", name, line)
            if self.verbose and line.strip():
                self.report(f"kipik {name}: kind: {line.strip()}")

        return sink

    def _provision(
        self,
        name: str,
        user_config: Mapping[str, Any] | None,
        nodes: int | None,
        node_image: str | None,
        deadline: float,
    ) -> NestedCluster:
        def left() -> float:
            return max(deadline - time.monotonic(), 1.0)

        say = self.report
        with contextlib.ExitStack() as undo:
            host = self._make_host(name)
            if self.config.keep:
                undo.callback(
                    say,
                    f"kipik {name}: kept after a failure; remove with: {host.removal_command()}",
                )
            else:
                undo.callback(self._remove_quietly, host)
            with phase(say, name, "DinD up"):
                host.start()
            with phase(say, name, "inner daemon ready"):
                host.wait_ready(left())
            kind.check_no_overlap(
                kind.subnets(user_config, self.config.pod_subnet, self.config.service_subnet),
                host.outer_addresses(),
            )
            images: dict[str, str] = {}
            for image in kind.node_images(user_config, node_image):
                with phase(say, name, f"node image {image} in"):
                    inner = host.load_image(image, left())
                if inner is None:
                    say(f"kipik {name}: {image} is not local; kind will pull it")
                else:
                    images[image] = inner
            config = self._build_config(user_config, name, host.cert_sans(), nodes, images)
            driver = kind.KindDriver(host)
            with phase(say, name, "kind create"):
                driver.create(
                    config,
                    image=images.get(node_image, node_image) if node_image else None,
                    timeout=left(),
                    retain=self.config.keep,
                    on_output=self._kind_output(name),
                )
            with phase(say, name, "kubeconfig + readiness"):
                endpoint = host.api_endpoint(kind.API_SERVER_PORT)
                raw = kubeconfig.parse(driver.kubeconfig(name))
                reported = kubeconfig.server_of(raw)
                if urlsplit(reported).port != kind.API_SERVER_PORT:
                    raise KipikError(
                        f"kind's kubeconfig names {reported}, but kipik asked kind to publish the "
                        f"API server on port {kind.API_SERVER_PORT} (networking.apiServerPort) "
                        "and reaches it there; the kind in the DinD image did not honour it"
                    )
                directory = self._kubeconfig_dir(name)
                if not self.config.keep:
                    undo.callback(shutil.rmtree, directory, True)
                path = kubeconfig.write_private(
                    directory / "kubeconfig",
                    kubeconfig.dump(kubeconfig.with_server(raw, endpoint.url)),
                )
                cluster = NestedCluster(
                    name=name,
                    kubeconfig_path=path,
                    server=endpoint.url,
                    host=host,
                    nodes=kind.node_count(config),
                    keep=self.config.keep,
                )
                undo.callback(cluster.close_client)
                readiness.wait_ready(cluster.api_client, nodes=cluster.nodes, deadline=deadline)
            undo.pop_all()
        return cluster

    def _remove_quietly(self, host: Host) -> None:
        """Undo a half-made host without hiding the error that got us here."""
        try:
            with (
                deferred_interrupts(reraise=False),
                phase(self.report, host.name, "teardown after a failed start"),
            ):
                host.remove()
        except Exception as exc:  # reported; the error that got us here wins
            self.report(f"kipik {host.name}: {exc}")

    # -- tearing down ----------------------------------------------------------------------

    def close(self) -> list[Exception]:
        """Remove every cluster (kept ones are listed instead); returns teardown problems.

        Every cluster is attempted whatever happened to the others. Ctrl-C and SIGTERM wait
        until the removal is done.
        """
        with deferred_interrupts():
            return self._close_all()

    def _close_all(self) -> list[Exception]:
        problems: list[Exception] = []
        try:
            for cluster in reversed(list(self.clusters)):
                if cluster.keep:
                    self.report(cluster.how_to_reach())
                    cluster.close()
                    self.clusters.remove(cluster)
                    continue
                try:
                    with phase(self.report, cluster.name, "teardown"):
                        cluster.close()
                except Exception as exc:  # every cluster gets its turn
                    problems.append(exc)
                else:
                    self.clusters.remove(cluster)
        finally:
            if self._backend is not None:
                self._backend.close()
                self._backend = None
            if self._own_workdir and not self.clusters:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return problems

    def __enter__(self) -> ClusterFactory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
