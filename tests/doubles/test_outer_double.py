"""Tests of the TEST DOUBLE of an outer Kubernetes cluster (tests/doubles/outer/).

The double stands in for the outer cluster of pytest-kipik's pod backend, so these tests talk to
it only the way the plugin does: through the official `kubernetes` client (REST calls,
`kubernetes.stream.stream` on connect_get_namespaced_pod_exec and `kubernetes.stream.portforward`
on connect_get_namespaced_pod_portforward). Every pod is a real container on the local Docker
engine; each test gets a double of its own and checks that nothing of it is left afterwards.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import docker
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import portforward, stream
from kubernetes.stream.ws_client import WSClient
from websocket import ABNF

from tests.doubles.node import podspec
from tests.doubles.node import websocket as ws
from tests.doubles.outer import DIND_IMAGE, OuterCluster, OuterClusterError
from tests.doubles.outer.kubelet import expand, normalize_image

NS = "kipik-test"
BIG = 64 << 20
CHUNK = 1 << 20
ECHO_SERVER = """
import hashlib, socket, sys, threading
def serve(conn):
    if mode == "sink":  # read a known length, answer its sha256
        digest, left = hashlib.sha256(), size
        while left:
            data = conn.recv(min(left, 1 << 20))
            if not data:
                break
            digest.update(data)
            left -= len(data)
        conn.sendall(digest.hexdigest().encode())
    else:
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            conn.sendall(data)
    conn.close()
mode, size = sys.argv[1], int(sys.argv[2])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", int(sys.argv[3])))
server.listen(64)
print("listening", flush=True)
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""
HTTPS_SERVER = """
import http.server, ssl, subprocess
subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "/tmp/k.pem", "-out", "/tmp/c.pem",
    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
    check=True, capture_output=True)
class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = ("hello " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", 8443), Hello)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("/tmp/c.pem", "/tmp/k.pem")
server.socket = context.wrap_socket(server.socket, server_side=True)
print("listening", flush=True)
server.serve_forever()
"""


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def outer(tmp_path: Path, test_images: tuple[str, str]) -> Iterator[OuterCluster]:
    """A double of its own; afterwards none of its containers, volumes or networks remain."""
    with OuterCluster.start(tmp_path / "outer", namespaces=(NS,)) as cluster:
        yield cluster
    assert cluster.leftovers() == []


@pytest.fixture
def core(outer: OuterCluster) -> Iterator[client.CoreV1Api]:
    api_client = outer.admin_client()
    yield client.CoreV1Api(api_client)
    api_client.close()


def pod_manifest(name: str, command: list[str], **spec: Any) -> Any:
    """A pod as a plain mapping (the client accepts these where its signatures say V1Pod)."""
    container = {"name": "main", "image": DIND_IMAGE, "command": command}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [container],
            **spec,
        },
    }


def run_pod(core: client.CoreV1Api, name: str, command: list[str], **spec: Any) -> None:
    """Create a pod and wait until it runs."""
    core.create_namespaced_pod(NS, pod_manifest(name, command, **spec))
    wait_until(lambda: phase(core, name) == "Running", 30, f"pod {name} running")


def run_server(core: client.CoreV1Api, name: str, command: list[str]) -> None:
    """Run a pod whose server prints "listening" once it accepts connections."""
    run_pod(core, name, command)
    wait_until(
        lambda: "listening" in core.read_namespaced_pod_log(name, NS), 30, f"{name} to listen"
    )


def read(core: client.CoreV1Api, name: str) -> Any:
    """A pod as the client returns it (typed Any: every field of its model is optional)."""
    return core.read_namespaced_pod(name, NS)


def phase(core: client.CoreV1Api, name: str) -> str:
    return str(read(core, name).status.phase)


def gone(core: client.CoreV1Api, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, NS)
    except ApiException as exc:
        return bool(exc.status == 404)
    return False


def events(core: client.CoreV1Api, name: str) -> list[tuple[str, str]]:
    found = core.list_namespaced_event(NS, field_selector=f"involvedObject.name={name}").items
    return [(str(e.reason), str(e.message)) for e in found]


def exec_stream(core: client.CoreV1Api, name: str, command: list[str], **kwargs: Any) -> Any:
    return stream(
        core.connect_get_namespaced_pod_exec,
        name,
        NS,
        command=command,
        stdout=True,
        stderr=True,
        tty=False,
        _preload_content=False,
        **kwargs,
    )


