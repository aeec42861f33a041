"""TEST DOUBLE support: the API server side of `pods/log` and `pods/portforward` (stdlib only).

The node image double's API server calls `serve(handler, subresource, pod, query)` after
authentication, authorization and the pod lookup; this module writes the whole response. Like
kube-apiserver it validates the request against the pod (container name, log status) and then
reaches the kubelet of the pod's node: here the kubelet double's plain node-local endpoint on
HOST_IP:10250 (one JSON request line, one JSON answer line, then raw bytes; see kubelet.py).

- log: container (required when the pod has several), tailLines, previous, timestamps,
  sinceSeconds, sinceTime, limitBytes, follow (chunked, until the container ends).
- portforward: the WebSocket protocol the official Python client speaks (`ports` query,
  `v4.channel.k8s.io`, a data and an error channel per port, each opened with its port as 2
  bytes little-endian); a refused connection is reported on the error channel in containerd's
  words. The relay is `websocket.run_portforward`, shared with the outer-cluster double.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any

if __package__:
    from . import websocket as ws
else:  # imported by /kipik-node/apiserver.py
    import websocket as ws  # type: ignore[no-redef]

JSON = dict[str, Any]
KUBELET_PORT = 10250
CONNECT_TIMEOUT = 5.0


class StatusError(Exception):
    """An error answered as a Kubernetes `Status` object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message

    def body(self) -> JSON:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }


def bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def serve(
    handler: BaseHTTPRequestHandler, subresource: str, pod: JSON, query: dict[str, list[str]]
) -> None:
    """Answer `GET pods/NAME/log` or a `pods/NAME/portforward` upgrade.

    The response is complete (and the connection marked to close) when this returns.
    """
    try:
        if subresource == "log":
            serve_log(handler, pod, query)
        elif subresource == "portforward":
            serve_portforward(handler, pod, query)
        else:
            raise StatusError(404, "NotFound", "the server could not find the requested resource")
    except StatusError as error:
        send(handler, error.code, json.dumps(error.body()).encode(), "application/json")
    except ws.Refusal as refusal:
        send(handler, refusal.code, refusal.text.encode(), "text/plain; charset=utf-8")
    except (ConnectionError, TimeoutError):
        pass
    handler.close_connection = True


def send(handler: BaseHTTPRequestHandler, code: int, data: bytes, content_type: str) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(data)))
    handler.send_header("Cache-Control", "no-cache, private")
    handler.end_headers()
    handler.wfile.write(data)
    handler.wfile.flush()


# --- log -------------------------------------------------------------------------------------
def _names(containers: list[JSON]) -> str:
    return "[" + " ".join(str(c["name"]) for c in containers) + "]"


def container_name(pod: JSON, query: dict[str, list[str]]) -> str:
    """The container a log request means (the API server's rules and texts)."""
    spec = pod["spec"]
    name = pod["metadata"]["name"]
    containers = spec.get("containers") or []
    init = spec.get("initContainers") or []
    ephemeral = spec.get("ephemeralContainers") or []
    wanted = (query.get("container") or [""])[0]
    if not wanted:
        if len(containers) == 1:
            return str(containers[0]["name"])
        message = f"a container name must be specified for pod {name}, choose one of: "
        message += _names(containers)
        if init:
            message += f" or one of the init containers: {_names(init)}"
        if ephemeral:
            message += f" or one of the ephemeral containers: {_names(ephemeral)}"
        raise bad_request(message)
    if not any(c["name"] == wanted for c in containers + init + ephemeral):
        raise bad_request(f"container {wanted} is not valid for pod {name}")
    return wanted


def _int(query: dict[str, list[str]], key: str) -> int | None:
    values = query.get(key)
    if not values or values[0] == "":
        return None
    try:
        return int(values[0])
    except ValueError:
        raise bad_request(f'strconv.ParseInt: parsing "{values[0]}": invalid syntax') from None


def _flag(query: dict[str, list[str]], key: str) -> bool:
    values = query.get(key) or [""]
    return values[0].lower() not in ("", "0", "false", "f")


