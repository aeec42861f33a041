"""Kubernetes objects from dicts, YAML text, files and folders, applied through the official client.

:func:`load` and :func:`ordered` are pure (exact unit tests); :class:`Manifests` does the API
calls through :class:`kubernetes.dynamic.DynamicClient`, so custom resources work as soon as
their CRD is established.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeAlias

import yaml
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError

from pytest_kipik.errors import ConfigError, KipikError, status_message
from pytest_kipik.waiting import NotYet, wait_until

#: What :meth:`Manifests.apply` takes: an object, YAML text, a file or folder, or a list of them.
Source: TypeAlias = Mapping[str, Any] | str | Path | Iterable["Source"]
#: Decides from an object (as a dict) whether what is awaited has happened.
Predicate = Callable[[dict[str, Any]], bool]

FIELD_MANAGER = "pytest-kipik"
CRD_API = "apiextensions.k8s.io/v1"
_SUFFIXES = (".yaml", ".yml", ".json")
# Applied first, deleted last: what other objects live in or are instances of.
_FIRST = ("Namespace", "CustomResourceDefinition")


def _documents(text: str, origin: str) -> list[Any]:
    try:
        return list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None


def _from_path(path: Path) -> list[tuple[Any, str]]:
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIXES)
        return [doc for file in found for doc in _from_path(file)]
    text = path.read_text(encoding="utf-8")
    return [
        (doc, f"{path} (document {i + 1})") for i, doc in enumerate(_documents(text, str(path)))
    ]


def _raw(source: Source, origin: str) -> list[tuple[Any, str]]:
    if isinstance(source, Mapping):
        return [(source, origin)]
    if isinstance(source, Path):
        if not source.exists():
            raise ConfigError(f"{source}: no such file or folder")
        return _from_path(source)
    if isinstance(source, str):
        if "\n" not in source and Path(source).exists():
            return _from_path(Path(source))
        docs = _documents(source, origin)
        if len(docs) == 1 and isinstance(docs[0], str):
            raise ConfigError(
                f"{source!r} is neither an existing file or folder nor YAML of Kubernetes objects"
            )
        return [(doc, f"{origin} (document {i + 1})") for i, doc in enumerate(docs)]
    if isinstance(source, Iterable):
        return [raw for i, item in enumerate(source) for raw in _raw(item, f"{origin}[{i}]")]
    raise ConfigError(f"{origin}: cannot make Kubernetes objects of a {type(source).__name__}")


def _checked(doc: Any, origin: str) -> list[dict[str, Any]]:
    if doc is None:  # an empty document, e.g. after a trailing ---
        return []
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{origin}: a Kubernetes object must be a mapping, not {doc!r:.60}")
    if str(doc.get("kind", "")).endswith("List") and "items" in doc:
        return [obj for item in doc["items"] or [] for obj in _checked(item, origin)]
    missing = [key for key in ("apiVersion", "kind") if not doc.get(key)]
    metadata = doc.get("metadata")
    if not isinstance(metadata, Mapping) or not (
        metadata.get("name") or metadata.get("generateName")
    ):
        missing.append("metadata.name")
    if missing:
        raise ConfigError(f"{origin}: the object has no {', '.join(missing)}")
    return [dict(doc)]


def load(source: Source, origin: str = "manifest") -> list[dict[str, Any]]:
    """The objects in ``source``, in order, each checked to have apiVersion, kind and a name.

    A string is a file or folder when one exists by that name (and it has no newline), else
    YAML text; a folder means its ``.yaml``/``.yml``/``.json`` files in name order; ``List``
    objects are expanded. Raises ConfigError naming the document that is wrong.
    """
    return [obj for doc, where in _raw(source, origin) for obj in _checked(doc, where)]


def ordered(objects: Iterable[dict[str, Any]], *, deleting: bool = False) -> list[dict[str, Any]]:
    """Namespaces and CRDs first (last when ``deleting``), the rest in their given order."""
    items = list(objects)
    first = [o for o in items if o.get("kind") in _FIRST]
    first.sort(key=lambda o: _FIRST.index(o["kind"]))
    rest = [o for o in items if o.get("kind") not in _FIRST]
    return list(reversed(rest)) + list(reversed(first)) if deleting else first + rest


def describe(obj: Mapping[str, Any]) -> str:
    """``Kind namespace/name`` (or ``Kind name``) of an object."""
    meta = obj.get("metadata") or {}
    name = meta.get("name") or f"{meta.get('generateName', '')}*"
    namespace = meta.get("namespace")
    return f"{obj.get('kind')} {namespace}/{name}" if namespace else f"{obj.get('kind')} {name}"


def condition_holds(obj: Mapping[str, Any], condition: str) -> bool:
    """Whether ``status.conditions`` has ``condition`` (``Type`` or ``Type=Status``) holding."""
    wanted, _, status = condition.partition("=")
    status = status or "True"
    for found in (obj.get("status") or {}).get("conditions") or []:
        if str(found.get("type", "")).lower() == wanted.lower():
            return str(found.get("status")) == status
    return False


def _state(obj: Mapping[str, Any] | None, *, whole: bool = False) -> str:
    """The object as a timeout shows it: its generation and status, or (``whole``) all of it.

    A function condition may judge any field, so it is shown the whole object (without the
    managedFields bookkeeping); a condition type lives in the status.
    """
    if obj is None:
        return "not found"
    if whole:
        metadata = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "managedFields"}
        shown = {**obj, "metadata": metadata}
    else:
        shown = {"metadata": {"generation": (obj.get("metadata") or {}).get("generation")}}
        shown["status"] = obj.get("status") or {}
    text = yaml.safe_dump(shown, sort_keys=False, default_flow_style=False).strip()
    limit = 4000 if whole else 2000
    return text if len(text) <= limit else text[:limit] + "\n..."


class Manifests:
    """Apply, delete and wait for objects in one cluster, through a DynamicClient.

    ``cache_file``: where the client keeps its discovery cache (a private file of the cluster;
    the client's default is a shared file in the temporary directory).
    """

    def __init__(self, api_client: k8s_client.ApiClient, cache_file: Path) -> None:
        self.api_client = api_client
        self.cache_file = cache_file
        self._dynamic: DynamicClient | None = None

    @property
    def dynamic(self) -> DynamicClient:
        """The DynamicClient (made on first use: it reads the API's discovery documents)."""
        if self._dynamic is None:
            self._dynamic = DynamicClient(self.api_client, cache_file=str(self.cache_file))
        return self._dynamic

    def close(self) -> None:
        """Remove the discovery cache file."""
        self.cache_file.unlink(missing_ok=True)

    # -- finding the resource of an object -------------------------------------------------

    def resource(self, api_version: str | None, kind: str, timeout: float = 30) -> Any:
        """The API resource for ``kind`` (a Kind, plural, short name, or ``plural.group``).

        Refreshes discovery once when it is not found. When a CustomResourceDefinition defines
        it, waits (up to ``timeout``) until the API serves it; otherwise fails at once.
        """
        found = self._lookup(api_version, kind)
        if found is not None:
            return found
        where = f" in {api_version}" if api_version else ""
        if not self._defined_by_crd(api_version, kind):
            raise KipikError(
                f"the cluster serves no resource {kind!r}{where} and no CustomResourceDefinition "
                "defines it: check the kind and apiVersion, or apply its CRD first"
            )

        def served() -> Any:
            resource = self._lookup(api_version, kind)
            if resource is None:
                raise NotYet(f"a CRD defines {kind!r}{where}, but the API does not serve it yet")
            return resource

        return wait_until(
            served,
            what=f"the API to serve {kind!r}{where}",
            timeout=timeout,
            hint="is its CustomResourceDefinition established? look at its status.conditions",
            interval=0.5,
        )

    def _lookup(self, api_version: str | None, kind: str) -> Any:
        found = self._search(api_version, kind)
        if found is None:
            self.dynamic.resources.invalidate_cache()
            found = self._search(api_version, kind)
        return found

    def _defined_by_crd(self, api_version: str | None, kind: str) -> bool:
        group = api_version.rpartition("/")[0] if api_version else kind.partition(".")[2]
        crds = self._search(CRD_API, "CustomResourceDefinition")
        if crds is None:
            return False
        for crd in crds.get().to_dict().get("items") or []:
            spec = crd.get("spec") or {}
            names = spec.get("names") or {}
            if group and spec.get("group") != group:
                continue
            if kind in (names.get("kind"), names.get("plural"), names.get("singular")):
                return True
        return False

    def _search(self, api_version: str | None, kind: str) -> Any:
        plural, _, group = kind.partition(".")
        queries: list[dict[str, Any]] = []
        if api_version:
            queries.append({"api_version": api_version, "kind": kind})
            queries.append({"api_version": api_version, "name": kind})
        else:
            queries += [{"kind": kind}, {"name": plural, **({"group": group} if group else {})}]
            queries.append({"short_names": [kind]})
        for query in queries:
            try:
                found = [r for r in self.dynamic.resources.search(**query) if "/" not in r.name]
            except ResourceNotFoundError:
                continue
            if found:
                preferred = [r for r in found if getattr(r, "preferred", False)]
                return (preferred or found)[0]
        return None

    # -- applying ----------------------------------------------------------------------------

    def apply(
        self,
        source: Source,
        *,
        namespace: str | None = None,
        server_side: bool = True,
        timeout: float = 60,
    ) -> list[dict[str, Any]]:
        """Apply every object in ``source`` (see :func:`load`); returns them as the API has them.

        Namespaces and CRDs go first, and each CRD is waited for until established, so custom
        resources in the same call work. ``namespace`` is used for namespaced objects that name
        none (default: ``default``). ``server_side``: server-side apply with field manager
        ``pytest-kipik`` (conflicts forced); else create, or replace what exists.
        """
        deadline = time.monotonic() + timeout
        applied = []
        for obj in ordered(load(source)):
            left = max(deadline - time.monotonic(), 0)
            resource = self.resource(obj["apiVersion"], obj["kind"], timeout=left)
            body = self._placed(obj, resource, namespace)
            ns = body["metadata"].get("namespace")
            try:
                if server_side:
                    result = resource.server_side_apply(
                        body=body, namespace=ns, field_manager=FIELD_MANAGER, force_conflicts=True
                    )
                else:
                    result = self._create_or_replace(resource, body, ns)
            except ApiException as exc:
                raise KipikError(f"applying {describe(body)} failed: {_reason(exc)}") from None
            applied.append(result.to_dict())
            if obj["kind"] == "CustomResourceDefinition":
                self.wait_for(
                    "CustomResourceDefinition",
                    body["metadata"]["name"],
                    condition="Established",
                    timeout=max(deadline - time.monotonic(), 0),
                    api_version=CRD_API,
                )
        return applied

    def _placed(self, obj: dict[str, Any], resource: Any, namespace: str | None) -> dict[str, Any]:
        body = dict(obj)
        metadata = dict(body["metadata"])
        if resource.namespaced:
            metadata["namespace"] = metadata.get("namespace") or namespace or "default"
        else:
            metadata.pop("namespace", None)
        body["metadata"] = metadata
        return body

    def _create_or_replace(self, resource: Any, body: dict[str, Any], namespace: str | None) -> Any:
        try:
            return resource.create(body=body, namespace=namespace)
        except ApiException as exc:
            if exc.status != 409 or not body["metadata"].get("name"):
                raise
        current = resource.get(name=body["metadata"]["name"], namespace=namespace)
        replaced = dict(body)
        replaced["metadata"] = {
            **body["metadata"],
            "resourceVersion": current.metadata.resourceVersion,
        }
        return resource.replace(body=replaced, namespace=namespace)

    # -- deleting ----------------------------------------------------------------------------

    def delete(
        self,
        source: Source,
        *,
        namespace: str | None = None,
        wait: bool = False,
        timeout: float = 60,
    ) -> list[str]:
        """Delete every object in ``source`` (reverse order; gone already is fine).

        Returns what was deleted (``Kind namespace/name``). ``wait``: until each is gone.
        """
        deadline = time.monotonic() + timeout
        deleted = []
        for obj in ordered(load(source), deleting=True):
            resource = self._lookup(obj["apiVersion"], obj["kind"])
            if resource is None:
                continue  # its kind is not served (e.g. its CRD went first): nothing to delete
            body = self._placed(obj, resource, namespace)
            name, ns = body["metadata"].get("name"), body["metadata"].get("namespace")
            try:
                resource.delete(name=name, namespace=ns, propagation_policy="Background")
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise KipikError(f"deleting {describe(body)} failed: {_reason(exc)}") from None
            deleted.append(describe(body))
            if wait:
                self._wait_gone(resource, name, ns, max(deadline - time.monotonic(), 0))
        return deleted

    def _wait_gone(self, resource: Any, name: str, namespace: str | None, timeout: float) -> None:
        def gone() -> None:
            obj = self._get(resource, name, namespace)
            if obj is not None:
                raise NotYet(_state(obj))

        wait_until(
            gone,
            what=f"{resource.kind} {name} to be deleted",
            timeout=timeout,
            hint="a finalizer may hold it: look at metadata.finalizers",
        )

    # -- waiting -----------------------------------------------------------------------------

    def _get(self, resource: Any, name: str, namespace: str | None) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = resource.get(name=name, namespace=namespace).to_dict()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KipikError(f"reading {resource.kind} {name} failed: {_reason(exc)}") from None
        return found

    def wait_for(
        self,
        kind: str,
        name: str,
        namespace: str | None = None,
        condition: str | Predicate | None = None,
        timeout: float = 60,
        *,
        api_version: str | None = None,
    ) -> dict[str, Any]:
        """Wait until the object exists and ``condition`` holds; returns the object.

        ``condition``: a status condition type (``"Available"``, ``"Ready=False"``), the word
        ``"deleted"`` (until it is gone; returns ``{}``), or a function of the object (a dict
        as the API returns it). On timeout, WaitTimeout shows the last state seen.
        """
        resource = self.resource(api_version, kind, timeout=timeout)
        ns = (namespace or "default") if resource.namespaced else None
        label = f"{resource.kind} {ns}/{name}" if ns else f"{resource.kind} {name}"
        if condition == "deleted":
            self._wait_gone(resource, name, ns, timeout)
            return {}
        if callable(condition):
            holds: Predicate = condition
            what = f"{label} to satisfy {getattr(condition, '__name__', 'the predicate')}"
        elif condition:
            wanted = str(condition)
            holds = lambda obj: condition_holds(obj, wanted)  # noqa: E731
            what = f"{label} to be {wanted}"
        else:
            holds = lambda obj: True  # noqa: E731
            what = f"{label} to exist"

        def check() -> dict[str, Any]:
            obj = self._get(resource, name, ns)
            if obj is None or not holds(obj):
                raise NotYet(_state(obj, whole=callable(condition)))
            return obj

        return wait_until(
            check,
            what=what,
            timeout=timeout,
            hint=f"its events may say why: kubectl describe {resource.kind} {name}"
            + (f" -n {ns}" if ns else ""),
            interval=0.25,
        )


def _reason(exc: ApiException) -> str:
    """The API's message for a failed call (the Status ``message``, else the body)."""
    message = status_message(exc.body)
    if message is not None:
        return f"HTTP {exc.status}: {message}"
    return f"HTTP {exc.status} {exc.reason}: {str(exc.body)[:300]}"


def local_registry_hosting(pushed_to: str, inside: str) -> dict[str, Any]:
    """KEP-1755's ``local-registry-hosting`` ConfigMap: where tools push, what nodes pull by."""
    document = {"host": pushed_to, "hostFromContainerRuntime": inside}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "local-registry-hosting", "namespace": "kube-public"},
        "data": {"localRegistryHosting.v1": yaml.safe_dump(document, sort_keys=False)},
    }


def announce_local_registry(core: k8s_client.CoreV1Api, pushed_to: str, inside: str) -> None:
    """Create or replace the cluster's ``local-registry-hosting`` ConfigMap."""
    wanted = local_registry_hosting(pushed_to, inside)
    body = k8s_client.V1ConfigMap(
        metadata=k8s_client.V1ObjectMeta(**wanted["metadata"]), data=wanted["data"]
    )
    try:
        core.create_namespaced_config_map("kube-public", body, _request_timeout=30)
    except ApiException as exc:
        if exc.status != 409:
            raise KipikError(f"announcing the registry inside: {_reason(exc)}") from None
        core.replace_namespaced_config_map(
            "local-registry-hosting", "kube-public", body, _request_timeout=30
        )
