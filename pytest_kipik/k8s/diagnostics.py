"""What a failed test's report shows about its nested cluster: nodes, troubled pods, warnings, logs.

Every collector runs on its own and is bounded in time; one that fails says so in its section and
never stops the others, nor hides the test's own failure. :func:`troubled` and the formatters
are pure (exact unit tests); :func:`snapshot` reads the cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

_TIMEOUT = 10
_HEALTHY = ("Running", "Succeeded")


def _plain(api: k8s_client.ApiClient, obj: Any) -> dict[str, Any]:
    found: dict[str, Any] = api.sanitize_for_serialization(obj)
    return found


def node_lines(nodes: list[dict[str, Any]]) -> list[str]:
    """``name  Ready|NotReady  version`` per node."""
    lines = []
    for node in nodes:
        conditions = (node.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        version = ((node.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "?")
        name = node["metadata"]["name"]
        lines.append(f"{name}  {'Ready' if ready else 'NotReady'}  {version}")
    return lines


def _container_problem(status: dict[str, Any]) -> str | None:
    state = status.get("state") or {}
    if "waiting" in state:
        waiting = state["waiting"] or {}
        return f"waiting: {waiting.get('reason', '?')} {waiting.get('message', '')}".strip()
    if "terminated" in state:
        ended = state["terminated"] or {}
        if ended.get("exitCode", 0) != 0:
            return f"terminated: {ended.get('reason', '?')} (exit code {ended.get('exitCode')})"
    if not status.get("ready", False) and "running" in state:
        return "running but not ready"
    return None


def troubled(pods: list[dict[str, Any]]) -> list[tuple[str, str, list[str], list[str]]]:
    """Pods not Running/Succeeded or with a container in trouble.

    ``(namespace/name, phase and reason, one line per troubled container, names of containers
    whose logs are worth reading)`` — a container that restarted or failed has logs worth
    reading.
    """
    found = []
    for pod in pods:
        status = pod.get("status") or {}
        phase = status.get("phase", "Unknown")
        problems: list[str] = []
        failing: list[str] = []
        statuses = (status.get("initContainerStatuses") or []) + (
            status.get("containerStatuses") or []
        )
        for container in statuses:
            problem = _container_problem(container)
            restarts = int(container.get("restartCount") or 0)
            if problem or restarts:
                problems.append(f"{container['name']}: {problem or 'running'}, {restarts} restarts")
            ended = (container.get("state") or {}).get("terminated") or {}
            if restarts or ended.get("exitCode", 0) != 0:  # it ran and failed: it has logs
                failing.append(str(container["name"]))
        if phase == "Succeeded" or (phase in _HEALTHY and not problems):
            continue
        reason = status.get("reason") or ""
        for condition in status.get("conditions") or []:
            if condition.get("status") != "True" and condition.get("message"):
                reason = reason or f"{condition.get('type')}: {condition.get('message')}"
        meta = pod["metadata"]
        label = f"{meta.get('namespace')}/{meta['name']}"
        found.append((label, f"{phase} {reason}".strip(), problems, failing))
    return found


def event_lines(events: list[dict[str, Any]], limit: int) -> list[str]:
    """The newest ``limit`` Warning events, oldest first: ``ns kind/name reason: message (xN)``."""

    def when(event: dict[str, Any]) -> str:
        return str(
            event.get("lastTimestamp")
            or event.get("eventTime")
            or (event.get("metadata") or {}).get("creationTimestamp")
            or ""
        )

    warnings = sorted((e for e in events if e.get("type") == "Warning"), key=when)[-limit:]
    lines = []
    for event in warnings:
        target = event.get("involvedObject") or {}
        count = event.get("count") or 1
        lines.append(
            f"{target.get('namespace') or '-'} {target.get('kind', '?')}/{target.get('name', '?')} "
            f"{event.get('reason', '?')}: {event.get('message', '')}"
            + (f" (x{count})" if count > 1 else "")
        )
    return lines


def _section(title: str, collect: Callable[[], list[str]]) -> str:
    try:
        lines = collect()
    except ApiException as exc:  # one collector's failure is reported, never raised
        return f"{title}: could not be read: HTTP {exc.status} {exc.reason}"
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        return f"{title}: could not be read: {type(exc).__name__}: {first[:300]}"
    return f"{title}:\n" + ("\n".join(f"  {line}" for line in lines) if lines else "  (none)")


def snapshot(
    api: k8s_client.ApiClient,
    *,
    namespace: str | None = None,
    events: int = 20,
    log_lines: int = 20,
    nodes: bool = True,
) -> str:
    """The cluster's state for a failure report (only ``namespace`` when given)."""
    core = k8s_client.CoreV1Api(api)
    where = f" in namespace {namespace}" if namespace else ""
    sections = []
    if nodes:
        sections.append(
            _section(
                "nodes",
                lambda: node_lines(
                    _plain(api, core.list_node(_request_timeout=_TIMEOUT)).get("items") or []
                ),
            )
        )
    pods_found: list[tuple[str, str, list[str], list[str]]] = []

    def pods() -> list[str]:
        if namespace:
            listed = core.list_namespaced_pod(namespace, _request_timeout=_TIMEOUT)
        else:
            listed = core.list_pod_for_all_namespaces(_request_timeout=_TIMEOUT)
        pods_found.extend(troubled(_plain(api, listed).get("items") or []))
        lines = []
        for label, state, problems, _ in pods_found:
            lines.append(f"{label}  {state}")
            lines += [f"  {problem}" for problem in problems]
        return lines

    sections.append(_section(f"pods not running or succeeded{where}", pods))

    def warnings() -> list[str]:
        if namespace:
            listed = core.list_namespaced_event(namespace, _request_timeout=_TIMEOUT)
        else:
            listed = core.list_event_for_all_namespaces(_request_timeout=_TIMEOUT)
        return event_lines(_plain(api, listed).get("items") or [], events)

    sections.append(_section(f"recent warning events{where}", warnings))
    for label, _, _, containers in pods_found:
        pod_namespace, _, name = label.partition("/")
        for container in containers:

            def logs(pod: str = name, ns: str = pod_namespace, c: str = container) -> list[str]:
                text = core.read_namespaced_pod_log(
                    pod, ns, container=c, tail_lines=log_lines, _request_timeout=_TIMEOUT
                )
                return str(text or "").splitlines() or ["(no output)"]

            sections.append(_section(f"last {log_lines} log lines of {label} {container}", logs))
    return "\n".join(sections)