def subprotocol(resp: Any) -> str:
    """The negotiated subprotocol, from the response header (all client versions keep it)."""
    return str(resp.sock.getheaders().get("sec-websocket-protocol"))


def close_stream(resp: Any) -> None:
    """Close an exec stream, socket included.

    websocket-client leaves its socket open when the server sent the close frame first (which
    API servers do when the command ends): WSClient.close() then does nothing to it.
    """
    resp.close()
    resp.sock.shutdown()


def close_forwards(*forwards: Any) -> None:
    """Close port-forwards and, once their proxy threads are done, their sockets (as above)."""
    for forward in forwards:
        forward.close()

    def proxies_done() -> bool:
        names = (t.name for t in threading.enumerate())
        return not any(n.startswith("Kubernetes port forward proxy") for n in names)

    wait_until(proxies_done, 30, "the port-forward proxy threads to end")
    for forward in forwards:
        forward.websocket.shutdown()


def run_exec(core: client.CoreV1Api, name: str, command: list[str]) -> tuple[int, str]:
    """Exit code and output of a command (read_all after returncode: it clears the channels)."""
    resp = exec_stream(core, name, command, stdin=False)
    try:
        resp.run_forever(timeout=60)
        code = resp.returncode
        return code, resp.read_all()
    finally:
        close_stream(resp)


def read_frames(resp: Any) -> tuple[bytes, bytes]:
    """Stdout digest and error channel of an exec, frame by frame from the client's WebSocket.

    WSClient.update() appends every frame to a bytes buffer (quadratic for large output:
    about 30 s for 64 MiB here), so large output is read frame by frame from the same socket.
    """
    digest, error = hashlib.sha256(), b""
    while True:
        opcode, frame = resp.sock.recv_data_frame(True)
        if opcode == ABNF.OPCODE_CLOSE:
            return digest.hexdigest().encode(), error
        channel, data = frame.data[:1], frame.data[1:]
        if channel == b"\x01":
            digest.update(data)
        elif channel == b"\x03":
            error += data


# -- exec ----------------------------------------------------------------------------------------
@pytest.mark.docker
def test_exec_moves_64_mib_both_ways_and_reports_exit_codes(core: client.CoreV1Api) -> None:
    run_pod(core, "box", ["sleep", "infinity"])
    payload = os.urandom(BIG)
    expected = hashlib.sha256(payload).hexdigest()

    # stdin: v4 cannot half-close, so the command reads a known length
    resp = exec_stream(core, "box", ["sh", "-c", f"head -c {BIG} > /tmp/data"], stdin=True)
    assert subprotocol(resp) == "v4.channel.k8s.io"
    started = time.monotonic()
    for offset in range(0, BIG, CHUNK):
        resp.write_stdin(payload[offset : offset + CHUNK])
    resp.run_forever(timeout=60)
    close_stream(resp)
    assert resp.returncode == 0
    assert time.monotonic() - started < 20
    assert run_exec(core, "box", ["sha256sum", "/tmp/data"]) == (0, f"{expected}  /tmp/data\n")

    # stdout, binary
    resp = exec_stream(core, "box", ["cat", "/tmp/data"], stdin=False)
    started = time.monotonic()
    digest, error = read_frames(resp)
    close_stream(resp)
    assert digest.decode() == expected
    assert json.loads(error) == {"metadata": {}, "status": "Success"}
    assert time.monotonic() - started < 20

    resp = exec_stream(core, "box", ["sh", "-c", "echo out; echo err >&2; exit 3"], stdin=False)
    resp.run_forever(timeout=30)
    close_stream(resp)
    assert resp.returncode == 3
    assert resp.read_stdout() == "out\n"
    assert resp.read_stderr() == "err\n"

    # smaller output through WSClient's own buffering (binary=True: kubernetes>=30)
    if "binary" not in inspect.signature(WSClient.__init__).parameters:
        return
    resp = exec_stream(core, "box", ["head", "-c", str(4 << 20), "/tmp/data"], binary=True)
    resp.run_forever(timeout=60)
    close_stream(resp)
    assert resp.returncode == 0
    assert resp.read_stdout() == payload[: 4 << 20]


