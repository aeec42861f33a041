"""TEST DOUBLE support: the server side of RFC 6455 WebSockets and Kubernetes' channel protocols.

Shared by the outer-cluster double (a fake kube-apiserver + kubelet backed by the local Docker
engine) and the node image double's API server (`streaming.py`); stdlib only, as everything
under tests/doubles/node. Kubernetes streams exec and port-forward sessions over a WebSocket
whose subprotocol (`v4.channel.k8s.io`, `v5.channel.k8s.io`) prefixes every binary message with
one channel byte (staging/src/k8s.io/apimachinery/pkg/util/httpstream/wsstream/conn.go). This
module does the handshake, frame encoding and decoding, a single-threaded relay loop between the
client's TLS socket and plain sockets (a Docker exec stream, TCP connections into a pod), with
bounded buffers in both directions so that large transfers neither stall nor grow without limit,
and the port-forward protocol on top of it.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import functools
import hashlib
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
#: v5's stream-close signal: a message [255, channel] half-closes that channel.
CLOSE_SIGNAL = 255
BUFFER_LIMIT = 4 << 20  # bytes buffered per direction before reading from that side pauses
RECV_SIZE = 256 << 10
MAX_MESSAGE = 64 << 20  # a client message larger than this closes the connection (1009)


class ProtocolError(Exception):
    """The peer broke RFC 6455; the connection is closed with `code`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def negotiate(offered: str, supported: list[str]) -> str | None:
    """Pick the first protocol the client offered that the server supports (wsstream's rule).

    A client that offers nothing gets "" when "" is supported; None means no agreement.
    """
    protocols = [p.strip() for p in offered.split(",") if p.strip()] or [""]
    for protocol in protocols:
        if protocol in supported:
            return protocol
    return None


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked, final server frame."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, size)
    return header + payload


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()[:120]


