"""Holds across processes: an xdist worker asks the session's owner to hold a host it made.

The owner (the controller) outlives every worker: a worker that finishes early or crashes never
takes a shared host from the others, while the owner's death (SIGKILL included) still removes
it (see :meth:`pytest_kipik.hosts.base.Host.hold`).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping

from pytest_kipik import paths
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts.base import Backend, Hold
from pytest_kipik.sharing.session import Record, Session

HOLDS = "holds"


def request_owner_hold(session: Session, host: str, found: Mapping[str, str]) -> bool:
    """Ask the owner of ``session`` to hold ``host`` (see :class:`OwnerHolds`); True once held."""
    directory = paths.private_dir(session.path(), HOLDS)
    Record(name=host, host=host, labels=dict(found), server="", kubeconfig="", nodes=0).write(
        directory / f"{host}.json"
    )
    held = directory / f"{host}.held"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if held.exists():
            return held.read_text(encoding="utf-8") == "held"
        time.sleep(0.05)  # polling a file another process writes
    return False


class OwnerHolds:
    """The session owner's side of :func:`request_owner_hold`: holds what its workers made.

    A thread picks up requests from the session directory and holds each host until
    :meth:`release` (after the owner removed the session's hosts, or when it dies).
    """

    def __init__(
        self, session: Session, backend: Callable[[], Backend], interval: float = 0.05
    ) -> None:
        self.session = session
        self._make_backend = backend
        self._backend: Backend | None = None
        self.interval = interval
        self.holds: dict[str, Hold | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kipik-holds", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a failed round is retried by the next one
                self.poll()

    def poll(self) -> None:
        """Hold every host asked for since the last poll."""
        directory = self.session.directory / HOLDS
        if not directory.is_dir():
            return
        for request in sorted(directory.glob("*.json")):
            name = request.stem
            if name in self.holds:
                continue
            record = Record.load(request)
            if record is None:
                continue
            if self._backend is None:
                self._backend = self._make_backend()
            host = self._backend.make_host(name, record.labels, [])
            answer = "gone"
            hold: Hold | None = None
            try:
                if host.attach():
                    hold = host.hold()
                    answer = "held"
            except KipikError:
                pass
            self.holds[name] = hold
            (directory / f"{name}.held").write_text(answer, encoding="utf-8")

    def release(self) -> None:
        """Stop taking requests and let go of every host held."""
        self._stop.set()
        self._thread.join(timeout=5)
        for hold in self.holds.values():
            if hold is not None:
                hold.release()
        self.holds.clear()
        if self._backend is not None:
            self._backend.close()
            self._backend = None
