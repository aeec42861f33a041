"""The pod backend: a privileged Docker-in-Docker pod in an outer Kubernetes cluster.

Everything goes through the official client: pods are created and deleted through the API,
commands run through the ``pods/exec`` WebSocket (:func:`kubernetes.stream.stream`), and a test
process outside the outer cluster reaches the nested API server through ``pods/portforward``
(:func:`kubernetes.stream.portforward`), one stream per local connection. Inside the outer
cluster it talks to the pod IP directly.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import docker
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

from pytest_kipik import labels as lbl
from pytest_kipik import paths
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import (
    BackendUnavailable,
    ConfigError,
    HostError,
    NameClashError,
    OuterClusterError,
    WaitTimeout,
    option,
    status_message,
)
from pytest_kipik.hosts import engine
from pytest_kipik.hosts.base import (
    Endpoint,
    Loaded,
    OutputSink,
    Owned,
    extract_tree,
    inner_dockerd_args,
    load_unless_present,
)
from pytest_kipik.hosts.engine import engine_answers, image_stream, local_image_id
from pytest_kipik.hosts.outer import RBAC_EXAMPLE, OuterCluster, local_outer_addresses
from pytest_kipik.hosts.pod_manifest import CONTAINER, build_pod, load_template
from pytest_kipik.k8s.portforward import PortForwarder, Target, streaming
from pytest_kipik.kind import config as kind
from pytest_kipik.process import CommandResult, Output, run_in
from pytest_kipik.progress import Reporter
from pytest_kipik.waiting import NotYet, wait_until

DAEMON_LOG = "/var/log/dockerd.log"
PSA_LABEL = "pod-security.kubernetes.io/enforce=privileged"
_CHUNK = 1024 * 1024
_REQUEST_TIMEOUT = 30
_EXEC_STATUS_CHANNEL = 3
#: Namespaces where this process created a DinD pod, and where creating one was refused (403):
#: when every creation was refused, a refused listing at teardown only repeats that error.
_CREATED: set[str] = set()
_CREATE_REFUSED: set[str] = set()


def _api_failure(exc: ApiException, verb: str, resource: str, namespace: str) -> OuterClusterError:
    """A precise error for a refused outer API call (RBAC, Pod Security, anything else)."""
    message = status_message(exc.body) or str(exc.body or "")
    if exc.status == 403 and "PodSecurity" in message:
        return OuterClusterError(
            f"the outer cluster's Pod Security admission refused the privileged DinD pod in "
            f"namespace {namespace}: {message}\n  The DinD pod must run privileged (or under a "
            "sysbox runtime class, see the README). Label a namespace for it: kubectl label "
            f"namespace {namespace} {PSA_LABEL} (or use {option('namespace')} with one that "
            "has it)."
        )
    if exc.status == 403:
        return OuterClusterError(
            f"the outer cluster refused to {verb} {resource} in namespace {namespace} "
            f"(HTTP 403): {message}\n  The account kipik uses needs the Role in "
            f"{RBAC_EXAMPLE}: pods create/get/list/watch/delete, pods/exec, pods/portforward, "
            "pods/log, events get/list."
        )
    if exc.status == 401:
        return OuterClusterError(
            f"the outer cluster did not accept kipik's credentials to {verb} {resource} "
            f"(HTTP 401): {message}\n  Check the outer kubeconfig/context or the pod's token."
        )
    return OuterClusterError(
        f"the outer cluster failed to {verb} {resource} in namespace {namespace}: "
        f"HTTP {exc.status} {exc.reason}: {message[:500]}"
    )


def _exit_code(status_text: str) -> int:
    """The exit code from the exec status channel (a metav1.Status)."""
    if not status_text.strip():
        return -1
    status = json.loads(status_text)
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            return int(cause.get("message", -1))
    raise HostError(f"the command could not run: {status.get('message', status_text)}")


class PodHost:
    """One privileged DinD pod for one nested cluster."""

    def __init__(
        self,
        backend: PodBackend,
        *,
        name: str,
        labels: Mapping[str, str],
        inner_ports: Sequence[int],
    ) -> None:
        self.backend = backend
        self._name = name
        self.labels = dict(labels)
        self.inner_ports = list(inner_ports)
        self.namespace = backend.namespace
        self.core = backend.core
        self.pod_ip: str | None = None
        self._created = False
        self._forwarders: dict[int, PortForwarder] = {}

    @property
    def name(self) -> str:
        """The DinD pod's name."""
        return self._name

    def _call(self, verb: str, resource: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, _request_timeout=_REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            raise _api_failure(exc, verb, resource, self.namespace) from None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the pod (it may still be pending)."""
        manifest = self.backend.manifest(self._name, self.labels)
        try:
            self.core.create_namespaced_pod(
                self.namespace, cast(Any, manifest), _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 409:
                raise self._clash() from None
            if exc.status == 403:
                _CREATE_REFUSED.add(self.namespace)
            raise _api_failure(exc, "create", "pods", self.namespace) from None
        self._created = True
        _CREATED.add(self.namespace)

    def _clash(self) -> NameClashError:
        try:
            found: Any = self.core.read_namespaced_pod(self._name, self.namespace)
            owner = (found.metadata.labels or {}).get(lbl.RUN_ID)
        except ApiException:
            owner = None
        whose = f"kipik run {owner}" if owner else "something that is not pytest-kipik"
        return NameClashError(
            f"a pod named {self._name} already exists in namespace {self.namespace} and "
            f"belongs to {whose}; kipik leaves it alone. Remove it if it is stale, or choose "
            f"another {option('name_prefix')}."
        )

    def _status_report(self) -> str:
        """Phase, conditions, container states and recent events of the pod, for errors."""
        lines = []
        try:
            pod: Any = self.core.read_namespaced_pod(
                self._name, self.namespace, _request_timeout=_REQUEST_TIMEOUT
            )
            status = pod.status
            lines.append(f"  phase: {status.phase} {status.reason or ''} {status.message or ''}")
            for cond in status.conditions or []:
                lines.append(
                    f"  condition {cond.type}={cond.status} {cond.reason or ''} "
                    f"{cond.message or ''}".rstrip()
                )
            for cs in status.container_statuses or []:
                state = cs.state
                if state.waiting:
                    desc = f"waiting: {state.waiting.reason} {state.waiting.message or ''}"
                elif state.terminated:
                    desc = (
                        f"terminated: {state.terminated.reason} exit code "
                        f"{state.terminated.exit_code} {state.terminated.message or ''}"
                    )
                else:
                    desc = "running"
                lines.append(f"  container {cs.name}: {desc.rstrip()}")
        except ApiException as exc:
            lines.append(f"  (pod status unavailable: HTTP {exc.status})")
        try:
            events = self.core.list_namespaced_event(
                self.namespace,
                field_selector=f"involvedObject.name={self._name}",
                _request_timeout=_REQUEST_TIMEOUT,
            ).items
            lines.append("  recent events:")
            for event in events[-10:]:
                lines.append(f"    {event.type} {event.reason}: {event.message}")
            if not events:
                lines.append("    (none)")
        except ApiException as exc:
            lines.append(f"  (events unavailable: HTTP {exc.status})")
        return "\n".join(lines)

    def wait_ready(self, timeout: float) -> None:
        """Wait for the pod to run and for ``docker version`` inside it to answer."""
        deadline = time.monotonic() + timeout
        fatal = ("InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError")

        def running() -> None:
            pod: Any = self._call(
                "get", "pods", self.core.read_namespaced_pod, self._name, self.namespace
            )
            phase = pod.status.phase
            states = [cs.state for cs in pod.status.container_statuses or []]
            waiting = [s.waiting.reason for s in states if s.waiting]
            never_started = any(w in fatal for w in waiting)
            if phase in ("Failed", "Succeeded") or never_started:
                # a container that never started has no output: the status report says it all
                output = "" if never_started else f"\n  its output:\n{self.daemon_log(20)}"
                raise HostError(
                    f"the DinD pod {self._name} cannot run:\n{self._status_report()}{output}"
                )
            if phase != "Running":
                raise NotYet(f"phase {phase} {' '.join(w for w in waiting if w)}".strip())
            self.pod_ip = pod.status.pod_ip

        def answers() -> None:
            result = self.exec(["docker", "version", "--format", "{{.Server.Version}}"], timeout=15)
            if result.exit_code != 0:
                text = (result.stderr or result.stdout).strip().splitlines()
                raise NotYet(text[-1] if text else f"docker version exited {result.exit_code}")

        try:
            wait_until(
                running,
                what=f"the DinD pod {self._name} to run",
                timeout=max(deadline - time.monotonic(), 0),
                hint="the pod must be schedulable and its image pullable by the outer cluster",
                interval=0.5,
            )
        except WaitTimeout as exc:
            raise HostError(
                f"{exc}\n  the pod as the outer cluster reports it:\n{self._status_report()}"
            ) from None
        wait_until(
            answers,
            what=f"the Docker daemon inside the pod {self._name} to answer",
            timeout=max(deadline - time.monotonic(), 0),
            hint=f"its log: kubectl exec -n {self.namespace} {self._name} -- "
            f"tail -n 50 {DAEMON_LOG}",
            interval=0.5,
        )

    def detach(self) -> None:
        """Close this process's port-forwards to the pod; the pod stays."""
        for forwarder in self._forwarders.values():
            forwarder.close()
        self._forwarders.clear()

    def remove(self) -> None:
        """Close port-forwards, delete our pod and wait until it is gone (bounded)."""
        self.detach()
        if not self._created and not self._is_ours():
            return
        try:
            self.core.delete_namespaced_pod(
                self._name,
                self.namespace,
                grace_period_seconds=2,
                _request_timeout=_REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise _api_failure(exc, "delete", "pods", self.namespace) from None
        except OSError as exc:
            raise HostError(f"could not delete the DinD pod {self._name}: {exc}") from None

        def gone() -> None:
            try:
                self.core.read_namespaced_pod(
                    self._name, self.namespace, _request_timeout=_REQUEST_TIMEOUT
                )
            except ApiException as exc:
                if exc.status == 404:
                    return
                raise
            raise NotYet("the pod still exists")

        wait_until(
            gone,
            what=f"the DinD pod {self._name} to be deleted",
            timeout=60,
            hint=f"check it: kubectl get pod -n {self.namespace} {self._name}",
            interval=0.5,
        )
        self._created = False

    def attach(self) -> bool:
        """Adopt the running pod of this name if it carries our run id."""
        try:
            found: Any = self.core.read_namespaced_pod(
                self._name, self.namespace, _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException:
            return False
        labels = found.metadata.labels or {}
        if labels.get(lbl.RUN_ID) != self.labels.get(lbl.RUN_ID):
            return False
        if found.status.phase != "Running":
            return False
        self.pod_ip = found.status.pod_ip
        self._created = True
        return True

    def hold(self) -> None:
        """None: the pod's backstop is its deadline (timeout + ttl) and its ownerReference."""
        # TODO(pod backend): a held exec like the docker backend's, if the deadline is too coarse.
        return None

    def _is_ours(self) -> bool:
        try:
            found: Any = self.core.read_namespaced_pod(
                self._name, self.namespace, _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException:
            return False
        return bool((found.metadata.labels or {}).get(lbl.RUN_ID) == self.labels.get(lbl.RUN_ID))

    def removal_command(self) -> str:
        """How to remove this host by hand."""
        return f"kubectl delete pod -n {self.namespace} {self._name} {self.backend.kubectl_flags}"

    def how_to_use(self, kubeconfig: str) -> str:
        """Inside the outer cluster the pod IP works as is; outside, a port-forward is needed."""
        if self.backend.direct:
            return f"kubectl --kubeconfig {kubeconfig} get nodes"
        port = self._forwarders[kind.API_SERVER_PORT].local_port
        return (
            f"kubectl port-forward -n {self.namespace} pod/{self._name} "
            f"{port}:{kind.API_SERVER_PORT} {self.backend.kubectl_flags}& "
            f"kubectl --kubeconfig {kubeconfig} get nodes"
        )

    # -- reaching it -----------------------------------------------------------------------

    def outer_addresses(self) -> dict[str, str]:
        """The outer network's addresses known here, the pod's own IP among them."""
        found = self.backend.outer_addresses()
        if self.pod_ip:
            found[f"the DinD pod {self._name}'s IP"] = self.pod_ip
        return found

    def cert_sans(self) -> list[str]:
        """The pod IP (direct) or 127.0.0.1 (port-forward)."""
        if self.pod_ip is None:
            raise HostError(f"the DinD pod {self._name} has no IP yet")
        return ["127.0.0.1"] if not self.backend.direct else [self.pod_ip]

    def api_endpoint(self, inner_port: int) -> Endpoint:
        """``pod IP:port`` inside the outer cluster; else a local port-forward held open."""
        if self.pod_ip is None:
            raise HostError(f"the DinD pod {self._name} has no IP yet")
        if self.backend.direct:
            return Endpoint(self.pod_ip, inner_port)
        if inner_port not in self._forwarders:
            target = Target(self.namespace, self._name, inner_port)
            self._forwarders[inner_port] = PortForwarder(
                self.backend.api.configuration, lambda: target, name=self._name
            )
        return Endpoint("127.0.0.1", self._forwarders[inner_port].local_port)

    # -- commands and files ----------------------------------------------------------------

    def exec(
        self, argv: Sequence[str], *, timeout: float, on_output: OutputSink | None = None
    ) -> CommandResult:
        """Run ``argv`` in the DinD container through the outer API's exec stream."""
        return self._exec(argv, timeout=timeout, on_output=on_output)

    def _exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        on_output: OutputSink | None = None,
        stdin: Iterable[bytes] | None = None,
    ) -> CommandResult:
        args = list(argv)
        where = ["kubectl", "exec", *(["-i"] if stdin else []), "-n", self.namespace]
        where += [self._name, "--"]

        def run(out: Output, err: Output) -> int:
            with self.backend.streaming() as core:
                return self._stream_exec(core, args, out, err, stdin)

        return run_in(where, args, run, timeout=timeout, on_output=on_output)

    def _stream_exec(
        self,
        core: k8s_client.CoreV1Api,
        args: list[str],
        out: Output,
        err: Output,
        stdin: Iterable[bytes] | None,
    ) -> int:
        """One exec through ``core`` (a client of its own): output in, exit code out."""
        try:
            ws: Any = stream(
                core.connect_get_namespaced_pod_exec,
                self._name,
                self.namespace,
                container=CONTAINER,
                command=args,
                stdin=stdin is not None,
                stdout=True,
                stderr=True,
                tty=False,
                _preload_content=False,
            )
        except ApiException as exc:
            raise _api_failure(exc, "create", "pods/exec", self.namespace) from None
        status = Output()

        def drain() -> None:
            # text channels (every client version since 29 speaks them); output is text
            for channel, sink in ((1, out), (2, err), (_EXEC_STATUS_CHANNEL, status)):
                data = ws.read_channel(channel)
                sink.add(data.encode() if isinstance(data, str) else data)

        try:
            for chunk in stdin or ():
                ws.write_stdin(chunk)
            while ws.is_open():
                ws.update(timeout=1)
                drain()
            drain()
        finally:
            ws.close()
            ws.sock.shutdown()  # the server closes first; websocket-client keeps the socket
        return _exit_code(status.text())

    def _exec_with_input(
        self, script: str, size: int, chunks: Iterable[bytes], timeout: float, *args: str
    ) -> CommandResult:
        """``sh -c script`` fed exactly ``size`` bytes.

        The script reads a known length (``head -c``): older API servers cannot half-close stdin.
        """
        argv = ["sh", "-c", script, "sh", str(size), *args]
        return self._exec(argv, timeout=timeout, stdin=chunks)

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Create or replace one file inside the DinD container."""
        script = 'mkdir -p "$(dirname "$2")" && head -c "$1" > "$2" && chmod "$3" "$2"'
        result = self._exec_with_input(script, len(data), [data], 60, path, format(mode, "o"))
        if result.exit_code != 0:
            raise HostError(f"could not write {path} into {self._name}: {result.stderr.strip()}")

    def feed(self, argv: Sequence[str], source: Path, timeout: float) -> CommandResult:
        """Run ``argv`` in the DinD container, fed the file ``source`` through exec's stdin."""
        size = source.stat().st_size
        with source.open("rb") as handle:
            chunks: Iterator[bytes] = iter(lambda: handle.read(_CHUNK), b"")
            # the remote side reads exactly the file's size: older API servers cannot half-close
            script = 'n=$1; shift; head -c "$n" | "$@"'
            return self._exec(
                ["sh", "-c", script, "sh", str(size), *argv], timeout=timeout, stdin=chunks
            )

    def load_image(self, image: str, timeout: float) -> Loaded | None:
        """Stream ``image`` from the local engine through exec into the inner daemon.

        The archive is spooled to a private temporary file first (never held in memory): its
        size must be known, because the remote side reads exactly that many bytes.
        """

        def move() -> tuple[str, CommandResult] | None:
            spooled = self.backend.spool_image(image)
            if spooled is None:
                return None
            image_id, path = spooled
            try:
                return image_id, self.feed(["docker", "load", "--quiet"], path, timeout)
            finally:
                path.unlink(missing_ok=True)

        return load_unless_present(self, image, self.backend.local_image_id(image), move)

    def daemon_log(self, lines: int = 50) -> str:
        """The tail of the inner daemon's log, or of the pod's output."""
        with contextlib.suppress(Exception):
            result = self.exec(["tail", "-n", str(lines), DAEMON_LOG], timeout=15)
            if result.exit_code == 0:
                return result.stdout
        try:
            text: str = self.core.read_namespaced_pod_log(
                self._name, self.namespace, tail_lines=lines, _request_timeout=_REQUEST_TIMEOUT
            )
            return text or "(no output)"
        except ApiException as exc:  # its message only, never the headers str(exc) carries
            return f"(pod output unavailable: {status_message(exc.body) or exc.reason})"
        except Exception as exc:  # a log is a courtesy, never a new failure
            return f"(pod output unavailable: {exc})"

    def copy_out(self, path: str, dest: Path, timeout: float) -> Path:
        """Copy the directory ``path`` out of the pod through exec.

        The exec stream carries text, so the tar archive comes base64-encoded; it is made into a
        file inside the pod first, so that a failing ``tar`` is seen in the exit code.
        """
        script = (
            'tmp=$(mktemp) && tar -C "$1" -cf "$tmp" . && base64 "$tmp"; '
            'code=$?; rm -f "$tmp"; exit $code'
        )
        result = self._exec(["sh", "-c", script, "sh", path], timeout=timeout)
        if result.exit_code != 0:
            raise HostError(
                f"could not copy {self._name}:{path} out (exit code {result.exit_code}): "
                f"{result.stderr.strip()}"
            )
        try:
            archive = io.BytesIO(base64.b64decode(result.stdout))
            extract_tree(archive, dest)
        except (ValueError, tarfile.TarError, OSError) as exc:
            raise HostError(f"could not copy {self._name}:{path} out to {dest}: {exc}") from None
        return dest


class PodBackend:
    """DinD pods in an outer Kubernetes cluster, through the official client."""

    name = "pod"

    def __init__(self, config: KipikConfig, report: Reporter) -> None:
        self.config = config
        self.report = report
        self.outer = OuterCluster(config)
        self._owner: dict[str, str] | None = None
        self._template = load_template(config.pod_template) if config.pod_template else None
        self._docker: Any = None

    @property
    def forwards_api(self) -> bool:
        """Outside the outer cluster, API servers are reached through this process's forwards."""
        return not self.direct

    # -- the outer cluster -----------------------------------------------------------------

    @property
    def api(self) -> k8s_client.ApiClient:
        """The outer cluster's client (its own configuration, never the global default)."""
        return self.outer.api

    @property
    def core(self) -> k8s_client.CoreV1Api:
        """``CoreV1Api`` of the outer cluster."""
        return self.outer.core

    @property
    def namespace(self) -> str:
        """The namespace of the DinD pods."""
        return self.outer.namespace

    @property
    def direct(self) -> bool:
        """Whether this process runs inside the outer cluster (it reaches pod IPs)."""
        return self.outer.direct

    @property
    def kubectl_flags(self) -> str:
        """``--kubeconfig``/``--context`` for kubectl commands printed to the user."""
        return self.outer.kubectl_flags

    def streaming(self) -> contextlib.AbstractContextManager[k8s_client.CoreV1Api]:
        """A ``CoreV1Api`` on a client of its own, for one exec stream (see :func:`streaming`)."""
        return streaming(self.api.configuration)

    def preflight(self) -> None:
        """A DinD image, and nested subnets that hide no address of the outer network."""
        if not self.config.image:
            self.connect()  # raises what to do
        kind.check_no_overlap(
            kind.subnets(
                self.config.user_kind_config, self.config.pod_subnet, self.config.service_subnet
            ),
            local_outer_addresses(),
        )

    def connect(self) -> None:
        """Check that the outer API server answers, and find the pod kipik runs in."""
        if not self.config.image:
            raise ConfigError(
                f"the pod backend needs {option('image')}: a DinD image the outer cluster's nodes "
                "can pull. Build pytest-kipik's image/ folder and push it, e.g. "
                "`docker build -t REGISTRY/kipik-dind:1 image/ && docker push "
                f"REGISTRY/kipik-dind:1`, then pass {option('image')}=REGISTRY/kipik-dind:1."
            )
        server = self.api.configuration.host
        try:
            k8s_client.VersionApi(self.api).get_code(_request_timeout=15)
        except Exception as exc:  # any failure here means: unreachable
            raise BackendUnavailable(
                f"the outer Kubernetes cluster at {server} did not answer ({self.outer.source}): "
                f"{exc}\n  Check the outer kubeconfig/context, and that this machine reaches "
                "that address."
            ) from None
        if self.direct:
            self._owner = self._find_own_pod()

    def _find_own_pod(self) -> dict[str, str] | None:
        """The pod this process runs in (HOSTNAME names it), for an ownerReference."""
        own = os.environ.get("HOSTNAME", "")
        try:
            pod: Any = self.core.read_namespaced_pod(own, self.namespace, _request_timeout=15)
        except (ApiException, OSError):
            self.report(
                f"kipik: could not read this pod ({own} in {self.namespace}); DinD pods will "
                "not be garbage-collected with it (they still stop at their deadline)"
            )
            return None
        return {"name": str(pod.metadata.name), "uid": str(pod.metadata.uid)}

    def outer_addresses(self) -> dict[str, str]:
        """Addresses of the outer network that nested subnets must not contain."""
        found = local_outer_addresses()
        server = urlsplit(str(self.api.configuration.host)).hostname
        if server:
            found["the outer API server"] = server
        return found

    def describe(self) -> str:
        """Where DinD pods run."""
        return self.outer.describe()

    # -- hosts -----------------------------------------------------------------------------

    def manifest(self, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
        """The DinD pod for host ``name``."""
        assert self.config.image is not None
        owner_labels = dict(labels)
        if self._owner:
            owner_labels[lbl.PREFIX + "owner-pod"] = lbl.label_value(self._owner["name"])
        return build_pod(
            name=name,
            namespace=self.namespace,
            image=self.config.image,
            args=inner_dockerd_args(),
            labels=owner_labels,
            deadline_seconds=int(self.config.timeout + self.config.ttl),
            service_account=self.config.service_account,
            storage_limit=self.config.docker_storage,
            owner=self._owner,
            template=self._template,
        )

    def make_host(self, name: str, labels: Mapping[str, str], inner_ports: Sequence[int]) -> Any:
        """A DinD pod named ``name`` (not created yet)."""
        return PodHost(self, name=name, labels=labels, inner_ports=inner_ports)

    def _local_engine(self) -> docker.DockerClient | None:
        """The Docker engine where the test runs, if one answers (usually none inside a pod)."""
        if self._docker is None and engine_answers():
            self._docker = engine.client()
        found: docker.DockerClient | None = self._docker
        return found

    def local_image_id(self, image: str) -> str | None:
        """The id of ``image`` on the local engine; None without an engine or such an image."""
        engine = self._local_engine()
        return None if engine is None else local_image_id(engine, image)

    def spool_image(self, image: str) -> tuple[str, Path] | None:
        """``docker save`` of a local image into a private temporary file, or None.

        Without a local Docker engine (the usual case inside a pod) there is nothing to move.
        """
        engine = self._local_engine()
        if engine is None:
            return None
        found = image_stream(engine, image)
        if found is None:
            return None
        image_id, chunks = found
        spool = paths.private_dir(paths.cache_home(), "spool")
        fd, name = tempfile.mkstemp(prefix="image-", suffix=".tar", dir=spool)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return image_id, Path(name)

    def list_owned(self, run_id: str | None = None) -> list[Owned]:
        """Pods kipik made in the namespace."""
        selector = f"{lbl.RUN_ID}={run_id}" if run_id else lbl.RUN_ID
        try:
            pods: list[Any] = self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _request_timeout=_REQUEST_TIMEOUT
            ).items
        except ApiException as exc:
            nothing_made = self.namespace in _CREATE_REFUSED and self.namespace not in _CREATED
            if exc.status == 403 and run_id and nothing_made:
                return []  # no pod of this run can exist; the refused creation was reported
            raise _api_failure(exc, "list", "pods", self.namespace) from None
        return [Owned("pod", str(p.metadata.name), dict(p.metadata.labels or {})) for p in pods]

    def remove_owned(self, resource: Owned) -> None:
        """Delete a kipik pod (and wait until it is gone)."""
        if lbl.RUN_ID not in resource.labels or resource.kind != "pod":
            raise HostError(f"{resource} is not a kipik pod: left alone")
        PodHost(self, name=resource.name, labels=resource.labels, inner_ports=[]).remove()

    def snapshots(self, prefix: str) -> None:
        """No snapshots on the pod backend (yet: see the README)."""
        return None

    def close(self) -> None:
        """Close the clients."""
        self.outer.close()
        if self._docker is not None:
            self._docker.close()
            self._docker = None
