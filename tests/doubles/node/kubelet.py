#!/usr/bin/env python3
"""TEST DOUBLE: the kubelet (and the kube-proxy NodePort part) of the kind node image double.

Started in the background by the kubeadm double after `init` (client certificate
`CN=system:node:NODE, O=system:nodes`) and after `join` (the bootstrap token). Stdlib only.

- Polls its node's pods (`fieldSelector=spec.nodeName=NODE`, every 0.4 s) and runs them: images
  only from the node's store (`imagestore.py`, what `ctr images import` put there), unpacked
  once per image ID; each container gets its own copy of that root filesystem, a private mount
  namespace (volumes, /dev, /proc bind-mounted) and is `chroot`ed into it. Pulls always fail
  (there is no registry): ErrImagePull, then ImagePullBackOff.
- PODS SHARE THE NODE'S NETWORK NAMESPACE (like hostNetwork pods): podIP = hostIP = the node's
  InternalIP; two pods listening on one port of one node collide.
- Init containers, restartPolicy with the kubelet's back-off (10 s doubling, cap 300 s), probes
  (exec, tcpSocket, httpGet), SIGTERM then SIGKILL after terminationGracePeriodSeconds for pods
  no longer listed (or whose uid changed), status through `PATCH pods/NAME/status`, events.
- Container logs in CRI format under /var/log/pods, linked from /var/log/containers.
- A plain node-local endpoint on NODE_IP:10250 that the API server's `streaming.py` uses: one
  JSON request line, one JSON answer line, then raw bytes (a log, or a TCP connection into the
  pod's port).
- kube-proxy: listens on 0.0.0.0:nodePort for NodePort/LoadBalancer Services and relays each
  connection to a ready endpoint (Endpoints maintained by the API server double).

`kubelet.py --config FILE` runs it; `kubelet.py --run-container SPEC_JSON STATUS_FD` is the
container init it execs through (mount namespace, chroot, user, working directory, execve).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import datetime
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

if __package__:
    from . import imagestore
    from . import runtime as rt
else:  # run as /kipik-node/kubelet.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import imagestore  # type: ignore[import-not-found,no-redef]
    import runtime as rt  # type: ignore[import-not-found,no-redef]

JSON = dict[str, Any]

POLL_INTERVAL = 0.4
SERVICE_POLL_INTERVAL = 1.0
KUBELET_PORT = 10250
STATE = Path("/var/lib/kipik-kubelet")
PODS_DIR = Path("/var/lib/kubelet/pods")
POD_LOGS = Path("/var/log/pods")
CONTAINER_LOGS = Path("/var/log/containers")
DEFAULT_GRACE = 30
MS_BIND, MS_REC, MS_PRIVATE, MS_RDONLY, MS_REMOUNT = 0x1000, 0x4000, 1 << 18, 0x1, 0x20
CLONE_NEWNS = 0x00020000
KUBELET_CONDITIONS = ("PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady")

_log_lock = threading.Lock()


def log(message: str) -> None:
    """One line of the kubelet's own log (klog-like prefix), on stdout (the log file)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    with _log_lock:
        print(f"I{now:%m%d %H:%M:%S.%f} {os.getpid():7d} kubelet.py] {message}", flush=True)


def now_epoch() -> float:
    return time.time()


# --- the API client -------------------------------------------------------------------------
class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:300]}")
        self.status = status


class Api:
    """HTTPS to the API server with the node's credentials (one keep-alive connection/thread)."""

    def __init__(self, cfg: JSON) -> None:
        server = str(cfg["server"])
        self.plain = server.startswith("http://")  # only the unit tests' fake API server
        host, _, port = server.split("://", 1)[-1].rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        context = ssl.create_default_context()
        if cfg.get("ca"):
            context.load_verify_locations(cfg["ca"])
            context.check_hostname = False
        else:  # a worker joined with unsafeSkipCAVerification, as kind configures it
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if cfg.get("cert"):
            context.load_cert_chain(cfg["cert"], cfg["key"])
        self.context = context
        self.headers = {"Accept": "application/json"}
        if cfg.get("token"):
            self.headers["Authorization"] = f"Bearer {cfg['token']}"
        self.local = threading.local()

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = content_type
        for attempt in range(2):
            conn: http.client.HTTPConnection | None = getattr(self.local, "conn", None)
            if conn is None:
                if self.plain:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                else:
                    conn = http.client.HTTPSConnection(
                        self.host, self.port, timeout=10, context=self.context
                    )
                self.local.conn = conn
            try:
                conn.request(method, path, body=data, headers=headers)
                response = conn.getresponse()
                text = response.read().decode(errors="replace")
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt:
                    raise
                continue
            if response.status >= 300:
                raise ApiError(response.status, text)
            return json.loads(text) if text.strip() else None
        return None

    def get_or_none(self, path: str) -> Any:
        try:
            return self.request("GET", path)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise


# --- events -------------------------------------------------------------------------------
class Recorder:
    """Events as the kubelet's recorder writes them; repeats bump `count` (the aggregation)."""

    def __init__(self, api: Api, node: str) -> None:
        self.api = api
        self.node = node
        self.seen: dict[tuple[str, str, str, str, str], tuple[str, int]] = {}
        self.lock = threading.Lock()

    def event(self, pod: JSON, kind: str, reason: str, message: str, field_path: str = "") -> None:
        meta = pod["metadata"]
        namespace = meta["namespace"]
        key = (meta["uid"], field_path, kind, reason, message)
        stamp = rt.rfc3339(now_epoch())
        with self.lock:
            known = self.seen.get(key)
        try:
            if known is not None:
                name, count = known
                self.api.request(
                    "PATCH",
                    f"/api/v1/namespaces/{namespace}/events/{name}",
                    {"count": count + 1, "lastTimestamp": stamp},
                    "application/merge-patch+json",
                )
                with self.lock:
                    self.seen[key] = (name, count + 1)
                return
            name = f"{meta['name']}.{secrets.token_hex(8)}"
            involved: JSON = {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": namespace,
                "uid": meta["uid"],
            }
            if meta.get("resourceVersion"):
                involved["resourceVersion"] = meta["resourceVersion"]
            if field_path:
                involved["fieldPath"] = field_path
            body = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": namespace},
                "involvedObject": involved,
                "reason": reason,
                "message": message,
                "source": {"component": "kubelet", "host": self.node},
                "firstTimestamp": stamp,
                "lastTimestamp": stamp,
                "count": 1,
                "type": kind,
                "eventTime": None,
                "reportingComponent": "kubelet",
                "reportingInstance": self.node,
            }
            self.api.request("POST", f"/api/v1/namespaces/{namespace}/events", body)
            with self.lock:
                self.seen[key] = (name, 1)
        except (ApiError, OSError, http.client.HTTPException) as exc:
            log(f"event {reason} for {namespace}/{meta['name']} not recorded: {exc}")


