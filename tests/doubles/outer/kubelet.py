"""TEST DOUBLE support: the one "kubelet" of the outer-cluster double, backed by the Docker engine.

Part of the outer-cluster double. Each pod becomes one real container on the double's own Docker
bridge network (pod IP = container IP, preassigned so `status.podIP` can be put in the
environment), with emptyDir volumes as labelled Docker volumes, hostPath volumes as bind mounts
and the service account token, CA and namespace files mounted where in-cluster clients look. A
worker thread per pod plays scheduler and kubelet: it schedules (or holds the pod unschedulable on
request), checks the image on the local engine (ErrImagePull/ImagePullBackOff when missing),
creates and starts the container, follows it to its exit, enforces activeDeadlineSeconds and
carries out graceful deletion, and writes the pod status and the events a real cluster shows.
Everything it creates carries the label `kipik-test.outer=<instance id>`.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import os
import shutil
import stat
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types

from tests.doubles.node import podspec
from tests.doubles.outer.cluster import TOKEN_DIR, Cluster, now

JSON = dict[str, Any]
LABEL = "kipik-test.outer"
MAX_GRACE = 60.0
IMAGE_BACKOFF = (10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
PROPAGATION = {"Bidirectional": "rshared", "HostToContainer": "rslave"}
SERVICE_NAMES = [
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]


def normalize_image(image: str) -> str:
    """The fully qualified reference containerd reports (docker.io/library/x:latest)."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" not in last and not digest:
        name += ":latest"
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif not ("." in first or ":" in first or first == "localhost"):
        name = f"docker.io/{name}"
    return f"{name}@{digest}" if digest else name


def repository(image: str) -> str:
    """The normalized reference without its tag."""
    ref = normalize_image(image).split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}"


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion ($$ escapes; unknown references stay as written)."""
    out, i = [], 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("$(", i) and ")" in text[i + 2 :]:
            end = text.index(")", i + 2)
            name = text[i + 2 : end]
            out.append(env[name] if name in env else text[i : end + 1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def set_condition(
    pod: JSON, kind: str, status: str, reason: str | None = None, message: str | None = None
) -> None:
    """Set a pod condition in the kubelet's order, keeping lastTransitionTime when unchanged."""
    order = ["PodReadyToStartContainers", "Initialized", "Ready", "ContainersReady", "PodScheduled"]
    conditions: list[JSON] = pod["status"].setdefault("conditions", [])
    current = next((c for c in conditions if c["type"] == kind), None)
    condition: JSON = {"type": kind, "status": status, "lastProbeTime": None}
    condition["lastTransitionTime"] = (
        current["lastTransitionTime"] if current and current["status"] == status else now()
    )
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    if current is not None:
        conditions[conditions.index(current)] = condition
    else:
        conditions.append(condition)
    conditions.sort(key=lambda c: order.index(c["type"]) if c["type"] in order else len(order))


def _docker_time(value: str | None) -> str:
    """Docker's RFC 3339 nano time as the API's second-precision time ("" for the zero time)."""
    if not value or value.startswith("0001-"):
        return ""
    return value.split(".")[0].rstrip("Z") + "Z"


