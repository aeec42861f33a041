"""A real outer Kubernetes cluster for the pod backend: a kind cluster on the local engine.

Made with the host's own ``kind`` (``bash ../shared/realkind/build.sh bin`` puts one on PATH) and
the real node image. ``examples/rbac.yaml`` is applied unchanged into a namespace, and the tests
run the plugin with a kubeconfig that carries that ServiceAccount's token (Kubernetes 1.22 makes
a token Secret for every ServiceAccount); the admin kubeconfig kind writes is only for the tests'
own setup and checks.

The outer node publishes one NodePort on ``127.0.0.1`` of this machine (``extraPortMappings``):
the in-cluster registry's, so that the local engine can push to it (Docker trusts registries on
127.0.0.0/8 without TLS) while pods of the outer cluster pull from the same registry at its
Service address.
"""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s_client

from pytest_kipik.k8s import kubeconfig
from pytest_kipik.waiting import NotYet, wait_until

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "examples" / "rbac.yaml"
SERVICE_ACCOUNT = "kipik-runner"
#: The registry's Service: a fixed ClusterIP, so no DNS lookup ever leaves the machine.
REGISTRY_NAMESPACE = "kipik-registry"
REGISTRY_CLUSTER_IP = "10.96.55.55"
REGISTRY_PORT = 5000
REGISTRY_NODE_PORT = 30500
#: The registry address the outer cluster's pods (and the DinD pods' daemons) pull from.
REGISTRY = f"{REGISTRY_CLUSTER_IP}:{REGISTRY_PORT}"
#: DinD pod requests small enough for two DinD pods and a runner on a 2-CPU outer node.
SMALL_RESOURCES = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "8Gi"}}


class OuterError(Exception):
    """Setting up or tearing down the outer cluster failed; the message has the command."""


def run(argv: Sequence[str], timeout: float, stdin: str | None = None) -> str:
    """Run a command, return its stdout; fail with a pasteable command and its output."""
    try:
        done = subprocess.run(
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise OuterError(f"timed out after {timeout:.0f}s: {shlex.join(argv)}") from None
    if done.returncode != 0:
        raise OuterError(
            f"exit code {done.returncode}: {shlex.join(argv)}\n{done.stdout[-2000:]}"
            f"{done.stderr[-3000:]}"
        )
    return done.stdout


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def kind_config(registry_host_port: int) -> str:
    """One node; the registry's NodePort published on 127.0.0.1 of this machine."""
    return yaml.safe_dump(
        {
            "kind": "Cluster",
            "apiVersion": "kind.x-k8s.io/v1alpha4",
            "nodes": [
                {
                    "role": "control-plane",
                    "extraPortMappings": [
                        {
                            "containerPort": REGISTRY_NODE_PORT,
                            "hostPort": registry_host_port,
                            "listenAddress": "127.0.0.1",
                            "protocol": "TCP",
                        }
                    ],
                }
            ],
        }
    )


def token_kubeconfig(
    admin: dict[str, Any], token: str, namespace: str, user: str
) -> dict[str, Any]:
    """A kubeconfig for the admin kubeconfig's server that authenticates with ``token``."""
    cluster = admin["clusters"][0]["cluster"]
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "outer", "cluster": dict(cluster)}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": user, "context": {"cluster": "outer", "user": user, "namespace": namespace}}
        ],
        "current-context": user,
    }