@pytest.mark.docker
def test_exec_status_channel_is_what_a_kubelet_writes(core: client.CoreV1Api) -> None:
    run_pod(core, "box", ["sleep", "infinity"])
    resp = exec_stream(core, "box", ["sh", "-c", "exit 7"], stdin=False)
    resp.run_forever(timeout=30)
    close_stream(resp)
    assert json.loads(resp.read_channel(3)) == {
        "metadata": {},
        "status": "Failure",
        "message": "command terminated with non-zero exit code: error executing command "
        "[sh -c exit 7], exit code 7",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "7"}]},
    }
    # a command that cannot start is an InternalError (returncode cannot parse it: as real)
    resp = exec_stream(core, "box", ["no-such-command"], stdin=False)
    resp.run_forever(timeout=30)
    close_stream(resp)
    assert resp.read_stdout() == ""
    status = json.loads(resp.read_channel(3))
    assert (status["reason"], status["code"]) == ("InternalError", 500)
    assert status["message"].startswith(
        "Internal error occurred: error executing command in container: failed to exec in "
        'container: failed to start exec "'
    )
    assert 'exec: "no-such-command": executable file not found in $PATH' in status["message"]


@pytest.mark.docker
def test_exec_v5_half_closes_stdin_when_the_server_speaks_it(
    outer: OuterCluster, core: client.CoreV1Api
) -> None:
    run_pod(core, "box", ["sleep", "infinity"])
    resp = exec_stream(core, "box", ["sha256sum"], stdin=True)
    assert subprotocol(resp) == "v4.channel.k8s.io"  # the default: an older API server
    close_stream(resp)
    if not hasattr(resp, "close_channel"):
        pytest.skip("this kubernetes client offers only v4.channel.k8s.io (no stdin half-close)")

    outer.set_exec_protocols(["v4.channel.k8s.io", "v5.channel.k8s.io"])
    payload = os.urandom(3 << 20)
    resp = exec_stream(core, "box", ["sha256sum"], stdin=True)
    assert subprotocol(resp) == "v5.channel.k8s.io"
    for offset in range(0, len(payload), CHUNK):
        resp.write_stdin(payload[offset : offset + CHUNK])
    resp.close_channel(0)
    resp.run_forever(timeout=30)
    close_stream(resp)
    assert resp.returncode == 0
    assert resp.read_stdout() == f"{hashlib.sha256(payload).hexdigest()}  -\n"

    # a v5 API server upgrades first and reports a stopped container on the error channel
    core.create_namespaced_pod(NS, pod_manifest("done", ["true"]))
    wait_until(lambda: phase(core, "done") == "Succeeded", 30, "pod done to succeed")
    resp = exec_stream(core, "done", ["true"], stdin=False)
    resp.run_forever(timeout=30)
    close_stream(resp)
    status = json.loads(resp.read_channel(3))
    assert (status["reason"], status["code"]) == ("InternalError", 500)
    assert status["message"] == (
        'Internal error occurred: unable to upgrade connection: container not found ("main")'
    )