class PodWorker(threading.Thread):
    """Scheduler + kubelet for one pod, from admission to the removal of its container."""

    def __init__(self, kubelet: Kubelet, pod: JSON) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod {meta['namespace']}/{meta['name']}", daemon=True)
        self.kubelet = kubelet
        self.cluster = kubelet.cluster
        self.pod = copy.deepcopy(pod)
        self.namespace, self.pod_name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.spec: JSON = self.pod["spec"]
        self.container: JSON = self.spec["containers"][0]
        base = f"{kubelet.prefix}-{self.namespace}-{self.pod_name}"[:200]
        self.container_name = f"{base}-{self.uid[:5]}"
        self.container_id = ""
        self.ip = ""
        self.volumes: list[str] = []
        self.wake = threading.Event()
        self.exited = threading.Event()
        self.grace: float | None = None  # set when deletion was requested
        self.deadline: float | None = None
        self.running = False
        self.started_at = ""
        self.restarts = 0
        self.last_state: JSON = {}
        self.field_path = f"spec.containers{{{self.container['name']}}}"

    # -- small helpers -------------------------------------------------------------------
    def log(self, message: str) -> None:
        self.kubelet.log(f"{self.namespace}/{self.pod_name}: {message}")

    def event(
        self, reason: str, message: str, kind: str = "Normal", container: bool = True
    ) -> None:
        path = self.field_path if container else ""
        self.cluster.record_event(self.pod, reason, message=message, kind=kind, field_path=path)

    def status(self, change: Callable[[JSON], None]) -> None:
        updated = self.cluster.update_pod_status(self.namespace, self.pod_name, self.uid, change)
        if updated is not None:
            self.pod = updated

    def interrupted(self) -> str | None:
        """'deleted' or 'deadline' when the pod must stop now, else None."""
        if self.grace is not None:
            return "deleted"
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "deadline"
        return None

    def pause(self, seconds: float | None, early: bool = False) -> str | None:
        """Wait `seconds` (None or `early`: until woken), cut short by deletion or the deadline.

        Returns 'deleted' or 'deadline' when that ended the wait, else None.
        """
        end = None if seconds is None else time.monotonic() + seconds
        while True:
            reason = self.interrupted()
            if reason:
                return reason
            current = time.monotonic()
            if end is not None and current >= end:
                return None
            limits = [x - current for x in (end, self.deadline) if x is not None]
            timeout = min([*limits, 5.0]) if limits or end is not None else None
            if self.wake.wait(timeout):
                self.wake.clear()
                if end is None or early:
                    return self.interrupted()

    def container_status(self, state: JSON, ready: bool = False) -> JSON:
        status: JSON = {
            "name": self.container["name"],
            "state": state,
            "lastState": self.last_state,
            "ready": ready,
            "restartCount": self.restarts,
            "image": normalize_image(self.container["image"]),
            "imageID": self.kubelet.image_id(self.container["image"]),
            "started": "running" in state,
        }
        if self.container_id:
            status["containerID"] = f"docker://{self.container_id}"
        return status

    # -- the life of the pod -------------------------------------------------------------
    def run(self) -> None:
        try:
            if self.schedule():
                self.admit()
                if self.prepare() and self.pull() and self.start_container():
                    self.supervise()
            # finished or never started: kept (with its container, for logs) until deleted
            while self.grace is None:
                if self.pause(None) == "deadline":
                    self.deadline_exceeded()
        except Exception:  # keep the server alive, and say what went wrong
            self.log("worker failed:\n" + traceback.format_exc())
            while self.grace is None:
                self.wake.wait(5.0)
                self.wake.clear()
        finally:
            self.teardown()
            self.kubelet.forget(self)
            self.cluster.pod_gone(self.namespace, self.pod_name, self.uid)

    def schedule(self) -> bool:
        """Bind to the node unless unschedulable (held, or a nodeSelector that cannot match).

        A pod created with spec.nodeName skips the scheduler; naming another node, it waits
        for a kubelet that never comes (as it would on a real cluster).
        """
        node = self.cluster.cfg.node_name
        if self.spec.get("nodeName"):
            while self.spec["nodeName"] != node and self.grace is None:
                self.pause(None)
            self.status(lambda pod: set_condition(pod, "PodScheduled", "True"))
            return self.grace is None
        announced = ""
        while self.grace is None:
            message = ""
            if self.cluster.hold_pending:
                message = self.cluster.unschedulable_message
            selector = self.spec.get("nodeSelector") or {}
            node_labels = self.cluster.node["metadata"]["labels"]
            if any(node_labels.get(k) != v for k, v in selector.items()):
                message = (
                    "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
                    " preemption: 0/1 nodes are available: 1 Preemption is not helpful for "
                    "scheduling."
                )
            if not message:
                break
            if message != announced:

                def unschedulable(pod: JSON, message: str = message) -> None:
                    set_condition(pod, "PodScheduled", "False", "Unschedulable", message)

                self.status(unschedulable)
                announced = message
            # the scheduler retries; each failed attempt counts the event again
            self.cluster.record_event(
                self.pod, "FailedScheduling", message=message, kind="Warning",
                component="default-scheduler",
            )  # fmt: skip
            if self.pause(5.0, early=True) == "deleted":
                return False
        if self.grace is not None:
            return False
        self.cluster.record_event(
            self.pod,
            "Scheduled",
            message=f"Successfully assigned {self.namespace}/{self.pod_name} to {node}",
            component="default-scheduler",
        )
        with self.cluster.store.lock:
            pod = self.cluster.store.get("pods", self.namespace, self.pod_name)
            if pod is None or pod["metadata"]["uid"] != self.uid:
                return False
            pod["spec"]["nodeName"] = node
            set_condition(pod, "PodScheduled", "True")
            self.cluster.store.modified("pods", pod)
            self.pod = copy.deepcopy(pod)
        return True

    def admit(self) -> None:
        deadline = self.spec.get("activeDeadlineSeconds")
        if deadline:
            self.deadline = time.monotonic() + deadline
        self.ip = self.kubelet.allocate_ip(self)
        gateway = self.cluster.cfg.gateway
        waiting = {"waiting": {"reason": "ContainerCreating"}}
        unready = f"containers with unready status: [{self.container['name']}]"

        def admitted(pod: JSON) -> None:
            status = pod["status"]
            status["hostIP"] = gateway
            status["hostIPs"] = [{"ip": gateway}]
            status["startTime"] = now()
            set_condition(pod, "PodReadyToStartContainers", "False")
            set_condition(pod, "Initialized", "True")
            set_condition(pod, "Ready", "False", "ContainersNotReady", unready)
            set_condition(pod, "ContainersReady", "False", "ContainersNotReady", unready)
            status["containerStatuses"] = [self.container_status(waiting)]

        self.status(admitted)

    def prepare(self) -> bool:
        """Check hostPaths (retrying like the kubelet's volume manager) and make emptyDirs."""
        while True:
            problem = self.kubelet.check_host_paths(self.spec)
            if not problem:
                break
            volume, detail = problem
            self.event(
                "FailedMount",
                f'MountVolume.SetUp failed for volume "{volume}" : {detail}',
                "Warning",
                container=False,
            )
            if self.pause(10.0):
                if self.interrupted() == "deadline":
                    self.deadline_exceeded()
                return False
        self.volumes = self.kubelet.make_volumes(self)
        ip = self.ip

        def sandbox(pod: JSON) -> None:
            set_condition(pod, "PodReadyToStartContainers", "True")
            pod["status"]["podIP"] = ip
            pod["status"]["podIPs"] = [{"ip": ip}]

        self.status(sandbox)
        return True

    def pull(self) -> bool:
        """The image must be on the local engine (nothing can be pulled here)."""
        image = self.container["image"]
        policy = self.container.get("imagePullPolicy", "IfNotPresent")
        attempt = 0
        while True:
            present = self.kubelet.image_present(image)
            if present and policy != "Always":
                self.event("Pulled", f'Container image "{image}" already present on machine')
                return True
            if present:
                self.event("Pulling", f'Pulling image "{image}"')
                self.event(
                    "Pulled",
                    f'Successfully pulled image "{image}" in 12ms (12ms including waiting). '
                    "Image size: 0 bytes.",
                )
                return True
            if policy == "Never":
                message = f'Container image "{image}" is not present with pull policy of Never'
                self.event("ErrImageNeverPull", message, "Warning")
                self._waiting("ErrImageNeverPull", message)
                if self.pause(10.0):
                    break
                continue
            self.event("Pulling", f'Pulling image "{image}"')
            ref = normalize_image(image)
            error = (
                f'rpc error: code = NotFound desc = failed to pull and unpack image "{ref}": '
                f'failed to resolve reference "{ref}": {ref}: not found'
            )
            self.event("Failed", f'Failed to pull image "{image}": {error}', "Warning")
            self.event("Failed", "Error: ErrImagePull", "Warning")
            self._waiting("ErrImagePull", error)
            if self.pause(1.0):
                break
            self.event("BackOff", f'Back-off pulling image "{image}"')
            self.event("Failed", "Error: ImagePullBackOff", "Warning")
            self._waiting(
                "ImagePullBackOff", f'Back-off pulling image "{image}": ErrImagePull: {error}'
            )
            delay = IMAGE_BACKOFF[min(attempt, len(IMAGE_BACKOFF) - 1)]
            attempt += 1
            if self.pause(delay - 1.0):
                break
        if self.interrupted() == "deadline":
            self.deadline_exceeded()
        return False

    def _waiting(self, reason: str, message: str) -> None:
        state = {"waiting": {"reason": reason, "message": message}}

        def waiting(pod: JSON) -> None:
            pod["status"]["containerStatuses"] = [self.container_status(state)]

        self.status(waiting)

    def start_container(self) -> bool:
        name = self.container["name"]
        try:
            self.container_id = self.kubelet.create_container(self)
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            self.event("Failed", f"Error: {text}", "Warning")
            self._waiting("CreateContainerError", text)
            self.log(f"create failed: {exc}")
            return False
        self.event("Created", f"Created container: {name}")
        if self.interrupted():
            return False
        return self._start()

    def _start(self) -> bool:
        name = self.container["name"]
        self.exited.clear()
        try:
            self.kubelet.docker.api.start(self.container_id)
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            self.event("Failed", f'Error: failed to start container "{name}": {text}', "Warning")
            self._terminated(128, "StartError", text, now(), now())
            return False
        info = self.kubelet.docker.api.inspect_container(self.container_id)
        self.started_at = _docker_time(info["State"].get("StartedAt")) or now()
        self.running = True
        threading.Thread(target=self._wait_exit, daemon=True, name=f"wait {name}").start()
        self.event("Started", f"Started container {name}")
        state = {"running": {"startedAt": self.started_at}}

        def running(pod: JSON) -> None:
            pod["status"]["phase"] = "Running"
            set_condition(pod, "Ready", "True")
            set_condition(pod, "ContainersReady", "True")
            pod["status"]["containerStatuses"] = [self.container_status(state, ready=True)]

        self.status(running)
        return True

    def _wait_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.kubelet.docker.api.wait(self.container_id, timeout=None)
        self.exited.set()
        self.wake.set()

    def supervise(self) -> None:
        """Follow the container to its exit (restarting it as restartPolicy says)."""
        backoff = 10.0
        while True:
            while not self.exited.is_set():
                reason = self.pause(None)
                if reason == "deleted":
                    return
                if reason == "deadline":
                    self.deadline_exceeded()
                    return
            self.running = False
            state = self.kubelet.docker.api.inspect_container(self.container_id)["State"]
            code = int(state.get("ExitCode", 0))
            finished = _docker_time(state.get("FinishedAt")) or now()
            why = "OOMKilled" if state.get("OOMKilled") else ("Completed" if code == 0 else "Error")
            policy = self.spec.get("restartPolicy", "Always")
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                self._terminated(code, why, "", self.started_at, finished)
                return
            if not self._crash_loop(code, why, finished, backoff):
                return
            backoff = min(backoff * 2, 300.0)

    def _crash_loop(self, code: int, why: str, finished: str, backoff: float) -> bool:
        """Wait out the restart back-off and start the container again (False: stop instead)."""
        self.last_state = {
            "terminated": {
                "exitCode": code,
                "reason": why,
                "startedAt": self.started_at,
                "finishedAt": finished,
                "containerID": f"docker://{self.container_id}",
            }
        }
        self.restarts += 1
        name = self.container["name"]
        full = f"{self.pod_name}_{self.namespace}({self.uid})"
        self.event(
            "BackOff", f"Back-off restarting failed container {name} in pod {full}", "Warning"
        )
        unready = f"containers with unready status: [{name}]"
        message = f"back-off {int(backoff)}s restarting failed container={name} pod={full}"
        waiting = {"waiting": {"reason": "CrashLoopBackOff", "message": message}}

        def crash_loop(pod: JSON) -> None:
            set_condition(pod, "Ready", "False", "ContainersNotReady", unready)
            set_condition(pod, "ContainersReady", "False", "ContainersNotReady", unready)
            pod["status"]["containerStatuses"] = [self.container_status(waiting)]

        self.status(crash_loop)
        reason = self.pause(backoff)
        if reason == "deadline":
            self.deadline_exceeded()
        if reason:
            return False
        image = self.container["image"]
        self.event("Pulled", f'Container image "{image}" already present on machine')
        self.event("Created", f"Created container: {name}")
        return self._start()

    def _terminated(
        self, code: int, reason: str, message: str, started: str, finished: str
    ) -> None:
        terminated: JSON = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started,
            "finishedAt": finished,
        }
        if message:
            terminated["message"] = message
        if self.container_id:
            terminated["containerID"] = f"docker://{self.container_id}"
        phase = "Succeeded" if code == 0 else "Failed"

        def done(pod: JSON) -> None:
            if pod["status"].get("phase") not in ("Succeeded", "Failed"):
                pod["status"]["phase"] = phase
            why = "PodCompleted" if pod["status"]["phase"] == "Succeeded" else "PodFailed"
            set_condition(pod, "PodReadyToStartContainers", "False")
            set_condition(pod, "Ready", "False", why)
            set_condition(pod, "ContainersReady", "False", why)
            pod["status"]["containerStatuses"] = [self.container_status({"terminated": terminated})]

        self.status(done)

    def deadline_exceeded(self) -> None:
        """The activeDeadlineSeconds passed: the pod fails and its container is stopped."""
        message = "Pod was active on the node longer than the specified deadline"
        self.deadline = None

        def failed(pod: JSON) -> None:
            pod["status"]["phase"] = "Failed"
            pod["status"]["reason"] = "DeadlineExceeded"
            pod["status"]["message"] = message

        self.status(failed)
        self.event("DeadlineExceeded", message, container=False)
        self.stop_container(float(self.spec.get("terminationGracePeriodSeconds", 30)))

    def stop_container(self, grace: float) -> None:
        if not self.container_id or not self.running:
            return
        self.event("Killing", f"Stopping container {self.container['name']}")
        with contextlib.suppress(docker.errors.APIError):
            self.kubelet.docker.api.stop(self.container_id, timeout=int(min(grace, MAX_GRACE)))
        self.exited.wait(10.0)
        self.running = False
        with contextlib.suppress(docker.errors.APIError):
            state = self.kubelet.docker.api.inspect_container(self.container_id)["State"]
            code = int(state.get("ExitCode", 137))
            finished = _docker_time(state.get("FinishedAt")) or now()
            why = "Completed" if code == 0 else "Error"
            self._terminated(code, why, "", self.started_at, finished)

    def teardown(self) -> None:
        """Stop (graceful period bounded), then remove the container and its volumes."""
        grace = self.grace if self.grace is not None else 0.0
        with contextlib.suppress(Exception):
            self.stop_container(grace)
        self.kubelet.remove_pod_resources(self)