@dataclass
class OuterCluster:
    """A kind cluster on the local engine, its admin access and its namespaces."""

    kind: str
    name: str
    workdir: Path
    registry_host_port: int

    @property
    def admin_kubeconfig(self) -> Path:
        """The kubeconfig kind wrote: for the tests' own setup and checks only."""
        return self.workdir / "admin.kubeconfig"

    def kubectl(self, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
        """``kubectl`` as admin."""
        return run(
            ["kubectl", "--kubeconfig", str(self.admin_kubeconfig), *args], timeout, stdin=stdin
        )

    def api(self) -> k8s_client.ApiClient:
        """An admin client of the outer cluster (close it after use)."""
        return kubeconfig.api_client(self.admin_kubeconfig)

    @contextmanager
    def core(self) -> Iterator[Any]:
        """An admin ``CoreV1Api``, closed afterwards."""
        api = self.api()
        try:
            yield k8s_client.CoreV1Api(api)
        finally:
            api.close()

    # -- life cycle ----------------------------------------------------------------------------

    def create(self, node_image: str, timeout: float) -> None:
        """``kind create cluster`` with the real node image; waits until the node is Ready."""
        config = self.workdir / "kind.yaml"
        config.write_text(kind_config(self.registry_host_port))
        run(
            [self.kind, "create", "cluster", "--name", self.name, "--image", node_image,
             "--config", str(config), "--kubeconfig", str(self.admin_kubeconfig),
             "--wait", f"{int(timeout)}s"],
            timeout + 120,
        )  # fmt: skip
        self.admin_kubeconfig.chmod(0o600)
        # pods are only admitted once the namespace's default ServiceAccount exists
        wait_until(
            self._has_default_account,
            what="the outer cluster's default ServiceAccount",
            timeout=120,
            hint=f"kubectl --kubeconfig {self.admin_kubeconfig} get sa -A",
            interval=1,
        )

    def _has_default_account(self) -> None:
        with self.core() as core:
            names = [a.metadata.name for a in core.list_namespaced_service_account("default").items]
        if "default" not in names:
            raise NotYet(f"service accounts: {names}")

    def load(self, image: str, timeout: float = 600) -> None:
        """``kind load docker-image`` into every node."""
        run([self.kind, "load", "docker-image", image, "--name", self.name], timeout)

    def node_containers(self) -> list[str]:
        """The outer cluster's node containers on the local engine."""
        out = run(
            ["docker", "ps", "-a", "--filter", f"label=io.x-k8s.kind.cluster={self.name}",
             "--format", "{{.Names}}"],
            60,
        )  # fmt: skip
        return out.split()

    def delete(self) -> None:
        """``kind delete cluster``; its node containers must be gone afterwards."""
        run([self.kind, "delete", "cluster", "--name", self.name], 300)
        left = self.node_containers()
        if left:
            raise OuterError(f"kind delete cluster --name {self.name} left containers: {left}")

    # -- namespaces and accounts ---------------------------------------------------------------

    def namespace(self, prefix: str) -> str:
        """A new namespace that admits privileged pods."""
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.kubectl("create", "namespace", name)
        self.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=privileged")
        return name

    def apply(self, namespace: str, text: str) -> None:
        """``kubectl apply -n namespace -f -`` as admin."""
        self.kubectl("apply", "-n", namespace, "-f", "-", stdin=text)

    def account_kubeconfig(self, namespace: str, account: str, path: Path) -> Path:
        """A kubeconfig (mode 0600) that authenticates with ``account``'s token Secret."""

        def token() -> str:
            with self.core() as core:
                found: Any = core.read_namespaced_service_account(account, namespace)
                for ref in found.secrets or []:
                    secret: Any = core.read_namespaced_secret(ref.name, namespace)
                    if secret.type == "kubernetes.io/service-account-token" and secret.data:
                        return base64.b64decode(secret.data["token"]).decode()
            raise NotYet(f"no token Secret for {namespace}/{account} yet")

        value = wait_until(
            token,
            what=f"the token Secret of ServiceAccount {namespace}/{account}",
            timeout=60,
            hint="the token controller of kube-controller-manager makes it",
            interval=0.5,
        )
        admin = yaml.safe_load(self.admin_kubeconfig.read_text())
        text = yaml.safe_dump(token_kubeconfig(admin, value, namespace, account))
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(text)
        return path

    def pods(self, namespace: str, selector: str = "") -> list[str]:
        """Names of the pods in ``namespace`` (matching ``selector``)."""
        with self.core() as core:
            items = core.list_namespaced_pod(namespace, label_selector=selector).items
        return sorted(str(p.metadata.name) for p in items)

    def wait_no_pods(self, namespace: str, selector: str, timeout: float) -> None:
        """Until no pod of ``selector`` is left in ``namespace``."""

        def none() -> None:
            left = self.pods(namespace, selector)
            if left:
                raise NotYet(f"still there: {left}")

        wait_until(none, what=f"no pods {selector} in {namespace}", timeout=timeout, hint="-")

    def events(self, namespace: str) -> str:
        """Events of a namespace, for failure messages."""
        return self.kubectl("get", "events", "-n", namespace)

    # -- the registry inside ---------------------------------------------------------------------

    def start_registry(self, image: str, timeout: float = 180) -> None:
        """Debian's docker-registry as a Deployment + Service (fixed ClusterIP and NodePort)."""
        self.kubectl("create", "namespace", REGISTRY_NAMESPACE)
        self.apply(REGISTRY_NAMESPACE, registry_manifests(image))
        self.kubectl(
            "rollout", "status", "-n", REGISTRY_NAMESPACE, "deployment/registry",
            f"--timeout={int(timeout)}s", timeout=timeout + 30,
        )  # fmt: skip

        url = f"http://127.0.0.1:{self.registry_host_port}/v2/"

        def answers() -> None:
            try:
                with urllib.request.urlopen(url, timeout=5) as answer:
                    answer.read()
            except OSError as exc:  # the port is published before kube-proxy serves it
                raise NotYet(str(exc)) from None

        wait_until(
            answers, what=f"the registry at {url}", timeout=120, interval=1,
            hint=f"kubectl --kubeconfig {self.admin_kubeconfig} -n {REGISTRY_NAMESPACE} get all",
        )  # fmt: skip

    def push(self, image: str, timeout: float = 900) -> str:
        """Push a local image into the in-cluster registry; its name as pods pull it."""
        path = image.split("/", 1)[1] if "/" in image else image
        local = f"127.0.0.1:{self.registry_host_port}/{path}"
        run(["docker", "tag", image, local], 60)
        try:
            run(["docker", "push", local], timeout)
        finally:
            run(["docker", "rmi", local], 60)
        return f"{REGISTRY}/{path}"


def registry_manifests(image: str) -> str:
    """The registry Deployment (storage in an emptyDir) and its Service."""
    labels = {"app": "registry"}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "registry"},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "registry",
                            "image": image,
                            "imagePullPolicy": "Never",
                            "ports": [{"containerPort": REGISTRY_PORT}],
                            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/registry"}],
                        }
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "registry"},
        "spec": {
            "type": "NodePort",
            "clusterIP": REGISTRY_CLUSTER_IP,
            "selector": labels,
            "ports": [
                {"port": REGISTRY_PORT, "targetPort": REGISTRY_PORT, "nodePort": REGISTRY_NODE_PORT}
            ],
        },
    }
    return yaml.safe_dump_all([deployment, service])


