"""TEST DOUBLE: an outer Kubernetes cluster (API server + one kubelet) on the local Docker engine.

pytest-kipik's pod backend runs its DinD hosts as pods of an outer Kubernetes cluster, through
the official `kubernetes` Python client: it creates a privileged pod, execs into it
(connect_get_namespaced_pod_exec over a `v4.channel.k8s.io`/`v5.channel.k8s.io` WebSocket),
port-forwards to it (connect_get_namespaced_pod_portforward) and deletes it. No real cluster can
be had on the machines this project is tested on, so this server stands in for one: HTTPS with a
CA of its own, bearer tokens (an admin token and one per ServiceAccount), the core/v1 REST API
for namespaces, pods (+ log, exec, portforward, status), events, service accounts and a node,
SelfSubjectAccessReviews, discovery, watches, and admin-only fault injection under /_double/.
Every pod is a real container on a Docker bridge network of the double's own.

Run it (the OuterCluster handle in tests/doubles/outer/__init__.py does this for tests):

    python -m tests.doubles.outer.server --workdir DIR --instance ID [--namespace NS ...]

It writes DIR/ready.json (port, gateway, network, admin token, CA path) once it answers, logs to
DIR/server.log, and on SIGTERM, SIGINT or POST /_double/shutdown removes every container, volume
and network it made (all labelled kipik-test.outer=ID) before it exits.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import ctypes
import datetime
import json
import os
import re
import secrets
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import docker
import docker.errors
import docker.types

from tests.doubles.node import websocket as ws
from tests.doubles.node.apiserver import ApiError, label_selector_matcher, wants_table
from tests.doubles.outer.cluster import (
    KUBERNETES_VERSION,
    Cluster,
    Config,
    Denial,
    Identity,
    bad_request,
    field_selector,
    merge,
    not_found,
)
from tests.doubles.outer.kubelet import LABEL, Kubelet, PodWorker

JSON = dict[str, Any]
SANS_DNS = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]
NAMESPACED = {
    "pods": ("Pod", "pod", ["po"]),
    "events": ("Event", "event", ["ev"]),
    "serviceaccounts": ("ServiceAccount", "serviceaccount", ["sa"]),
}
CLUSTER_SCOPED = {
    "namespaces": ("Namespace", "namespace", ["ns"]),
    "nodes": ("Node", "node", ["no"]),
}
NS_ROUTE = re.compile(
    r"^/api/v1/namespaces/(?P<ns>[^/]+)/(?P<res>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$"
)
ROOT_ROUTE = re.compile(r"^/api/v1/(?P<res>[^/]+)(?:/(?P<name>[^/]+)(?:/(?P<sub>[^/]+))?)?$")
AUTHZ_GROUP = "authorization.k8s.io"
METHOD_NOT_ALLOWED = ApiError(
    405, "MethodNotAllowed", "the server does not allow this method on the requested resource", {}
)
CLONE_NEWNET = 0x40000000


def unknown_resource() -> ApiError:
    return ApiError(404, "NotFound", "the server could not find the requested resource", {})


# -- TLS ----------------------------------------------------------------------------------------
def make_certificates(directory: Path, ips: list[str]) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for `ips` and the kubernetes service names (openssl CLI)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = (directory / f"apiserver.{suffix}" for suffix in ("key", "csr", "crt"))
    ext = directory / "apiserver.ext"
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)

    openssl(
        *["req", "-x509", "-days", "7", "-subj", "/CN=kipik-test-outer-ca"],
        *new_key,
        *("-keyout", str(ca_key), "-out", str(ca_crt)),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"),
    )
    openssl(
        *["req", "-new", "-subj", "/CN=kube-apiserver"],
        *new_key,
        *("-keyout", str(key), "-out", str(csr)),
    )
    names = [f"IP:{ip}" for ip in ips] + [f"DNS:{name}" for name in SANS_DNS]
    ext.write_text(
        f"subjectAltName={','.join(names)}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl(
        *["x509", "-req", "-days", "7"],
        *("-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key), "-extfile", str(ext)),
        *("-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-out", str(crt)),
    )
    for path in (ca_key, key):
        path.chmod(0o600)
    return ca_crt, crt, key


# -- the network --------------------------------------------------------------------------------
def create_network(client: docker.DockerClient, name: str, instance: str) -> tuple[str, str]:
    """A labelled bridge network with an explicit subnet (so pod IPs can be assigned ahead).

    Docker picks a free subnet for a probe network; the real one is made with that subnet, which
    Docker only allows for user-configured subnets.
    """
    labels = {LABEL: instance}
    for _ in range(5):
        probe = client.networks.create(f"{name}-probe", driver="bridge", labels=labels)
        try:
            config = probe.attrs["IPAM"]["Config"][0]
            subnet, gateway = config["Subnet"], config["Gateway"]
        finally:
            probe.remove()
        ipam = docker.types.IPAMConfig(
            pool_configs=[docker.types.IPAMPool(subnet=subnet, gateway=gateway)]
        )
        try:
            client.networks.create(name, driver="bridge", labels=labels, ipam=ipam)
        except docker.errors.APIError:
            continue
        return subnet, gateway
    raise RuntimeError(f"could not create the Docker network {name}")


# -- exec and port-forward plumbing -----------------------------------------------------------
def open_exec_socket(client: docker.DockerClient, exec_id: str, tty: bool) -> socket.socket:
    """Start a Docker exec and return its hijacked connection, with nothing read past headers."""
    adapter = getattr(client.api, "_custom_adapter", None)
    path = getattr(adapter, "socket_path", None)
    if not path:
        started: Any = client.api.exec_start(exec_id, tty=tty, socket=True)
        return started._sock if hasattr(started, "_sock") else started  # type: ignore[no-any-return]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    body = json.dumps({"Detach": False, "Tty": tty}).encode()
    version = client.api.api_version
    request = (
        f"POST /v{version}/exec/{exec_id}/start HTTP/1.1\r\nHost: docker\r\n"
        "Content-Type: application/json\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sock.sendall(request)
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise OSError("the Docker engine closed the exec connection")
        head += byte
    status = head.split(b"\r\n", 1)[0]
    if b" 101 " not in status and b" 200 " not in status:
        raise OSError(f"Docker exec start failed: {head.decode(errors='replace').strip()}")
    return sock


def exit_status(command: list[str], code: int) -> bytes:
    """The error-channel Status a kubelet writes when an exec ends (Go's JSON field order)."""
    if code == 0:
        return b'{"metadata":{},"status":"Success"}'
    status = {
        "metadata": {},
        "status": "Failure",
        "message": (
            "command terminated with non-zero exit code: error executing command "
            f"[{' '.join(command)}], exit code {code}"
        ),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }
    return json.dumps(status, separators=(",", ":")).encode()


def internal_error_status(message: str) -> bytes:
    status = {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }
    return json.dumps(status, separators=(",", ":")).encode()


_libc: Any = None


def connect_in_netns(pid: int, port: int, fallback_ip: str) -> socket.socket:
    """Connect to localhost:port inside the network namespace of `pid` (as a kubelet does).

    setns() changes only the calling thread's namespace, so a short-lived thread joins the pod's
    namespace, creates and connects the socket (which stays bound to that namespace) and leaves.
    Without the privilege to do so, connect to the pod IP instead.
    """
    global _libc  # noqa: PLW0603
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    result: dict[str, Any] = {}

    def work() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        except OSError as exc:
            os.close(own)
            result["unavailable"] = exc
            return
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                result["unavailable"] = OSError(ctypes.get_errno(), "setns")
                return
            try:
                errors = []
                for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                    sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.settimeout(5)
                    try:
                        sock.connect((address, port))
                        sock.settimeout(None)
                        result["sock"] = sock
                        return
                    except OSError as exc:
                        sock.close()
                        errors.append(exc)
                result["errors"] = errors
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    result["stuck"] = True  # this thread ends now; nothing else runs in it
        finally:
            os.close(target)
            os.close(own)

    thread = threading.Thread(target=work, name=f"connect {pid}:{port}", daemon=True)
    thread.start()
    thread.join()
    if "sock" in result:
        return result["sock"]  # type: ignore[no-any-return]
    if "errors" in result:
        v4, v6 = result["errors"]
        raise ConnectionRefusedError(
            f"failed to connect to localhost:{port} inside namespace, IPv4: dial tcp4 "
            f"127.0.0.1:{port}: connect: {_errno_text(v4)} IPv6 dial tcp6 [::1]:{port}: "
            f"connect: {_errno_text(v6)} "
        )
    try:
        return socket.create_connection((fallback_ip, port), timeout=5)
    except OSError as exc:
        raise ConnectionRefusedError(
            f"failed to connect to localhost:{port} inside namespace, IPv4: dial tcp4 "
            f"127.0.0.1:{port}: connect: {_errno_text(exc)} IPv6 dial tcp6 [::1]:{port}: "
            f"connect: {_errno_text(exc)} "
        ) from exc


def _errno_text(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "i/o timeout"
    return (exc.strerror or str(exc)).lower()


def _flag(query: dict[str, list[str]], name: str, default: bool) -> bool:
    """A boolean query parameter as the API server converts it ("0"/"false" are false)."""
    values = query.get(name)
    if not values:
        return default
    return not (values[0] == "0" or values[0].lower() == "false")


# -- tables for kubectl --------------------------------------------------------------------------
def _age(created: str) -> str:
    try:
        start = datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
    except ValueError:
        return "<unknown>"
    seconds = int((datetime.datetime.now(datetime.timezone.utc) - start).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def pod_display_status(pod: JSON) -> str:
    status = pod.get("status") or {}
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    if status.get("reason"):
        return str(status["reason"])
    for container in status.get("containerStatuses") or []:
        state = container.get("state") or {}
        if "waiting" in state and state["waiting"].get("reason"):
            return str(state["waiting"]["reason"])
        if "terminated" in state:
            return str(state["terminated"].get("reason") or "Terminated")
    return str(status.get("phase", "Pending"))


def as_table(resource: str, objects: list[JSON], revision: str) -> JSON:
    columns = [("Name", "string"), ("Age", "string")]
    if resource == "pods":
        columns = [
            ("Name", "string"),
            ("Ready", "string"),
            ("Status", "string"),
            ("Restarts", "string"),
            ("Age", "string"),
            ("IP", "string"),
            ("Node", "string"),
        ]
    elif resource == "namespaces":
        columns = [("Name", "string"), ("Status", "string"), ("Age", "string")]
    rows = []
    for obj in objects:
        meta = obj["metadata"]
        age = _age(meta.get("creationTimestamp", ""))
        if resource == "pods":
            statuses = obj.get("status", {}).get("containerStatuses") or []
            ready = sum(1 for s in statuses if s.get("ready"))
            cells: list[Any] = [
                meta["name"],
                f"{ready}/{len(obj['spec'].get('containers') or [])}",
                pod_display_status(obj),
                str(sum(s.get("restartCount", 0) for s in statuses)),
                age,
                obj.get("status", {}).get("podIP", "<none>"),
                obj["spec"].get("nodeName", "<none>"),
            ]
        elif resource == "namespaces":
            cells = [meta["name"], obj["status"]["phase"], age]
        else:
            cells = [meta["name"], age]
        rows.append(
            {
                "cells": cells,
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": meta,
                },
            }
        )
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": revision},
        "columnDefinitions": [
            {
                "name": n,
                "type": t,
                "format": "name" if n == "Name" else "",
                "description": n,
                "priority": 0,
            }
            for n, t in columns
        ],
        "rows": rows,
    }


class Response:
    """A JSON (or text) answer with extra headers."""

    def __init__(self, code: int, body: Any, headers: list[tuple[str, str]] | None = None) -> None:
        self.code = code
        self.body = body
        self.headers = headers or []


class Streamed(Exception):
    """The handler wrote its answer itself (a stream, an upgrade)."""


class Handler(BaseHTTPRequestHandler):
    """One connection; TLS handshake, authentication and routing happen in its thread."""

    protocol_version = "HTTP/1.1"
    wbufsize = 1 << 16
    server: ApiServer

    def setup(self) -> None:
        conn: ssl.SSLSocket = self.request
        conn.settimeout(120)
        try:
            conn.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            raise ConnectionAbortedError from exc
        super().setup()

    def handle(self) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError, OSError):
            super().handle()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send_response(self, code: int, message: str | None = None) -> None:
        self.send_response_only(code, message)
        self.send_header("Date", self.date_time_string())

    def do_GET(self) -> None:
        self.dispatch("GET")

    def do_POST(self) -> None:
        self.dispatch("POST")

    def do_PUT(self) -> None:
        self.dispatch("PUT")

    def do_PATCH(self) -> None:
        self.dispatch("PATCH")

    def do_DELETE(self) -> None:
        self.dispatch("DELETE")

    # -- plumbing ---------------------------------------------------------------------------
    @property
    def double(self) -> Double:
        return self.server.double

    def dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        if len(path) > 1:
            path = path.rstrip("/")
        query = parse_qs(url.query, keep_blank_values=True)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        started = time.monotonic()
        user = "-"
        try:
            identity = self.double.cluster.authenticate(self.headers.get("Authorization", ""))
            user = identity.name
            response = self.route(method, path, query, raw, identity)
        except Streamed:
            self.double.log(
                f"{method} {self.path} (stream) user={user} {time.monotonic() - started:.2f}s"
            )
            return
        except ApiError as err:
            response = Response(err.code, err.status())
        except Exception:
            self.double.log(f"{method} {self.path} failed:\n{traceback.format_exc()}")
            response = Response(
                500,
                ApiError(
                    500,
                    "InternalError",
                    "Internal error occurred: the test double failed; see its log",
                ).status(),
            )
        self.double.log(f"{method} {self.path} {response.code} user={user}")
        self.answer(response)

    def answer(self, response: Response) -> None:
        if isinstance(response.body, str):
            data, ctype = response.body.encode(), "text/plain; charset=utf-8"
        elif isinstance(response.body, bytes):
            data, ctype = response.body, "text/plain; charset=utf-8"
        else:
            data = json.dumps(response.body, separators=(",", ":")).encode() + b"\n"
            ctype = "application/json"
        self.send_response(response.code)
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Type", ctype)
        for key, value in response.headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def read_json(self, raw: bytes) -> Any:
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise bad_request(f"the body of the request was in an unknown format: {exc}") from exc

    def warnings(self, texts: list[str]) -> list[tuple[str, str]]:
        return [("Warning", f'299 - "{t.replace(chr(34), chr(92) + chr(34))}"') for t in texts]

    # -- routing -------------------------------------------------------------------------------
    def route(
        self, method: str, path: str, query: dict[str, list[str]], raw: bytes, user: Identity
    ) -> Response:
        cluster = self.double.cluster
        if path.startswith("/_double/") or path == "/_double":
            return self.control(method, path, query, raw, user)
        if path in ("/healthz", "/livez", "/readyz") or path.startswith(
            ("/healthz/", "/livez/", "/readyz/")
        ):
            if method != "GET":
                raise METHOD_NOT_ALLOWED
            return Response(200, "ok")
        if method == "GET":
            discovery = self.discovery(path)
            if discovery is not None:
                return Response(200, discovery)
        if path == f"/apis/{AUTHZ_GROUP}/v1/selfsubjectaccessreviews":
            if method != "POST":
                raise METHOD_NOT_ALLOWED
            cluster.authorize(user, "create", "selfsubjectaccessreviews", "", group=AUTHZ_GROUP)
            with cluster.store.lock:
                return Response(201, cluster.access_review(user, self.read_json(raw)))
        match = NS_ROUTE.match(path)
        namespace = resource = name = sub = ""
        if match:
            namespace, resource = match["ns"], match["res"]
            name, sub = match["name"] or "", match["sub"] or ""
            if resource in ("status", "finalize") and not name:
                namespace, resource, name, sub = "", "namespaces", namespace, resource
        else:
            match = ROOT_ROUTE.match(path)
            if not match:
                raise unknown_resource()
            resource, name, sub = match["res"], match["name"] or "", match["sub"] or ""
            if resource not in CLUSTER_SCOPED and name:
                raise unknown_resource()
        if namespace and resource not in NAMESPACED:
            raise unknown_resource()
        if not namespace and resource not in CLUSTER_SCOPED and resource not in NAMESPACED:
            raise unknown_resource()
        watching = method == "GET" and _flag(query, "watch", False)
        verb = {
            "GET": "watch" if watching else ("get" if name else "list"),
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if name else "deletecollection",
        }[method]
        full = f"{resource}/{sub}" if sub else resource
        if sub in ("exec", "portforward", "attach"):
            first = "get" if method == "GET" else "create"
            cluster.authorize(user, first, full, namespace, name=name)
            cluster.authorize(user, "create", full, namespace, name=name)
        else:
            cluster.authorize(user, verb, full, namespace, name=name if verb != "create" else "")
        if resource == "pods" and sub:
            return self.pod_subresource(method, namespace, name, sub, query)
        if (
            sub
            and not (resource == "namespaces" and sub in ("status", "finalize"))
            and not (resource == "serviceaccounts" and sub == "token")
        ):
            raise unknown_resource()
        if watching:
            self.watch(resource, namespace, query)
            raise Streamed
        if method == "GET":
            return self.read(resource, namespace, name, query)
        body = self.read_json(raw)
        strict = (query.get("fieldValidation") or ["Warn"])[0] == "Strict"
        with cluster.store.lock:
            if method == "POST" and resource == "serviceaccounts" and sub == "token":
                return Response(201, cluster.token_request(namespace, name, body))
            if method == "POST" and not name:
                return self.create(resource, namespace, body, strict, user)
            if method in ("PUT", "PATCH") and name:
                return self.update(method, resource, namespace, name, body)
            if method == "DELETE" and name:
                return self.delete(resource, namespace, name, body, query)
            if method == "DELETE" and resource == "pods" and namespace:
                cluster.require_namespace(namespace, creating=False)
                deleted = [
                    self.delete(resource, namespace, pod["metadata"]["name"], body, query).body
                    for pod in self.selected(resource, namespace, query)
                ]
                meta = {"resourceVersion": str(cluster.store.revision)}
                return Response(200, self.as_list(resource, deleted, meta))
        raise METHOD_NOT_ALLOWED

    def discovery(self, path: str) -> JSON | None:
        if path == "/version":
            major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
            return {
                "major": major,
                "minor": minor,
                "gitVersion": KUBERNETES_VERSION,
                "gitCommit": "0" * 40,
                "gitTreeState": "clean",
                "buildDate": "2024-12-10T00:00:00Z",
                "goVersion": "go1.22.9",
                "compiler": "gc",
                "platform": "linux/amd64",
            }
        if path == "/api":
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {
                        "clientCIDR": "0.0.0.0/0",
                        "serverAddress": f"{self.double.gateway}:{self.double.port}",
                    }
                ],
            }
        if path == "/api/v1":
            return {"kind": "APIResourceList", "groupVersion": "v1", "resources": _core_resources()}
        group = {
            "name": AUTHZ_GROUP,
            "versions": [{"groupVersion": f"{AUTHZ_GROUP}/v1", "version": "v1"}],
            "preferredVersion": {"groupVersion": f"{AUTHZ_GROUP}/v1", "version": "v1"},
        }
        if path == "/apis":
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
        if path == f"/apis/{AUTHZ_GROUP}":
            return {"kind": "APIGroup", "apiVersion": "v1", **group}
        if path == f"/apis/{AUTHZ_GROUP}/v1":
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": f"{AUTHZ_GROUP}/v1",
                "resources": [
                    {
                        "name": "selfsubjectaccessreviews",
                        "singularName": "selfsubjectaccessreview",
                        "namespaced": False,
                        "kind": "SelfSubjectAccessReview",
                        "verbs": ["create"],
                    },
                ],
            }
        return None

    # -- reads ---------------------------------------------------------------------------------
    def read(
        self, resource: str, namespace: str, name: str, query: dict[str, list[str]]
    ) -> Response:
        cluster = self.double.cluster
        table = wants_table(self.headers.get("Accept") or "")
        with cluster.store.lock:
            if namespace:
                cluster.require_namespace(namespace, creating=False)
            if name:
                obj = cluster.store.get(resource, namespace, name)
                if obj is None:
                    raise not_found(resource, name)
                if table:
                    return Response(
                        200, as_table(resource, [obj], obj["metadata"]["resourceVersion"])
                    )
                return Response(200, copy.deepcopy(obj))
            items = self.selected(resource, namespace, query)
            revision = str(cluster.store.revision)
            meta: JSON = {"resourceVersion": revision}
            start = 0
            token = (query.get("continue") or [""])[0]
            if token:
                try:
                    start = int(base64.urlsafe_b64decode(token.encode()).decode())
                except ValueError as exc:
                    raise bad_request(f"continue key is not valid: {exc}") from exc
            limit = int((query.get("limit") or ["0"])[0] or 0)
            if limit > 0 and start + limit < len(items):
                meta["continue"] = base64.urlsafe_b64encode(str(start + limit).encode()).decode()
                meta["remainingItemCount"] = len(items) - start - limit
                items = items[start : start + limit]
            else:
                items = items[start:]
            if table:
                return Response(200, as_table(resource, items, revision))
            return Response(200, self.as_list(resource, items, meta))

    def selected(self, resource: str, namespace: str, query: dict[str, list[str]]) -> list[JSON]:
        """The objects matching the request's label and field selectors."""
        labels = label_selector_matcher((query.get("labelSelector") or [""])[0])
        fields = field_selector(resource, (query.get("fieldSelector") or [""])[0])
        return [
            obj
            for obj in self.double.cluster.store.items(resource, namespace)
            if labels(obj["metadata"].get("labels") or {}) and fields(obj)
        ]

    def as_list(self, resource: str, items: list[JSON], meta: JSON) -> JSON:
        kind = {**NAMESPACED, **CLUSTER_SCOPED}[resource][0]
        return {
            "kind": f"{kind}List",
            "apiVersion": "v1",
            "metadata": meta,
            "items": [
                {k: copy.deepcopy(v) for k, v in obj.items() if k not in ("kind", "apiVersion")}
                for obj in items
            ],
        }

    def start_stream(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Audit-Id", str(uuid.uuid4()))
        self.send_header("Cache-Control", "no-cache, private")
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()

    def chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

    def end_stream(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        self.close_connection = True

    def peer_closed(self) -> bool:
        conn = self.connection
        try:
            readable, _, _ = select.select([conn], [], [], 0)
        except (OSError, ValueError):
            return True
        if not readable:
            return False
        try:
            conn.setblocking(False)
            try:
                return bool(conn.recv(1) == b"")
            finally:
                conn.setblocking(True)
        except (ssl.SSLWantReadError, BlockingIOError):
            return False
        except OSError:
            return True

    def watch(self, resource: str, namespace: str, query: dict[str, list[str]]) -> None:
        cluster = self.double.cluster
        labels = label_selector_matcher((query.get("labelSelector") or [""])[0])
        fields = field_selector(resource, (query.get("fieldSelector") or [""])[0])
        timeout = float((query.get("timeoutSeconds") or ["1800"])[0] or 1800)
        rv = (query.get("resourceVersion") or [""])[0]

        def matches(obj: JSON) -> bool:
            return labels(obj["metadata"].get("labels") or {}) and fields(obj)

        initial: list[JSON] = []
        expired = False
        with cluster.store.lock:
            if namespace:
                cluster.require_namespace(namespace, creating=False)
            if rv in ("", "0"):
                initial = [
                    copy.deepcopy(o) for o in cluster.store.items(resource, namespace) if matches(o)
                ]
                since = cluster.store.revision
            else:
                try:
                    since = int(rv)
                except ValueError as exc:
                    raise bad_request(f'invalid resource version "{rv}"') from exc
                expired = (
                    since < cluster.store.oldest_revision() - 1
                    and len(cluster.store.history) == cluster.store.history.maxlen
                )
        self.start_stream("application/json")
        stop = threading.Event()
        seen = {(o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in initial}
        try:
            if rv not in ("", "0") and expired:
                error = ApiError(
                    410,
                    "Expired",
                    f"too old resource version: {since} ({cluster.store.oldest_revision()})",
                )
                self.chunk(json.dumps({"type": "ERROR", "object": error.status()}).encode() + b"\n")
                return
            for obj in initial:
                self.chunk(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
            for change in cluster.changes(resource, namespace, since, timeout, stop):
                if change is None:
                    if self.peer_closed():
                        return
                    continue
                key = (change.obj["metadata"].get("namespace", ""), change.obj["metadata"]["name"])
                kind = change.kind
                if matches(change.obj):
                    if kind == "MODIFIED" and key not in seen:
                        kind = "ADDED"
                    if kind == "DELETED":
                        seen.discard(key)
                    else:
                        seen.add(key)
                elif key in seen:
                    seen.discard(key)
                    kind = "DELETED"
                else:
                    continue
                self.chunk(json.dumps({"type": kind, "object": change.obj}).encode() + b"\n")
        except OSError:
            return
        finally:
            stop.set()
            self.end_stream()

    # -- writes -------------------------------------------------------------------------------
    def create(
        self, resource: str, namespace: str, body: Any, strict: bool, user: Identity
    ) -> Response:
        cluster = self.double.cluster
        warnings: list[str] = []
        if resource == "pods":
            pod = cluster.create_pod(user, namespace, body, strict, warnings)
            return Response(201, copy.deepcopy(pod), self.warnings(warnings))
        if resource == "namespaces":
            return Response(201, copy.deepcopy(cluster.create_namespace(body)))
        if resource == "serviceaccounts":
            return Response(201, copy.deepcopy(cluster.create_service_account(namespace, body)))
        if resource == "events":
            cluster.require_namespace(namespace, creating=True)
            if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
                raise bad_request("the body of the request was in an unknown format")
            event = copy.deepcopy(body)
            event["kind"], event["apiVersion"] = "Event", "v1"
            event["metadata"] = cluster._meta(event["metadata"], namespace)
            return Response(201, copy.deepcopy(cluster.store.add("events", event)))
        raise METHOD_NOT_ALLOWED

    def update(self, method: str, resource: str, namespace: str, name: str, body: Any) -> Response:
        cluster = self.double.cluster
        if namespace:
            cluster.require_namespace(namespace, creating=False)
        old = cluster.store.get(resource, namespace, name)
        if old is None:
            raise not_found(resource, name)
        if method == "PATCH":
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            new = merge(old, body, ctype)
        else:
            if not isinstance(body, dict):
                raise bad_request("the body of the request was in an unknown format")
            new = body
            wanted = (new.get("metadata") or {}).get("resourceVersion")
            if wanted and wanted != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {resource} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    {"name": name, "kind": resource},
                )
        if resource == "namespaces":
            return Response(200, copy.deepcopy(cluster.update_namespace(name, new)))
        if resource == "pods":
            return Response(200, copy.deepcopy(cluster.patch_pod(namespace, name, new)))
        if resource == "serviceaccounts":
            for key in ("labels", "annotations"):
                old["metadata"][key] = (new.get("metadata") or {}).get(key) or {}
            for key in ("automountServiceAccountToken", "imagePullSecrets", "secrets"):
                if key in new:
                    old[key] = new[key]
            return Response(200, copy.deepcopy(cluster.store.modified(resource, old)))
        raise METHOD_NOT_ALLOWED

    def delete(
        self, resource: str, namespace: str, name: str, body: Any, query: dict[str, list[str]]
    ) -> Response:
        cluster = self.double.cluster
        options = body if isinstance(body, dict) else {}
        grace_text = (query.get("gracePeriodSeconds") or [""])[0]
        grace = options.get("gracePeriodSeconds")
        if grace_text:
            try:
                grace = int(grace_text)
            except ValueError as exc:
                raise bad_request(f'gracePeriodSeconds: invalid value "{grace_text}"') from exc
        propagation = (
            options.get("propagationPolicy") or (query.get("propagationPolicy") or [""])[0] or None
        )
        if resource == "pods":
            pod = cluster.delete_pod(namespace, name, grace, propagation)
            return Response(200, copy.deepcopy(pod))
        if resource == "namespaces":
            return Response(200, copy.deepcopy(cluster.delete_namespace(name)))
        if resource == "serviceaccounts":
            return Response(200, copy.deepcopy(cluster.delete_service_account(namespace, name)))
        if resource == "events":
            obj = cluster.store.remove("events", namespace, name)
            if obj is None:
                raise not_found("events", name)
            return Response(
                200,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "kind": "events", "uid": obj["metadata"]["uid"]},
                },
            )
        raise METHOD_NOT_ALLOWED

    # -- pod subresources ---------------------------------------------------------------------
    def pod_subresource(
        self, method: str, namespace: str, name: str, sub: str, query: dict[str, list[str]]
    ) -> Response:
        cluster = self.double.cluster
        with cluster.store.lock:
            pod = copy.deepcopy(cluster.get_pod(namespace, name))
        if sub == "status":
            if method != "GET":
                raise METHOD_NOT_ALLOWED
            return Response(200, pod)
        if sub == "log":
            if method != "GET":
                raise METHOD_NOT_ALLOWED
            return self.logs(pod, query)
        if sub == "exec":
            if method not in ("GET", "POST"):
                raise METHOD_NOT_ALLOWED
            self.exec(pod, query)
        if sub == "portforward":
            if method not in ("GET", "POST"):
                raise METHOD_NOT_ALLOWED
            self.portforward(pod, query)
        raise unknown_resource()

    def _container_name(self, pod: JSON, query: dict[str, list[str]]) -> str:
        """ValidateContainer of the API server."""
        wanted = (query.get("container") or [""])[0]
        names: list[str] = [c["name"] for c in pod["spec"]["containers"]]
        if not wanted:
            return names[0]
        if wanted not in names:
            raise bad_request(f"container {wanted} is not valid for pod {pod['metadata']['name']}")
        return wanted

    def logs(self, pod: JSON, query: dict[str, list[str]]) -> Response:
        container = self._container_name(pod, query)
        name = pod["metadata"]["name"]
        if not pod["spec"].get("nodeName"):
            return Response(200, "")
        worker = self.double.kubelet.worker(pod["metadata"]["uid"])
        if _flag(query, "previous", False) and (worker is None or not worker.restarts):
            raise bad_request(
                f'previous terminated container "{container}" in pod "{name}" not found'
            )
        if worker is None or not worker.container_id:
            statuses = pod.get("status", {}).get("containerStatuses") or []
            waiting = (statuses[0].get("state") or {}).get("waiting", {}) if statuses else {}
            reason = waiting.get("reason", "ContainerCreating")
            text = {
                "ErrImagePull": "image can't be pulled",
                "ImagePullBackOff": "trying and failing to pull image",
            }.get(reason, reason)
            raise bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: {text}'
            )
        options: JSON = {
            "stdout": True,
            "stderr": True,
            "timestamps": _flag(query, "timestamps", False),
        }
        tail = (query.get("tailLines") or [""])[0]
        if tail:
            options["tail"] = int(tail)
        since = (query.get("sinceSeconds") or [""])[0]
        if since:
            options["since"] = int(time.time()) - int(since)
        limit = int((query.get("limitBytes") or ["0"])[0] or 0)
        api = self.double.docker.api
        if not _flag(query, "follow", False):
            data: bytes = api.logs(worker.container_id, stream=False, **options)
            return Response(200, data[:limit] if limit else data)
        self.start_stream("text/plain")
        sent = 0
        try:
            pieces: Iterator[bytes] = api.logs(
                worker.container_id, stream=True, follow=True, **options
            )
            for received in pieces:
                piece = received[: limit - sent] if limit else received
                self.chunk(piece)
                sent += len(piece)
                if limit and sent >= limit:
                    break
        except (OSError, docker.errors.APIError):
            pass
        finally:
            self.end_stream()
        raise Streamed

    def _upgrade_headers(self) -> str:
        upgrade = (self.headers.get("Upgrade") or "").lower()
        connection = (self.headers.get("Connection") or "").lower()
        if upgrade != "websocket" or "upgrade" not in connection:
            raise ApiError(400, "BadRequest", "Upgrade request required", {})
        key = self.headers.get("Sec-WebSocket-Key") or ""
        if not key or self.headers.get("Sec-WebSocket-Version") != "13":
            raise ApiError(400, "BadRequest", "Upgrade request required", {})
        return key

    def _refuse(self, code: int, text: str) -> None:
        """A bare, non-Status answer before the upgrade (what a kubelet's handler writes)."""
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        self.close_connection = True
        raise Streamed

    def _switch(self, key: str, protocol: str) -> ssl.SSLSocket:
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {ws.accept_key(key)}",
        ]
        if protocol:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        self.wfile.flush()
        conn: ssl.SSLSocket = self.connection
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.close_connection = True
        return conn

    def exec(self, pod: JSON, query: dict[str, list[str]]) -> None:
        key = self._upgrade_headers()
        name = pod["metadata"]["name"]
        container = self._container_name(pod, query)
        if not pod["spec"].get("nodeName"):
            raise bad_request(f"pod {name} does not have a host assigned")
        command = query.get("command") or []
        stdin = _flag(query, "stdin", False)
        stdout = _flag(query, "stdout", True)
        stderr = _flag(query, "stderr", True)
        tty = _flag(query, "tty", False)
        if tty:
            stderr = False
        supported = list(self.double.cluster.exec_protocols)
        protocol = ws.negotiate(self.headers.get("Sec-WebSocket-Protocol") or "", supported)
        translator = protocol == ws.V5
        if not translator:
            # no v5: the API server proxies to the kubelet, which answers these before upgrading
            if not (stdin or stdout or stderr):
                self._refuse(400, "you must specify at least 1 of stdin, stdout, stderr")
            if protocol is None:
                self._refuse(403, "")
        worker = self.double.kubelet.worker(pod["metadata"]["uid"])
        running = worker is not None and worker.running and bool(worker.container_id)
        if not running and not translator:
            self._refuse(500, f'container not found ("{container}")')
        assert protocol is not None
        conn = self._switch(key, protocol)
        session = ws.Session(conn, protocol)
        first = 1 if stdout else (2 if stderr else 3)
        session.send(first, b"")
        if not running or worker is None:
            session.send(
                3,
                internal_error_status(
                    f'unable to upgrade connection: container not found ("{container}")'
                ),
            )
            session.finished = True
            session.run()
            raise Streamed
        if not command:
            session.send(
                3,
                internal_error_status("error executing command in container: command is required"),
            )
            session.finished = True
            session.run()
            raise Streamed
        self.double.run_exec(
            session, worker, command, stdin=stdin, stdout=stdout, stderr=stderr, tty=tty
        )
        raise Streamed

    def portforward(self, pod: JSON, query: dict[str, list[str]]) -> None:
        key = self._upgrade_headers()
        name = pod["metadata"]["name"]
        if not pod["spec"].get("nodeName"):
            raise bad_request(f"pod {name} does not have a host assigned")
        try:
            ports = ws.forward_ports(query)
        except ws.Refusal as refusal:
            self._refuse(refusal.code, refusal.text)
        worker = self.double.kubelet.worker(pod["metadata"]["uid"])
        if (
            worker is None
            or pod.get("status", {}).get("phase") in ("Succeeded", "Failed")
            or not pod.get("status", {}).get("podIP")
        ):
            self._refuse(500, f'pod not found ("{name}_{pod["metadata"]["namespace"]}")')
        protocol = ws.negotiate(self.headers.get("Sec-WebSocket-Protocol") or "", ["", ws.V4])
        if protocol is None:
            self._refuse(403, "")
        assert worker is not None
        assert protocol is not None
        conn = self._switch(key, protocol)
        self.double.run_portforward(ws.Session(conn, protocol), worker, ports)
        raise Streamed

    # -- fault injection -----------------------------------------------------------------------
    def control(
        self, method: str, path: str, query: dict[str, list[str]], raw: bytes, user: Identity
    ) -> Response:
        if not user.is_admin:
            raise ApiError(
                403,
                "Forbidden",
                f'forbidden: User "{user.name}" cannot {method.lower()} path "{path}"',
                {},
            )
        double = self.double
        cluster = double.cluster
        body = self.read_json(raw) or {}
        what = path[len("/_double/") :]
        with cluster.store.lock:
            if what == "state" and method == "GET":
                return Response(
                    200,
                    {
                        "denials": [d.__dict__ for d in cluster.denials],
                        "holdPending": cluster.hold_pending,
                        "execProtocols": cluster.exec_protocols,
                    },
                )
            if method != "POST":
                raise METHOD_NOT_ALLOWED
            if what == "deny":
                cluster.denials.append(
                    Denial(body["verb"], body["resource"], body.get("namespace"), body.get("user"))
                )
            elif what == "allow-all":
                cluster.denials.clear()
            elif what == "hold-pending":
                cluster.hold_pending = bool(body.get("hold", True))
                if body.get("message"):
                    cluster.unschedulable_message = str(body["message"])
            elif what == "exec-protocols":
                protocols = [str(p) for p in body.get("protocols") or []]
                if not protocols or any(p not in (ws.V4, ws.V5) for p in protocols):
                    raise bad_request(
                        f"exec protocols must be a non-empty subset of {[ws.V4, ws.V5]}"
                    )
                cluster.exec_protocols = protocols
            elif what == "token":
                key = (body["namespace"], body["name"])
                if key not in cluster.sa_tokens:
                    raise not_found("serviceaccounts", body["name"])
                return Response(200, {"token": cluster.sa_tokens[key]})
            elif what == "shutdown":
                threading.Thread(target=double.shutdown, daemon=True).start()
            else:
                raise unknown_resource()
        double.kubelet.poke_all()
        return Response(200, {"ok": True})


