"""When is a nested cluster usable? /readyz ok, every node Ready, the default ServiceAccount.

Waiting only helps with what time can fix (connection refused, 5xx, not yet Ready). A TLS
verification failure or a 401/403 fails at once, with the real cause.
"""

from __future__ import annotations

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


def default_service_account(api: k8s_client.ApiClient) -> None:
    """Raise NotYet unless the ``default`` ServiceAccount exists in ``default``."""
    k8s_client.CoreV1Api(api).read_namespaced_service_account(
        "default", "default", _request_timeout=_REQUEST_TIMEOUT
    )


def wait_ready(api: k8s_client.ApiClient, *, nodes: int, deadline: float) -> None:
    """Wait for every readiness check in turn, each within what is left until ``deadline``."""
    server = str(api.configuration.host)
    checks = (
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
    )
    for what, call, hint in checks:
        wait_until(
            _guard(server, call),
            what=what,
            timeout=max(deadline - time.monotonic(), 0.0),
            hint=hint,
        )
