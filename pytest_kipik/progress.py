"""Progress output: one line per phase of a cluster's life, with its duration."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger("pytest_kipik")

#: Receives one finished line of progress output.
Reporter = Callable[[str], None]


def stderr_reporter(line: str) -> None:
    """The reporter used outside pytest: lines go to standard error."""
    print(line, file=sys.stderr, flush=True)


@contextmanager
def phase(report: Reporter, cluster: str, label: str) -> Iterator[None]:
    """Report ``label`` for ``cluster`` with its duration once the block finishes."""
    start = time.monotonic()
    log.info("kipik %s: %s ...", cluster, label)
    try:
        yield
    except BaseException:
        report(f"kipik {cluster}: {label} failed after {time.monotonic() - start:.1f}s")
        raise
    report(f"kipik {cluster}: {label} ({time.monotonic() - start:.1f}s)")


def file_reporter(path: Path, tag: str) -> Reporter:
    """A reporter appending ``[tag] line`` to ``path``, for a process without a terminal.

    One write per line: lines of concurrent writers never interleave.
    """

    def report(line: str) -> None:
        log.info("%s", line)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"[{tag}] {line}\n".encode())
        finally:
            os.close(fd)

    return report


class Tail:
    """Follows a file that :func:`file_reporter` writes and hands every new line to ``report``.

    Under pytest-xdist the workers have no terminal; the controller tails their progress file
    so that the lines show as they come.
    """

    def __init__(self, path: Path, report: Reporter, interval: float = 0.2) -> None:
        self.path = path
        self.report = report
        self.interval = interval
        self._offset = 0
        self._pending = b""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kipik-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        """Report the complete lines written since the last poll."""
        with self._lock:
            try:
                with self.path.open("rb") as handle:
                    handle.seek(self._offset)
                    data = handle.read()
            except FileNotFoundError:
                return
            self._offset += len(data)
            *lines, self._pending = (self._pending + data).split(b"\n")
            for line in lines:
                self.report(line.decode("utf-8", "replace"))

    def stop(self) -> None:
        """Stop following, after reporting what is there."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()