@pytest.mark.docker
def test_exec_into_a_pod_that_does_not_run(outer: OuterCluster, core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as missing:
        exec_stream(core, "nobody", ["true"], stdin=False)
    assert "404" in str(missing.value.reason)
    assert 'pods \\"nobody\\" not found' in str(missing.value.reason)

    outer.hold_pending()
    core.create_namespaced_pod(NS, pod_manifest("waiting", ["sleep", "infinity"]))
    with pytest.raises(ApiException) as unscheduled:
        exec_stream(core, "waiting", ["true"], stdin=False)
    assert "400" in str(unscheduled.value.reason)
    assert "pod waiting does not have a host assigned" in str(unscheduled.value.reason)

    core.create_namespaced_pod(NS, pod_manifest("done", ["true"]))
    outer.hold_pending(False)
    wait_until(lambda: phase(core, "done") == "Succeeded", 30, "pod done to succeed")
    with pytest.raises(ApiException) as finished:
        exec_stream(core, "done", ["true"], stdin=False)
    assert "500" in str(finished.value.reason)
    assert str(finished.value.reason).endswith('container not found ("main")')


# -- port-forward ----------------------------------------------------------------------------------
@pytest.mark.docker
def test_port_forward_moves_64_mib_both_ways(core: client.CoreV1Api) -> None:
    run_server(core, "echo", ["python3", "-c", ECHO_SERVER, "echo", "0", "7000"])
    run_server(core, "sink", ["python3", "-c", ECHO_SERVER, "sink", str(BIG), "7001"])
    payload = os.urandom(BIG)
    expected = hashlib.sha256(payload).hexdigest()

    def connect(pod: str, port: int) -> Any:
        forward = portforward(core.connect_get_namespaced_pod_portforward, pod, NS, ports=str(port))
        forward.socket(port).settimeout(30)
        return forward

    forward = connect("sink", 7001)
    sock = forward.socket(7001)
    started = time.monotonic()
    sock.sendall(payload)
    assert sock.recv(64).decode() == expected
    assert time.monotonic() - started < 20
    close_forwards(forward)

    forward = connect("echo", 7000)
    sock = forward.socket(7000)
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    digest, received = hashlib.sha256(), 0
    while received < BIG:
        data = sock.recv(CHUNK)
        assert data, f"the stream ended after {received} bytes"
        digest.update(data)
        received += len(data)
    sender.join()
    assert digest.hexdigest() == expected
    close_forwards(forward)


@pytest.mark.docker
def test_port_forward_to_a_closed_port_says_so_like_a_kubelet(core: client.CoreV1Api) -> None:
    run_pod(core, "box", ["sleep", "infinity"])
    pod = read(core, "box")
    forward = portforward(core.connect_get_namespaced_pod_portforward, "box", NS, ports="6443")
    sock = forward.socket(6443)
    sock.settimeout(10)
    assert sock.recv(10) == b""
    error = forward.error(6443)
    container = pod.status.container_statuses[0].container_id.removeprefix("docker://")
    assert error.startswith(f"error forwarding port 6443 to pod {container}, uid : ")
    assert "dial tcp4 127.0.0.1:6443: connect: connection refused" in error
    close_forwards(forward)


@pytest.mark.docker
def test_twenty_https_requests_through_twenty_port_forwards(core: client.CoreV1Api) -> None:
    run_server(core, "web", ["python3", "-c", HTTPS_SERVER])
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE

    forwards: list[Any] = []

    def get(index: int) -> str:
        forward = portforward(core.connect_get_namespaced_pod_portforward, "web", NS, ports="8443")
        forwards.append(forward)
        raw = socket.socket(fileno=os.dup(forward.socket(8443).fileno()))
        raw.settimeout(30)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(f"GET /{index} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            answer = b""
            while not answer.endswith(f"hello /{index}".encode()):
                data = tls.recv(4096)
                if not data:
                    break
                answer += data
            return answer.decode()

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(get, range(20)))
    assert len(forwards) == 20
    close_forwards(*forwards)
    for index, answer in enumerate(answers):
        assert answer.startswith("HTTP/1.1 200 "), answer
        assert answer.endswith(f"hello /{index}"), answer


# -- faults on demand ----------------------------------------------------------------------------
@pytest.mark.docker
def test_forbidden_on_demand(outer: OuterCluster) -> None:
    token = outer.service_account_token(NS, "runner")
    api_client = outer.admin_client(token=token)
    core = client.CoreV1Api(api_client)
    outer.deny("create", "pods", NS)
    with pytest.raises(ApiException) as denied:
        core.create_namespaced_pod(NS, pod_manifest("nope", ["true"]))
    assert denied.value.status == 403
    assert json.loads(str(denied.value.body)) == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods is forbidden: User "system:serviceaccount:kipik-test:runner" cannot '
        'create resource "pods" in API group "" in the namespace "kipik-test"',
        "reason": "Forbidden",
        "details": {"kind": "pods"},
        "code": 403,
    }
    attributes = client.V1ResourceAttributes(namespace=NS, verb="create", resource="pods")
    review: Any = client.AuthorizationV1Api(api_client).create_self_subject_access_review(
        client.V1SelfSubjectAccessReview(
            spec=client.V1SelfSubjectAccessReviewSpec(resource_attributes=attributes)
        )
    )
    assert review.status.allowed is False
    outer.allow_all()
    core.create_namespaced_pod(NS, pod_manifest("yes", ["true"]))
    core.delete_namespaced_pod("yes", NS, grace_period_seconds=0)
    api_client.close()

    stranger = outer.admin_client(token="not-a-token")
    with pytest.raises(ApiException) as unauthenticated:
        client.CoreV1Api(stranger).list_namespaced_pod(NS)
    stranger.close()
    assert unauthenticated.value.status == 401