def _core_resources() -> list[JSON]:
    verbs = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    resources: list[JSON] = []
    for plural, (kind, singular, short) in {**NAMESPACED, **CLUSTER_SCOPED}.items():
        entry: JSON = {
            "name": plural,
            "singularName": singular,
            "namespaced": plural in NAMESPACED,
            "kind": kind,
            "verbs": verbs,
            "shortNames": short,
        }
        if plural == "pods":
            entry["categories"] = ["all"]
        resources.append(entry)
    resources += [
        {
            "name": "pods/exec",
            "singularName": "",
            "namespaced": True,
            "kind": "PodExecOptions",
            "verbs": ["create", "get"],
        },
        {
            "name": "pods/log",
            "singularName": "",
            "namespaced": True,
            "kind": "Pod",
            "verbs": ["get"],
        },
        {
            "name": "pods/portforward",
            "singularName": "",
            "namespaced": True,
            "kind": "PodPortForwardOptions",
            "verbs": ["create", "get"],
        },
        {
            "name": "pods/status",
            "singularName": "",
            "namespaced": True,
            "kind": "Pod",
            "verbs": ["get", "patch", "update"],
        },
        {
            "name": "serviceaccounts/token",
            "singularName": "",
            "namespaced": True,
            "group": "authentication.k8s.io",
            "version": "v1",
            "kind": "TokenRequest",
            "verbs": ["create"],
        },
        {
            "name": "namespaces/status",
            "singularName": "",
            "namespaced": False,
            "kind": "Namespace",
            "verbs": ["get", "patch", "update"],
        },
    ]
    return resources


class ApiServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose accepted sockets become TLS sockets (handshake deferred)."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, double: Double) -> None:
        self.context = context
        self.double = double
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, addr = self.socket.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, (ConnectionError, ssl.SSLError, TimeoutError)):
            self.double.log(f"error serving {client_address}: {exc!r}")


class Double:
    """The whole double: network, TLS, cluster state, kubelet and the listening servers."""

    def __init__(self, workdir: Path, instance: str, namespaces: list[str]) -> None:
        self.workdir = workdir
        self.instance = instance
        self.log_lock = threading.Lock()
        self.log_file = open(workdir / "server.log", "a", buffering=1)  # noqa: SIM115
        self.docker = docker.from_env(timeout=120, max_pool_size=64)
        self.network = f"kipik-test-outer-{instance}"
        self.stopped = threading.Event()
        self.stopping = threading.Lock()
        self.servers: list[ApiServer] = []
        subnet, self.gateway = create_network(self.docker, self.network, instance)
        ca, cert, key = make_certificates(workdir / "pki", ["127.0.0.1", self.gateway])
        self.ca_path = ca
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        local = ApiServer(("127.0.0.1", 0), context, self)
        self.port = local.server_address[1]
        try:
            inside = ApiServer((self.gateway, self.port), context, self)
        except OSError:
            inside = ApiServer((self.gateway, 0), context, self)
        self.inside_port = inside.server_address[1]
        self.servers = [local, inside]
        self.admin_token = secrets.token_urlsafe(32)
        cfg = Config(
            instance,
            f"kipik-test-outer-{instance}-node",
            self.gateway,
            self.inside_port,
            ca.read_text(),
            namespaces,
        )
        self.cluster = Cluster(cfg, self.admin_token)
        self.kubelet = Kubelet(
            self.cluster,
            self.docker,
            network=self.network,
            subnet=subnet,
            workdir=workdir,
            log=self.log,
        )
        self.cluster.kubelet = self.kubelet

    def log(self, line: str) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S.%f")
        with self.log_lock:
            if not self.log_file.closed:
                self.log_file.write(f"{stamp} {line}\n")

    def serve(self) -> None:
        for server in self.servers:
            threading.Thread(target=server.serve_forever, daemon=True, name="https").start()
        ready = {
            "port": self.port,
            "insidePort": self.inside_port,
            "gateway": self.gateway,
            "network": self.network,
            "instance": self.instance,
            "adminToken": self.admin_token,
            "caPath": str(self.ca_path),
            "pid": os.getpid(),
            "nodeName": self.cluster.cfg.node_name,
        }
        path = self.workdir / "ready.json"
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(ready))
        temp.chmod(0o600)
        temp.replace(path)
        self.log(
            f"serving on https://127.0.0.1:{self.port} and https://{self.gateway}:{self.inside_port}"
        )
        self.stopped.wait()

    def shutdown(self) -> None:
        """Remove every pod's container and volumes, then the network; then stop serving."""
        if not self.stopping.acquire(blocking=False):
            return
        self.log("shutting down")
        try:
            with self.cluster.store.lock:
                for pod in list(self.cluster.store.items("pods")):
                    self.cluster.store.remove(
                        "pods", pod["metadata"]["namespace"], pod["metadata"]["name"]
                    )
            self.kubelet.shutdown()
            sweep(self.docker, self.instance, self.log)
        finally:
            self.stopped.set()

    # -- streaming sessions -------------------------------------------------------------------
    def run_exec(
        self,
        session: ws.Session,
        worker: PodWorker,
        command: list[str],
        *,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        tty: bool,
    ) -> None:
        api = self.docker.api
        try:
            exec_id = api.exec_create(
                worker.container_id, command, stdin=stdin, stdout=stdout, stderr=stderr, tty=tty
            )["Id"]
            sock = open_exec_socket(self.docker, exec_id, tty)
        except (docker.errors.APIError, OSError) as exc:
            text = str(getattr(exc, "explanation", None) or exc)
            session.send(3, internal_error_status(f"error executing command in container: {text}"))
            session.finished = True
            session.run()
            return
        # Docker reports a command that cannot start (exit 126) as output on stdout; a
        # kubelet reports it as an InternalError status instead, with no output.
        held: list[bytes] = []
        first = [True]

        def emit(channel: int, data: bytes) -> None:
            failed_start = first[0] and data.startswith(b"OCI runtime exec failed")
            if channel == 1 and (failed_start or held):
                held.append(data)
            else:
                session.send(channel, data)
            first[0] = False

        if tty:

            def on_data(data: bytes) -> None:
                emit(1, data)
        else:
            demux = ws.DockerStreamDemux(lambda stream, data: emit(1 if stream == 1 else 2, data))
            on_data = demux.feed
        endpoint = ws.Endpoint(sock, on_data)
        session.endpoints = [endpoint]
        if not stdin:
            endpoint.shutdown_wanted = True

        def on_message(channel: int, data: bytes) -> None:
            if channel == 0 and stdin and not endpoint.shutdown_wanted:
                endpoint.outbuf += data
            elif channel == ws.CLOSE_SIGNAL and session.protocol == ws.V5 and data[:1] == b"\x00":
                endpoint.shutdown_wanted = True

        def on_eof(_: ws.Endpoint) -> None:
            code = None
            for _attempt in range(100):
                info = api.exec_inspect(exec_id)
                if not info.get("Running"):
                    code = info.get("ExitCode")
                    break
                time.sleep(0.05)
            if code == 126 and held:
                reason = b"".join(held).decode(errors="replace").strip()
                session.send(3, internal_error_status(
                    "error executing command in container: failed to exec in container: "
                    f'failed to start exec "{exec_id}": {reason}'
                ))  # fmt: skip
            elif code is None:
                for data in held:
                    session.send(1, data)
                session.send(3, internal_error_status(
                    "error executing command in container: the exec did not finish"
                ))  # fmt: skip
            else:
                for data in held:
                    session.send(1, data)
                session.send(3, exit_status(command, int(code)))
            session.finished = True

        session.on_message = on_message
        session.on_endpoint_eof = on_eof
        session.run()

    def run_portforward(self, session: ws.Session, worker: PodWorker, ports: list[int]) -> None:
        pid = 0
        with contextlib.suppress(docker.errors.APIError):
            if worker.container_id and worker.running:
                pid = int(
                    self.docker.api.inspect_container(worker.container_id)["State"].get("Pid") or 0
                )
        sandbox = worker.container_id or worker.uid

        def connect(port: int) -> socket.socket:
            try:
                if not pid:
                    raise ConnectionRefusedError(
                        f"failed to connect to localhost:{port} inside namespace, IPv4: dial tcp4 "
                        f"127.0.0.1:{port}: connect: connection refused IPv6 dial tcp6 "
                        f"[::1]:{port}: connect: connection refused "
                    )
                return connect_in_netns(pid, port, worker.ip)
            except OSError as exc:
                detail = str(exc).replace("inside namespace,", f'inside namespace "{sandbox}",')
                raise ws.ForwardError(
                    f"error forwarding port {port} to pod {sandbox}, uid : failed to execute "
                    f'portforward in network namespace "/var/run/netns/cni-{worker.uid}": {detail}'
                ) from exc

        def stream_error(port: int, error: OSError) -> str:
            return f"error forwarding port {port} to pod {sandbox}, uid : {error}"

        ws.run_portforward(session, ports, connect, stream_error)


