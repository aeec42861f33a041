"""When is a nested cluster usable? /readyz ok, every node Ready, the default ServiceAccount."""

from __future__ import annotations

import time
from collections.abc import Callable

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from pytest_kipik.waiting import NotYet, wait_until

_REQUEST_TIMEOUT = 5


def _guard(call: Callable[[], None]) -> Callable[[], None]:
    """Turn connection and API errors into NotYet, carrying what was seen."""

    def check() -> None:
        try:
            call()
        except ApiException as exc:
            raise NotYet(f"HTTP {exc.status} {exc.reason}: {(exc.body or '')[:200]}") from None
        except (HTTPError, OSError) as exc:
            raise NotYet(f"{type(exc).__name__}: {exc}") from None

    return check


def readyz(api: k8s_client.ApiClient) -> None:
    """Raise NotYet unless ``GET /readyz`` answers 200 ``ok``."""
    response = api.rest_client.pool_manager.request(
        "GET", f"{api.configuration.host}/readyz", timeout=_REQUEST_TIMEOUT, retries=False
    )
    body = response.data.decode("utf-8", "replace").strip()
    if response.status != 200:
        raise NotYet(f"/readyz answered HTTP {response.status}: {body[-300:]}")


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
    checks = (
        (
            "/readyz of the nested API server to answer ok",
            lambda: readyz(api),
            "the API server may still be starting; a slow machine needs a longer --kipik-timeout",
        ),
        (
            f"all {nodes} node(s) to be Ready",
            lambda: nodes_ready(api, nodes),
            "nodes become Ready once the CNI runs: `kubectl describe nodes` with the kubeconfig, "
            "or keep the cluster (--kipik-keep) and inspect it",
        ),
        (
            "the default ServiceAccount in namespace default",
            lambda: default_service_account(api),
            "the controller-manager creates it; check its pod in kube-system",
        ),
    )
    for what, call, hint in checks:
        wait_until(
            _guard(call),
            what=what,
            timeout=max(deadline - time.monotonic(), 0.0),
            hint=hint,
        )