# --- images -----------------------------------------------------------------------------------
class Images:
    """Root filesystems unpacked once per image ID, and per-container copies of them."""

    def __init__(self) -> None:
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()

    def rootfs(self, image: JSON) -> tuple[Path, JSON]:
        """The unpacked root filesystem of a stored image and its config (unpacked if needed)."""
        image_id = str(image["id"])
        hexa = image_id.removeprefix("sha256:")
        with self.lock:
            lock = self.locks.setdefault(image_id, threading.Lock())
        target = STATE / "images" / hexa
        with lock:
            done = target / "config.json"
            if not done.exists():
                archive = imagestore.STORE / f"{hexa}.tar"
                scratch = target.with_name(hexa + ".part")
                shutil.rmtree(scratch, ignore_errors=True)
                config = rt.unpack_image(str(archive), image_id, str(scratch / "rootfs"))
                (scratch / "config.json").write_text(json.dumps(config))
                shutil.rmtree(target, ignore_errors=True)
                scratch.rename(target)
            config = json.loads(done.read_text())
        return target / "rootfs", config

    @staticmethod
    def copy_for(container_id: str, rootfs: Path) -> Path:
        """A container's own copy of its image's root filesystem (test images are tiny)."""
        target = STATE / "containers" / container_id / "rootfs"
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cp", "-a", str(rootfs), str(target)], check=True)
        return target


def pull_error(image: str, normalized: str) -> str:
    """What containerd answers for a pull on a node that reaches no registry."""
    host, repository, reference = rt.registry_host(normalized)
    nameserver = "127.0.0.11"
    with contextlib.suppress(OSError):
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            if line.startswith("nameserver "):
                nameserver = line.split()[1]
                break
    kind = "manifests"
    return (
        f'rpc error: code = Unknown desc = failed to pull and unpack image "{normalized}": '
        f'failed to resolve reference "{normalized}": failed to do request: Head '
        f'"https://{host}/v2/{repository}/{kind}/{reference}": dial tcp: lookup {host} on '
        f"{nameserver}:53: server misbehaving"
    )


# --- container processes -----------------------------------------------------------------------
@dataclass
class Instance:
    """One run of a container (a restart is a new instance)."""

    container_id: str
    log_path: Path
    rootfs: Path
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    readers: list[threading.Thread] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.process is not None and self.exit_code is None


def run_container_process(
    spec: JSON, log_path: Path, log_lock: threading.Lock
) -> tuple[subprocess.Popen[bytes] | None, str, list[threading.Thread]]:
    """Start the container init helper; (process, start error, log reader threads)."""
    read_fd, write_fd = os.pipe()
    try:
        process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--run-container",
                json.dumps(spec),
                str(write_fd),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as status:
        error = status.read().decode(errors="replace")
    readers = []
    log_file = open(log_path, "ab", buffering=0)  # noqa: SIM115 - closed by the last reader
    remaining = [2]

    def pump(stream_name: str, pipe: Any) -> None:
        splitter = rt.CriSplitter(stream_name)
        try:
            while chunk := pipe.read1(1 << 16):
                entries = splitter.feed(chunk)
                write(stream_name, entries)
        except (OSError, ValueError):
            pass
        write(stream_name, splitter.close())
        with log_lock:
            remaining[0] -= 1
            if remaining[0] == 0:
                log_file.close()

    def write(stream_name: str, entries: list[tuple[str, bytes]]) -> None:
        if not entries:
            return
        stamp = time.time_ns()
        data = b"".join(rt.cri_entry(stamp, stream_name, tag, text) for tag, text in entries)
        with log_lock:
            log_file.write(data)

    for stream_name, pipe in (("stdout", process.stdout), ("stderr", process.stderr)):
        thread = threading.Thread(target=pump, args=(stream_name, pipe), daemon=True)
        thread.start()
        readers.append(thread)
    if error:
        process.wait()
        return None, error, readers
    return process, "", readers


_libc: Any = None


