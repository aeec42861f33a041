"""The outer cluster's API as the pod backend meets it: precise errors and one exec stream.

Commands run through the ``pods/exec`` WebSocket (:func:`kubernetes.stream.stream`); a refused
call becomes an error that says which permission or which Pod Security label is missing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException
from kubernetes.stream import stream

from pytest_kipik.errors import HostError, OuterClusterError, option, status_message
from pytest_kipik.hosts.outer import RBAC_EXAMPLE
from pytest_kipik.hosts.pod_manifest import CONTAINER
from pytest_kipik.process import Output

PSA_LABEL = "pod-security.kubernetes.io/enforce=privileged"
#: How long one call of the outer API may take.
REQUEST_TIMEOUT = 30
EXEC_STATUS_CHANNEL = 3
#: Namespaces where this process created a DinD pod, and where creating one was refused (403):
#: when every creation was refused, a refused listing at teardown only repeats that error.
CREATED: set[str] = set()
CREATE_REFUSED: set[str] = set()


def api_failure(exc: ApiException, verb: str, resource: str, namespace: str) -> OuterClusterError:
    """A precise error for a refused outer API call (RBAC, Pod Security, anything else)."""
    message = status_message(exc.body) or str(exc.body or "")
    if exc.status == 403 and "PodSecurity" in message:
        return OuterClusterError(
            f"the outer cluster's Pod Security admission refused the privileged DinD pod in "
            f"namespace {namespace}: {message}\n  The DinD pod must run privileged (or under a "
            "sysbox runtime class, see docs/backends.md). Label a namespace for it: kubectl label "
            f"namespace {namespace} {PSA_LABEL} (or use {option('namespace')} with one that "
            "has it)."
        )
    if exc.status == 403:
        return OuterClusterError(
            f"the outer cluster refused to {verb} {resource} in namespace {namespace} "
            f"(HTTP 403): {message}\n  The account kipik uses needs the Role in "
            f"{RBAC_EXAMPLE}: pods create/get/list/watch/delete, pods/exec, pods/portforward, "
            "pods/log, events get/list."
        )
    if exc.status == 401:
        return OuterClusterError(
            f"the outer cluster did not accept kipik's credentials to {verb} {resource} "
            f"(HTTP 401): {message}\n  Check the outer kubeconfig/context or the pod's token."
        )
    return OuterClusterError(
        f"the outer cluster failed to {verb} {resource} in namespace {namespace}: "
        f"HTTP {exc.status} {exc.reason}: {message[:500]}"
    )


def exit_code(status_text: str) -> int:
    """The exit code from the exec status channel (a metav1.Status)."""
    if not status_text.strip():
        return -1
    status = json.loads(status_text)
    if status.get("status") == "Success":
        return 0
    for cause in (status.get("details") or {}).get("causes") or []:
        if cause.get("reason") == "ExitCode":
            return int(cause.get("message", -1))
    raise HostError(f"the command could not run: {status.get('message', status_text)}")


def stream_exec(
    core: k8s_client.CoreV1Api,
    pod: str,
    namespace: str,
    args: list[str],
    *,
    out: Output,
    err: Output,
    stdin: Iterable[bytes] | None,
) -> int:
    """One exec in ``pod``'s DinD container through ``core`` (a client of its own).

    Output goes to ``out`` and ``err``, ``stdin`` is written first; the exit code comes back.
    """
    try:
        ws: Any = stream(
            core.connect_get_namespaced_pod_exec,
            pod,
            namespace,
            container=CONTAINER,
            command=args,
            stdin=stdin is not None,
            stdout=True,
            stderr=True,
            tty=False,
            _preload_content=False,
        )
    except ApiException as exc:
        raise api_failure(exc, "create", "pods/exec", namespace) from None
    status = Output()

    def drain() -> None:
        # text channels (every client version since 29 speaks them); output is text
        for channel, sink in ((1, out), (2, err), (EXEC_STATUS_CHANNEL, status)):
            data = ws.read_channel(channel)
            sink.add(data.encode() if isinstance(data, str) else data)

    try:
        for chunk in stdin or ():
            ws.write_stdin(chunk)
        while ws.is_open():
            ws.update(timeout=1)
            drain()
        drain()
    finally:
        ws.close()
        ws.sock.shutdown()  # the server closes first; websocket-client keeps the socket
    return exit_code(status.text())
