"""When is a nested cluster usable? /readyz ok, every node Ready, the default ServiceAccount.

A cluster restored from a snapshot must also show that it runs again, not only what its copy
remembers: its kubelets renewed their leases, its controller-manager and scheduler took their
leader leases again, its kube-system pods' status is the restarted kubelet's (the control plane's
own pods prove themselves by the above), and no kube-system Service points at a container of
before the copy.

Waiting only helps with what time can fix (connection refused, 5xx, not yet Ready). A TLS
verification failure or a 401/403 fails at once, with the real cause.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from pytest_kipik.errors import ClusterUnusableError, option
from pytest_kipik.k8s.tls import certificate_names
from pytest_kipik.waiting import NotYet, wait_until

_REQUEST_TIMEOUT = 5
_TLS_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "doesn't match")


def _tls_failure(server: str, detail: str) -> ClusterUnusableError:
    url = urlsplit(server)
    host, port = url.hostname or "", url.port or 443
    names = certificate_names(host, port)
    shown = ", ".join(names) if names else "(could not be read)"
    return ClusterUnusableError(
        f"the nested API server's certificate does not verify for {server}: {detail}\n"
        f"  names in the certificate: {shown}\n"
        f"  address used: {host}\n"
        "  hint: the address must be one of the certificate's names. kipik adds the address "
        "it uses to certSANs; a kind config or a DinD image that replaces kubeadm's certSANs, "
        "or an API server reached through another address, breaks that."
    )


def classify(server: str, exc: Exception) -> Exception:
    """NotYet for what waiting can fix, ClusterUnusableError for what it cannot."""
    text = f"{exc} {getattr(exc, 'reason', '')}"
    if isinstance(exc, ssl.SSLCertVerificationError) or any(m in text for m in _TLS_MARKERS):
        return _tls_failure(server, text.strip().splitlines()[0][:300])
    if isinstance(exc, ApiException) and exc.status in (401, 403):
        return ClusterUnusableError(
            f"the nested API server at {server} refused kipik's credentials: HTTP {exc.status} "
            f"{exc.reason}: {(exc.body or '')[:300]}\n  hint: the kubeconfig kind wrote does "
            "not match this API server (a stale kubeconfig, or another cluster on that port)"
        )
    if isinstance(exc, ApiException):
        return NotYet(f"HTTP {exc.status} {exc.reason}: {(exc.body or '')[:200]}")
    return NotYet(f"{type(exc).__name__}: {exc}")


def _guard(server: str, call: Callable[[], None]) -> Callable[[], None]:
    """Turn connection and API errors into NotYet or a permanent error, carrying what was seen."""

    def check() -> None:
        try:
            call()
        except (ApiException, HTTPError, OSError) as exc:
            raise classify(server, exc) from None

    return check


def get_raw(api: Any, path: str) -> tuple[int, str]:
    """``GET path`` through the client (its TLS and credentials): status and body text.

    kubernetes >= 35 splits requests into ``param_serialize`` + ``call_api``; older clients
    take ``call_api(path, method, ..., _preload_content=False)``.
    """
    if hasattr(api, "param_serialize"):
        method, url, headers, body, post = api.param_serialize(
            "GET", path, auth_settings=["BearerToken"]
        )
        response = api.call_api(method, url, headers, body, post, _request_timeout=_REQUEST_TIMEOUT)
        response.read()
        return int(response.status), bytes(response.data or b"").decode("utf-8", "replace")
    raw, status, _headers = api.call_api(
        path,
        "GET",
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=_REQUEST_TIMEOUT,
    )
    return int(status), bytes(raw.data or b"").decode("utf-8", "replace")


def readyz(api: k8s_client.ApiClient) -> None:
    """Raise NotYet unless ``GET /readyz`` answers 200 ``ok``."""
    status, body = get_raw(api, "/readyz")
    if status in (401, 403):
        raise ApiException(status=status, reason="Unauthorized" if status == 401 else "Forbidden")
    if status != 200:
        raise NotYet(f"/readyz answered HTTP {status}: {body.strip()[-300:]}")


def nodes_ready(api: k8s_client.ApiClient, expected: int) -> None:
    """Raise NotYet unless ``expected`` nodes exist and every one is Ready."""
    nodes = k8s_client.CoreV1Api(api).list_node(_request_timeout=_REQUEST_TIMEOUT).items
    states = []
    for node in nodes:
        ready = next(
            (c for c in ((node.status and node.status.conditions) or []) if c.type == "Ready"),
            None,
        )
        status = ready.status if ready else "Unknown"
        states.append(f"{node.metadata and node.metadata.name}: Ready={status}")
    if len(nodes) < expected or any(not s.endswith("=True") for s in states):
        raise NotYet(f"{len(nodes)}/{expected} nodes [{', '.join(states) or 'none'}]")


def leases_renewed(api: k8s_client.ApiClient, expected: int, since: dt.datetime) -> None:
    """Raise NotYet unless ``expected`` kubelets renewed their node lease at or after ``since``.

    A restored cluster's nodes say Ready from before the copy; a lease renewed since the
    restore shows each kubelet really runs again.
    """
    leases = (
        k8s_client.CoordinationV1Api(api)
        .list_namespaced_lease("kube-node-lease", _request_timeout=_REQUEST_TIMEOUT)
        .items
    )
    fresh = [
        lease
        for lease in leases
        if lease.spec is not None
        and lease.spec.renew_time is not None
        and lease.spec.renew_time >= since
    ]
    if len(fresh) < expected:
        raise NotYet(f"{len(fresh)}/{expected} kubelets renewed their lease since the restore")


#: Leader-election leases of the control plane: a restored copy's controller-manager and
#: scheduler would wait out the lease their copied predecessor holds (15 s) before they act.
LEADER_LEASES = ("kube-controller-manager", "kube-scheduler")

#: The ``component`` label of the control plane's static pods. After a restore each one proves
#: that it runs by what it does (/readyz: the API server and etcd; a leader lease taken since the
#: restore: the controller-manager and the scheduler), not by its mirror pod's status, which the
#: restarted kubelet sends again only with its next status sync (every 10 s).
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler")
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


def _delete_unless_changed(delete: Callable[..., Any], name: str, version: str | None) -> None:
    """``delete`` the kube-system object ``name`` if it still has resourceVersion ``version``.

    Gone already, or changed meanwhile (a new lease holder, the controller's own update), is
    left as it is.
    """
    try:
        delete(
            name,
            "kube-system",
            body=k8s_client.V1DeleteOptions(
                preconditions=k8s_client.V1Preconditions(resource_version=version)
            ),
            _request_timeout=_REQUEST_TIMEOUT,
        )
    except ApiException as exc:
        if exc.status not in (404, 409):
            raise


def release_leaders(api: k8s_client.ApiClient, since: dt.datetime) -> list[str]:
    """Delete the control plane's leader leases last renewed before ``since``; the ones in use.

    After a restore their holders are gone (they ran in the copied cluster), so the new
    controller-manager and scheduler take over at once instead of after the lease runs out.
    A lease renewed since (a new holder) is left alone, and so is one changed meanwhile.
    Returns the leases the copy held (released or renewed since): those must get a new holder.
    A lease the copy did not have (leader election switched off) is not awaited.
    """
    leases = k8s_client.CoordinationV1Api(api)
    held = []
    for name in LEADER_LEASES:
        try:
            lease = leases.read_namespaced_lease(
                name, "kube-system", _request_timeout=_REQUEST_TIMEOUT
            )
        except ApiException as exc:
            if exc.status == 404:  # the copy has no such lease
                continue
            raise
        held.append(name)
        renewed = lease.spec.renew_time if lease.spec is not None else None
        if renewed is not None and renewed >= since:
            continue
        version = lease.metadata.resource_version if lease.metadata is not None else None
        _delete_unless_changed(leases.delete_namespaced_lease, name, version)
    return held


def leaderless(leases: list[Any], names: list[str], since: dt.datetime) -> list[str]:
    """The leader leases among ``names`` that nobody took or renewed at or after ``since``.

    ``leases``: the V1Lease objects of ``kube-system``; a lease that is missing has no leader.
    """
    renewed = {
        lease.metadata.name: lease.spec.renew_time
        for lease in leases
        if lease.metadata is not None and lease.spec is not None
    }
    return [name for name in names if renewed.get(name) is None or renewed[name] < since]


def leaders_elected(api: k8s_client.ApiClient, names: list[str], since: dt.datetime) -> None:
    """Raise NotYet unless each leader lease in ``names`` was taken or renewed since ``since``.

    A new holder shows that the restored controller-manager (or scheduler) runs and leads.
    """
    if not names:
        return
    leases = (
        k8s_client.CoordinationV1Api(api)
        .list_namespaced_lease("kube-system", _request_timeout=_REQUEST_TIMEOUT)
        .items
    )
    waiting = leaderless(leases, names, since)
    if waiting:
        raise NotYet(f"no leader since the restore: {', '.join(waiting)}")


def _control_plane_mirror(pod: Any) -> bool:
    """Whether ``pod`` (V1Pod) is the mirror pod of one of the :data:`CONTROL_PLANE`."""
    meta = pod.metadata
    if meta is None or MIRROR_ANNOTATION not in (meta.annotations or {}):
        return False
    return (meta.labels or {}).get("component") in CONTROL_PLANE


def not_current(pods: list[Any], since: dt.datetime) -> list[str]:
    """The names of ``pods`` (V1Pod) whose status is still the copy's, not the kubelet's now.

    A restored cluster's pods say Running and Ready from before the copy while their containers
    are gone. A pod's status is current once the restarted kubelet reported it: each of its
    containers started since ``since``, or its Ready condition turned False since then (the
    kubelet saw them gone and starts them anew). Finished pods are left out, and so are the
    control plane's mirror pods (:data:`CONTROL_PLANE`), which prove it otherwise.
    """
    waiting = []
    for pod in pods:
        status = pod.status
        if status is None or status.phase in ("Succeeded", "Failed") or _control_plane_mirror(pod):
            continue
        containers = status.container_statuses or []
        started = bool(containers) and all(
            c.state is not None
            and c.state.running is not None
            and c.state.running.started_at is not None
            and c.state.running.started_at >= since
            for c in containers
        )
        reported_down = any(
            c.type == "Ready"
            and c.status == "False"
            and c.last_transition_time is not None
            and c.last_transition_time >= since
            for c in status.conditions or []
        )
        if not (started or reported_down):
            waiting.append(str(pod.metadata and pod.metadata.name))
    return sorted(waiting)


def stale_endpoints(pods: list[Any], slices: list[Any]) -> list[str]:
    """Endpoints in ``slices`` (V1EndpointSlice) that do not show their pod as it runs now.

    An endpoint of a pod in ``pods`` (V1Pod) is current when its address is the pod's IP and
    it is ready exactly when the pod is. After a restore, pods run with new IPs, and Services
    (kube-dns among them) reach them once the controllers caught up.
    """
    by_name = {pod.metadata.name: pod for pod in pods if pod.metadata is not None}
    stale = []
    for found in slices:
        service = (found.metadata.labels or {}).get("kubernetes.io/service-name", "?")
        for endpoint in found.endpoints or []:
            ref = endpoint.target_ref
            pod = by_name.get(ref.name) if ref is not None and ref.kind == "Pod" else None
            if pod is None or pod.status is None:
                continue
            ready = any(
                c.type == "Ready" and c.status == "True" for c in pod.status.conditions or []
            )
            shown_ready = bool(endpoint.conditions and endpoint.conditions.ready)
            if pod.status.pod_ip not in (endpoint.addresses or []) or shown_ready != ready:
                stale.append(f"{service} -> {ref.name}")
    return sorted(stale)


def system_pods_current(api: k8s_client.ApiClient, since: dt.datetime) -> None:
    """Raise NotYet until the kube-system pods' status and Services are current again.

    Each pod's status is the restarted kubelet's (:func:`not_current`), and no kube-system
    Service points at its pods as they were before the copy (:func:`stale_endpoints`): such an
    EndpointSlice is removed at once, as the controller-manager would when its controllers
    start (10 s after it leads: its node IPAM controller waits that long at every start), and
    it makes them anew. CoreDNS then starts and becomes Ready as in a new cluster (kube-dns has
    no ready endpoint meanwhile), not later than a cold cluster's.
    """
    pods = (
        k8s_client.CoreV1Api(api)
        .list_namespaced_pod("kube-system", _request_timeout=_REQUEST_TIMEOUT)
        .items
    )
    waiting = not_current(pods, since)
    if waiting:
        raise NotYet(f"status of before the restore: {', '.join(waiting)}")
    discovery = k8s_client.DiscoveryV1Api(api)
    slices = discovery.list_namespaced_endpoint_slice(
        "kube-system", _request_timeout=_REQUEST_TIMEOUT
    ).items
    removed: list[str] = []
    for found in slices:
        stale = stale_endpoints(pods, [found])
        if stale and found.metadata is not None:
            name, version = str(found.metadata.name), found.metadata.resource_version
            _delete_unless_changed(discovery.delete_namespaced_endpoint_slice, name, version)
            removed.extend(stale)
    if removed:
        shown = ", ".join(sorted(removed))
        raise NotYet(f"removed the EndpointSlices of before the restore ({shown}); checking again")


def default_service_account(api: k8s_client.ApiClient) -> None:
    """Raise NotYet unless the ``default`` ServiceAccount exists in ``default``."""
    k8s_client.CoreV1Api(api).read_namespaced_service_account(
        "default", "default", _request_timeout=_REQUEST_TIMEOUT
    )


#: A readiness check: what is awaited, the call that raises NotYet until then, and a hint.
Check = tuple[str, Callable[[], None], str]


def _restore_checks(
    api: k8s_client.ApiClient, nodes: int, restored_at: dt.datetime
) -> tuple[Check, list[Check]]:
    """What a restored cluster adds: the release of the copied leader leases, and the rest.

    The release comes first, as soon as the API server answers; then the kubelets, the
    control plane's leaders and the kube-system status current.
    """
    since = restored_at - dt.timedelta(seconds=1)  # leases carry whole microseconds
    held: list[str] = []

    def release() -> None:
        held[:] = release_leaders(api, since)

    release_check: Check = (
        "the copied control plane's leader leases to be released",
        release,
        "kipik deletes the leases of kube-controller-manager and kube-scheduler that "
        "their copied holders cannot renew",
    )
    return release_check, [
        (
            f"all {nodes} kubelet(s) to run again since the restore",
            lambda: leases_renewed(api, nodes, since),
            "a kubelet renews its node lease every 10 s once it runs; look at the node's "
            "journal (kipik logs)",
        ),
        (
            "the controller-manager and the scheduler to lead again since the restore",
            lambda: leaders_elected(api, held, since),
            "each takes its leader lease within a few seconds once it runs; "
            "`kubectl -n kube-system logs` of its pod on a kept cluster "
            f"({option('keep')}) says why not",
        ),
        (
            "the kube-system pods' status and Services to be current again",
            lambda: system_pods_current(api, since),
            "the kubelet reports them after a restore, the controller-manager updates "
            "their Services; `kubectl -n kube-system get pods,endpointslices` "
            f"on a kept cluster ({option('keep')}) shows which one does not come back",
        ),
    ]


def wait_ready(
    api: k8s_client.ApiClient,
    *,
    nodes: int,
    deadline: float,
    restored_at: dt.datetime | None = None,
) -> None:
    """Wait for every readiness check in turn, each within what is left until ``deadline``.

    ``restored_at``: when the cluster was restored from a snapshot. Then the copied leader
    leases are released first, every kubelet must run again since, the controller-manager and
    the scheduler lead again, and the kube-system pods' status and Services must be current
    (:func:`leases_renewed`, :func:`leaders_elected`, :func:`system_pods_current`).
    """
    server = str(api.configuration.host)
    checks: list[Check] = [
        (
            "/readyz of the nested API server to answer ok",
            lambda: readyz(api),
            "the API server may still be starting; a slow machine needs a longer "
            f"{option('timeout')}",
        ),
        (
            f"all {nodes} node(s) to be Ready",
            lambda: nodes_ready(api, nodes),
            "nodes become Ready once the CNI runs: `kubectl describe nodes` with the kubeconfig, "
            f"or keep the cluster ({option('keep')}) and inspect it",
        ),
        (
            "the default ServiceAccount in namespace default",
            lambda: default_service_account(api),
            "the controller-manager creates it; check its pod in kube-system",
        ),
    ]
    if restored_at is not None:  # the leases go as soon as the API server answers
        release, running = _restore_checks(api, nodes, restored_at)
        checks = [release, *checks, *running]
    for what, call, hint in checks:
        wait_until(
            _guard(server, call),
            what=what,
            timeout=max(deadline - time.monotonic(), 0.0),
            hint=hint,
        )