def sweep(client: docker.DockerClient, instance: str, log: Callable[[str], None]) -> None:
    """Remove whatever still carries this instance's label (containers, volumes, networks)."""
    selector: dict[str, str | list[str] | bool] = {"label": f"{LABEL}={instance}"}
    for container in client.api.containers(all=True, filters=selector):
        with contextlib.suppress(docker.errors.NotFound):
            client.api.remove_container(container["Id"], force=True, v=True)
    for volume in client.volumes.list(filters=selector):
        with contextlib.suppress(docker.errors.NotFound):
            volume.remove(force=True)
    for network in client.networks.list(filters=selector):
        for _ in range(20):
            try:
                network.remove()
                break
            except docker.errors.NotFound:
                break
            except docker.errors.APIError as exc:
                log(f"removing network {network.name}: {exc}")
                time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--namespace", action="append", default=[])
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    client = docker.from_env(timeout=60)
    try:
        double = Double(args.workdir, args.instance, args.namespace)
    except BaseException:
        sweep(client, args.instance, lambda line: None)
        raise

    def on_signal(signum: int, frame: Any) -> None:
        threading.Thread(target=double.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()

    def orphaned() -> None:
        """Clean up if the test process that started this server dies without stopping it."""
        while not double.stopped.wait(1.0):
            if os.getppid() != parent:
                double.log(f"parent process {parent} is gone")
                double.shutdown()

    threading.Thread(target=orphaned, daemon=True, name="parent watch").start()
    try:
        double.serve()
    finally:
        double.shutdown()
        double.log("stopped")


if __name__ == "__main__":
    main()