@pytest.mark.docker
def test_pending_on_demand(outer: OuterCluster, core: client.CoreV1Api) -> None:
    outer.hold_pending()
    core.create_namespaced_pod(NS, pod_manifest("held", ["sleep", "infinity"]))

    def unschedulable() -> bool:
        conditions = read(core, "held").status.conditions or []
        return any(c.type == "PodScheduled" and c.reason == "Unschedulable" for c in conditions)

    wait_until(unschedulable, 10, "PodScheduled=False Unschedulable")
    pod = read(core, "held")
    assert pod.status.phase == "Pending"
    assert pod.spec.node_name is None
    reasons = wait_until(lambda: events(core, "held"), 10, "a FailedScheduling event")
    assert reasons[0][0] == "FailedScheduling"
    assert reasons[0][1].startswith("0/1 nodes are available: ")
    outer.hold_pending(False)
    wait_until(lambda: phase(core, "held") == "Running", 30, "the held pod to run once released")


@pytest.mark.docker
def test_missing_image_backs_off(core: client.CoreV1Api) -> None:
    manifest = pod_manifest("ghost", ["true"])
    manifest["spec"]["containers"][0]["image"] = "kipik-test/no-such-image:1"
    core.create_namespaced_pod(NS, manifest)

    def waiting_reason() -> str:
        statuses = read(core, "ghost").status.container_statuses or []
        state = statuses[0].state if statuses else None
        return str(state.waiting.reason) if state and state.waiting else ""

    wait_until(lambda: waiting_reason() == "ErrImagePull", 10, "ErrImagePull")
    wait_until(lambda: waiting_reason() == "ImagePullBackOff", 10, "ImagePullBackOff")
    assert phase(core, "ghost") == "Pending"
    messages = [message for _, message in events(core, "ghost")]
    assert any(
        m.startswith('Failed to pull image "kipik-test/no-such-image:1": ') for m in messages
    )
    assert 'Back-off pulling image "kipik-test/no-such-image:1"' in messages


@pytest.mark.docker
def test_pod_security_refuses_privileged_pods(outer: OuterCluster, core: client.CoreV1Api) -> None:
    manifest = pod_manifest(
        "dind",
        ["sleep", "infinity"],
        volumes=[{"name": "modules", "hostPath": {"path": "/lib/modules", "type": "Directory"}}],
    )
    container = manifest["spec"]["containers"][0]
    container["name"] = "dind"
    container["securityContext"] = {"privileged": True}
    container["volumeMounts"] = [{"name": "modules", "mountPath": "/lib/modules", "readOnly": True}]
    outer.label_namespace(NS, {"pod-security.kubernetes.io/enforce": "baseline"})
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_pod(NS, manifest)
    assert refused.value.status == 403
    body = json.loads(str(refused.value.body))
    assert body["reason"] == "Forbidden"
    assert body["message"] == (
        'pods "dind" is forbidden: violates PodSecurity "baseline:latest": hostPath volumes '
        '(volume "modules"), privileged (container "dind" must not set '
        "securityContext.privileged=true)"
    )
    outer.label_namespace(NS, {"pod-security.kubernetes.io/enforce": "privileged"})
    core.create_namespaced_pod(NS, manifest)
    wait_until(lambda: phase(core, "dind") == "Running", 30, "the privileged pod to run")
    assert run_exec(core, "dind", ["ls", "/lib/modules"])[0] == 0


