"""TEST DOUBLE of an outer Kubernetes cluster, for pytest-kipik's pod backend.

`OuterCluster.start(workdir)` runs the double's server (tests/doubles/outer/server.py: a
kube-apiserver and one kubelet backed by the local Docker engine) as a subprocess, waits until it
answers, and hands out what a test needs: a kubeconfig for the test process, admin and
ServiceAccount clients, fault injection (403 denials, unschedulable pods, the exec protocols an
older or newer API server speaks, Pod Security labels) and a leak check. Leaving the context
stops the server and removes everything the double made, also after a failure.

    with OuterCluster.start(tmp_path, namespaces=("kipik-test",)) as outer:
        core = kubernetes.client.CoreV1Api(outer.admin_client())
        ...
    assert outer.leftovers() == []
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import docker.errors
import yaml

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

LABEL = "kipik-test.outer"
REPO = Path(__file__).resolve().parents[3]
DIND_IMAGE = "kipik-test/dind:dev"
START_TIMEOUT = 60.0


class OuterClusterError(Exception):
    """The double could not be started, or a control request failed."""


@dataclass(frozen=True)
class PodResult:
    """How a pod ended: its phase, its container's exit code and its log."""

    phase: str
    exit_code: int | None
    logs: str
    pod: dict[str, Any]