class Kubelet:
    """Runs pods as containers on the double's network; one PodWorker per pod."""

    def __init__(
        self,
        cluster: Cluster,
        client: docker.DockerClient,
        *,
        network: str,
        subnet: str,
        workdir: Path,
        log: Callable[[str], None],
    ) -> None:
        self.cluster = cluster
        self.docker = client
        self.network = network
        self.subnet = ipaddress.ip_network(subnet)
        self.workdir = workdir
        self.log = log
        self.prefix = f"kipik-test-outer-{cluster.cfg.instance}"
        self.lock = threading.Lock()
        self.workers: dict[str, PodWorker] = {}
        self.ips: dict[str, str] = {}
        self.image_ids: dict[str, str] = {}

    # -- bookkeeping ----------------------------------------------------------------------
    def labels(self, worker: PodWorker, kind: str) -> dict[str, str]:
        labels = {
            LABEL: self.cluster.cfg.instance,
            f"{LABEL}.kind": kind,
            f"{LABEL}.pod": f"{worker.namespace}/{worker.pod_name}",
            f"{LABEL}.uid": worker.uid,
        }
        for key, value in (worker.pod["metadata"].get("labels") or {}).items():
            labels[f"{LABEL}.label/{key}"] = value
        return labels

    def admit(self, pod: JSON) -> None:
        worker = PodWorker(self, pod)
        with self.lock:
            self.workers[worker.uid] = worker
        worker.start()

    def kill(self, pod: JSON, grace: float) -> None:
        with self.lock:
            worker = self.workers.get(pod["metadata"]["uid"])
        if worker is not None:
            worker.grace = grace if worker.grace is None else min(worker.grace, grace)
            worker.wake.set()

    def poke_all(self) -> None:
        with self.lock:
            for worker in self.workers.values():
                worker.wake.set()

    def forget(self, worker: PodWorker) -> None:
        with self.lock:
            self.workers.pop(worker.uid, None)
            self.ips.pop(worker.uid, None)

    def worker(self, uid: str) -> PodWorker | None:
        with self.lock:
            return self.workers.get(uid)

    def allocate_ip(self, worker: PodWorker) -> str:
        gateway = self.cluster.cfg.gateway
        with self.lock:
            used = set(self.ips.values())
            for host in self.subnet.hosts():
                address = str(host)
                if address != gateway and address not in used:
                    self.ips[worker.uid] = address
                    return address
        raise RuntimeError(f"no free address left in {self.subnet}")

    # -- images ----------------------------------------------------------------------------
    def image_present(self, image: str) -> bool:
        try:
            found = self.docker.images.get(image)
        except docker.errors.APIError:  # ImageNotFound included
            return False
        self.image_ids[image] = str(found.id)
        return True

    def image_id(self, image: str) -> str:
        found = self.image_ids.get(image)
        return f"{repository(image)}@{found}" if found else ""

    # -- volumes ---------------------------------------------------------------------------
    def check_host_paths(self, spec: JSON) -> tuple[str, str] | None:
        """(volume, error) for the first hostPath whose type check fails; creates *OrCreate."""
        checks = {
            "Directory": (stat.S_ISDIR, "a directory"),
            "File": (stat.S_ISREG, "a file"),
            "Socket": (stat.S_ISSOCK, "a socket file"),
            "CharDevice": (stat.S_ISCHR, "a character device"),
            "BlockDevice": (stat.S_ISBLK, "a block device"),
        }
        for volume in spec.get("volumes") or []:
            host = volume.get("hostPath")
            if host is None:
                continue
            path, kind = host["path"], host.get("type", "")
            try:
                mode: int | None = os.stat(path).st_mode
            except OSError:
                mode = None
            if kind == "DirectoryOrCreate" and mode is None:
                os.makedirs(path, mode=0o755, exist_ok=True)
            elif kind == "FileOrCreate" and mode is None:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).touch(mode=0o644)
            elif kind in checks:
                check, what = checks[kind]
                if mode is None or not check(mode):
                    return volume["name"], f"hostPath type check failed: {path} is not {what}"
        return None

    def make_volumes(self, worker: PodWorker) -> list[str]:
        made = []
        for volume in worker.spec.get("volumes") or []:
            empty = volume.get("emptyDir")
            if empty is None or empty.get("medium") == "Memory":
                continue
            name = f"{worker.container_name}-{volume['name']}"
            self.docker.volumes.create(name=name, labels=self.labels(worker, "emptyDir"))
            made.append(name)
        return made

    def token_dir(self, worker: PodWorker) -> Path:
        directory: Path = self.workdir / "pods" / worker.uid / "serviceaccount"
        directory.mkdir(parents=True, exist_ok=True)
        sa = worker.spec.get("serviceAccountName", "default")
        token = self.cluster.sa_tokens.get((worker.namespace, sa), "")
        for name, content in (
            ("token", token),
            ("ca.crt", self.cluster.cfg.ca_pem),
            ("namespace", worker.namespace),
        ):
            path = directory / name
            path.write_text(content)
            path.chmod(0o644)
        for folder in (directory, directory.parent, directory.parent.parent):
            folder.chmod(0o755)
        return directory

    def mounts(self, worker: PodWorker) -> list[docker.types.Mount]:
        by_name = {v["name"]: v for v in worker.spec.get("volumes") or []}
        mounts = []
        for mount in worker.container.get("volumeMounts") or []:
            volume = by_name[mount["name"]]
            target = mount["mountPath"]
            read_only = bool(mount.get("readOnly"))
            sub = mount.get("subPath", "")
            propagation = PROPAGATION.get(mount.get("mountPropagation", "None"))
            empty = volume.get("emptyDir")
            if "hostPath" in volume:
                path = volume["hostPath"]["path"]
                source = os.path.join(path, sub) if sub else path  # a socket has no "/" after it
                if not os.path.exists(source):
                    os.makedirs(source, exist_ok=True)
                mounts.append(
                    docker.types.Mount(
                        target, source, type="bind", read_only=read_only, propagation=propagation
                    )
                )
            elif empty is not None and empty.get("medium") == "Memory":
                size = empty.get("sizeLimit")
                tmpfs_size = int(podspec.parse_quantity(size)) if size else None
                mounts.append(
                    docker.types.Mount(
                        target, None, type="tmpfs", read_only=read_only, tmpfs_size=tmpfs_size
                    )
                )
            elif empty is not None:
                name = f"{worker.container_name}-{volume['name']}"
                if sub:
                    mountpoint = self.docker.api.inspect_volume(name)["Mountpoint"]
                    source = os.path.join(mountpoint, sub)
                    os.makedirs(source, exist_ok=True)
                    mounts.append(
                        docker.types.Mount(target, source, type="bind", read_only=read_only)
                    )
                else:
                    mounts.append(
                        docker.types.Mount(target, name, type="volume", read_only=read_only)
                    )
            elif "projected" in volume and target == TOKEN_DIR:
                source = str(self.token_dir(worker))
                mounts.append(docker.types.Mount(target, source, type="bind", read_only=True))
        return mounts

    # -- containers --------------------------------------------------------------------------
    def environment(self, worker: PodWorker) -> dict[str, str]:
        cfg = self.cluster.cfg
        meta = worker.pod["metadata"]
        values = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": cfg.node_name,
            "spec.serviceAccountName": worker.spec.get("serviceAccountName", ""),
            "status.hostIP": cfg.gateway,
            "status.hostIPs": cfg.gateway,
            "status.podIP": worker.ip,
            "status.podIPs": worker.ip,
        }
        env: dict[str, str] = {}
        for item in worker.container.get("env") or []:
            ref = (item.get("valueFrom") or {}).get("fieldRef")
            if ref is None:
                env[item["name"]] = expand(item.get("value", ""), env)
                continue
            path = ref["fieldPath"]
            if path.startswith(("metadata.labels[", "metadata.annotations[")):
                source = "labels" if path.startswith("metadata.labels") else "annotations"
                key = path.split("[", 1)[1].rstrip("]").strip("'\"")
                env[item["name"]] = (meta.get(source) or {}).get(key, "")
            elif path in ("metadata.labels", "metadata.annotations"):
                pairs = sorted((meta.get(path.split(".")[1]) or {}).items())
                env[item["name"]] = "\n".join(f'{k}="{v}"' for k, v in pairs)
            else:
                env[item["name"]] = values.get(path, "")
        port, host = str(cfg.port), cfg.gateway
        service = {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP": f"tcp://{host}:{port}",
            f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
            f"KUBERNETES_PORT_{port}_TCP_PORT": port,
            f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
        }
        for key, value in service.items():
            env.setdefault(key, value)
        return env

    def create_container(self, worker: PodWorker) -> str:
        container = worker.container
        env = self.environment(worker)
        command = [expand(c, env) for c in container.get("command") or []] or None
        args = [expand(a, env) for a in container.get("args") or []]
        security = container.get("securityContext") or {}
        pod_security = worker.spec.get("securityContext") or {}
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        group = security.get("runAsGroup", pod_security.get("runAsGroup"))
        if user is not None and group is not None:
            user = f"{user}:{group}"
        capabilities = security.get("capabilities") or {}
        options = ["no-new-privileges"] if security.get("allowPrivilegeEscalation") is False else []
        groups = [str(g) for g in pod_security.get("supplementalGroups") or []]
        host_config = self.docker.api.create_host_config(
            privileged=bool(security.get("privileged")),
            mounts=self.mounts(worker),
            cap_add=capabilities.get("add") or None,
            cap_drop=capabilities.get("drop") or None,
            security_opt=options or None,
            read_only=bool(security.get("readOnlyRootFilesystem")),
            extra_hosts=dict.fromkeys(SERVICE_NAMES, self.cluster.cfg.gateway),
            network_mode=self.network,
            group_add=groups or None,
        )
        endpoint = self.docker.api.create_endpoint_config(
            ipv4_address=worker.ip, aliases=[worker.pod_name]
        )
        created = self.docker.api.create_container(
            container["image"],
            command=args if (args or command) else None,
            entrypoint=command,
            name=worker.container_name,
            hostname=(worker.spec.get("hostname") or worker.pod_name)[:63].rstrip("-."),
            environment=[f"{k}={v}" for k, v in env.items()],
            labels=self.labels(worker, "pod"),
            working_dir=container.get("workingDir") or None,
            user=str(user) if user is not None else None,
            tty=bool(container.get("tty")),
            stdin_open=bool(container.get("stdin")),
            host_config=host_config,
            # (types-docker declares one EndpointConfig; the API takes a mapping of them)
            networking_config=self.docker.api.create_networking_config(
                {self.network: endpoint}  # type: ignore[arg-type]
            ),
        )
        return str(created["Id"])

    def remove_pod_resources(self, worker: PodWorker) -> None:
        try:
            self.docker.api.remove_container(
                worker.container_id or worker.container_name, force=True, v=True
            )
        except docker.errors.APIError as exc:
            if exc.status_code != 404:
                self.log(f"removing {worker.container_name}: {exc}")
        for name in worker.volumes:
            for _ in range(20):
                try:
                    self.docker.api.remove_volume(name, force=True)
                    break
                except docker.errors.NotFound:
                    break
                except docker.errors.APIError:
                    time.sleep(0.1)
        shutil.rmtree(self.workdir / "pods" / worker.uid, ignore_errors=True)

    def shutdown(self, timeout: float = 60.0) -> None:
        """Kill every pod now and wait for their workers to remove what they made."""
        with self.lock:
            workers = list(self.workers.values())
        for worker in workers:
            worker.grace = 0.0
            worker.wake.set()
        deadline = time.monotonic() + timeout
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
