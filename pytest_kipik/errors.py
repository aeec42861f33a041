"""The exceptions pytest-kipik raises (one root, a few precise subclasses), and their words.

An error that names a setting spells its option with :func:`option`, as the users of the
running front end type it.
"""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator, Sequence


def status_message(body: object) -> str | None:
    """The ``message`` of a Kubernetes ``Status`` in an API error's body; None when it has none."""
    try:
        parsed = json.loads(str(body or ""))
    except ValueError:
        return None
    return str(parsed["message"]) if isinstance(parsed, dict) and "message" in parsed else None


class KipikError(Exception):
    """Root of every error pytest-kipik raises on purpose."""


class ConfigError(KipikError):
    """A setting or a kind config file is invalid; raised before anything is started."""


class BackendUnavailable(KipikError):
    """The selected backend does not answer (no Docker engine, outer cluster unreachable)."""


class DockerUnavailableError(BackendUnavailable):
    """No Docker engine answered where the Docker SDK looks for one."""


class OuterClusterError(KipikError):
    """The outer Kubernetes cluster refused or failed a request of the pod backend."""


class ImageError(KipikError):
    """An image is missing, cannot be pulled, or the default image could not be built."""


class HostError(KipikError):
    """The Docker-in-Docker host failed to start, died, or its inner daemon never answered."""


class NameClashError(HostError):
    """A container, volume or pod of the wanted name exists and is not this run's."""


class ClusterUnusableError(KipikError):
    """The nested cluster answers in a way waiting cannot fix (TLS mismatch, 401/403)."""


class WaitTimeout(KipikError):
    """Something awaited did not happen in time: readiness, ``wait_for``, a pod, a daemon.

    ``check`` names what was awaited, ``last_state`` the last state seen, ``hint`` what to
    look at.
    """

    def __init__(self, check: str, timeout: float, last_state: str, hint: str) -> None:
        self.check = check
        self.timeout = timeout
        self.last_state = last_state
        self.hint = hint
        super().__init__(
            f"timed out after {timeout:.0f}s waiting for {check}\n"
            f"  last state seen: {last_state}\n"
            f"  hint: {hint}"
        )


#: The name :class:`WaitTimeout` had before every wait used it (kept for existing code).
ReadinessTimeout = WaitTimeout


def _tail(text: str, lines: int) -> str:
    kept = text.rstrip("\n").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in kept) if kept else "    (empty)"


class CommandError(KipikError):
    """A command exited non-zero; carries everything needed to rerun and debug it."""

    def __init__(
        self,
        argv: Sequence[str],
        exit_code: int,
        stdout: str,
        stderr: str,
        *,
        where: Sequence[str] = (),
    ) -> None:
        self.argv = list(argv)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        self.where = list(where)
        super().__init__(self._message())

    @property
    def pretty_command(self) -> str:
        """The command as one could paste it into a shell (prefixed by where it ran)."""
        return shlex.join([*self.where, *self.argv])

    def _message(self) -> str:
        parts = [f"command failed with exit code {self.exit_code}: {self.pretty_command}"]
        if self.stderr.strip():
            parts.append("  stderr:\n" + _tail(self.stderr, 40))
        if self.stdout.strip():
            parts.append("  stdout:\n" + _tail(self.stdout, 20))
        return "\n".join(parts)


class CommandTimeout(CommandError):
    """A command did not finish in time; carries the output it had printed until then."""

    def __init__(
        self,
        argv: Sequence[str],
        timeout: float,
        stdout: str,
        stderr: str,
        *,
        where: Sequence[str] = (),
    ) -> None:
        self.timeout = timeout
        super().__init__(argv, -1, stdout, stderr, where=where)

    def _message(self) -> str:
        _first, *rest = super()._message().split("\n", 1)
        head = f"command did not finish within {self.timeout:.0f}s: {self.pretty_command}"
        return "\n".join([head, *rest])


class KindError(KipikError):
    """``kind`` failed inside the host; carries kind's output and the inner daemon's log."""

    def __init__(self, action: str, error: CommandError, daemon_log: str) -> None:
        self.action = action
        self.error = error
        self.daemon_log = daemon_log
        outcome = (
            f"did not finish within {error.timeout:.0f}s"
            if isinstance(error, CommandTimeout)
            else f"exit code {error.exit_code}"
        )
        super().__init__(
            f"kind failed to {action} ({outcome}): {error.pretty_command}\n"
            f"  kind's stderr:\n{_tail(error.stderr, 60)}\n"
            f"  last 50 lines of the inner Docker daemon's log:\n{_tail(daemon_log, 50)}"
        )


# -- how each front end spells a setting ---------------------------------------------------------

#: The front end running in this process (set by :func:`front_end`).
_running = {"front": "pytest"}


def option(name: str) -> str:
    """The command-line option of setting ``name`` as the running front end's users type it.

    ``--kipik-node-image`` under pytest, ``--node-image`` with the ``kipik`` command. Errors
    anywhere below the front ends name settings with this.
    """
    dashed = name.replace("_", "-")
    return f"--{dashed}" if _running["front"] == "kipik" else f"--kipik-{dashed}"


@contextlib.contextmanager
def front_end(name: str) -> Iterator[None]:
    """Inside, :func:`option` spells options for ``name``'s users (``pytest`` or ``kipik``)."""
    before, _running["front"] = _running["front"], name
    try:
        yield
    finally:
        _running["front"] = before