class OuterCluster:
    """A running outer-cluster double (use `OuterCluster.start`)."""

    def __init__(
        self,
        workdir: Path,
        process: subprocess.Popen[bytes],
        ready: dict[str, Any],
        namespaces: Sequence[str],
    ) -> None:
        self.workdir = workdir
        self.process = process
        self.port: int = ready["port"]
        self.inside_port: int = ready["insidePort"]
        #: the Docker network every pod is attached to
        self.network: str = ready["network"]
        #: its gateway address: where pods reach the API server (in-cluster config)
        self.gateway: str = ready["gateway"]
        #: the value of the `kipik-test.outer` label on everything the double made
        self.instance: str = ready["instance"]
        self.node_name: str = ready["nodeName"]
        self.admin_token: str = ready["adminToken"]
        self.ca_path = Path(ready["caPath"])
        self.namespaces = list(namespaces)
        self.namespace = self.namespaces[0] if self.namespaces else "default"
        #: https://127.0.0.1:PORT (for the test process)
        self.server = f"https://127.0.0.1:{self.port}"
        #: https://GATEWAY:PORT (for pods)
        self.in_cluster_server = f"https://{self.gateway}:{self.inside_port}"
        self.log_path = workdir / "server.log"
        self.kubeconfig_path = workdir / "kubeconfig"
        self._write_kubeconfig(
            self.kubeconfig_path, "kubernetes-admin", self.admin_token, self.namespace
        )
        self._ssl = ssl.create_default_context(cafile=str(self.ca_path))
        self._docker = docker.from_env(timeout=60)

    # -- lifecycle --------------------------------------------------------------------------
    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        workdir: Path,
        namespaces: Sequence[str] = ("kipik-test",),
        *,
        timeout: float = START_TIMEOUT,
    ) -> Iterator[OuterCluster]:
        """Start the double in `workdir`; on exit stop it and remove everything it made."""
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(workdir, 0o700)
        instance = secrets.token_hex(4)
        argv = [
            sys.executable,
            "-m",
            "tests.doubles.outer.server",
            "--workdir",
            str(workdir),
            "--instance",
            instance,
        ]
        for namespace in namespaces:
            argv += ["--namespace", namespace]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        output = open(workdir / "server.out", "ab")  # noqa: SIM115 - the child writes to it
        process = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        output.close()
        outer: OuterCluster | None = None
        try:
            ready = _wait_ready(workdir / "ready.json", process, timeout)
            outer = cls(workdir, process, ready, namespaces)
            outer._wait_answering(timeout)
            yield outer
        finally:
            _stop(process, workdir, instance)

    def _wait_answering(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError, OuterClusterError):
                if self.request("GET", "/readyz") == "ok":
                    return
            if time.monotonic() > deadline:
                raise OuterClusterError(
                    f"the outer-cluster double did not answer in {timeout}s; see {self.log_path}"
                )
            time.sleep(0.05)

    # -- requests ---------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        """One HTTPS request to the double (admin token unless told); JSON or text back."""
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ssl, timeout=60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Authorization": f"Bearer {token or self.admin_token}"}
            if data is not None:
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        text = payload.decode(errors="replace")
        if response.status >= 400:
            raise OuterClusterError(f"{method} {path}: {response.status} {text}")
        if response.getheader("Content-Type", "").startswith("application/json"):
            return json.loads(text)
        return text

    def _control(self, what: str, body: dict[str, Any]) -> Any:
        return self.request("POST", f"/_double/{what}", body)

    # -- fault injection --------------------------------------------------------------------
    def deny(
        self, verb: str, resource: str, namespace: str | None = None, user: str | None = None
    ) -> None:
        """Answer matching requests with RBAC's 403 (resource "pods", "pods/exec"...; "*": any)."""
        self._control(
            "deny", {"verb": verb, "resource": resource, "namespace": namespace, "user": user}
        )

    def allow_all(self) -> None:
        """Drop every denial."""
        self._control("allow-all", {})

    def hold_pending(self, hold: bool = True, message: str | None = None) -> None:
        """Keep new and waiting pods unschedulable (PodScheduled=False, FailedScheduling)."""
        self._control("hold-pending", {"hold": hold, "message": message})

    def set_exec_protocols(self, protocols: Sequence[str]) -> None:
        """Exec subprotocols the API server speaks: ["v4.channel.k8s.io"] (default) or with v5."""
        self._control("exec-protocols", {"protocols": list(protocols)})

    def label_namespace(self, namespace: str, labels: Mapping[str, str | None]) -> None:
        """Merge labels into a namespace (None removes one), e.g. Pod Security enforce levels."""
        conn_body = {"metadata": {"labels": dict(labels)}}
        self._patch(f"/api/v1/namespaces/{namespace}", conn_body)

    def _patch(self, path: str, body: Any) -> Any:
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ssl, timeout=60)
        try:
            conn.request(
                "PATCH",
                path,
                body=json.dumps(body).encode(),
                headers={
                    "Authorization": f"Bearer {self.admin_token}",
                    "Content-Type": "application/merge-patch+json",
                },
            )
            response = conn.getresponse()
            payload = response.read().decode()
        finally:
            conn.close()
        if response.status >= 400:
            raise OuterClusterError(f"PATCH {path}: {response.status} {payload}")
        return json.loads(payload)

    # -- identities and clients ----------------------------------------------------------------
    def service_account_token(self, namespace: str, name: str) -> str:
        """The token of a ServiceAccount (created if it does not exist yet)."""
        with contextlib.suppress(OuterClusterError):
            self.request(
                "POST",
                f"/api/v1/namespaces/{namespace}/serviceaccounts",
                {"metadata": {"name": name}},
            )
        return str(self._control("token", {"namespace": namespace, "name": name})["token"])

    def service_account_kubeconfig(self, namespace: str, name: str) -> Path:
        """A kubeconfig (0600) for the test process acting as that ServiceAccount."""
        path = self.workdir / f"kubeconfig-{namespace}-{name}"
        user = f"system:serviceaccount:{namespace}:{name}"
        self._write_kubeconfig(path, user, self.service_account_token(namespace, name), namespace)
        return path

    def _write_kubeconfig(self, path: Path, user: str, token: str, namespace: str) -> None:
        import base64

        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kipik-test-outer",
                    "cluster": {
                        "server": self.server,
                        "certificate-authority-data": base64.b64encode(
                            self.ca_path.read_bytes()
                        ).decode(),
                    },
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "kipik-test-outer",
                    "context": {
                        "cluster": "kipik-test-outer",
                        "user": user,
                        "namespace": namespace,
                    },
                }
            ],
            "current-context": "kipik-test-outer",
            "preferences": {},
        }
        temp = path.with_name(path.name + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(config, handle, sort_keys=False)
        temp.replace(path)

    def admin_client(self, token: str | None = None) -> ApiClient:
        """A kubernetes ApiClient of its own Configuration (admin, or the given token)."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.server
        configuration.ssl_ca_cert = str(self.ca_path)
        configuration.verify_ssl = True
        configuration.api_key = {"authorization": f"Bearer {token or self.admin_token}"}
        return client.ApiClient(configuration)

    # -- pods for in-cluster tests -------------------------------------------------------------
    def runner_pod_manifest(
        self,
        name: str,
        command: Sequence[str],
        *,
        image: str = DIND_IMAGE,
        env: Mapping[str, str] | None = None,
        host_paths: Mapping[str, str] | None = None,
        python_environment: bool = True,
        service_account: str = "default",
        active_deadline_seconds: int | None = None,
    ) -> dict[str, Any]:
        """A pod that runs `command` with this repository and the test's Python packages.

        Both are mounted read-only at the same paths (hostPath volumes) and PYTHONPATH names
        them, so `python3 -m pytest` or `python3 -c "import kubernetes"` works inside it.
        """
        mounts = dict(host_paths or {})
        variables = dict(env or {})
        if python_environment:
            mounts.setdefault(str(REPO), str(REPO))
            paths = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
            for path in paths:
                mounts.setdefault(path, path)
            variables.setdefault("PYTHONPATH", os.pathsep.join([str(REPO), *paths]))
            variables.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        volumes, volume_mounts = [], []
        for index, (host, target) in enumerate(mounts.items()):
            volumes.append(
                {"name": f"host-{index}", "hostPath": {"path": host, "type": "Directory"}}
            )
            volume_mounts.append({"name": f"host-{index}", "mountPath": target, "readOnly": True})
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "serviceAccountName": service_account,
            "automountServiceAccountToken": True,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "runner",
                    "image": image,
                    "command": list(command),
                    "env": [{"name": k, "value": v} for k, v in variables.items()],
                    "volumeMounts": volume_mounts,
                }
            ],
            "volumes": volumes,
        }
        if active_deadline_seconds is not None:
            spec["activeDeadlineSeconds"] = active_deadline_seconds
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}

    def run_pod(
        self, manifest: Mapping[str, Any], namespace: str | None = None, timeout: float = 120.0
    ) -> PodResult:
        """Create a pod through the API, wait until it ends, and return phase, exit code and log."""
        namespace = namespace or self.namespace
        name = manifest["metadata"]["name"]
        self.request("POST", f"/api/v1/namespaces/{namespace}/pods", dict(manifest))
        deadline = time.monotonic() + timeout
        while True:
            pod = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
            phase = pod.get("status", {}).get("phase", "")
            if phase in ("Succeeded", "Failed"):
                break
            if time.monotonic() > deadline:
                logs = ""
                with contextlib.suppress(OuterClusterError):
                    logs = str(
                        self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}/log")
                    )
                raise OuterClusterError(
                    f"pod {namespace}/{name} still {phase} after {timeout}s: "
                    f"{pod.get('status')}\n{logs}"
                )
            time.sleep(0.1)
        logs = str(self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}/log"))
        statuses = pod["status"].get("containerStatuses") or [{}]
        terminated = (statuses[0].get("state") or {}).get("terminated") or {}
        code = terminated.get("exitCode")
        return PodResult(phase, code, logs, pod)

    # -- leak check ---------------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """Containers, volumes and networks of this instance that still exist."""
        return _owned(self._docker, self.instance)


def _owned(client: docker.DockerClient, instance: str) -> list[str]:
    selector: dict[str, str | list[str] | bool] = {"label": f"{LABEL}={instance}"}
    # the low-level list: containers.list() inspects each one and fails on one just removed
    listed = client.api.containers(all=True, filters=selector)
    names = [f"container {c['Names'][0].lstrip('/')}" for c in listed]
    names += [f"volume {v.name}" for v in client.volumes.list(filters=selector)]
    names += [f"network {n.name}" for n in client.networks.list(filters=selector)]
    return sorted(names)


def _wait_ready(path: Path, process: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            output = (path.parent / "server.out").read_text(errors="replace")[-4000:]
            raise OuterClusterError(
                f"the outer-cluster double exited with {process.returncode}:\n{output}"
            )
        if time.monotonic() > deadline:
            raise OuterClusterError(f"the outer-cluster double was not ready after {timeout}s")
        time.sleep(0.05)
    ready: dict[str, Any] = json.loads(path.read_text())
    return ready


def _stop(process: subprocess.Popen[bytes], workdir: Path, instance: str) -> None:
    """Ask the server to clean up and exit; make sure of both whatever happens."""
    if process.poll() is None:
        process.terminate()  # SIGTERM: the server removes what it made, then exits
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    client = docker.from_env(timeout=60)
    try:
        from tests.doubles.outer.server import sweep

        sweep(client, instance, lambda line: None)
    finally:
        client.close()
