"""Exporting a nested cluster's logs: ``kind export logs`` and the inner Docker daemon's log.

:func:`export_logs` runs kind inside the host (through ``host.exec``, like every kind command),
copies the tree out through the host (:meth:`~pytest_kipik.hosts.base.Host.copy_out`) and adds
the DinD daemon's log. Nothing secret is added: no kubeconfig, no tokens, no environment.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from pytest_kipik.errors import CommandError, KindError, KipikError
from pytest_kipik.hosts.base import Host
from pytest_kipik.kind import config as kind

#: The inner daemon's log as written next to kind's logs.
DAEMON_LOG_FILE = "dind-daemon.log"
#: How much of the inner daemon's log is kept (its whole life, for any session of sane length).
DAEMON_LOG_LINES = 20000


def export_argv(directory: str, cluster: str) -> list[str]:
    """``kind export logs DIR --name CLUSTER``."""
    return ["kind", "export", "logs", directory, "--name", cluster]


def export_logs(
    host: Host, cluster_name: str, directory: Path, timeout: float, kind_name: str | None = None
) -> Path:
    """Write ``kind export logs`` of ``cluster_name`` and the DinD daemon log to a directory.

    ``kind_name``: the kind cluster's name in the host, when it differs (a restored copy).
    The result is ``directory/<cluster_name>/`` (returned): kind's tree, as kind writes it, plus
    ``dind-daemon.log``. The temporary directory inside the host is removed again. Raises
    :class:`~pytest_kipik.errors.KindError` when kind fails (with its output and the daemon
    log) and :class:`~pytest_kipik.errors.HostError` when the copy fails; the daemon log is
    written either way.
    """
    deadline = time.monotonic() + timeout

    def left() -> float:
        return max(deadline - time.monotonic(), 5.0)

    target = directory / cluster_name
    target.mkdir(mode=0o700, parents=True, exist_ok=True)
    inside = f"{kind.HOST_DIR}/logs-{cluster_name}-{time.time_ns()}"
    try:
        try:
            host.exec(export_argv(inside, kind_name or cluster_name), timeout=left()).check()
        except CommandError as exc:
            raise KindError(
                f"export the logs of {cluster_name!r}", exc, host.daemon_log(50)
            ) from None
        host.copy_out(inside, target, timeout=left())
    finally:
        (target / DAEMON_LOG_FILE).write_text(host.daemon_log(DAEMON_LOG_LINES), encoding="utf-8")
        with contextlib.suppress(KipikError):  # the host may be gone; nothing is left outside
            host.exec(["rm", "-rf", inside], timeout=min(left(), 30))
    return target