def small_pod_template(path: Path, **spec: Any) -> Path:
    """A ``--kipik-pod-template`` with small requests (two DinD pods and a runner fit a node)."""
    container = {"name": "dind", "resources": SMALL_RESOURCES}
    path.write_text(json.dumps({"spec": {**spec, "containers": [container]}}))
    return path


def wait_phase(
    outer: OuterCluster, namespace: str, name: str, phases: Sequence[str], timeout: float
) -> str:
    """Until pod ``name`` is in one of ``phases``; its phase."""

    def check() -> str:
        with outer.core() as core:
            phase = str(core.read_namespaced_pod(name, namespace).status.phase)
        if phase not in phases:
            raise NotYet(phase)
        return phase

    started = time.monotonic()
    return wait_until(
        check, what=f"pod {namespace}/{name} to be {'/'.join(phases)}", timeout=timeout,
        hint=f"{time.monotonic() - started:.0f}s; kubectl describe pod -n {namespace} {name}",
        interval=1,
    )  # fmt: skip


# -- images (recipes of tests/images/build.py, cached by content hash the same way) -------------

REGISTRY_IMAGE = "kipik-test/registry:dev"
RUNNER_IMAGE = "kipik-test/runner:dev"
TRUSTING_DIND_IMAGE = "kipik-test/dind-registry:dev"
#: Where the runner image keeps the example suite and a small-requests pod template.
RUNNER_SUITE = "/src/tests"
RUNNER_TEMPLATE = "/etc/kipik/pod-template.json"
REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
http:
  addr: :5000
"""


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries (and loader) ``ldd`` names for a dynamically linked binary."""
    found = []
    for line in run(["ldd", str(binary)], 30).splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            found.append(Path(parts[2]))
        elif parts and parts[0].startswith("/"):
            found.append(Path(parts[0]))
    return found


def registry_recipe(binary: Path) -> Any:
    """Debian's docker-registry FROM scratch: the binary, its libraries, a config."""
    from tests.images.build import ImageRecipe

    libraries = shared_libraries(binary)
    copies = "\n".join(f"COPY lib{i} {lib}" for i, lib in enumerate(libraries))
    return ImageRecipe(
        tag=REGISTRY_IMAGE,
        rootfs=None,
        dockerfile=f"""\
FROM scratch
COPY docker-registry /usr/bin/docker-registry
{copies}
COPY config.yml /etc/docker/registry/config.yml
LABEL org.opencontainers.image.title="kipik-test-registry"
EXPOSE 5000
ENTRYPOINT ["/usr/bin/docker-registry", "serve", "/etc/docker/registry/config.yml"]
""",
        files={"docker-registry": binary, **{f"lib{i}": lib for i, lib in enumerate(libraries)}},
        texts={"config.yml": REGISTRY_CONFIG},
    )