def _mount(source: str | None, target: str, fstype: str | None, flags: int) -> None:
    global _libc  # noqa: PLW0603
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)

    def encode(text: str | None) -> bytes | None:
        return None if text is None else text.encode()

    if _libc.mount(encode(source), target.encode(), encode(fstype), flags, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def container_init(spec: JSON, status_fd: int) -> None:
    """In the helper process: set up the mount namespace, chroot, user, cwd; exec the command.

    Failures before the exec are written to `status_fd` (closed on exec, so an empty read in the
    kubelet means the command runs), in runc's words.
    """
    os.set_inheritable(status_fd, False)
    root = spec["rootfs"]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0:
            raise OSError(ctypes.get_errno(), "unshare")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        for source, target_path, read_only in spec["mounts"]:
            target = rt.resolve_in_root(root, target_path)
            if os.path.isdir(source):
                os.makedirs(target, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if not os.path.exists(target):
                    Path(target).touch()
            _mount(source, target, None, MS_BIND | MS_REC)
            if read_only:
                _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC)
        proc = rt.resolve_in_root(root, "/proc")
        os.makedirs(proc, exist_ok=True)
        _mount("proc", proc, "proc", 0)
        os.chroot(root)
        workdir = spec["workingDir"] or "/"
        os.makedirs(workdir, exist_ok=True)
        os.chdir(workdir)
        env = dict(spec["env"])
        if spec.get("gid") is not None:
            os.setgroups([int(spec["gid"])])
            os.setgid(int(spec["gid"]))
        if spec.get("uid") is not None:
            os.setuid(int(spec["uid"]))
        argv = spec["argv"]
        if not argv:
            raise RuntimeError("no command specified")
        program = argv[0]
        if "/" not in program:
            for folder in env.get("PATH", rt.DEFAULT_PATH).split(":"):
                candidate = os.path.join(folder or ".", program)
                if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
                    program = candidate
                    break
            else:
                raise RuntimeError(f'exec: "{argv[0]}": executable file not found in $PATH')
        elif not os.path.exists(program):
            raise RuntimeError(
                f"exec: {program!r}: stat {program}: no such file or directory".replace("'", '"')
            )
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.execve(program, argv, env)
    except (OSError, RuntimeError) as exc:
        text = str(exc) if isinstance(exc, RuntimeError) else f"{exc.strerror or exc}"
        message = (
            "failed to create containerd task: failed to create shim task: OCI runtime create "
            "failed: runc create failed: unable to start container process: error during "
            f"container init: {text}: unknown"
        )
        os.write(status_fd, message.encode())
        os._exit(128)


# --- pods -------------------------------------------------------------------------------------
def format_pod(pod: JSON) -> str:
    meta = pod["metadata"]
    return f"{meta['name']}_{meta['namespace']}({meta['uid']})"


def field_path(kind: str, name: str) -> str:
    return f"spec.{kind}{{{name}}}"


class CreateConfigError(Exception):
    """CreateContainerConfigError: a referenced ConfigMap/Secret key is missing."""


class MountError(Exception):
    """A volume cannot be set up yet (FailedMount)."""


@dataclass
class ContainerState:
    """What the kubelet knows of one container of a pod."""

    name: str
    spec: JSON
    init: bool
    instances: list[Instance] = field(default_factory=list)
    restart_count: int = 0
    waiting: JSON | None = None  # {"reason": ..., "message": ...}
    ready: bool = False
    started: bool = False
    image_ref: str = ""  # normalized name of the image it runs
    image_id: str = ""
    probe_results: dict[str, bool | None] = field(default_factory=dict)
    probe_failures: dict[str, int] = field(default_factory=dict)
    probe_successes: dict[str, int] = field(default_factory=dict)
    probe_due: dict[str, float] = field(default_factory=dict)
    probe_busy: set[str] = field(default_factory=set)
    pull_error: str = ""

    @property
    def current(self) -> Instance | None:
        return self.instances[-1] if self.instances else None

    @property
    def running(self) -> bool:
        current = self.current
        return current is not None and current.running

    @property
    def succeeded(self) -> bool:
        current = self.current
        return current is not None and current.exit_code == 0 and not self.waiting


class PodWorker:
    """Runs one pod (one uid) until it is no longer listed."""

    def __init__(self, kubelet: Kubelet, pod: JSON) -> None:
        self.kubelet = kubelet
        self.pod = pod
        self.uid = str(pod["metadata"]["uid"])
        self.sandbox_id = secrets.token_hex(32)
        spec = pod["spec"]
        self.init = [ContainerState(c["name"], c, True) for c in spec.get("initContainers") or []]
        self.apps = [ContainerState(c["name"], c, False) for c in spec.get("containers") or []]
        self.lock = threading.RLock()
        self.log_lock = threading.Lock()
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.started_at = now_epoch()
        self.volumes_ready = False
        self.mounts: dict[str, str] = {}  # volume name -> host path
        self.last_status: JSON | None = None
        self.transitions: dict[str, tuple[str, str]] = {}
        self.thread = threading.Thread(target=self.run, name=f"pod {self.uid}", daemon=True)
        meta = pod["metadata"]
        self.log_dir = POD_LOGS / f"{meta['namespace']}_{meta['name']}_{self.uid}"

    # -- helpers -------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    def event(self, kind: str, reason: str, message: str, state: ContainerState | None) -> None:
        path = ""
        if state is not None:
            path = field_path("initContainers" if state.init else "containers", state.name)
        self.kubelet.recorder.event(self.pod, kind, reason, message, path)

    def all_containers(self) -> list[ContainerState]:
        return self.init + self.apps

    def container(self, name: str) -> ContainerState | None:
        return next((c for c in self.all_containers() if c.name == name), None)

    def restart_policy(self) -> str:
        return str(self.pod["spec"].get("restartPolicy") or "Always")

    # -- main loop -----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.push_status()
            while not self.stop.is_set():
                try:
                    self.sync()
                except Exception:
                    log(f"sync of pod {format_pod(self.pod)} failed:\n{traceback.format_exc()}")
                self.push_status()
                self.wake.wait(0.25)
                self.wake.clear()
        finally:
            self.push_status_quietly()

    def sync(self) -> None:
        if not self.volumes_ready:
            try:
                self.setup_volumes()
            except MountError as exc:
                self.event("Warning", "FailedMount", str(exc), None)
                self.stop.wait(2.0)
                return
            self.volumes_ready = True
        self.reap()
        self.run_probes()
        policy = self.restart_policy()
        for state in self.init:
            if state.succeeded:
                continue
            if state.running:
                return
            current = state.current
            if current is not None and current.exit_code not in (None, 0) and policy == "Never":
                return  # the pod failed
            self.ensure_started(state, restart_failed=True)
            return
        for state in self.apps:
            if state.running:
                continue
            current = state.current
            if current is not None and current.exit_code is not None:
                failed = current.exit_code != 0
                if policy == "Never" or (policy == "OnFailure" and not failed):
                    continue
            self.ensure_started(state, restart_failed=True)

    def reap(self) -> None:
        for state in self.all_containers():
            current = state.current
            if current is None or current.process is None or current.exit_code is not None:
                continue
            code = current.process.poll()
            if code is None:
                continue
            for reader in current.readers:
                reader.join(timeout=2)
            current.exit_code = 128 - code if code < 0 else code
            current.finished_at = now_epoch()
            current.reason = "Completed" if current.exit_code == 0 else "Error"
            state.ready = False
            state.started = False
            state.probe_results.clear()
            log(f"container {state.name} of {format_pod(self.pod)} exited with {current.exit_code}")

    # -- starting containers --------------------------------------------------------------------
    def ensure_started(self, state: ContainerState, restart_failed: bool) -> None:
        now = now_epoch()
        kubelet = self.kubelet
        key = f"{self.uid}/{state.name}"
        current = state.current
        if current is not None and current.exit_code is not None:
            if kubelet.restart_backoff.in_backoff_since(key, current.finished_at, now):
                delay = rt.go_duration(kubelet.restart_backoff.get(key))
                message = (
                    f"back-off {delay} restarting failed container={state.name} "
                    f"pod={format_pod(self.pod)}"
                )
                if not state.waiting or state.waiting.get("reason") != "CrashLoopBackOff":
                    self.event(
                        "Warning",
                        "BackOff",
                        f"Back-off restarting failed container {state.name} in pod "
                        f"{format_pod(self.pod)}",
                        state,
                    )
                state.waiting = {"reason": "CrashLoopBackOff", "message": message}
                return
            kubelet.restart_backoff.next(key, now)
        image = self.ensure_image(state)
        if image is None:
            return
        try:
            env = self.environment(state)
        except CreateConfigError as exc:
            state.waiting = {"reason": "CreateContainerConfigError", "message": str(exc)}
            self.event("Warning", "Failed", f"Error: {exc}", state)
            return
        self.start(state, image, env)

    def ensure_image(self, state: ContainerState) -> JSON | None:
        spec_image = str(state.spec.get("image") or "")
        policy = str(state.spec.get("imagePullPolicy") or rt.default_pull_policy(spec_image))
        normalized = imagestore.normalize(spec_image)
        found = imagestore.find(spec_image)
        kubelet = self.kubelet
        key = f"pull/{self.uid}/{state.name}/{spec_image}"
        if found is not None and policy != "Always":
            if state.image_id != found["id"]:
                self.event(
                    "Normal",
                    "Pulled",
                    f'Container image "{spec_image}" already present on machine and can be '
                    "accessed by the pod",
                    state,
                )
            state.image_ref = normalized
            state.image_id = str(found["id"])
            return found
        if policy == "Never":
            message = f'Container image "{spec_image}" is not present with pull policy of Never'
            if not state.waiting or state.waiting.get("reason") != "ErrImageNeverPull":
                self.event("Warning", "ErrImageNeverPull", message, state)
                self.event("Warning", "Failed", "Error: ErrImageNeverPull", state)
            state.waiting = {"reason": "ErrImageNeverPull", "message": message}
            return None
        now = now_epoch()
        if state.pull_error and kubelet.pull_backoff.in_backoff_since(key, now, now):
            message = f'Back-off pulling image "{spec_image}": ErrImagePull: {state.pull_error}'
            if not state.waiting or state.waiting.get("reason") != "ImagePullBackOff":
                self.event("Normal", "BackOff", f'Back-off pulling image "{spec_image}"', state)
                self.event("Warning", "Failed", "Error: ImagePullBackOff", state)
            state.waiting = {"reason": "ImagePullBackOff", "message": message}
            return None
        kubelet.pull_backoff.next(key, now)
        self.event("Normal", "Pulling", f'Pulling image "{spec_image}"', state)
        error = pull_error(spec_image, normalized)
        state.pull_error = error
        self.event("Warning", "Failed", f'Failed to pull image "{spec_image}": {error}', state)
        self.event("Warning", "Failed", "Error: ErrImagePull", state)
        state.waiting = {"reason": "ErrImagePull", "message": error}
        return None

    def field_value(self, path: str) -> str:
        meta = self.pod["metadata"]
        node_ip = self.kubelet.node_ip
        simple = {
            "metadata.name": meta.get("name", ""),
            "metadata.namespace": meta.get("namespace", ""),
            "metadata.uid": meta.get("uid", ""),
            "spec.nodeName": self.kubelet.node,
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", ""),
            "status.hostIP": node_ip,
            "status.hostIPs": node_ip,
            "status.podIP": node_ip,
            "status.podIPs": node_ip,
        }
        if path in simple:
            return str(simple[path])
        for prefix, values in (
            ("metadata.labels", meta.get("labels") or {}),
            ("metadata.annotations", meta.get("annotations") or {}),
        ):
            if path == prefix:
                return "\n".join(f'{k}="{v}"' for k, v in sorted(values.items()))
            if path.startswith(prefix + "['") and path.endswith("']"):
                return str(values.get(path[len(prefix) + 2 : -2], ""))
        return ""

    def lookup(self, resource: str, name: str) -> JSON | None:
        return self.kubelet.api.get_or_none(  # type: ignore[no-any-return]
            f"/api/v1/namespaces/{self.namespace}/{resource}/{quote(name)}"
        )

    def key_ref(self, resource: str, ref: JSON) -> str | None:
        kind = "configmap" if resource == "configmaps" else "secret"
        obj = self.lookup(resource, str(ref.get("name", "")))
        optional = bool(ref.get("optional"))
        if obj is None:
            if optional:
                return None
            raise CreateConfigError(f'{kind} "{ref.get("name", "")}" not found')
        key = str(ref.get("key", ""))
        data = obj.get("data") or {}
        if key not in data and resource == "configmaps" and key in (obj.get("binaryData") or {}):
            data = obj["binaryData"]
        if key not in data:
            if optional:
                return None
            raise CreateConfigError(
                f"couldn't find key {key} in {'ConfigMap' if kind == 'configmap' else 'Secret'} "
                f"{self.namespace}/{ref.get('name', '')}"
            )
        value = str(data[key])
        return base64.b64decode(value).decode(errors="replace") if kind == "secret" else value

    def environment(self, state: ContainerState) -> dict[str, str]:
        """The container's environment: image env, Kubernetes service vars, envFrom, env."""
        env: dict[str, str] = {}
        service_vars = {
            "KUBERNETES_SERVICE_HOST": self.kubelet.service_host,
            "KUBERNETES_SERVICE_PORT": "443",
            "KUBERNETES_SERVICE_PORT_HTTPS": "443",
            "KUBERNETES_PORT": f"tcp://{self.kubelet.service_host}:443",
            "KUBERNETES_PORT_443_TCP": f"tcp://{self.kubelet.service_host}:443",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            "KUBERNETES_PORT_443_TCP_PORT": "443",
            "KUBERNETES_PORT_443_TCP_ADDR": self.kubelet.service_host,
        }
        env.update(service_vars)
        for source in state.spec.get("envFrom") or []:
            prefix = str(source.get("prefix") or "")
            for resource, ref_key in (("configmaps", "configMapRef"), ("secrets", "secretRef")):
                ref = source.get(ref_key)
                if ref is None:
                    continue
                obj = self.lookup(resource, str(ref.get("name", "")))
                if obj is None:
                    if ref.get("optional"):
                        continue
                    kind = "configmap" if resource == "configmaps" else "secret"
                    raise CreateConfigError(f'{kind} "{ref.get("name", "")}" not found')
                for key, value in (obj.get("data") or {}).items():
                    text = (
                        base64.b64decode(value).decode(errors="replace")
                        if resource == "secrets"
                        else str(value)
                    )
                    env[prefix + key] = text
        for item in state.spec.get("env") or []:
            name = str(item["name"])
            if "value" in item:
                env[name] = rt.expand(str(item.get("value") or ""), env)
                continue
            value_from = item.get("valueFrom") or {}
            found: str | None = ""
            if "fieldRef" in value_from:
                found = self.field_value(str(value_from["fieldRef"].get("fieldPath", "")))
            elif "configMapKeyRef" in value_from:
                found = self.key_ref("configmaps", value_from["configMapKeyRef"])
            elif "secretKeyRef" in value_from:
                found = self.key_ref("secrets", value_from["secretKeyRef"])
            elif "resourceFieldRef" in value_from:
                found = "0"
            if found is not None:
                env[name] = found
        return env

    def start(self, state: ContainerState, image: JSON, env: dict[str, str]) -> None:
        rootfs, config = self.kubelet.images.rootfs(image)
        image_config = config.get("config") or {}
        merged: dict[str, str] = {}
        for entry in image_config.get("Env") or []:
            key, _, value = str(entry).partition("=")
            merged[key] = value
        merged.setdefault("PATH", rt.DEFAULT_PATH)
        merged["HOSTNAME"] = self.kubelet.node
        merged.update(env)
        command = state.spec.get("command")
        args = state.spec.get("args")
        entrypoint = [str(a) for a in image_config.get("Entrypoint") or []]
        cmd = [str(a) for a in image_config.get("Cmd") or []]
        if command:
            argv = [rt.expand(str(a), env) for a in command]
            argv += [rt.expand(str(a), env) for a in args or []]
        elif args:
            argv = entrypoint + [rt.expand(str(a), env) for a in args]
        else:
            argv = entrypoint + cmd
        container_id = secrets.token_hex(32)
        own_root = self.kubelet.images.copy_for(container_id, rootfs)
        for name in ("resolv.conf", "hosts", "hostname"):
            source = Path("/etc") / name
            target = Path(rt.resolve_in_root(str(own_root), f"/etc/{name}"))
            with contextlib.suppress(OSError):
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.is_symlink():
                    target.unlink()
                shutil.copyfile(source, target)
        mounts: list[tuple[str, str, bool]] = [("/dev", "/dev", False)]
        for mount in state.spec.get("volumeMounts") or []:
            volume = self.mounts.get(str(mount.get("name")))
            if volume is None:
                continue
            if mount.get("subPath"):
                volume = os.path.join(volume, str(mount["subPath"]))
                if not os.path.exists(volume):
                    os.makedirs(volume, exist_ok=True)
            mounts.append((volume, str(mount["mountPath"]), bool(mount.get("readOnly"))))
        security = state.spec.get("securityContext") or {}
        pod_security = self.pod["spec"].get("securityContext") or {}
        uid = security.get("runAsUser", pod_security.get("runAsUser"))
        gid = security.get("runAsGroup", pod_security.get("runAsGroup"))
        if uid is None and image_config.get("User"):
            user = str(image_config["User"])
            if user.split(":", maxsplit=1)[0].isdigit():
                uid = int(user.split(":", maxsplit=1)[0])
        workdir = str(state.spec.get("workingDir") or image_config.get("WorkingDir") or "/")
        restart = state.restart_count + (1 if state.instances else 0)
        log_dir = self.log_dir / state.name
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{restart}.log"
        log_path.write_bytes(b"")
        CONTAINER_LOGS.mkdir(parents=True, exist_ok=True)
        link = CONTAINER_LOGS / f"{self.name}_{self.namespace}_{state.name}-{container_id}.log"
        with contextlib.suppress(OSError):
            link.symlink_to(log_path)
        spec = {
            "rootfs": str(own_root),
            "mounts": mounts,
            "env": merged,
            "argv": argv,
            "workingDir": workdir,
            "uid": uid,
            "gid": gid,
        }
        instance = Instance(container_id, log_path, own_root)
        instance.started_at = now_epoch()
        self.event("Normal", "Created", "Container created", state)
        process, error, readers = run_container_process(spec, log_path, self.log_lock)
        instance.readers = readers
        instance.process = process
        state.restart_count = restart
        if process is None:
            instance.exit_code = 128
            instance.finished_at = now_epoch()
            instance.reason = "StartError"
            instance.message = error
            state.instances.append(instance)
            state.waiting = None
            self.event("Warning", "Failed", f"Error: {error}", state)
            return
        state.instances.append(instance)
        state.waiting = None
        state.started = "startupProbe" not in state.spec
        state.ready = state.started and "readinessProbe" not in state.spec
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = state.spec.get(kind)
            if probe:
                state.probe_due[kind] = instance.started_at + float(
                    probe.get("initialDelaySeconds") or 0
                )
        state.probe_failures.clear()
        state.probe_successes.clear()
        self.event("Normal", "Started", "Container started", state)
        log(f"started container {state.name} ({container_id[:12]}) of {format_pod(self.pod)}")

    # -- volumes -------------------------------------------------------------------------------
    def setup_volumes(self) -> None:
        base = PODS_DIR / self.uid / "volumes"
        for volume in self.pod["spec"].get("volumes") or []:
            name = str(volume["name"])
            if name in self.mounts:
                continue
            if "emptyDir" in volume:
                path = base / "kubernetes.io~empty-dir" / name
                path.mkdir(parents=True, exist_ok=True)
                path.chmod(0o777)
            elif "hostPath" in volume:
                host = str(volume["hostPath"].get("path", ""))
                kind = str(volume["hostPath"].get("type") or "")
                if kind == "DirectoryOrCreate":
                    os.makedirs(host, exist_ok=True)
                elif kind == "FileOrCreate" and not os.path.exists(host):
                    Path(host).touch()
                elif kind and not os.path.exists(host):
                    raise MountError(
                        f'MountVolume.SetUp failed for volume "{name}" : hostPath type check '
                        f"failed: {host} is not a {kind.lower()}"
                    )
                self.mounts[name] = host
                continue
            elif "configMap" in volume or "secret" in volume or "projected" in volume:
                plugin = (
                    "configmap"
                    if "configMap" in volume
                    else ("secret" if "secret" in volume else "projected")
                )
                path = base / f"kubernetes.io~{plugin}" / name
                files = self.volume_files(name, volume)
                path.mkdir(parents=True, exist_ok=True)
                for relative, (content, mode) in files.items():
                    target = path / relative
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(content)
                    target.chmod(mode)
            elif "downwardAPI" in volume:
                path = base / "kubernetes.io~downward-api" / name
                path.mkdir(parents=True, exist_ok=True)
                for item in volume["downwardAPI"].get("items") or []:
                    ref = item.get("fieldRef") or {}
                    target = path / str(item["path"])
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(self.field_value(str(ref.get("fieldPath", ""))))
            else:
                path = base / "kubernetes.io~unsupported" / name
                path.mkdir(parents=True, exist_ok=True)
            self.mounts[name] = str(path)

    def volume_files(self, name: str, volume: JSON) -> dict[str, tuple[bytes, int]]:
        files: dict[str, tuple[bytes, int]] = {}
        sources: list[tuple[str, JSON]] = []
        if "configMap" in volume:
            sources.append(("configMap", volume["configMap"]))
        elif "secret" in volume:
            sources.append(("secret", volume["secret"]))
        else:
            for source in volume["projected"].get("sources") or []:
                sources.extend((kind, value) for kind, value in source.items())
        default_mode = int(
            (volume.get("configMap") or volume.get("secret") or volume.get("projected") or {}).get(
                "defaultMode"
            )
            or 0o644
        )
        for kind, source in sources:
            if kind == "serviceAccountToken":
                path = str(source.get("path") or "token")
                files[path] = (b"kipik-node-double-has-no-service-account-tokens", default_mode)
                continue
            if kind == "downwardAPI":
                for item in source.get("items") or []:
                    ref = item.get("fieldRef") or {}
                    value = self.field_value(str(ref.get("fieldPath", "")))
                    files[str(item["path"])] = (value.encode(), default_mode)
                continue
            resource = "configmaps" if kind == "configMap" else "secrets"
            object_name = str(source.get("name") or source.get("secretName") or "")
            obj = self.lookup(resource, object_name)
            if obj is None:
                if source.get("optional"):
                    continue
                word = "configmap" if resource == "configmaps" else "secret"
                raise MountError(
                    f'MountVolume.SetUp failed for volume "{name}" : {word} "{object_name}" '
                    "not found"
                )
            data: dict[str, bytes] = {}
            for key, value in (obj.get("data") or {}).items():
                data[key] = base64.b64decode(value) if kind == "secret" else str(value).encode()
            for key, value in (obj.get("binaryData") or {}).items():
                data[key] = base64.b64decode(value)
            items = source.get("items")
            if items:
                for item in items:
                    key = str(item["key"])
                    if key not in data:
                        if source.get("optional"):
                            continue
                        raise MountError(
                            f'MountVolume.SetUp failed for volume "{name}" : configmap references '
                            f"non-existent config key: {key}"
                        )
                    files[str(item["path"])] = (data[key], int(item.get("mode") or default_mode))
            else:
                for key, content in data.items():
                    files[key] = (content, default_mode)
        return files

    # -- probes --------------------------------------------------------------------------------
    def run_probes(self) -> None:
        now = now_epoch()
        for state in self.all_containers():
            if not state.running:
                continue
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = state.spec.get(kind)
                if not probe or kind in state.probe_busy:
                    continue
                if kind != "startupProbe" and not state.started:
                    continue
                if kind == "startupProbe" and state.started:
                    continue
                if now < state.probe_due.get(kind, 0.0):
                    continue
                state.probe_due[kind] = now + float(probe.get("periodSeconds") or 10)
                state.probe_busy.add(kind)
                threading.Thread(
                    target=self.probe_once, args=(state, kind, probe), daemon=True
                ).start()

    def probe_once(self, state: ContainerState, kind: str, probe: JSON) -> None:
        instance = state.current
        try:
            ok, output = self.check(state, probe)
        finally:
            state.probe_busy.discard(kind)
        with self.lock:
            if instance is not state.current or not state.running:
                return
            word = {"startupProbe": "Startup", "livenessProbe": "Liveness"}.get(kind, "Readiness")
            if ok:
                state.probe_failures[kind] = 0
                state.probe_successes[kind] = state.probe_successes.get(kind, 0) + 1
                if state.probe_successes[kind] >= int(probe.get("successThreshold") or 1):
                    if kind == "startupProbe":
                        state.started = True
                        state.ready = "readinessProbe" not in state.spec
                    elif kind == "readinessProbe":
                        state.ready = True
            else:
                state.probe_successes[kind] = 0
                state.probe_failures[kind] = state.probe_failures.get(kind, 0) + 1
                self.event("Warning", "Unhealthy", f"{word} probe failed: {output}", state)
                if state.probe_failures[kind] >= int(probe.get("failureThreshold") or 3):
                    if kind == "readinessProbe":
                        state.ready = False
                    else:
                        self.event(
                            "Normal",
                            "Killing",
                            f"Container {state.name} failed {word.lower()} probe, will be "
                            "restarted",
                            state,
                        )
                        threading.Thread(
                            target=self.kill_instance, args=(instance, self.grace()), daemon=True
                        ).start()
        self.wake.set()

    def check(self, state: ContainerState, probe: JSON) -> tuple[bool, str]:
        timeout = float(probe.get("timeoutSeconds") or 1)
        ip = self.kubelet.node_ip
        if "exec" in probe:
            command = [str(a) for a in probe["exec"].get("command") or []]
            return self.exec_probe(state, command, timeout)
        if "tcpSocket" in probe:
            port = self.resolve_port(state, probe["tcpSocket"].get("port"))
            host = str(probe["tcpSocket"].get("host") or ip)
            try:
                with socket.create_connection((host, port), timeout=timeout):
                    return True, ""
            except OSError as exc:
                return False, f"dial tcp {host}:{port}: {go_error(exc)}"
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = self.resolve_port(state, get.get("port"))
            host = str(get.get("host") or ip)
            scheme = str(get.get("scheme") or "HTTP").lower()
            path = str(get.get("path") or "/")
            url = f"{scheme}://{host}:{port}{path}"
            conn: http.client.HTTPConnection
            if scheme == "https":
                context = ssl._create_unverified_context()
                conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            try:
                headers = {"User-Agent": "kube-probe/1.36", "Accept": "*/*"}
                for header in get.get("httpHeaders") or []:
                    headers[str(header["name"])] = str(header["value"])
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                response.read(10240)
                if 200 <= response.status < 400:
                    return True, ""
                return False, f"HTTP probe failed with statuscode: {response.status}"
            except OSError as exc:
                return False, f'Get "{url}": dial tcp {host}:{port}: {go_error(exc)}'
            finally:
                conn.close()
        return True, ""

    def resolve_port(self, state: ContainerState, port: Any) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for declared in state.spec.get("ports") or []:
            if declared.get("name") == port:
                return int(declared["containerPort"])
        return 0

    def exec_probe(
        self, state: ContainerState, command: list[str], timeout: float
    ) -> tuple[bool, str]:
        current = state.current
        if current is None:
            return False, ""
        spec = {
            "rootfs": str(current.rootfs),
            "mounts": [("/dev", "/dev", False)],
            "env": {"PATH": rt.DEFAULT_PATH},
            "argv": command,
            "workingDir": "/",
            "uid": None,
            "gid": None,
        }
        read_fd, write_fd = os.pipe()
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--run-container",
                    json.dumps(spec),
                    str(write_fd),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, "rb") as status:
            error = status.read().decode(errors="replace")
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return False, f"command {json.dumps(command)} timed out"
        if error:
            return False, error
        return process.returncode == 0, output.decode(errors="replace")

    # -- stopping --------------------------------------------------------------------------------
    def grace(self) -> float:
        value = self.pod["spec"].get("terminationGracePeriodSeconds")
        return float(DEFAULT_GRACE if value is None else value)

    @staticmethod
    def kill_instance(instance: Instance | None, grace: float) -> None:
        if instance is None or instance.process is None or instance.exit_code is not None:
            return
        pid = instance.process.pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            instance.process.wait(timeout=max(grace, 0.0) or 0.01)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            instance.process.wait(timeout=10)

    def terminate(self, grace: float | None = None) -> None:
        """Stop every container (SIGTERM, then SIGKILL after the grace period), then clean up."""
        self.stop.set()
        self.wake.set()
        period = self.grace() if grace is None else grace
        threads = [
            threading.Thread(target=self.kill_instance, args=(s.current, period), daemon=True)
            for s in self.all_containers()
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for state in self.all_containers():
            for instance in state.instances:
                shutil.rmtree(instance.rootfs.parent, ignore_errors=True)
        shutil.rmtree(PODS_DIR / self.uid, ignore_errors=True)
        log(f"pod {format_pod(self.pod)} stopped")

    # -- status --------------------------------------------------------------------------------
    def container_status(self, state: ContainerState) -> JSON:
        spec_image = str(state.spec.get("image") or "")
        current = state.current
        status: JSON = {"name": state.name, "image": spec_image, "imageID": ""}
        mounts = [
            {
                "name": m.get("name"),
                "mountPath": m.get("mountPath"),
                **({"readOnly": True} if m.get("readOnly") else {}),
                **({"recursiveReadOnly": "Disabled"} if m.get("readOnly") else {}),
            }
            for m in state.spec.get("volumeMounts") or []
        ]

        def terminated(instance: Instance) -> JSON:
            body: JSON = {
                "exitCode": instance.exit_code,
                "reason": instance.reason,
                "startedAt": rt.rfc3339(instance.started_at),
                "finishedAt": rt.rfc3339(instance.finished_at),
                "containerID": f"containerd://{instance.container_id}",
            }
            if instance.message:
                body["message"] = instance.message
            return {"terminated": body}

        last: JSON = {}
        if state.waiting is not None or current is None:
            waiting = dict(state.waiting or {"reason": "ContainerCreating"})
            state_json: JSON = {"waiting": waiting}
            if current is not None and current.exit_code is not None:
                last = terminated(current)
        elif current.exit_code is None:
            state_json = {"running": {"startedAt": rt.rfc3339(current.started_at)}}
            if len(state.instances) > 1:
                last = terminated(state.instances[-2])
        else:
            state_json = terminated(current)
            if len(state.instances) > 1:
                last = terminated(state.instances[-2])
        if current is not None and state.image_id:
            status["image"] = state.image_ref
            status["imageID"] = state.image_id
            status["containerID"] = f"containerd://{current.container_id}"
        status["lastState"] = last
        status["ready"] = bool(state.ready and state.running)
        status["restartCount"] = state.restart_count
        status["started"] = bool(state.started and state.running)
        status["state"] = state_json
        if mounts:
            status["volumeMounts"] = mounts
        security = state.spec.get("securityContext") or {}
        pod_security = self.pod["spec"].get("securityContext") or {}
        uid = int(security.get("runAsUser", pod_security.get("runAsUser", 0)) or 0)
        gid = int(security.get("runAsGroup", pod_security.get("runAsGroup", 0)) or 0)
        if current is not None and state.image_id:
            status["user"] = {"linux": {"uid": uid, "gid": gid, "supplementalGroups": [gid]}}
        return status

    def phase(self) -> str:
        policy = self.restart_policy()
        init_failed = any(
            s.current is not None
            and s.current.exit_code not in (None, 0)
            and not s.running
            and policy == "Never"
            for s in self.init
        )
        if init_failed:
            return "Failed"
        if not all(s.succeeded for s in self.init):
            return "Pending"
        if any(s.running for s in self.apps):
            return "Running"
        if not all(s.current is not None for s in self.apps):
            return "Pending"
        finished = all(s.current is not None and s.current.exit_code is not None for s in self.apps)
        if policy == "Always":
            return "Running" if all(s.instances for s in self.apps) else "Pending"
        if finished:
            codes = [s.current.exit_code for s in self.apps if s.current is not None]
            if policy == "OnFailure":
                return "Succeeded" if all(c == 0 for c in codes) else "Running"
            return "Succeeded" if all(c == 0 for c in codes) else "Failed"
        return "Running"

    def condition(self, kind: str, status: bool, reason: str = "", message: str = "") -> JSON:
        value = "True" if status else "False"
        previous = self.transitions.get(kind)
        stamp = previous[1] if previous and previous[0] == value else rt.rfc3339(now_epoch())
        self.transitions[kind] = (value, stamp)
        body: JSON = {"type": kind, "status": value, "lastProbeTime": None}
        body["lastTransitionTime"] = stamp
        if reason:
            body["reason"] = reason
        if message:
            body["message"] = message
        return body

    def status(self) -> JSON:
        with self.lock:
            phase = self.phase()
            completed = phase in ("Succeeded", "Failed")
            ip = self.kubelet.node_ip
            incomplete = [s.name for s in self.init if not s.succeeded]
            unready = [s.name for s in self.apps if not (s.ready and s.running)]
            conditions = [
                self.condition("PodReadyToStartContainers", self.volumes_ready and not completed),
            ]
            if completed and not incomplete:
                conditions.append(self.condition("Initialized", True, "PodCompleted"))
            elif incomplete:
                conditions.append(
                    self.condition(
                        "Initialized",
                        False,
                        "ContainersNotInitialized",
                        f"containers with incomplete status: [{' '.join(incomplete)}]",
                    )
                )
            else:
                conditions.append(self.condition("Initialized", True))
            for kind in ("Ready", "ContainersReady"):
                if phase == "Succeeded":
                    conditions.append(self.condition(kind, False, "PodCompleted"))
                elif unready:
                    conditions.append(
                        self.condition(
                            kind,
                            False,
                            "ContainersNotReady",
                            f"containers with unready status: [{' '.join(unready)}]",
                        )
                    )
                else:
                    conditions.append(self.condition(kind, True))
            others = [
                c
                for c in (self.pod.get("status") or {}).get("conditions") or []
                if c.get("type") not in KUBELET_CONDITIONS
            ]
            status: JSON = {
                "phase": phase,
                "conditions": conditions + others,
                "hostIP": ip,
                "hostIPs": [{"ip": ip}],
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "startTime": rt.rfc3339(self.started_at),
                "containerStatuses": sorted(
                    (self.container_status(s) for s in self.apps), key=lambda c: str(c["name"])
                ),
            }
            if self.init:
                status["initContainerStatuses"] = [self.container_status(s) for s in self.init]
            qos = (self.pod.get("status") or {}).get("qosClass")
            if qos:
                status["qosClass"] = qos
            return status

    def push_status(self) -> None:
        status = self.status()
        comparable = json.dumps(status, sort_keys=True)
        if self.last_status is not None and json.dumps(self.last_status, sort_keys=True) == (
            comparable
        ):
            return
        try:
            self.kubelet.api.request(
                "PATCH",
                f"/api/v1/namespaces/{self.namespace}/pods/{quote(self.name)}/status",
                {"metadata": {"uid": self.uid}, "status": status},
                "application/merge-patch+json",
            )
            self.last_status = status
        except ApiError as exc:
            if exc.status in (404, 409):
                return  # deleted or replaced; the main loop notices
            log(f"status of {format_pod(self.pod)} not written: {exc}")
        except (OSError, http.client.HTTPException) as exc:
            log(f"status of {format_pod(self.pod)} not written: {exc}")

    def push_status_quietly(self) -> None:
        with contextlib.suppress(Exception):
            if not self.stop.is_set():
                self.push_status()

    # -- what the streaming endpoint reads ------------------------------------------------------
    def log_instance(self, container: str, previous: bool) -> tuple[Instance | None, str]:
        """The instance whose log `GET pods/log` reads, or the kubelet's 400 text."""
        state = self.container(container)
        if state is None:
            return None, f'container "{container}" in pod "{self.name}" not found'
        with self.lock:
            if previous:
                if len(state.instances) >= 2 and state.waiting is None:
                    return state.instances[-2], ""
                if state.instances and state.waiting is not None:
                    return state.instances[-1], ""
                return None, (
                    f'previous terminated container "{container}" in pod "{self.name}" not found'
                )
            current = state.current
            if current is not None:
                return current, ""
            reason = (state.waiting or {}).get("reason", "ContainerCreating")
            text = {
                "ErrImagePull": "image can't be pulled",
                "ImagePullBackOff": "trying and failing to pull image",
            }.get(reason, reason)
            return None, f'container "{container}" in pod "{self.name}" is waiting to start: {text}'


def go_error(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connect: connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "i/o timeout"
    return f"connect: {(exc.strerror or str(exc)).lower()}"


# --- kube-proxy (NodePort) ------------------------------------------------------------------------
def relay(a: socket.socket, b: socket.socket) -> None:
    """Copy both ways until both directions ended (half-closes passed on)."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    other = threading.Thread(target=pump, args=(b, a), daemon=True)
    other.start()
    pump(a, b)
    other.join()
    a.close()
    b.close()


class NodePorts:
    """Listeners on 0.0.0.0:nodePort relaying to ready endpoints, refreshed from the API."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.listeners: dict[int, tuple[socket.socket, str, str, str]] = {}
        self.endpoints: dict[tuple[str, str], JSON] = {}
        self.counter = 0

    def refresh(self) -> None:
        services = self.api.request("GET", "/api/v1/services") or {}
        endpoints = self.api.get_or_none("/api/v1/endpoints") or {}
        self.endpoints = {
            (e["metadata"]["namespace"], e["metadata"]["name"]): e
            for e in endpoints.get("items") or []
        }
        wanted: dict[int, tuple[str, str, str]] = {}
        for service in services.get("items") or []:
            spec = service.get("spec") or {}
            if spec.get("type") not in ("NodePort", "LoadBalancer"):
                continue
            meta = service["metadata"]
            for port in spec.get("ports") or []:
                if port.get("nodePort") and str(port.get("protocol") or "TCP") == "TCP":
                    wanted[int(port["nodePort"])] = (
                        meta["namespace"],
                        meta["name"],
                        str(port.get("name") or ""),
                    )
        for number in list(self.listeners):
            if wanted.get(number) != self.listeners[number][1:]:
                sock = self.listeners.pop(number)[0]
                sock.close()
        for number, target in wanted.items():
            if number in self.listeners:
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", number))
                sock.listen(64)
            except OSError as exc:
                log(f"nodePort {number} for {target[0]}/{target[1]} not opened: {exc}")
                sock.close()
                continue
            self.listeners[number] = (sock, *target)
            threading.Thread(target=self.accept, args=(number, sock), daemon=True).start()
            log(f"nodePort {number} -> service {target[0]}/{target[1]} port {target[2]!r}")

    def backends(self, namespace: str, name: str, port_name: str) -> list[tuple[str, int]]:
        found = []
        endpoints = self.endpoints.get((namespace, name)) or {}
        for subset in endpoints.get("subsets") or []:
            ports = subset.get("ports") or []
            port = next((p for p in ports if str(p.get("name") or "") == port_name), None)
            if port is None and len(ports) == 1:
                port = ports[0]
            if port is None:
                continue
            for address in subset.get("addresses") or []:
                found.append((str(address["ip"]), int(port["port"])))
        return found

    def accept(self, number: int, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            entry = self.listeners.get(number)
            backends = self.backends(*entry[1:]) if entry else []
            if not backends:
                # iptables REJECT: the client sees a reset
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                conn.close()
                continue
            self.counter += 1
            address = backends[self.counter % len(backends)]
            threading.Thread(target=self.forward, args=(conn, address), daemon=True).start()

    @staticmethod
    def forward(conn: socket.socket, address: tuple[str, int]) -> None:
        try:
            upstream = socket.create_connection(address, timeout=5)
        except OSError:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            conn.close()
            return
        upstream.settimeout(None)
        relay(conn, upstream)


# --- the node-local streaming endpoint -----------------------------------------------------------
class StreamServer:
    """NODE_IP:10250, one JSON request line per connection (see streaming.py)."""

    def __init__(self, kubelet: Kubelet) -> None:
        self.kubelet = kubelet
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", KUBELET_PORT))
        self.sock.listen(128)

    def serve(self) -> None:
        while True:
            conn, _ = self.sock.accept()
            threading.Thread(target=self.handle, args=(conn,), daemon=True).start()

    def handle(self, conn: socket.socket) -> None:
        try:
            reader = conn.makefile("rb")
            request = json.loads(reader.readline(65536) or b"{}")
            op = request.get("op")
            if op == "log":
                self.log(conn, request)
            elif op == "connect":
                self.connect(conn, request)
            else:
                self.answer(conn, 400, f"unknown op {op!r}")
                conn.close()
        except (OSError, ValueError) as exc:
            log(f"stream request failed: {exc}")
            conn.close()

    @staticmethod
    def answer(conn: socket.socket, code: int, message: str = "") -> None:
        conn.sendall(json.dumps({"code": code, "message": message}).encode() + b"\n")

    def worker(self, request: JSON) -> PodWorker | None:
        worker = self.kubelet.workers.get(str(request.get("uid", "")))
        return worker

    def log(self, conn: socket.socket, request: JSON) -> None:
        worker = self.worker(request)
        if worker is None:
            self.answer(conn, 404, f'pod "{request.get("name")}" not found')
            conn.close()
            return
        instance, error = worker.log_instance(str(request["container"]), bool(request["previous"]))
        if instance is None:
            self.answer(conn, 400, error)
            conn.close()
            return
        tail = request.get("tailLines")
        since = request.get("sinceTime")
        limit = request.get("limitBytes")
        self.answer(conn, 200)
        data = instance.log_path.read_bytes() if instance.log_path.exists() else b""
        complete = data[: data.rfind(b"\n") + 1]
        out = rt.render_log(
            rt.parse_cri(complete),
            tail=None if tail is None else int(tail),
            since=None if since is None else float(since),
            timestamps=bool(request.get("timestamps")),
            limit=None if limit is None else int(limit),
        )
        sent = len(out)
        try:
            conn.sendall(out)
            if not request.get("follow") or (limit is not None and sent >= int(limit)):
                return
            offset = len(complete)
            while True:
                data = instance.log_path.read_bytes() if instance.log_path.exists() else b""
                new = data[offset:]
                complete = new[: new.rfind(b"\n") + 1]
                if complete:
                    offset += len(complete)
                    out = rt.render_log(
                        rt.parse_cri(complete), timestamps=bool(request.get("timestamps"))
                    )
                    if limit is not None:
                        out = out[: int(limit) - sent]
                    conn.sendall(out)
                    sent += len(out)
                    if limit is not None and sent >= int(limit):
                        return
                    continue
                if not instance.running or worker.stop.is_set():
                    return
                time.sleep(0.1)
        finally:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def connect(self, conn: socket.socket, request: JSON) -> None:
        port = int(request.get("port", 0))
        worker = self.worker(request)
        sandbox = worker.sandbox_id if worker is not None else str(request.get("uid", ""))
        errors = []
        upstream = None
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect((address, port))
                sock.settimeout(None)
                upstream = sock
                break
            except OSError as exc:
                sock.close()
                errors.append(exc)
        if upstream is None:
            v4 = go_error(errors[0])
            v6 = go_error(errors[-1])
            self.answer(
                conn,
                500,
                f"error forwarding port {port} to pod {sandbox}, uid : failed to execute "
                'portforward in network namespace "host": failed to connect to '
                f'localhost:{port} inside namespace "{sandbox}", IPv4: dial tcp4 '
                f"127.0.0.1:{port}: {v4} IPv6 dial tcp6 [::1]:{port}: {v6} ",
            )
            conn.close()
            return
        self.answer(conn, 200)
        relay(conn, upstream)


# --- the kubelet --------------------------------------------------------------------------------
class Kubelet:
    def __init__(self, cfg: JSON) -> None:
        self.cfg = cfg
        self.node = str(cfg["node_name"])
        self.node_ip = str(cfg["node_ip"])
        self.service_host = str(cfg.get("service_host") or "10.96.0.1")
        self.api = Api(cfg)
        self.recorder = Recorder(self.api, self.node)
        self.images = Images()
        self.restart_backoff = rt.BackOff()
        self.pull_backoff = rt.BackOff()
        self.workers: dict[str, PodWorker] = {}
        self.node_ports = NodePorts(self.api)

    def sync_pods(self) -> None:
        selector = quote(f"spec.nodeName={self.node}")
        listed = self.api.request("GET", f"/api/v1/pods?fieldSelector={selector}") or {}
        pods = {str(p["metadata"]["uid"]): p for p in listed.get("items") or []}
        for uid in list(self.workers):
            if uid not in pods:
                worker = self.workers.pop(uid)
                log(f"pod {format_pod(worker.pod)} is gone: stopping it")
                threading.Thread(target=worker.terminate, daemon=True).start()
        for uid, pod in pods.items():
            known = self.workers.get(uid)
            if known is None:
                if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                    continue  # finished before this kubelet started
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                log(f"pod {format_pod(pod)} added")
                worker.thread.start()
            else:
                worker = known
                with worker.lock:
                    worker.pod["metadata"] = pod["metadata"]
                    worker.pod["status"] = pod.get("status") or {}
            if pod["metadata"].get("deletionTimestamp") and not worker.stop.is_set():
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                threading.Thread(
                    target=worker.terminate,
                    args=(None if grace is None else float(grace),),
                    daemon=True,
                ).start()

    def loop(self, interval: float, action: Callable[[], None], what: str) -> None:
        failures = 0
        while True:
            try:
                action()
                failures = 0
            except (ApiError, OSError, http.client.HTTPException, ValueError) as exc:
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log(f"{what} failed ({failures}x): {exc}")
            time.sleep(interval)

    def run(self) -> None:
        for folder in (STATE, PODS_DIR, POD_LOGS, CONTAINER_LOGS):
            folder.mkdir(parents=True, exist_ok=True)
        server = StreamServer(self)
        threading.Thread(target=server.serve, daemon=True).start()
        threading.Thread(
            target=self.loop,
            args=(SERVICE_POLL_INTERVAL, self.node_ports.refresh, "service sync"),
            daemon=True,
        ).start()
        log(
            f"kubelet (kipik test double) for node {self.node} ({self.node_ip}), API server "
            f"{self.cfg['server']}, streaming on :{KUBELET_PORT}"
        )
        self.loop(POLL_INTERVAL, self.sync_pods, "pod sync")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--run-container":
        container_init(json.loads(sys.argv[2]), int(sys.argv[3]))
        return 127
    parser = argparse.ArgumentParser(description="kubelet of the kind node image double")
    parser.add_argument("--config", required=True, help="JSON written by the kubeadm double")
    args = parser.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    Kubelet(cfg).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
