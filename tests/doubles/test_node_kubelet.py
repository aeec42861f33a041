"""The node double's kubelet and streaming endpoints against the real engine.

Two node containers (kipik-test/node:dev, privileged, on a network of their own) run the kubelet
double against `fake_node_api.py` (a plain-HTTP stand-in for the API server that serves pods
from a file and routes pods/log and pods/portforward to the node double's `streaming.serve`).
The official client talks to it; the app image is imported with the node's `ctr`, as `kind load`
does. Independent of the API server double's pod support.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.stream import portforward

pytestmark = pytest.mark.docker
NODE_DIR = Path(__file__).resolve().parent / "node"
FAKE_API = Path(__file__).resolve().parent / "fake_node_api.py"
APP_IMAGE = "kipik-test/app:dev"
API_PORT = 8001


def docker(*args: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(["docker", *args], input=stdin, capture_output=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr.decode()}")
    return done.stdout.decode()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


@dataclass
class Node:
    name: str
    ip: str
    state: Path

    def pods(self, pods: list[dict[str, Any]]) -> None:
        (self.state / "pods.json").write_text(json.dumps(pods))

    def status(self, uid: str) -> dict[str, Any]:
        path = self.state / "status" / f"{uid}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def events(self) -> list[dict[str, Any]]:
        path = self.state / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def nodes(
    test_images: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Node]]:
    try:
        docker("image", "inspect", APP_IMAGE)
    except AssertionError:
        pytest.skip(f"{APP_IMAGE} is missing: python3 tests/images/build.py")
    tag = secrets.token_hex(4)
    network = f"kipik-test-kubelet-{tag}"
    docker("network", "create", network)
    made: list[Node] = []
    try:
        archive = docker_save(APP_IMAGE)
        for index in range(2):
            state = tmp_path_factory.mktemp(f"node{index}")
            name = f"kipik-test-kubelet-{tag}-{index}"
            docker(
                "run", "-d", "--privileged", "--name", name, "--hostname", name,
                "--network", network, "-v", f"{NODE_DIR}:/kipik-node:ro",
                "-v", f"{state}:/smoke", "-v", f"{FAKE_API}:/fake_node_api.py:ro",
                test_images[1],
            )  # fmt: skip
            ip = docker(
                "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name
            ).strip()
            made.append(Node(name, ip, state))
            if index == 0:  # the app image is on node 0 only
                docker(
                    "exec", "-i", name, "ctr", "--namespace=k8s.io", "images", "import",
                    "--all-platforms", "--digests", "-", stdin=archive,
                )  # fmt: skip
            (state / "pods.json").write_text("[]")
            config = {"server": f"http://127.0.0.1:{API_PORT}", "node_name": name, "node_ip": ip}
            (state / "kubelet.json").write_text(json.dumps(config))
            docker("exec", "-d", name, "python3", "/fake_node_api.py", str(API_PORT), "/smoke")
            docker(
                "exec", "-d", name, "sh", "-c",
                "python3 /kipik-node/kubelet.py --config /smoke/kubelet.json "
                ">/smoke/kubelet.log 2>&1",
            )  # fmt: skip
        yield made
    finally:
        for node in made:
            subprocess.run(
                ["docker", "rm", "-f", "-v", node.name], capture_output=True, check=False
            )
        subprocess.run(["docker", "network", "rm", network], capture_output=True, check=False)


def docker_save(image: str) -> bytes:
    return subprocess.run(["docker", "save", image], capture_output=True, check=True).stdout


def close_forward(forward: Any) -> None:
    """Close a port-forward, then (its proxy threads done) its socket: see outer/README.md."""
    forward.close()

    def proxies_done() -> bool:
        names = (t.name for t in threading.enumerate())
        return not any(n.startswith("Kubernetes port forward proxy") for n in names)

    wait_for(proxies_done, 30, "the port-forward proxy threads to end")
    forward.websocket.shutdown()


def core(node: Node) -> client.CoreV1Api:
    configuration = client.Configuration()
    configuration.host = f"http://{node.ip}:{API_PORT}"
    return client.CoreV1Api(client.ApiClient(configuration))


def pod(name: str, node: Node, containers: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "default", "uid": f"{name}-{secrets.token_hex(4)}"},
        "spec": {"nodeName": node.name, "containers": containers, **spec},
        "status": {"phase": "Pending", "qosClass": "BestEffort"},
    }


def test_pods_run_are_reached_and_report_like_a_kubelet(nodes: list[Node]) -> None:
    node, other = nodes
    web = pod(
        "web",
        node,
        [
            {
                "name": "app",
                "image": APP_IMAGE,
                "ports": [{"name": "http", "containerPort": 8080}],
                "readinessProbe": {"httpGet": {"port": "http", "path": "/"}, "periodSeconds": 1},
            }
        ],
    )
    crash = pod(
        "crash",
        node,
        [
            {
                "name": "c",
                "image": APP_IMAGE,
                "command": ["sh", "-c", "echo run $(GREETING) $POD; cat /www/index.html; exit 3"],
                "env": [
                    {"name": "WHO", "value": "kubelet"},
                    {"name": "GREETING", "value": "hello-$(WHO)"},
                    {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                ],
            }
        ],
    )
    missing = pod("nopull", node, [{"name": "c", "image": "example.local/missing:v1"}])
    node.pods([web, crash, missing])
    api = core(node)

    ready = wait_for(
        lambda: [
            c
            for c in node.status(web["metadata"]["uid"]).get("conditions", [])
            if c["type"] == "Ready" and c["status"] == "True"
        ],
        30,
        "the web pod to be Ready",
    )
    assert ready
    status = node.status(web["metadata"]["uid"])
    assert status["phase"] == "Running"
    assert status["podIP"] == status["hostIP"] == node.ip
    assert [c["type"] for c in status["conditions"]] == [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
    ]
    app = status["containerStatuses"][0]
    assert app["image"] == "docker.io/kipik-test/app:dev"
    assert app["imageID"].startswith("sha256:")
    assert app["containerID"].startswith("containerd://")
    assert app["ready"] is True
    assert app["started"] is True
    assert set(app["state"]) == {"running"}

    # port-forward, many connections, through the official client
    forward = portforward(
        api.connect_get_namespaced_pod_portforward, "web", "default", ports="8080"
    )
    try:
        sock = forward.socket(8080)
        sock.setblocking(True)
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200 OK")
        assert data.endswith(b"kipik app\n")
    finally:
        close_forward(forward)
    for _ in range(10):  # a session carries one connection per port: one session each
        forward = portforward(
            api.connect_get_namespaced_pod_portforward, "web", "default", ports="8080"
        )
        try:
            sock = forward.socket(8080)
            sock.setblocking(True)
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            assert data.endswith(b"kipik app\n")
        finally:
            close_forward(forward)

    refused = portforward(api.connect_get_namespaced_pod_portforward, "web", "default", ports="9")
    try:
        sock = refused.socket(9)
        sock.settimeout(10)
        assert sock.recv(10) == b""
        sock.close()
        error = refused.error(9)
    finally:
        close_forward(refused)
    assert error.startswith("error forwarding port 9 to pod ")
    assert 'failed to execute portforward in network namespace "host"' in error
    assert "dial tcp4 127.0.0.1:9: connect: connection refused" in error

    # the crash-looping pod: restarted at once, then CrashLoopBackOff with the real message
    crash_uid = crash["metadata"]["uid"]
    looping = wait_for(
        lambda: (
            (node.status(crash_uid).get("containerStatuses") or [{}])[0]
            .get("state", {})
            .get("waiting")
        ),
        30,
        "CrashLoopBackOff",
    )
    assert looping == {
        "reason": "CrashLoopBackOff",
        "message": f"back-off 10s restarting failed container=c pod=crash_default({crash_uid})",
    }
    crashed = node.status(crash_uid)["containerStatuses"][0]
    assert crashed["restartCount"] == 1
    assert crashed["lastState"]["terminated"]["exitCode"] == 3
    assert crashed["lastState"]["terminated"]["reason"] == "Error"
    assert node.status(crash_uid)["phase"] == "Running"
    previous = api.read_namespaced_pod_log("crash", "default", previous=True)
    assert previous == "run hello-kubelet crash\nkipik app\n"
    stamped = api.read_namespaced_pod_log("crash", "default", timestamps=True, tail_lines=1)
    assert stamped.endswith("Z kipik app\n")
    assert api.read_namespaced_pod_log("crash", "default", limit_bytes=3) == "run"
    logs = api.read_namespaced_pod_log("web", "default")
    assert "response:200" in logs
    with pytest.raises(client.ApiException) as denied:
        api.read_namespaced_pod_log("web", "default", previous=True)
    assert denied.value.status == 400
    assert json.loads(str(denied.value.body))["message"] == (
        'previous terminated container "app" in pod "web" not found'
    )

    # an image that was never loaded: ErrImagePull, then ImagePullBackOff, with events
    missing_uid = missing["metadata"]["uid"]
    wait_for(
        lambda: (
            (node.status(missing_uid).get("containerStatuses") or [{}])[0]
            .get("state", {})
            .get("waiting", {})
            .get("reason")
            == "ImagePullBackOff"
        ),
        30,
        "ImagePullBackOff",
    )
    reasons = [
        (e["type"], e["reason"], e["message"])
        for e in node.events()
        if e.get("involvedObject", {}).get("uid") == missing_uid
    ]
    assert ("Normal", "Pulling", 'Pulling image "example.local/missing:v1"') in reasons
    assert ("Warning", "Failed", "Error: ErrImagePull") in reasons
    assert ("Normal", "BackOff", 'Back-off pulling image "example.local/missing:v1"') in reasons
    assert any(
        m.startswith('Failed to pull image "example.local/missing:v1": ') for _, _, m in reasons
    )
    with pytest.raises(client.ApiException) as waiting:
        api.read_namespaced_pod_log("nopull", "default")
    assert json.loads(str(waiting.value.body))["message"] == (
        'container "c" in pod "nopull" is waiting to start: trying and failing to pull image'
    )

    # logs in CRI format, linked from /var/log/containers
    listing = docker("exec", node.name, "sh", "-c", "ls /var/log/containers /var/log/pods")
    assert f"web_default_app-{app['containerID'].removeprefix('containerd://')}.log" in listing
    assert f"default_web_{web['metadata']['uid']}" in listing

    # the other node reaches a NodePort of this node's service
    service = {
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]},
    }
    endpoints = {
        "metadata": {"name": "web", "namespace": "default"},
        "subsets": [{"addresses": [{"ip": node.ip}], "ports": [{"port": 8080}]}],
    }
    for target in nodes:
        (target.state / "services.json").write_text(json.dumps([service]))
        (target.state / "endpoints.json").write_text(json.dumps([endpoints]))
    fetch = (
        "import urllib.request,sys\n"
        "print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')\n"
    )

    def through_node_port() -> str:
        done = subprocess.run(
            [
                "docker",
                "exec",
                other.name,
                "python3",
                "-c",
                fetch,
                f"http://{other.ip}:30080/",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout

    assert wait_for(through_node_port, 20, "the NodePort on the other node") == "kipik app\n"

    # deletion: processes of a pod no longer listed are stopped (SIGTERM; busybox httpd obeys)
    node.pods([crash, missing])
    wait_for(
        lambda: "httpd" not in docker("exec", node.name, "ps", "-eo", "args"),
        20,
        "the web pod's httpd to stop",
    )
    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex((node.ip, 8080)) != 0
