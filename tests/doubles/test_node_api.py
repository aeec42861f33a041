"""The node image's fake kube-apiserver, in process, through the official `kubernetes` client.

The server runs on 127.0.0.1 with a CA made here; clients authenticate with client certificates
(an admin in `system:masters`, a kubelet `system:node:NAME`). No kubelet runs: where a test
needs pods to run, it writes their status as a kubelet would (through `pods/status`, with the
node's identity). These tests also run under `.tox/lowest` (kubernetes 29).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

NODE = Path(__file__).resolve().parent / "node"
NODE_NAME = "kipik-control-plane"
WORKER = "kipik-worker"


def load_apiserver() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("node_apiserver", str(NODE / "apiserver.py"))
    spec = importlib.util.spec_from_loader("node_apiserver", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


apiserver = load_apiserver()


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(folder: Path) -> dict[str, str]:
    """A CA, a serving certificate for 127.0.0.1, an admin and two kubelet client certificates."""
    ca_key, ca_crt = folder / "ca.key", folder / "ca.crt"
    openssl(
        "req", "-x509", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
        "-out", str(ca_crt), "-days", "2", "-subj", "/CN=kubernetes",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
    )  # fmt: skip
    paths = {"ca": str(ca_crt)}
    for name, subject, usage, san in (
        ("server", "/CN=kube-apiserver", "serverAuth", "IP:127.0.0.1,DNS:localhost"),
        ("admin", "/O=system:masters/CN=kubernetes-admin", "clientAuth", ""),
        ("node", f"/O=system:nodes/CN=system:node:{NODE_NAME}", "clientAuth", ""),
        ("nobody", "/CN=jane", "clientAuth", ""),
    ):
        key, csr, crt = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.crt"
        openssl(
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", subject,
        )  # fmt: skip
        ext = folder / f"{name}.ext"
        ext.write_text(f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else ""))
        openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext),
        )  # fmt: skip
        paths[name] = str(crt)
        paths[f"{name}_key"] = str(key)
    return paths


class Server:
    """A running ApiServer and the certificates to talk to it."""

    def __init__(self, folder: Path) -> None:
        import ssl

        self.pki = make_pki(folder)
        self.cni = folder / "10-kindnet.conflist"
        self.cni.write_text("{}")
        cfg: dict[str, Any] = {
            "cert": self.pki["server"],
            "key": self.pki["server_key"],
            "ca_cert": self.pki["ca"],
            "log": str(folder / "apiserver.log"),
            "node_name": NODE_NAME,
            "node_ip": "127.0.0.1",
            "node_labels": {},
            "cluster_name": "kipik",
            "kubernetes_version": "v1.36.1",
            "pod_subnet": "10.244.0.0/16",
            "service_subnet": "10.96.0.0/16",
            "bootstrap_token": "abcdef.0123456789abcdef",
            "cni_marker": str(self.cni),
            "host": "127.0.0.1",
            "port": 0,
        }
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cfg["cert"], cfg["key"])
        context.load_verify_locations(cfg["ca_cert"])
        context.verify_mode = ssl.CERT_OPTIONAL
        self.httpd = apiserver.ApiServer(cfg, context, cfg["log"])
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def client(self, who: str = "admin") -> client.ApiClient:
        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = self.pki["ca"]
        if who != "anonymous":
            cfg.cert_file = self.pki[who]
            cfg.key_file = self.pki[f"{who}_key"]
        return client.ApiClient(cfg)

    def raw(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        who: str = "admin",
    ) -> tuple[int, dict[str, str], Any]:
        """One HTTPS request outside the official client: (status, headers, decoded body)."""
        import http.client
        import ssl

        context = ssl.create_default_context(cafile=self.pki["ca"])
        if who != "anonymous":
            context.load_cert_chain(self.pki[who], self.pki[f"{who}_key"])
        conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            answer = dict(response.getheaders())
        finally:
            conn.close()
        try:
            decoded: Any = json.loads(data)
        except ValueError:
            decoded = data.decode()
        return response.status, answer, decoded

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with tempfile.TemporaryDirectory() as folder:
        running = Server(Path(folder))
        try:
            yield running
        finally:
            running.stop()


@pytest.fixture(scope="module")
def admin(server: Server) -> Iterator[client.ApiClient]:
    api = server.client()
    yield api
    api.close()


@pytest.fixture(scope="module")
def dyn(admin: client.ApiClient) -> DynamicClient:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as cache:
        path = cache.name
    Path(path).unlink()
    return DynamicClient(admin, cache_file=path)


def typed_api(api_class: Any, api_client: client.ApiClient) -> Any:
    """An API of the official client, typed Any: the tests send plain dict bodies."""
    return api_class(api_client)


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def status_of(exc: pytest.ExceptionInfo[ApiException]) -> dict[str, Any]:
    body = json.loads(exc.value.body or "")
    assert isinstance(body, dict)
    return body


_namespaces = iter(range(1000))


@pytest.fixture
def namespace(admin: client.ApiClient) -> str:
    """A fresh namespace whose `default` ServiceAccount exists."""
    core = typed_api(client.CoreV1Api, admin)
    name = f"test-{next(_namespaces)}"
    core.create_namespace({"metadata": {"name": name}})
    wait_until(
        lambda: core.list_namespaced_service_account(name).items, 5, "the default ServiceAccount"
    )
    return name


# -- discovery ----------------------------------------------------------------------------------
def test_discovery_through_the_dynamic_client(dyn: DynamicClient) -> None:
    deployments = dyn.resources.get(api_version="apps/v1", kind="Deployment")
    assert deployments.namespaced
    assert deployments.short_names == ["deploy"]
    assert set(deployments.subresources) == {"scale", "status"}
    pods = dyn.resources.get(api_version="v1", kind="Pod")
    assert {"log", "portforward", "status"} <= set(pods.subresources)
    assert dyn.resources.get(api_version="v1", kind="Service").categories == ["all"]
    for api_version, kind in (
        ("batch/v1", "Job"),
        ("discovery.k8s.io/v1", "EndpointSlice"),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition"),
        ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration"),
        ("networking.k8s.io/v1", "NetworkPolicy"),
        ("v1", "PersistentVolumeClaim"),
    ):
        assert dyn.resources.get(api_version=api_version, kind=kind).kind == kind
    with pytest.raises(ResourceNotFoundError):
        dyn.resources.get(api_version="apps/v1", kind="Nope")


def test_aggregated_discovery_is_answered_with_legacy_json(server: Server) -> None:
    accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
    code, headers, body = server.raw("GET", "/apis", headers={"Accept": accept})
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert body["kind"] == "APIGroupList"
    names = [g["name"] for g in body["groups"]]
    assert "apps" in names
    assert "apiextensions.k8s.io" in names


class FakeKubelet:
    """What the kubelet double will do, through the API as `system:node:NAME`.

    It runs every pod bound to the node (Running + Ready + a pod IP), or ends it when its `exit`
    label says so.
    """

    def __init__(self, server: Server) -> None:
        self.api = server.client("node")
        self.core = typed_api(client.CoreV1Api, self.api)
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        ips = iter(range(2, 250))
        while not self.stopping.wait(0.05):
            try:
                pods = self.core.list_pod_for_all_namespaces(
                    field_selector=f"spec.nodeName={NODE_NAME}"
                ).items
                for pod in pods:
                    if pod.status.phase != "Pending":
                        continue
                    exit_code = (pod.metadata.labels or {}).get("exit")
                    if exit_code is not None:
                        status: dict[str, Any] = {
                            "phase": "Succeeded" if exit_code == "0" else "Failed",
                            "conditions": [{"type": "Ready", "status": "False"}],
                        }
                    else:
                        status = {
                            "phase": "Running",
                            "podIP": f"10.244.0.{next(ips)}",
                            "conditions": [
                                {"type": "Ready", "status": "True"},
                                {"type": "ContainersReady", "status": "True"},
                            ],
                        }
                    self.core.patch_namespaced_pod_status(
                        pod.metadata.name, pod.metadata.namespace, {"status": status}
                    )
            except ApiException as exc:
                if exc.status != 404:
                    self.errors.append(f"{exc.status} {exc.body}")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.api.close()


@pytest.fixture
def kubelet(server: Server, admin: client.ApiClient) -> Iterator[FakeKubelet]:
    """A single-node cluster as kind leaves it (control-plane taint removed) with a kubelet."""
    untaint(admin)
    running = FakeKubelet(server)
    yield running
    running.stop()
    assert running.errors == []


def untaint(admin: client.ApiClient) -> None:
    core = typed_api(client.CoreV1Api, admin)
    node = core.read_node(NODE_NAME)
    taints = [t for t in node.spec.taints or [] if t.key != "node-role.kubernetes.io/control-plane"]
    core.patch_node(NODE_NAME, [{"op": "replace", "path": "/spec/taints", "value": [
        {"key": t.key, "effect": t.effect} for t in taints
    ]}])  # fmt: skip


def events_of(admin: client.ApiClient, namespace: str, name: str) -> list[tuple[str, str, str]]:
    listed = typed_api(client.CoreV1Api, admin).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}"
    )
    return [(e.type, e.reason, e.message) for e in listed.items]


# -- CRUD and errors -----------------------------------------------------------------------
def test_create_get_conflicts_and_texts(admin: client.ApiClient, namespace: str) -> None:
    core = typed_api(client.CoreV1Api, admin)
    made = core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cm", "labels": {"a": "1"}}, "data": {"k": "v"}}
    )
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "cm"}})
    assert exists.value.status == 409
    assert status_of(exists)["message"] == 'configmaps "cm" already exists'
    with pytest.raises(ApiException) as missing:
        typed_api(client.AppsV1Api, admin).read_namespaced_deployment("nope", namespace)
    assert missing.value.status == 404
    assert status_of(missing)["message"] == 'deployments.apps "nope" not found'
    assert status_of(missing)["details"] == {"name": "nope", "group": "apps", "kind": "deployments"}
    stale = {
        "metadata": {
            "name": "cm",
            "labels": {"a": "1"},
            "resourceVersion": made.metadata.resource_version,
        }
    }
    core.replace_namespaced_config_map("cm", namespace, {**stale, "data": {"k": "w"}})
    with pytest.raises(ApiException) as conflict:
        core.replace_namespaced_config_map("cm", namespace, {**stale, "data": {"k": "x"}})
    assert conflict.value.status == 409
    assert status_of(conflict)["reason"] == "Conflict"
    with pytest.raises(ApiException) as bad_name:
        core.create_namespaced_service(
            namespace, {"metadata": {"name": "1web"}, "spec": {"ports": [{"port": 80}]}}
        )
    assert bad_name.value.status == 422
    assert status_of(bad_name)["message"].startswith(
        'Service "1web" is invalid: metadata.name: Invalid value: "1web": a DNS-1035 label'
    )
    with pytest.raises(ApiException) as no_ns:
        core.create_namespaced_config_map("absent", {"metadata": {"name": "cm"}})
    assert no_ns.value.status == 404
    assert status_of(no_ns)["message"] == 'namespaces "absent" not found'
    listed = core.list_namespaced_config_map(namespace, label_selector="a=1")
    assert [c.metadata.name for c in listed.items] == ["cm"]
    with pytest.raises(ApiException) as bad_field:
        core.list_namespaced_config_map(namespace, field_selector="data.k=v")
    assert status_of(bad_field)["message"] == (
        '"data.k" is not a known field selector: only "metadata.name", "metadata.namespace"'
    )
    with pytest.raises(ApiException) as bad_pod_field:
        core.list_namespaced_pod(namespace, field_selector="spec.foo=v")
    assert status_of(bad_pod_field)["message"] == "field label not supported: spec.foo"


def test_dry_run_stores_nothing(admin: client.ApiClient, namespace: str) -> None:
    core = typed_api(client.CoreV1Api, admin)
    made = core.create_namespaced_secret(
        namespace, {"metadata": {"name": "s"}, "stringData": {"a": "b"}}, dry_run="All"
    )
    assert made.data == {"a": "Yg=="}
    with pytest.raises(ApiException) as missing:
        core.read_namespaced_secret("s", namespace)
    assert missing.value.status == 404


def test_patch_flavours(admin: client.ApiClient, dyn: DynamicClient, namespace: str) -> None:
    cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
    cms.create(body={"metadata": {"name": "p"}, "data": {"a": "1", "b": "2"}}, namespace=namespace)
    merged = cms.patch(
        name="p",
        namespace=namespace,
        body={"data": {"a": None, "c": "3"}},
        content_type="application/merge-patch+json",
    )
    assert merged.data.to_dict() == {"b": "2", "c": "3"}
    patched = cms.patch(
        name="p",
        namespace=namespace,
        body=[{"op": "replace", "path": "/data/b", "value": "9"}],
        content_type="application/json-patch+json",
    )
    assert patched.data.b == "9"
    with pytest.raises(ApiException) as forced:
        cms.patch(name="p", namespace=namespace, body={"data": {}}, force_conflicts=True,
                  content_type="application/merge-patch+json")  # fmt: skip
    assert forced.value.status == 422


def test_server_side_apply(admin: client.ApiClient, dyn: DynamicClient, namespace: str) -> None:
    cms = dyn.resources.get(api_version="v1", kind="ConfigMap")
    body = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "ssa"},
        "data": {"a": "1"},
    }
    created = cms.server_side_apply(body=body, namespace=namespace, field_manager="tests")
    assert created.data.a == "1"
    managers = [(m.manager, m.operation) for m in created.metadata.managedFields]
    assert managers == [("tests", "Apply")]
    again = cms.server_side_apply(
        body={**body, "data": {"b": "2"}}, namespace=namespace, field_manager="tests",
        force_conflicts=True,
    )  # fmt: skip
    assert again.data.to_dict() == {"a": "1", "b": "2"}
    with pytest.raises(ApiException) as no_manager:
        cms.server_side_apply(body=body, namespace=namespace)
    assert no_manager.value.status == 422
    assert status_of(no_manager)["message"] == (
        'PatchOptions.meta.k8s.io "" is invalid: fieldManager: Required value: is required for '
        "apply patch"
    )
    with pytest.raises(ApiException) as wrong_version:
        cms.server_side_apply(
            body={**body, "apiVersion": "v2"}, namespace=namespace, field_manager="tests"
        )
    assert wrong_version.value.status == 400
    assert status_of(wrong_version)["message"] == (
        "Incorrect version specified in apply patch. Specified patch version: v2, expected: v1"
    )


def test_apply_bodies_must_be_json(server: Server, namespace: str) -> None:
    code, _, body = server.raw(
        "PATCH",
        f"/api/v1/namespaces/{namespace}/configmaps/y?fieldManager=t",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\n",
        {"Content-Type": "application/apply-patch+yaml"},
    )
    assert code == 415
    assert "only JSON-encoded" in body["message"]


# -- custom resources ------------------------------------------------------------------------
def widget_crd(name: str = "widgets.example.com") -> dict[str, Any]:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["size"],
                "properties": {
                    "size": {"type": "integer", "minimum": 1},
                    "color": {"type": "string", "enum": ["red", "blue"]},
                    "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                },
            },
            "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": name},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def test_crd_validation_texts(admin: client.ApiClient) -> None:
    ext = typed_api(client.ApiextensionsV1Api, admin)
    with pytest.raises(ApiException) as wrong_name:
        ext.create_custom_resource_definition(widget_crd("widget.example.com"))
    assert wrong_name.value.status == 422
    assert status_of(wrong_name)["message"] == (
        'CustomResourceDefinition.apiextensions.k8s.io "widget.example.com" is invalid: '
        'metadata.name: Invalid value: "widget.example.com": must be spec.names.plural+"."+'
        "spec.group"
    )
    crd = widget_crd()
    crd["spec"]["versions"][0]["storage"] = False
    del crd["spec"]["versions"][0]["schema"]
    with pytest.raises(ApiException) as no_storage:
        ext.create_custom_resource_definition(crd)
    causes = {c["field"]: c["message"] for c in status_of(no_storage)["details"]["causes"]}
    assert causes["spec.versions"].endswith(
        "must have exactly one version marked as storage version"
    )
    assert (
        causes["spec.versions[0].schema.openAPIV3Schema"] == "Required value: schemas are required"
    )


def test_custom_resources_appear_once_established(
    admin: client.ApiClient, dyn: DynamicClient, namespace: str
) -> None:
    ext = typed_api(client.ApiextensionsV1Api, admin)
    custom = typed_api(client.CustomObjectsApi, admin)
    ext.create_custom_resource_definition(widget_crd())
    item = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": 2, "unknown": 1, "extra": {"any": "thing"}}}  # fmt: skip
    # right after creation, as on a real cluster, the resource is not served yet
    with pytest.raises(ApiException) as early:
        custom.create_namespaced_custom_object("example.com", "v1", namespace, "widgets", item)
    assert early.value.status == 404

    def established() -> bool:
        crd = ext.read_custom_resource_definition("widgets.example.com")
        return any(
            c.type == "Established" and c.status == "True" for c in crd.status.conditions or []
        )

    wait_until(established, 5, "the CRD to be Established")
    crd = ext.read_custom_resource_definition("widgets.example.com")
    assert [c.type for c in crd.status.conditions] == ["NamesAccepted", "Established"]
    made = custom.create_namespaced_custom_object("example.com", "v1", namespace, "widgets", item)
    assert made["spec"] == {"size": 2, "extra": {"any": "thing"}}  # unknown field pruned
    widgets = dyn.resources.get(api_version="example.com/v1", kind="Widget")
    assert widgets.short_names == ["wd"]
    assert widgets.subresources["status"].kind == "Widget"
    with pytest.raises(ApiException) as typed:
        widgets.create(
            body={**item, "metadata": {"name": "x"}, "spec": {"size": "big"}}, namespace=namespace
        )
    assert typed.value.status == 422
    assert status_of(typed)["message"] == (
        'Widget.example.com "x" is invalid: spec.size: Invalid value: "string": spec.size in '
        'body must be of type integer: "string"'
    )
    with pytest.raises(ApiException) as required:
        widgets.create(body={**item, "metadata": {"name": "y"}, "spec": {}}, namespace=namespace)
    assert status_of(required)["details"]["causes"] == [
        {"reason": "FieldValueRequired", "message": "Required value", "field": "spec.size"}
    ]
    # the status subresource: the main resource ignores status, /status changes only status
    stored = widgets.patch(name="w", namespace=namespace, body={"status": {"ready": True}},
                           content_type="application/merge-patch+json")  # fmt: skip
    assert stored.status is None
    stored = widgets.status.patch(name="w", namespace=namespace, body={"status": {"ready": True}},
                                  content_type="application/merge-patch+json")  # fmt: skip
    assert stored.status.ready is True
    applied = widgets.server_side_apply(
        body={"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "z"},
              "spec": {"size": 5}},
        namespace=namespace, field_manager="tests",
    )  # fmt: skip
    assert applied.spec.size == 5
    ext.delete_custom_resource_definition("widgets.example.com")
    code, _, _ = server_of(admin).raw(
        "GET", f"/apis/example.com/v1/namespaces/{namespace}/widgets/w"
    )
    assert code == 404
    _, _, groups = server_of(admin).raw("GET", "/apis")
    assert "example.com" not in [g["name"] for g in groups["groups"]]


_servers: dict[str, Server] = {}


def server_of(api: client.ApiClient) -> Server:
    return _servers[api.configuration.host]


@pytest.fixture(autouse=True, scope="module")
def _register(server: Server) -> None:
    _servers[server.url] = server


# -- workloads -------------------------------------------------------------------------------
def test_deployment_rolls_out_to_available(
    admin: client.ApiClient, namespace: str, kubelet: FakeKubelet
) -> None:
    apps, core = typed_api(client.AppsV1Api, admin), typed_api(client.CoreV1Api, admin)
    body = {
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "nginx:1", "ports": [
                    {"name": "http", "containerPort": 8080}]}]},
            },
        },
    }  # fmt: skip
    apps.create_namespaced_deployment(namespace, body)

    def available() -> Any:
        d = apps.read_namespaced_deployment_status("web", namespace)
        conditions = {c.type: c.reason for c in d.status.conditions or []}
        done = d.status.available_replicas == 2 and conditions.get("Progressing") == (
            "NewReplicaSetAvailable"
        )
        return d if done else None

    deployment = wait_until(available, 10, "the Deployment to be Available")
    assert {c.type: (c.status, c.reason) for c in deployment.status.conditions} == {
        "Available": ("True", "MinimumReplicasAvailable"),
        "Progressing": ("True", "NewReplicaSetAvailable"),
    }
    assert deployment.status.observed_generation == 1
    (rs,) = apps.list_namespaced_replica_set(namespace).items
    digest = rs.metadata.labels["pod-template-hash"]
    assert rs.metadata.name == f"web-{digest}"
    assert rs.metadata.owner_references[0].kind == "Deployment"
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    assert len(pods) == 2
    assert all(p.metadata.name.startswith(f"web-{digest}-") for p in pods)
    assert all(len(p.metadata.name) == len(f"web-{digest}-") + 5 for p in pods)
    assert {p.spec.node_name for p in pods} == {NODE_NAME}
    reasons = [r for _, r, _ in events_of(admin, namespace, "web")]
    assert "ScalingReplicaSet" in reasons
    assert ("Normal", "SuccessfulCreate") in {
        (t, r) for t, r, _ in events_of(admin, namespace, rs.metadata.name)
    }
    # a Service selects the pods: ClusterIP from the service subnet, endpoints by named port
    svc = core.create_namespaced_service(namespace, {"metadata": {"name": "web"}, "spec": {
        "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]}})  # fmt: skip
    assert svc.spec.cluster_ip.startswith("10.96.")

    def endpoints() -> Any:
        try:
            found = core.read_namespaced_endpoints("web", namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return None
        return found if found.subsets else None

    ep = wait_until(endpoints, 5, "endpoints")
    assert sorted(a.ip for a in ep.subsets[0].addresses) == sorted(p.status.pod_ip for p in pods)
    assert ep.subsets[0].ports[0].port == 8080
    slices = (
        typed_api(client.DiscoveryV1Api, admin)
        .list_namespaced_endpoint_slice(namespace, label_selector="kubernetes.io/service-name=web")
        .items
    )
    assert len(slices) == 1
    assert all(e.conditions.ready for e in slices[0].endpoints)
    # a template change rolls out a new ReplicaSet; scaling goes through the scale subresource
    apps.patch_namespaced_deployment("web", namespace, {"spec": {"template": {"metadata": {
        "annotations": {"v": "2"}}}}})  # fmt: skip
    wait_until(
        lambda: len([r for r in apps.list_namespaced_replica_set(namespace).items
                     if r.spec.replicas]) == 1
        and apps.read_namespaced_deployment("web", namespace).status.updated_replicas == 2,
        10, "the rollout",
    )  # fmt: skip
    apps.patch_namespaced_deployment_scale("web", namespace, {"spec": {"replicas": 3}})
    wait_until(
        lambda: apps.read_namespaced_deployment("web", namespace).status.available_replicas == 3,
        10,
        "three available replicas",
    )
    # deleting the Deployment collects its ReplicaSets and pods
    apps.delete_namespaced_deployment("web", namespace)
    wait_until(lambda: not core.list_namespaced_pod(namespace).items, 5, "garbage collection")
    assert apps.list_namespaced_replica_set(namespace).items == []


def test_job_runs_to_complete(
    admin: client.ApiClient, namespace: str, kubelet: FakeKubelet
) -> None:
    batch = typed_api(client.BatchV1Api, admin)
    template: dict[str, Any] = {"metadata": {"labels": {"exit": "0"}},
                "spec": {"containers": [{"name": "c", "image": "busybox:1"}]}}  # fmt: skip
    with pytest.raises(ApiException) as invalid:
        batch.create_namespaced_job(
            namespace, {"metadata": {"name": "j"}, "spec": {"template": template}}
        )
    assert status_of(invalid)["message"] == (
        'Job.batch "j" is invalid: spec.template.spec.restartPolicy: Required value: valid '
        'values: "OnFailure", "Never"'
    )
    template["spec"]["restartPolicy"] = "Never"
    batch.create_namespaced_job(
        namespace, {"metadata": {"name": "j"}, "spec": {"template": template}}
    )
    job = wait_until(
        lambda: (j := batch.read_namespaced_job("j", namespace)).status.succeeded == 1 and j,
        10,
        "the Job to succeed",
    )
    assert ("Complete", "True") in [(c.type, c.status) for c in job.status.conditions]
    assert job.status.completion_time is not None


def test_scheduler_taints_and_selectors(admin: client.ApiClient, namespace: str) -> None:
    core = typed_api(client.CoreV1Api, admin)
    node = core.read_node(NODE_NAME)
    core.patch_node(NODE_NAME, {"spec": {"taints": [
        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}]}})  # fmt: skip
    pod: dict[str, Any] = {
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "x:1"}]},
    }
    core.create_namespaced_pod(namespace, pod)
    expected = (
        "0/1 nodes are available: 1 node(s) had untolerated taint "
        "{node-role.kubernetes.io/control-plane: }. preemption: 0/1 nodes are available: 1 "
        "Preemption is not helpful for scheduling."
    )
    wait_until(
        lambda: ("Warning", "FailedScheduling", expected) in events_of(admin, namespace, "p"),
        5,
        "FailedScheduling",
    )
    scheduled = core.read_namespaced_pod("p", namespace).status.conditions
    assert [(c.type, c.status, c.reason) for c in scheduled] == [
        ("PodScheduled", "False", "Unschedulable")
    ]
    tolerant = {**pod, "metadata": {"name": "t"}, "spec": {**pod["spec"], "tolerations": [
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}}  # fmt: skip
    core.create_namespaced_pod(namespace, tolerant)
    wait_until(lambda: core.read_namespaced_pod("t", namespace).spec.node_name, 5, "binding")
    picky = {**pod, "metadata": {"name": "s"}, "spec": {**pod["spec"], "tolerations":
             tolerant["spec"]["tolerations"], "nodeSelector": {"disk": "ssd"}}}  # fmt: skip
    core.create_namespaced_pod(namespace, picky)
    wait_until(
        lambda: any("didn't match Pod's node affinity/selector" in m
                    for _, _, m in events_of(admin, namespace, "s")),
        5, "FailedScheduling for the selector",
    )  # fmt: skip
    untaint(admin)
    wait_until(lambda: core.read_namespaced_pod("p", namespace).spec.node_name, 5, "rescheduling")
    assert node.metadata.labels["node-role.kubernetes.io/control-plane"] == ""
    deleted = core.delete_namespaced_pod("p", namespace)
    assert deleted.metadata.name == "p"
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_pod("p", namespace)
    assert gone.value.status == 404


def test_node_ports_and_cluster_ips(admin: client.ApiClient, namespace: str) -> None:
    core = typed_api(client.CoreV1Api, admin)
    svc = core.create_namespaced_service(namespace, {"metadata": {"name": "np"}, "spec": {
        "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}})  # fmt: skip
    assert svc.spec.ports[0].node_port == 30080
    with pytest.raises(ApiException) as taken:
        core.create_namespaced_service(namespace, {"metadata": {"name": "np2"}, "spec": {
            "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}})  # fmt: skip
    assert status_of(taken)["message"] == (
        'Service "np2" is invalid: spec.ports[0].nodePort: Invalid value: 30080: provided port '
        "is already allocated"
    )
    with pytest.raises(ApiException) as out_of_range:
        core.create_namespaced_service(namespace, {"metadata": {"name": "np3"}, "spec": {
            "type": "NodePort", "ports": [{"port": 80, "nodePort": 80}]}})  # fmt: skip
    assert (
        "provided port is not in the valid range. The range of valid ports is 30000-32767"
        in (status_of(out_of_range)["message"])
    )
    auto = core.create_namespaced_service(namespace, {"metadata": {"name": "lb"}, "spec": {
        "type": "LoadBalancer", "ports": [{"port": 443}]}})  # fmt: skip
    assert 30000 <= auto.spec.ports[0].node_port <= 32767
    kubernetes = core.read_namespaced_service("kubernetes", "default")
    assert kubernetes.spec.cluster_ip == "10.96.0.1"
    with pytest.raises(ApiException) as used_ip:
        core.create_namespaced_service(namespace, {"metadata": {"name": "ip"}, "spec": {
            "clusterIP": "10.96.0.1", "ports": [{"port": 80}]}})  # fmt: skip
    assert (
        "failed to allocate IP 10.96.0.1: provided IP is already allocated"
        in (status_of(used_ip)["message"])
    )


# -- identities ------------------------------------------------------------------------------
def test_kubelet_identity_is_limited(server: Server, namespace: str) -> None:
    node = server.client("node")
    try:
        core = typed_api(client.CoreV1Api, node)
        core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE_NAME}")
        core.list_namespaced_service(namespace)
        core.read_namespaced_config_map("kube-root-ca.crt", namespace)
        with pytest.raises(ApiException) as denied:
            core.create_namespaced_config_map(namespace, {"metadata": {"name": "x"}})
        assert denied.value.status == 403
        assert status_of(denied)["message"] == (
            f'configmaps is forbidden: User "system:node:{NODE_NAME}" cannot create resource '
            f'"configmaps" in API group "" in the namespace "{namespace}"'
        )
        with pytest.raises(ApiException) as no_apps:
            typed_api(client.AppsV1Api, node).list_namespaced_deployment(namespace)
        assert 'in API group "apps"' in status_of(no_apps)["message"]
    finally:
        node.close()
    code, _, body = server.raw("GET", "/api/v1/namespaces", who="nobody")
    assert code == 403
    assert body["message"] == (
        'namespaces is forbidden: User "jane" cannot list resource "namespaces" in API group "" '
        "at the cluster scope"
    )


def test_streaming_routes_reach_the_streaming_module(
    server: Server, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, dict[str, list[str]]]] = []

    class FakeStreaming:
        @staticmethod
        def serve(handler: Any, subresource: str, pod: dict[str, Any], query: Any) -> None:
            calls.append((subresource, pod["metadata"]["name"], query))
            data = b"hello\n"
            handler.send_response(200)
            handler.send_header("Content-Type", "text/plain")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)

    monkeypatch.setattr(apiserver, "_streaming", lambda: FakeStreaming)
    code, _, body = server.raw("GET", f"/api/v1/namespaces/{namespace}/pods/nope/log")
    assert code == 404
    assert body["message"] == 'pods "nope" not found'
    pod = {"metadata": {"name": "s"}, "spec": {"containers": [{"name": "c", "image": "x:1"}]}}
    typed_api(client.CoreV1Api, server.client()).create_namespaced_pod(namespace, pod)
    code, _, body = server.raw("GET", f"/api/v1/namespaces/{namespace}/pods/s/log", who="nobody")
    assert code == 403
    assert body["message"] == (
        'pods "s" is forbidden: User "jane" cannot get resource "pods/log" in API group "" in '
        f'the namespace "{namespace}"'
    )
    code, _, body = server.raw("GET", f"/api/v1/namespaces/{namespace}/pods/s/log?tailLines=3")
    assert (code, body) == (200, "hello\n")
    code, _, _ = server.raw("POST", f"/api/v1/namespaces/{namespace}/pods/s/portforward?ports=80")
    assert code == 200
    assert calls == [("log", "s", {"tailLines": ["3"]}), ("portforward", "s", {"ports": ["80"]})]

    def missing() -> ModuleType:
        raise ModuleNotFoundError("No module named 'streaming'", name="streaming")

    monkeypatch.setattr(apiserver, "_streaming", missing)
    code, _, body = server.raw("GET", f"/api/v1/namespaces/{namespace}/pods/s/log")
    assert code == 503
    assert "streaming.py" in body["message"]


def test_namespace_deletion_removes_its_objects(admin: client.ApiClient, namespace: str) -> None:
    core = typed_api(client.CoreV1Api, admin)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "cm"}})
    core.delete_namespace(namespace)
    with pytest.raises(ApiException) as terminating:
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "other"}})
    assert terminating.value.status == 403
    assert status_of(terminating)["message"] == (
        f"unable to create new content in namespace {namespace} because it is being terminated"
    )
    wait_until(
        lambda: namespace not in [n.metadata.name for n in core.list_namespace().items],
        5,
        "the namespace to go",
    )
    assert (
        core.list_config_map_for_all_namespaces(
            field_selector=f"metadata.namespace={namespace}"
        ).items
        == []
    )


def test_kubectl_double_removes_the_control_plane_taint(server: Server, tmp_path: Path) -> None:
    """What kind runs in a single-node cluster, through the kubectl double."""
    import sys

    from tests.doubles.node import nodelib

    kubeconfig = tmp_path / "admin.conf"
    nodelib.write_kubeconfig(
        str(kubeconfig),
        cluster="kipik",
        user="kubernetes-admin",
        server=server.url,
        ca=Path(server.pki["ca"]).read_bytes(),
        cert=Path(server.pki["admin"]).read_bytes(),
        key=Path(server.pki["admin_key"]).read_bytes(),
    )
    admin = server.client()
    try:
        core = typed_api(client.CoreV1Api, admin)
        taint = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
        core.patch_node(NODE_NAME, {"spec": {"taints": [taint]}})

        def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, str(NODE / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
                capture_output=True,
                text=True,
                check=False,
            )

        done = kubectl("taint", "nodes", "--all", "node-role.kubernetes.io/control-plane-")
        assert (done.returncode, done.stdout) == (0, f"node/{NODE_NAME} untainted\n")
        again = kubectl("taint", "nodes", "--all", "node-role.kubernetes.io/control-plane-")
        assert again.returncode == 1
        assert again.stderr == 'error: taint "node-role.kubernetes.io/control-plane" not found\n'
        label = "node.kubernetes.io/exclude-from-external-load-balancers"
        done = kubectl("label", "nodes", "--all", f"{label}-")
        assert (done.returncode, done.stdout) == (0, f"node/{NODE_NAME} unlabeled\n")
        node = core.read_node(NODE_NAME)
        assert label not in node.metadata.labels
        assert "node-role.kubernetes.io/control-plane" not in [
            t.key for t in node.spec.taints or []
        ]
    finally:
        admin.close()
