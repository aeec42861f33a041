"""The choke point for commands: kubectl/helm here and every exec inside a host go through it.

(``kipik shell`` alone hands the terminal to the user's shell directly.)

Every command is an argv list (never a shell string), is debug-logged as a pasteable line, and a
failure raises :class:`~pytest_kipik.errors.CommandError` with argv, exit code and both streams.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from pytest_kipik.errors import CommandError, CommandTimeout, KipikError

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


class Output:
    """Collects one output stream of a command; forwards complete lines to ``sink``, if any."""

    def __init__(self, sink: Callable[[str], None] | None = None) -> None:
        self.sink = sink
        self.chunks: list[bytes] = []
        self.pending = b""

    def add(self, data: bytes) -> None:
        """Take the next piece of output."""
        self.chunks.append(data)
        if self.sink is not None:
            *lines, self.pending = (self.pending + data).split(b"\n")
            for line in lines:
                self.sink(line.decode("utf-8", "replace"))

    def flush(self) -> None:
        """Forward a last line that had no newline."""
        if self.pending and self.sink is not None:
            self.sink(self.pending.decode("utf-8", "replace"))
        self.pending = b""

    def text(self) -> str:
        """Everything collected so far."""
        return b"".join(list(self.chunks)).decode("utf-8", "replace")


#: Runs a command somewhere, feeding its stdout and stderr in; returns its exit code.
Runner = Callable[[Output, Output], int]


def run_in(
    where: Sequence[str],
    argv: Sequence[str],
    runner: Runner,
    *,
    timeout: float,
    on_output: Callable[[str], None] | None = None,
) -> CommandResult:
    """Run a command inside a host through ``runner``, logged and bounded by ``timeout``.

    ``where`` is the prefix that makes it pasteable (e.g. ``docker exec NAME``). On timeout
    :class:`CommandTimeout` carries what the command printed until then; the abandoned call ends
    when the caller removes the host. Ctrl-C still interrupts the wait.
    """
    args = list(argv)
    log_command(args, where)
    out, err = Output(), Output(on_output)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kipik-exec")
    future = executor.submit(runner, out, err)
    executor.shutdown(wait=False)
    try:
        code = future.result(timeout=timeout)
    except FutureTimeout:
        raise CommandTimeout(args, timeout, out.text(), err.text(), where=where) from None
    err.flush()
    return CommandResult(args, code, out.text(), err.text(), where=list(where))
