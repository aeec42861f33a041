"""A local TCP port relayed to a pod port through the official client's ``pods/portforward``.

Both backends use it: the pod backend to reach the DinD pod's API server from outside the outer
cluster, and :meth:`~pytest_kipik.NestedCluster.port_forward` to reach a pod or service inside
a nested cluster. Every accepted connection opens a stream of its own, to a target resolved
afresh, so a dropped stream (or a replaced pod) costs only the connections in flight.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.stream import portforward

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Target:
    """One pod port: where a connection goes."""

    namespace: str
    pod: str
    port: int


#: Says where the next connection goes (called once per connection; may raise).
Resolver = Callable[[], Target]


@contextlib.contextmanager
def streaming(configuration: k8s_client.Configuration) -> Iterator[k8s_client.CoreV1Api]:
    """A ``CoreV1Api`` on a client of its own, for one exec or port-forward stream.

    The official client's ``stream``/``portforward`` swap the request method of the client
    they are given for the duration of the call; on a client shared between threads that
    sends other threads' plain requests down the WebSocket path (and can leave it there).
    """
    api = k8s_client.ApiClient(configuration)
    try:
        yield k8s_client.CoreV1Api(api)
    finally:
        api.close()


def _open_forward(
    core: k8s_client.CoreV1Api, target: Target
) -> tuple[Any, threading.Thread | None]:
    """A port-forward stream and the client's proxy thread serving it.

    The client starts one thread per stream and does not expose it: it is the running thread
    whose target is this stream's proxy method, so it can be waited for before the stream's
    socket is released (releasing it under a running proxy breaks that thread's read). No lock
    is held while the stream opens: a nested cluster's stream may itself go through another
    forwarder of this process (the pod backend's), which must open its own stream meanwhile.
    """
    forward = portforward(
        core.connect_get_namespaced_pod_portforward,
        target.pod,
        target.namespace,
        ports=str(target.port),
    )
    proxies = [
        t
        for t in threading.enumerate()
        # CPython keeps a running thread's target (a bound method) until the thread ends
        if getattr(getattr(t, "_target", None), "__self__", None) is forward
    ]
    return forward, proxies[0] if proxies else None


class PortForwarder:
    """``127.0.0.1:<port>`` relayed to a pod port, one port-forward stream per connection.

    ``configuration`` is the client configuration of the cluster the pod is in; ``resolve``
    says, for each new connection, which pod and port it goes to. ``local_port`` 0 picks a free
    port. A connection whose stream cannot be opened is closed (the client sees EOF); the
    failure is kept in :attr:`last_error`.
    """

    def __init__(
        self,
        configuration: k8s_client.Configuration,
        resolve: Resolver,
        *,
        name: str,
        local_port: int = 0,
    ) -> None:
        self.configuration = configuration
        self.resolve = resolve
        self._server = socket.create_server(("127.0.0.1", local_port))
        self.local_port = int(self._server.getsockname()[1])
        self.last_error: Exception | None = None
        self.connections = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept, name=f"kipik-forward-{name}", daemon=True
        )
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self._lock:
            self._open.add(conn)
        forward: Any = None
        remote: Any = None
        proxy: threading.Thread | None = None
        try:
            target = self.resolve()
            with streaming(self.configuration) as core:
                forward, proxy = _open_forward(core, target)
                remote = forward.socket(target.port)
                self._relay(conn, remote)
        except Exception as exc:  # the client sees its connection close
            self.last_error = exc
        finally:
            with self._lock:
                self._open.discard(conn)
            conn.close()
            if forward is not None:
                # EOF to the client's proxy thread: it closes its end and ends. Closing ours
                # first would break its write of data still in flight (BrokenPipeError there).
                with contextlib.suppress(OSError):
                    if remote is not None:
                        remote.shutdown(socket.SHUT_WR)
                if proxy is not None:
                    proxy.join(timeout=10)
                forward.close()
                if proxy is None or not proxy.is_alive():
                    # websocket-client keeps its TLS socket when the server closed first
                    forward.websocket.shutdown()

    def _relay(self, local: socket.socket, remote: Any) -> None:
        peers = {local.fileno(): remote, remote.fileno(): local}
        while not self._closed:
            readable, _, _ = select.select([local, remote], [], [], 1.0)
            for source in readable:
                data = source.recv(_CHUNK)
                if not data:
                    return
                peers[source.fileno()].sendall(data)

    def close(self) -> None:
        """Stop accepting and cut every open connection; idempotent."""
        self._closed = True
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        with self._lock:
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


# -- what ``cluster.port_forward("svc/name", port)`` reaches --------------------------------------

_KINDS = {
    "pod": "pod",
    "pods": "pod",
    "po": "pod",
    "svc": "service",
    "service": "service",
    "services": "service",
    "deploy": "deployment",
    "deployment": "deployment",
    "deployments": "deployment",
}


def parse_target(text: str) -> tuple[str, str]:
    """``("pod"|"service"|"deployment", name)`` from ``svc/web``, ``pod/web-0`` or ``web-0``."""
    kind, slash, name = text.partition("/")
    if not slash:
        kind, name = "pod", text
    if kind.lower() not in _KINDS or not name:
        raise ValueError(
            f"cannot port-forward to {text!r}: say pod/NAME, svc/NAME or deployment/NAME"
        )
    return _KINDS[kind.lower()], name


def pick_pod(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The pod a forward to a set of pods uses: running and ready first, then the oldest.

    Pods that are terminating or not Running are never picked (a forward to them fails).
    """

    def ready(pod: dict[str, Any]) -> bool:
        conditions = (pod.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    running = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running"
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    running.sort(
        key=lambda p: (
            not ready(p),
            str(p["metadata"].get("creationTimestamp")),
            p["metadata"]["name"],
        )
    )
    return running[0] if running else None


def container_port(service: dict[str, Any], pod: dict[str, Any], port: int) -> int:
    """The pod port behind ``port`` of ``service`` (its targetPort, named ports resolved)."""
    ports = (service.get("spec") or {}).get("ports") or []
    match = [p for p in ports if p.get("port") == port]
    if not match:
        offered = ", ".join(str(p.get("port")) for p in ports) or "none"
        raise ValueError(
            f"service {service['metadata']['name']} has no port {port} (its ports: {offered})"
        )
    target = match[0].get("targetPort", port)
    if isinstance(target, int) or str(target).isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for declared in container.get("ports") or []:
            if declared.get("name") == target:
                return int(declared["containerPort"])
    raise ValueError(
        f"service {service['metadata']['name']} port {port} targets the port named {target!r}, "
        f"which pod {pod['metadata']['name']} does not declare"
    )


def forward_resolver(
    api_client: k8s_client.ApiClient, namespace: str, target: str, port: int
) -> Resolver:
    """Where each connection of a forward to ``target`` (``svc/NAME``, ...) goes, asked anew.

    A pod is used as named; for a service or deployment, a running pod its selector matches
    (see :func:`pick_pod`), with a service port translated to the pod's (:func:`container_port`).
    """
    kind, name = parse_target(target)
    core = k8s_client.CoreV1Api(api_client)

    def plain(obj: Any) -> dict[str, Any]:
        found: dict[str, Any] = api_client.sanitize_for_serialization(obj)
        return found

    def resolve() -> Target:
        if kind == "pod":
            core.read_namespaced_pod(name, namespace)  # 404 names it
            return Target(namespace, name, port)
        if kind == "service":
            owner = plain(core.read_namespaced_service(name, namespace))
            selector = (owner.get("spec") or {}).get("selector") or {}
        else:
            apps = k8s_client.AppsV1Api(api_client)
            owner = plain(apps.read_namespaced_deployment(name, namespace))
            selector = ((owner.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        if not selector:
            raise ValueError(f"{target} has no pod selector, so no pod to forward to")
        labels = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        pods = plain(core.list_namespaced_pod(namespace, label_selector=labels)).get("items") or []
        pod = pick_pod(pods)
        if pod is None:
            raise ValueError(f"no running pod matches {target}'s selector {labels}")
        remote = container_port(owner, pod, port) if kind == "service" else port
        return Target(namespace, pod["metadata"]["name"], remote)

    return resolve
