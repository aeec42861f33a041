"""One DinD pod in the outer cluster: started, reached, fed, removed.

Pods are created and deleted through the API and commands run through the exec stream of
:mod:`pytest_kipik.hosts.pod_api`. A test process outside the outer cluster reaches the nested
API server through ``pods/portforward`` (:func:`kubernetes.stream.portforward`), one stream per
local connection; inside the outer cluster it talks to the pod IP directly.
"""

from __future__ import annotations

import base64
import contextlib
import io
import tarfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kubernetes.client.exceptions import ApiException

from pytest_kipik import labels as lbl
from pytest_kipik.errors import HostError, NameClashError, WaitTimeout, option, status_message
from pytest_kipik.hosts.base import (
    Endpoint,
    Loaded,
    OutputSink,
    extract_tree,
    files_archive,
    load_unless_present,
)
from pytest_kipik.hosts.pod_api import (
    CREATE_REFUSED,
    CREATED,
    REQUEST_TIMEOUT,
    api_failure,
    stream_exec,
)
from pytest_kipik.k8s.portforward import PortForwarder, Target
from pytest_kipik.kind import config as kind
from pytest_kipik.process import CommandResult, Output, run_in
from pytest_kipik.waiting import NotYet, wait_until

if TYPE_CHECKING:
    from pytest_kipik.hosts.pod import PodBackend

DAEMON_LOG = "/var/log/dockerd.log"
_CHUNK = 1024 * 1024
#: Extracts the archive of exactly ``$1`` bytes on stdin at ``/`` (:meth:`PodHost.write_files`).
UNTAR = 'head -c "$1" | tar -x -C / -f -'


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
            return fn(*args, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as exc:
            raise api_failure(exc, verb, resource, self.namespace) from None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the pod (it may still be pending)."""
        manifest = self.backend.manifest(self._name, self.labels)
        try:
            self.core.create_namespaced_pod(
                self.namespace, cast(Any, manifest), _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 409:
                raise self._clash() from None
            if exc.status == 403:
                CREATE_REFUSED.add(self.namespace)
            raise api_failure(exc, "create", "pods", self.namespace) from None
        self._created = True
        CREATED.add(self.namespace)

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
                self._name, self.namespace, _request_timeout=REQUEST_TIMEOUT
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
                _request_timeout=REQUEST_TIMEOUT,
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
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as exc:
            if exc.status != 404:
                raise api_failure(exc, "delete", "pods", self.namespace) from None
        except OSError as exc:
            raise HostError(f"could not delete the DinD pod {self._name}: {exc}") from None

        def gone() -> None:
            try:
                self.core.read_namespaced_pod(
                    self._name, self.namespace, _request_timeout=REQUEST_TIMEOUT
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
                self._name, self.namespace, _request_timeout=REQUEST_TIMEOUT
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
                self._name, self.namespace, _request_timeout=REQUEST_TIMEOUT
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
                return stream_exec(
                    core, self._name, self.namespace, args, out=out, err=err, stdin=stdin
                )

        return run_in(where, args, run, timeout=timeout, on_output=on_output)

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
        self.write_files({path: (data, mode)})

    def write_files(self, files: Mapping[str, tuple[bytes, int]]) -> None:
        """Create or replace files inside the DinD container: one archive through one exec."""
        archive = files_archive(files, int(time.time()))
        result = self._exec_with_input(UNTAR, len(archive), [archive], 60)
        if result.exit_code != 0:
            raise HostError(
                f"could not write {', '.join(files)} into {self._name}: {result.stderr.strip()}"
            )

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
                self._name, self.namespace, tail_lines=lines, _request_timeout=REQUEST_TIMEOUT
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