def log_options(query: dict[str, list[str]]) -> JSON:
    """PodLogOptions from the query, validated like the API server (422 with its texts)."""
    tail = _int(query, "tailLines")
    since_seconds = _int(query, "sinceSeconds")
    limit = _int(query, "limitBytes")
    since_time = (query.get("sinceTime") or [""])[0]
    causes: list[tuple[str, object, str]] = []
    if tail is not None and tail < 0:
        causes.append(("tailLines", tail, "must be greater than or equal to 0"))
    if since_seconds is not None and since_seconds < 1:
        causes.append(("sinceSeconds", since_seconds, "must be greater than 0"))
    if limit is not None and limit < 1:
        causes.append(("limitBytes", limit, "must be greater than 0"))
    if since_seconds is not None and since_time:
        causes.append(("", "", "at most one of `sinceTime` or `sinceSeconds` may be specified"))
    if causes:
        text = ", ".join(
            f"{field}: Invalid value: {value}: {why}" if field else why
            for field, value, why in causes
        )
        raise StatusError(422, "Invalid", f'PodLogOptions "" is invalid: {text}')
    since: float | None = None
    if since_seconds is not None:
        since = time.time() - since_seconds
    elif since_time:
        try:
            parsed = datetime.datetime.strptime(since_time, "%Y-%m-%dT%H:%M:%SZ")
        except ValueError:
            raise bad_request(
                f'parsing time "{since_time}" as "2006-01-02T15:04:05Z07:00": cannot parse'
            ) from None
        since = parsed.replace(tzinfo=datetime.timezone.utc).timestamp()
    return {
        "tailLines": tail,
        "sinceTime": since,
        "limitBytes": limit,
        "timestamps": _flag(query, "timestamps"),
        "previous": _flag(query, "previous"),
        "follow": _flag(query, "follow"),
    }


def check_log_status(pod: JSON, container: str, previous: bool) -> None:
    """The API server's check of the container's status before it asks the kubelet."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    statuses = (
        (status.get("containerStatuses") or [])
        + (status.get("initContainerStatuses") or [])
        + (status.get("ephemeralContainerStatuses") or [])
    )
    found = next((s for s in statuses if s.get("name") == container), None)
    if found is None:
        return
    last = (found.get("lastState") or {}).get("terminated")
    if previous:
        if not last:
            raise bad_request(
                f'previous terminated container "{container}" in pod "{name}" not found'
            )
        return
    waiting = (found.get("state") or {}).get("waiting")
    if waiting and not last:
        reason = str(waiting.get("reason") or "")
        text = {
            "ErrImagePull": "image can't be pulled",
            "ImagePullBackOff": "trying and failing to pull image",
            "InvalidImageName": "image can't be pulled",
        }.get(reason, reason)
        raise bad_request(f'container "{container}" in pod "{name}" is waiting to start: {text}')


def kubelet_request(pod: JSON, request: JSON) -> tuple[socket.socket, JSON, bytes]:
    """Open the node-local endpoint of the pod's kubelet; (socket, answer, bytes read past it)."""
    host = str((pod.get("status") or {}).get("hostIP") or "")
    if not host:
        raise StatusError(
            500, "InternalError", f'pod "{pod["metadata"]["name"]}" has no host IP yet'
        )
    sock = socket.create_connection((host, KUBELET_PORT), timeout=CONNECT_TIMEOUT)
    meta = pod["metadata"]
    body = {"uid": meta["uid"], "name": meta["name"], "namespace": meta["namespace"], **request}
    sock.sendall(json.dumps(body).encode() + b"\n")
    buffer = b""
    while b"\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            raise StatusError(500, "InternalError", "the kubelet closed the connection")
        buffer += chunk
    line, _, rest = buffer.partition(b"\n")
    sock.settimeout(None)
    return sock, json.loads(line), rest