@pytest.mark.docker
def test_invalid_pods_are_refused_like_the_api_server_does(
    outer: OuterCluster, core: client.CoreV1Api
) -> None:
    manifest = pod_manifest("bad", ["true"])
    del manifest["spec"]["containers"][0]["image"]
    with pytest.raises(ApiException) as invalid:
        core.create_namespaced_pod(NS, manifest)
    assert invalid.value.status == 422
    body = json.loads(str(invalid.value.body))
    assert body["message"] == 'Pod "bad" is invalid: spec.containers[0].image: Required value'
    assert body["details"]["causes"] == [
        {
            "reason": "FieldValueRequired",
            "message": "Required value",
            "field": "spec.containers[0].image",
        }
    ]
    manifest = pod_manifest("bad", ["true"])
    manifest["spec"]["containers"][0]["resources"] = {"limits": {"memory": "lots"}}
    with pytest.raises(ApiException) as undecodable:
        core.create_namespaced_pod(NS, manifest)
    assert undecodable.value.status == 400
    manifest = pod_manifest("bad", ["true"])
    manifest["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    with pytest.raises(ApiException) as unsupported:
        core.create_namespaced_pod(NS, manifest)
    assert unsupported.value.status == 422
    # kubernetes>=33 validates bodies itself; kubectl and older clients send unknown fields
    manifest = pod_manifest("bad", ["true"])
    manifest["spec"]["containres"] = []
    with pytest.raises(OuterClusterError) as strict:
        outer.request("POST", f"/api/v1/namespaces/{NS}/pods?fieldValidation=Strict", manifest)
    assert 'strict decoding error: unknown field \\"spec.containres\\"' in str(strict.value)


# -- lifecycle -------------------------------------------------------------------------------------
@pytest.mark.docker
def test_active_deadline_stops_the_pod(outer: OuterCluster, core: client.CoreV1Api) -> None:
    run_pod(core, "brief", ["sleep", "infinity"], activeDeadlineSeconds=2)
    wait_until(lambda: phase(core, "brief") == "Failed", 15, "the deadline to fail the pod")
    assert read(core, "brief").status.reason == "DeadlineExceeded"

    def terminated() -> Any:
        pod = read(core, "brief")
        return pod if pod.status.container_statuses[0].state.terminated else None

    pod = wait_until(terminated, 15, "the container to be stopped")
    assert (
        "DeadlineExceeded",
        "Pod was active on the node longer than the specified deadline",
    ) in (events(core, "brief"))
    container = pod.status.container_statuses[0].container_id.removeprefix("docker://")
    engine = docker.from_env()
    assert engine.api.inspect_container(container)["State"]["Running"] is False
    engine.close()


@pytest.mark.docker
def test_deleting_an_owner_deletes_its_dependant(core: client.CoreV1Api) -> None:
    run_pod(core, "owner", ["sleep", "infinity"])
    owner = read(core, "owner")
    dependant = pod_manifest("dependant", ["sleep", "infinity"])
    dependant["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Pod", "name": "owner", "uid": owner.metadata.uid}
    ]
    core.create_namespaced_pod(NS, dependant)
    wait_until(lambda: phase(core, "dependant") == "Running", 30, "the dependant to run")
    deleted: Any = core.delete_namespaced_pod("owner", NS, propagation_policy="Background")
    assert deleted.metadata.deletion_timestamp is not None
    wait_until(lambda: gone(core, "owner"), 30, "the owner to go")
    wait_until(lambda: gone(core, "dependant"), 30, "the dependant to be collected")


@pytest.mark.docker
def test_in_cluster_config_works_from_a_pod(outer: OuterCluster) -> None:
    script = (
        "import os, kubernetes\n"
        "from kubernetes import client, config\n"
        "config.load_incluster_config()\n"
        "pod = client.CoreV1Api().read_namespaced_pod(os.environ['POD_NAME'], "
        "open('/var/run/secrets/kubernetes.io/serviceaccount/namespace').read())\n"
        "assert pod.status.pod_ip == os.environ['POD_IP'], (pod.status.pod_ip, os.environ)\n"
        "print('in-cluster ok', pod.metadata.name, pod.spec.service_account_name)\n"
    )
    manifest = outer.runner_pod_manifest("runner", ["python3", "-c", script])
    manifest["spec"]["containers"][0]["env"] += [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
    ]
    result = outer.run_pod(manifest, timeout=60)
    assert result.logs == "in-cluster ok runner default\n"
    assert (result.phase, result.exit_code) == ("Succeeded", 0)

    failing = outer.runner_pod_manifest("failing", ["python3", "-c", "raise SystemExit(4)"])
    assert outer.run_pod(failing, timeout=60).exit_code == 4


@pytest.mark.docker
def test_deleting_a_pod_removes_its_container_and_volumes(
    outer: OuterCluster, core: client.CoreV1Api
) -> None:
    run_pod(core, "scratch", ["sleep", "infinity"], volumes=[{"name": "work", "emptyDir": {}}])
    names = outer.leftovers()
    assert any(n.startswith("volume ") for n in names), names
    assert any(n.startswith("container ") for n in names), names
    deleted: Any = core.delete_namespaced_pod("scratch", NS, grace_period_seconds=1)
    assert deleted.metadata.deletion_timestamp is not None
    wait_until(lambda: gone(core, "scratch"), 30, "the pod to go")
    assert outer.leftovers() == [f"network {outer.network}"]