def trusting_dind_recipe(dind_image: str, dind_id: str) -> Any:
    """The DinD image whose daemon pulls from the in-cluster registry over plain HTTP."""
    from tests.images.build import ImageRecipe

    return ImageRecipe(
        tag=TRUSTING_DIND_IMAGE,
        rootfs=None,
        dockerfile=f"""\
FROM {dind_image}
COPY daemon.json /etc/docker/daemon.json
LABEL kipik-test.base-image-id="{dind_id}"
""",
        files={},
        texts={"daemon.json": json.dumps({"insecure-registries": [REGISTRY]}) + "\n"},
    )


def runner_recipe(wheels: Path, kubectl: Path, template: str) -> Any:
    """Debian's python3 with the project's wheel and its dependencies, kubectl, the examples."""
    from tests.images.build import ImageRecipe, Rootfs

    return ImageRecipe(
        tag=RUNNER_IMAGE,
        rootfs=Rootfs("runner", ("python3", "python3-pip", "ca-certificates")),
        dockerfile=f"""\
FROM {{rootfs}}
COPY wheels /tmp/wheels
RUN python3 -m pip install --quiet --no-index --find-links /tmp/wheels --no-cache-dir \\
        --break-system-packages pytest-kipik \\
    && rm -rf /tmp/wheels /usr/lib/python3*/EXTERNALLY-MANAGED \\
    && ln -sf /usr/bin/python3 /usr/local/bin/python
COPY kubectl /usr/local/bin/kubectl
COPY test_example.py test_workload.py {RUNNER_SUITE}/
COPY pod-template.json {RUNNER_TEMPLATE}
WORKDIR /work
ENV PYTHONDONTWRITEBYTECODE=1
LABEL org.opencontainers.image.title="kipik-test-runner"
""",
        files={
            "wheels": wheels,
            "kubectl": kubectl,
            "test_example.py": ROOT / "examples" / "test_example.py",
            "test_workload.py": ROOT / "examples" / "test_workload.py",
        },
        texts={"pod-template.json": template},
    )


def build_wheels(folder: Path) -> Path:
    """``pip wheel`` of this project and its dependencies into an empty ``folder``."""
    import shutil
    import sys

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(folder), str(ROOT)],
        900)  # fmt: skip
    return folder


def build_images(dind_image: str, kind_bin: Path, cache: Path) -> None:
    """Bring the registry, trusting-DinD and runner images up to date (cached by content)."""
    import docker

    from tests.images.build import engine_arch, ensure

    client = docker.from_env(timeout=600)
    try:
        arch = engine_arch(client)
        template = json.dumps(
            {"spec": {"containers": [{"name": "dind", "resources": SMALL_RESOURCES}]}}
        )
        recipes = [
            registry_recipe(Path("/usr/bin/docker-registry")),
            trusting_dind_recipe(dind_image, str(client.images.get(dind_image).id)),
            runner_recipe(build_wheels(cache / "wheels"), kind_bin / "kubectl", template),
        ]
        for recipe in recipes:
            ensure(client, recipe, arch, False)
    finally:
        client.close()


# -- the whole set-up, for the tests' fixtures and the benchmarks ---------------------------------


@contextmanager
def started(
    kind: str, workdir: Path, node_image: str, images: Sequence[str] = ()
) -> Iterator[OuterCluster]:
    """A new outer cluster with ``images`` loaded; deleted (and checked gone) afterwards."""
    cluster = OuterCluster(
        kind=kind,
        name=f"kipik-outer-{secrets.token_hex(3)}",
        workdir=workdir,
        registry_host_port=free_port(),
    )
    try:
        cluster.create(node_image, timeout=300)
        for image in images:
            cluster.load(image)
        yield cluster
    finally:
        cluster.delete()


def rbac_namespace(cluster: OuterCluster, prefix: str) -> tuple[str, Path]:
    """A namespace with examples/rbac.yaml applied unchanged; its account's kubeconfig (0600)."""
    namespace = cluster.namespace(prefix)
    cluster.apply(namespace, RBAC.read_text())
    path = cluster.workdir / f"{namespace}.kubeconfig"
    return namespace, cluster.account_kubeconfig(namespace, SERVICE_ACCOUNT, path)