def serve_log(handler: BaseHTTPRequestHandler, pod: JSON, query: dict[str, list[str]]) -> None:
    container = container_name(pod, query)
    options = log_options(query)
    if not pod["spec"].get("nodeName"):
        send(handler, 200, b"", "text/plain")
        return
    check_log_status(pod, container, bool(options["previous"]))
    try:
        sock, answer, rest = kubelet_request(pod, {"op": "log", "container": container, **options})
    except OSError as exc:
        raise StatusError(
            500,
            "InternalError",
            f'Get "https://{(pod.get("status") or {}).get("hostIP")}:{KUBELET_PORT}/'
            f"containerLogs/{pod['metadata']['namespace']}/{pod['metadata']['name']}/"
            f'{container}": {exc}',
        ) from exc
    with contextlib.closing(sock):
        code = int(answer.get("code", 500))
        if code != 200:
            reason = {400: "BadRequest", 404: "NotFound"}.get(code, "InternalError")
            raise StatusError(code, reason, str(answer.get("message", "")))
        if not options["follow"]:
            data = rest
            while chunk := sock.recv(1 << 16):
                data += chunk
            send(handler, 200, data, "text/plain")
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/plain")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Cache-Control", "no-cache, private")
        handler.end_headers()
        handler.wfile.flush()
        try:
            if rest:
                _chunk(handler, rest)
            while chunk := sock.recv(1 << 16):
                _chunk(handler, chunk)
        finally:
            with contextlib.suppress(OSError):
                handler.wfile.write(b"0\r\n\r\n")
                handler.wfile.flush()


def _chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


# --- portforward -------------------------------------------------------------------------------
def upgrade_key(handler: BaseHTTPRequestHandler) -> str:
    upgrade = (handler.headers.get("Upgrade") or "").lower()
    connection = (handler.headers.get("Connection") or "").lower()
    key = handler.headers.get("Sec-WebSocket-Key") or ""
    if upgrade != "websocket" or "upgrade" not in connection or not key:
        raise bad_request("Upgrade request required")
    if handler.headers.get("Sec-WebSocket-Version") != "13":
        raise bad_request("Upgrade request required")
    return key


def switch(handler: BaseHTTPRequestHandler, key: str, protocol: str) -> Any:
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {ws.accept_key(key)}",
    ]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    handler.wfile.flush()
    conn = handler.connection
    conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return conn


def serve_portforward(
    handler: BaseHTTPRequestHandler, pod: JSON, query: dict[str, list[str]]
) -> None:
    key = upgrade_key(handler)
    meta = pod["metadata"]
    if not pod["spec"].get("nodeName"):
        raise bad_request(f"pod {meta['name']} does not have a host assigned")
    ports = ws.forward_ports(query)
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed") or not status.get("hostIP"):
        raise ws.Refusal(500, f'pod not found ("{meta["name"]}_{meta["namespace"]}")')
    protocol = ws.negotiate(handler.headers.get("Sec-WebSocket-Protocol") or "", ["", ws.V4])
    if protocol is None:
        raise ws.Refusal(403, "")
    conn = switch(handler, key, protocol)
    sandbox = [str(meta["uid"])]

    def connect(port: int) -> socket.socket:
        try:
            sock, answer, rest = kubelet_request(pod, {"op": "connect", "port": port})
        except (OSError, StatusError) as exc:
            raise ws.ForwardError(
                f"error forwarding port {port} to pod {sandbox[0]}, uid : {exc}"
            ) from exc
        if int(answer.get("code", 500)) != 200:
            sock.close()
            raise ws.ForwardError(str(answer.get("message", "")))
        if rest:  # the pod spoke first: keep it for the client
            return _Prefixed(sock, rest).sock
        return sock

    def stream_error(port: int, error: OSError) -> str:
        return f"error forwarding port {port} to pod {sandbox[0]}, uid : {error}"

    ws.run_portforward(ws.Session(conn, protocol), ports, connect, stream_error)


class _Prefixed:
    """Bytes read past the kubelet's answer line go back to the front of the stream.

    The answer is one line and the kubelet sends it before relaying anything, so data can only
    follow it in the same read when the pod talks first; a socket pair carries those bytes and
    then the rest of the connection, relayed by a thread.
    """

    def __init__(self, upstream: socket.socket, prefix: bytes) -> None:
        inner, outer = socket.socketpair()
        self.sock = outer

        def pump_up() -> None:
            try:
                inner.sendall(prefix)
                while data := upstream.recv(1 << 16):
                    inner.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                inner.shutdown(socket.SHUT_WR)

        def pump_down() -> None:
            try:
                while data := inner.recv(1 << 16):
                    upstream.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

        threading.Thread(target=pump_up, daemon=True).start()
        threading.Thread(target=pump_down, daemon=True).start()
