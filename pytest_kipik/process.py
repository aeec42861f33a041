"""The one choke point for commands: local processes and execs inside a host share it.

Every command is an argv list (never a shell string), is debug-logged as a pasteable line, and a
failure raises :class:`~pytest_kipik.errors.CommandError` with argv, exit code and both streams.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from pytest_kipik.errors import CommandError, KipikError

log = logging.getLogger("pytest_kipik")


@dataclass(frozen=True)
class CommandResult:
    """What a finished command left behind."""

    argv: list[str]
    exit_code: int
    stdout: str
    stderr: str
    where: list[str] = field(default_factory=list)

    def check(self) -> CommandResult:
        """Return self when the command succeeded, else raise :class:`CommandError`."""
        if self.exit_code != 0:
            raise CommandError(
                self.argv, self.exit_code, self.stdout, self.stderr, where=self.where
            )
        return self


def log_command(argv: Sequence[str], where: Sequence[str] = ()) -> None:
    """Debug-log a command the way one would paste it into a shell."""
    log.debug("run: %s", shlex.join([*where, *argv]))


def run(
    argv: Sequence[str],
    *,
    input_data: bytes | None = None,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> CommandResult:
    """Run a local command and capture its output."""
    args = list(argv)
    log_command(args)
    try:
        done = subprocess.run(
            args,
            input=input_data,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except FileNotFoundError as exc:
        raise KipikError(
            f"{args[0]!r} was not found on PATH: install it to run {shlex.join(args)}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise KipikError(f"command did not finish within {timeout}s: {shlex.join(args)}") from exc
    result = CommandResult(
        args,
        done.returncode,
        done.stdout.decode("utf-8", "replace"),
        done.stderr.decode("utf-8", "replace"),
    )
    return result.check() if check else result


T = TypeVar("T")


def bounded(fn: Callable[[], T], *, timeout: float, what: str) -> T:
    """Run ``fn`` in a daemon thread and give up waiting after ``timeout`` seconds.

    Used for blocking calls into the Docker API that have no deadline of their own (a command
    running inside a host). On timeout the caller is free to remove the host, which also ends
    the abandoned call. Ctrl-C still interrupts the wait.
    """
    outcome: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the waiting thread below
            outcome["error"] = exc
        finally:
            done.set()

    threading.Thread(target=target, name=f"kipik: {what}", daemon=True).start()
    if not done.wait(timeout):
        raise KipikError(f"{what} did not finish within {timeout:.0f}s")
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["value"])