def unmask(payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR with the 4-byte mask in linear time (one big-integer XOR, no per-byte loop)."""
    size = len(payload)
    if size == 0:
        return b""
    key = (mask * (size // 4 + 1))[:size]
    value = int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")
    return value.to_bytes(size, "big")


class FrameParser:
    """Incremental parser of masked client frames; yields whole messages and control frames."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.fragments: list[bytes] = []
        self.fragment_opcode = 0
        self.fragment_size = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def messages(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        while True:
            frame = self._next_frame()
            if frame is None:
                return out
            fin, opcode, payload = frame
            if opcode >= 0x8:
                if not fin or len(payload) > 125:
                    raise ProtocolError(1002, "bad control frame")
                out.append((opcode, payload))
            elif opcode == OP_CONT:
                if not self.fragments:
                    raise ProtocolError(1002, "continuation without a start")
                self._add_fragment(payload)
                if fin:
                    out.append((self.fragment_opcode, b"".join(self.fragments)))
                    self.fragments, self.fragment_size = [], 0
            elif opcode in (OP_TEXT, OP_BINARY):
                if self.fragments:
                    raise ProtocolError(1002, "new message inside a fragmented one")
                if fin:
                    out.append((opcode, payload))
                else:
                    self.fragment_opcode = opcode
                    self._add_fragment(payload)
            else:
                raise ProtocolError(1002, f"unknown opcode {opcode}")

    def _add_fragment(self, payload: bytes) -> None:
        self.fragment_size += len(payload)
        if self.fragment_size > MAX_MESSAGE:
            raise ProtocolError(1009, "message too big")
        self.fragments.append(payload)

    def _next_frame(self) -> tuple[bool, int, bytes] | None:
        buf = self.buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        if first & 0x70:
            raise ProtocolError(1002, "reserved bits set")
        if not second & 0x80:
            raise ProtocolError(1002, "client frames must be masked")
        size = second & 0x7F
        offset = 2
        if size == 126:
            if len(buf) < 4:
                return None
            size = struct.unpack_from("!H", buf, 2)[0]
            offset = 4
        elif size == 127:
            if len(buf) < 10:
                return None
            size = struct.unpack_from("!Q", buf, 2)[0]
            offset = 10
        if size > MAX_MESSAGE:
            raise ProtocolError(1009, "message too big")
        if len(buf) < offset + 4 + size:
            return None
        mask = bytes(buf[offset : offset + 4])
        start = offset + 4
        payload = unmask(memoryview(buf)[start : start + size], mask)
        del buf[: start + size]
        return bool(first & 0x80), first & 0x0F, payload


class Endpoint:
    """A plain socket on the far side of the relay (a Docker exec stream, a TCP connection)."""

    def __init__(self, sock: socket.socket, on_data: Callable[[bytes], None]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_data = on_data
        self.outbuf = bytearray()
        self.eof = False  # nothing more will be read from it
        self.shutdown_wanted = False  # half-close its write side once outbuf is flushed
        self.write_closed = False
        self.error: OSError | None = None

    def close(self) -> None:
        self.eof = True
        self.write_closed = True
        self.outbuf.clear()
        with contextlib.suppress(OSError):
            self.sock.close()


class Session:
    """A WebSocket connection carrying Kubernetes channels, relayed to endpoints in one thread.

    `on_message(channel, data)` receives client data messages; `on_endpoint_eof(endpoint)` is
    called once per endpoint when reading it ends; the owner sets `finished` (after queueing its
    last frames) to end the session with a close frame.
    """

    def __init__(self, tls: ssl.SSLSocket | socket.socket, protocol: str) -> None:
        self.tls = tls
        self.protocol = protocol
        self.parser = FrameParser()
        self.out = bytearray()
        self.endpoints: list[Endpoint] = []
        self.on_message: Callable[[int, bytes], None] = lambda channel, data: None
        self.on_endpoint_eof: Callable[[Endpoint], None] = lambda endpoint: None
        self.client_closed = False  # the client sent a close frame or the socket ended
        self.close_sent = False
        self.half_closed = False
        self.finished = False
        self.broken = False

    # -- output ---------------------------------------------------------------------------
    def send(self, channel: int, data: bytes) -> None:
        if not self.close_sent:
            self.out += encode_frame(OP_BINARY, bytes((channel,)) + data)

    def send_close(self, code: int = 1000, reason: str = "") -> None:
        if not self.close_sent:
            self.out += encode_frame(OP_CLOSE, close_payload(code, reason))
            self.close_sent = True

    # -- the loop ---------------------------------------------------------------------------
    def run(self, linger: float = 10.0) -> None:
        """Relay until finished (then close and wait up to `linger` s for the client's close)."""
        self.tls.setblocking(False)
        linger_deadline: float | None = None
        try:
            while True:
                if (self.finished or self.client_closed) and not self.close_sent:
                    self.send_close()
                if self.close_sent and not self.out:
                    if self.client_closed or self.broken:
                        return
                    if not self.half_closed:
                        # FIN after the close frame (as a server that closes its connection
                        # would send), but keep reading until the client's close: wakes clients
                        # that poll the raw socket, and loses nothing still in flight.
                        self.half_closed = True
                        with contextlib.suppress(OSError):
                            socket.socket.shutdown(self.tls, socket.SHUT_WR)
                    if linger_deadline is None:
                        linger_deadline = time.monotonic() + linger
                    elif time.monotonic() > linger_deadline:
                        return
                if self.broken:
                    return
                self._step(linger_deadline)
        finally:
            for endpoint in self.endpoints:
                endpoint.close()

    def _pending_to_endpoints(self) -> int:
        return sum(len(e.outbuf) for e in self.endpoints)

    def _step(self, linger_deadline: float | None) -> None:
        poller = select.poll()
        fds: dict[int, Endpoint | None] = {}
        tls_events = 0
        read_client = not self.client_closed and self._pending_to_endpoints() < BUFFER_LIMIT
        if read_client:
            if isinstance(self.tls, ssl.SSLSocket) and self.tls.pending():
                self._read_client()
                return
            tls_events |= select.POLLIN
        if self.out:
            tls_events |= select.POLLOUT
        if tls_events:
            poller.register(self.tls.fileno(), tls_events)
            fds[self.tls.fileno()] = None
        for endpoint in self.endpoints:
            events = 0
            if not endpoint.eof and len(self.out) < BUFFER_LIMIT and not self.close_sent:
                events |= select.POLLIN
            if endpoint.outbuf and not endpoint.write_closed:
                events |= select.POLLOUT
            if events:
                poller.register(endpoint.sock.fileno(), events)
                fds[endpoint.sock.fileno()] = endpoint
        timeout = 1000
        if linger_deadline is not None:
            timeout = max(0, int((linger_deadline - time.monotonic()) * 1000))
        ready = poller.poll(timeout)
        for fd, event in ready:
            target = fds.get(fd)
            if target is None:
                if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read_client()
                if event & select.POLLOUT:
                    self._write_client()
            else:
                if event & select.POLLOUT:
                    self._write_endpoint(target)
                if event & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self._read_endpoint(target)
        for endpoint in self.endpoints:
            if endpoint.shutdown_wanted and not endpoint.outbuf and not endpoint.write_closed:
                endpoint.write_closed = True
                with contextlib.suppress(OSError):
                    endpoint.sock.shutdown(socket.SHUT_WR)

    def _read_client(self) -> None:
        try:
            while self._pending_to_endpoints() < BUFFER_LIMIT:
                data = self.tls.recv(RECV_SIZE)
                if not data:
                    self.client_closed = True
                    break
                self.parser.feed(data)
                self._dispatch()
                if self.client_closed:
                    break
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except ProtocolError as exc:
            self.client_closed = True
            self.send_close(exc.code, str(exc))
        except (OSError, ssl.SSLError):
            self.client_closed = True
            self.broken = True

    def _dispatch(self) -> None:
        for opcode, payload in self.parser.messages():
            if opcode == OP_CLOSE:
                self.client_closed = True
                if not self.close_sent:
                    code = payload[:2] if len(payload) >= 2 else struct.pack("!H", 1000)
                    self.out += encode_frame(OP_CLOSE, code)
                    self.close_sent = True
                return
            if opcode == OP_PING:
                self.out += encode_frame(OP_PONG, payload)
            elif opcode in (OP_TEXT, OP_BINARY) and payload and not self.close_sent:
                self.on_message(payload[0], payload[1:])

    def _write_client(self) -> None:
        try:
            while self.out:
                sent = self.tls.send(memoryview(self.out)[: 1 << 20])
                if sent <= 0:
                    break
                del self.out[:sent]
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except (OSError, ssl.SSLError):
            self.out.clear()
            self.client_closed = True
            self.broken = True

    def _write_endpoint(self, endpoint: Endpoint) -> None:
        try:
            while endpoint.outbuf:
                sent = endpoint.sock.send(memoryview(endpoint.outbuf)[: 1 << 20])
                if sent <= 0:
                    break
                del endpoint.outbuf[:sent]
        except BlockingIOError:
            pass
        except OSError as exc:
            endpoint.outbuf.clear()
            endpoint.write_closed = True
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                endpoint.error = exc

    def _read_endpoint(self, endpoint: Endpoint) -> None:
        try:
            while len(self.out) < BUFFER_LIMIT:
                data = endpoint.sock.recv(RECV_SIZE)
                if not data:
                    self._endpoint_eof(endpoint)
                    return
                endpoint.on_data(data)
        except BlockingIOError:
            pass
        except OSError as exc:
            endpoint.error = exc
            self._endpoint_eof(endpoint)

    def _endpoint_eof(self, endpoint: Endpoint) -> None:
        if not endpoint.eof:
            endpoint.eof = True
            self.on_endpoint_eof(endpoint)


class DockerStreamDemux:
    """Splits Docker's multiplexed exec stream (8-byte headers) into (stream, payload) pieces."""

    def __init__(self, emit: Callable[[int, bytes], None]) -> None:
        self.buffer = bytearray()
        self.emit = emit

    def feed(self, data: bytes) -> None:
        self.buffer += data
        buf = self.buffer
        consumed = 0
        while len(buf) - consumed >= 8:
            stream, size = buf[consumed], struct.unpack_from("!I", buf, consumed + 4)[0]
            if len(buf) - consumed - 8 < size:
                break
            start = consumed + 8
            if size:
                self.emit(stream, bytes(buf[start : start + size]))
            consumed = start + size
        if consumed:
            del buf[:consumed]


# -- port-forward (the kubelet's v4 WebSocket protocol), shared by both API server doubles ---------
class Refusal(Exception):
    """An answer before the upgrade: a bare text body with an HTTP code, as a kubelet writes."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class ForwardError(Exception):
    """A port that cannot be forwarded; the message goes on that port's error channel."""


def forward_ports(query: dict[str, list[str]]) -> list[int]:
    """The `ports` query parameter(s) of a port-forward request, parsed as the kubelet does."""
    ports: list[int] = []
    values = query.get("ports") or []
    if not values:
        raise Refusal(400, 'query parameter "port" is required')
    for value in values:
        if not value:
            raise Refusal(400, 'query parameter "port" cannot be empty')
        for part in value.split(","):
            if not part.isdigit() or int(part) > 65535:
                raise Refusal(
                    400,
                    f'unable to parse "{value}" as a port: strconv.ParseUint: parsing "{part}": '
                    "invalid syntax",
                )
            if int(part) < 1:
                raise Refusal(400, f'port "{value}" must be > 0')
            ports.append(int(part))
    return ports


def run_portforward(
    session: Session,
    ports: list[int],
    connect: Callable[[int], socket.socket],
    stream_error: Callable[[int, OSError], str],
) -> None:
    """Serve one port-forward WebSocket: two channels per port (data 2i, error 2i+1).

    The first message of every channel is its port, 2 bytes little-endian. `connect(port)`
    opens the connection into the pod or raises ForwardError with the text for the error
    channel; `stream_error(port, exc)` words a failure in the middle of the stream. The session
    ends (close frame) once every port's connection has ended.
    """
    for index, port in enumerate(ports):
        prefix = struct.pack("<H", port)
        session.send(2 * index, prefix)
        session.send(2 * index + 1, prefix)
    endpoints: dict[int, Endpoint] = {}
    done: set[int] = set()

    def finish(index: int) -> None:
        done.add(index)
        if len(done) == len(ports):
            session.finished = True

    for index, port in enumerate(ports):
        try:
            sock = connect(port)
        except ForwardError as exc:
            session.send(2 * index + 1, str(exc).encode())
            finish(index)
            continue
        endpoints[index] = Endpoint(sock, functools.partial(session.send, 2 * index))
    session.endpoints = list(endpoints.values())
    by_endpoint = {id(e): i for i, e in endpoints.items()}

    def on_message(channel: int, data: bytes) -> None:
        index = channel // 2
        endpoint = endpoints.get(index)
        if channel % 2 == 0 and endpoint is not None and index not in done:
            endpoint.outbuf += data

    def on_eof(endpoint: Endpoint) -> None:
        index = by_endpoint[id(endpoint)]
        if endpoint.error is not None and not isinstance(endpoint.error, ConnectionResetError):
            session.send(2 * index + 1, stream_error(ports[index], endpoint.error).encode())
        endpoint.close()
        finish(index)

    session.on_message = on_message
    session.on_endpoint_eof = on_eof
    if len(done) == len(ports):
        session.finished = True
    session.run()