# -- pure parts (no Docker) ------------------------------------------------------------------
def test_validation_texts_match_the_api_server() -> None:
    pod = {"metadata": {"name": "x"}, "spec": {"containers": [{"name": "Bad_Name"}]}}
    errors = podspec.validate_pod(pod)
    assert [str(e) for e in errors][1] == "spec.containers[0].image: Required value"
    assert str(errors[0]).startswith(
        'spec.containers[0].name: Invalid value: "Bad_Name": a lowercase RFC 1123 label must '
    )
    status = podspec.invalid_status("Pod", "x", errors)
    assert status["message"].startswith('Pod "x" is invalid: [spec.containers[0].name: ')
    assert [c["reason"] for c in status["details"]["causes"]] == [
        "FieldValueInvalid",
        "FieldValueRequired",
    ]


def test_decoding_errors_are_go_json_errors() -> None:
    with pytest.raises(podspec.DecodeError) as typed:
        podspec.decode({"spec": {"containers": [{"securityContext": {"privileged": "yes"}}]}})
    assert str(typed.value) == (
        "json: cannot unmarshal string into Go struct field "
        "SecurityContext.spec.containers.securityContext.privileged of type bool"
    )
    with pytest.raises(podspec.DecodeError, match="quantities must match the regular"):
        podspec.decode({"spec": {"volumes": [{"name": "v", "emptyDir": {"sizeLimit": "1X"}}]}})
    assert podspec.decode({"spec": {"nodeName": "n", "oops": 1}}).unknown == ["spec.oops"]
    assert podspec.parse_quantity("1Gi") == 2**30
    assert podspec.parse_quantity("500m") == 0.5
    assert podspec.parse_quantity("1e3") == 1000


def test_restricted_pod_security_lists_checks_in_the_admission_order() -> None:
    spec = {
        "containers": [{"name": "c", "securityContext": {"privileged": True}}],
        "volumes": [{"name": "a", "hostPath": {"path": "/a"}}, {"name": "b", "emptyDir": {}}],
    }
    assert podspec.pod_security_violations("restricted", spec) == [
        'hostPath volumes (volume "a")',
        'privileged (container "c" must not set securityContext.privileged=true)',
        'allowPrivilegeEscalation != false (container "c" must set '
        "securityContext.allowPrivilegeEscalation=false)",
        'unrestricted capabilities (container "c" must set '
        'securityContext.capabilities.drop=["ALL"])',
        'restricted volume types (volume "a" uses restricted volume type "hostPath")',
        'runAsNonRoot != true (pod or container "c" must set securityContext.runAsNonRoot=true)',
        'seccompProfile (pod or container "c" must set securityContext.seccompProfile.type to '
        '"RuntimeDefault" or "Localhost")',
    ]
    assert podspec.pod_security_violations("privileged", spec) == []


def test_image_references_and_variable_expansion() -> None:
    assert normalize_image("busybox") == "docker.io/library/busybox:latest"
    assert normalize_image("kipik-test/dind:dev") == "docker.io/kipik-test/dind:dev"
    assert normalize_image("localhost:5000/x") == "localhost:5000/x:latest"
    assert expand("$(A)-$(B)-$$(A)", {"A": "1"}) == "1-$(B)-$(A)"


def test_websocket_frames_and_channels() -> None:
    assert ws.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert ws.negotiate("v5.channel.k8s.io,v4.channel.k8s.io", [ws.V4]) == ws.V4
    assert ws.negotiate("v5.channel.k8s.io, v4.channel.k8s.io", [ws.V4, ws.V5]) == ws.V5
    assert ws.negotiate("v5.channel.k8s.io", [ws.V4]) is None
    payload = os.urandom(70000)
    frame = ABNF.create_frame(b"\x00" + payload, ABNF.OPCODE_BINARY).format()  # masked
    parser = ws.FrameParser()
    parser.feed(frame[:1000])
    assert parser.messages() == []
    parser.feed(frame[1000:])
    assert parser.messages() == [(ws.OP_BINARY, b"\x00" + payload)]
    pieces: list[tuple[int, bytes]] = []
    demux = ws.DockerStreamDemux(lambda stream, data: pieces.append((stream, data)))
    demux.feed(b"\x01\x00\x00\x00\x00\x00\x00\x02hi\x02\x00\x00")
    demux.feed(b"\x00\x00\x00\x00\x01!")
    assert pieces == [(1, b"hi"), (2, b"!")]
