"""The Host seam: everything kind logic needs from the place its Docker daemon runs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pytest_kipik.process import CommandResult

#: Receives output lines of a running command as they come (e.g. kind's progress).
OutputSink = Callable[[str], None]


@dataclass(frozen=True)
class Endpoint:
    """How the test process reaches a port of the host: an address plus certSANs to add."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """The https URL of this endpoint."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


class Host(Protocol):
    """A Docker-in-Docker environment with a ready inner daemon and kind on its PATH."""

    @property
    def name(self) -> str:
        """The host's name (container or pod name)."""
        ...

    def start(self) -> None:
        """Create the host (its inner daemon may still be starting)."""
        ...

    def wait_ready(self, timeout: float) -> None:
        """Wait until the inner Docker daemon answers."""
        ...

    def exec(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        on_output: OutputSink | None = None,
        stdin: Iterable[bytes] | None = None,
    ) -> CommandResult:
        """Run ``argv`` inside the host (no shell), bounded by ``timeout`` seconds.

        ``stdin`` is streamed to the command and then closed; stderr lines go to ``on_output``
        as they come.
        """
        ...

    def write_file(self, path: str, data: bytes, mode: int = 0o600) -> None:
        """Create or replace a file inside the host (parent directories are made)."""
        ...

    def load_image(self, image: str, timeout: float) -> bool:
        """Stream ``image`` from where the test runs into the inner daemon.

        Returns False (and does nothing) when there is no local copy to stream.
        """
        ...

    def api_endpoint(self, inner_port: int) -> Endpoint:
        """Where the test process reaches ``inner_port`` of the host."""
        ...

    def cert_sans(self) -> list[str]:
        """Names/addresses the nested API server certificate must carry for ``api_endpoint``."""
        ...

    def daemon_log(self, lines: int = 50) -> str:
        """The last ``lines`` lines of the inner Docker daemon's log (never raises)."""
        ...

    def remove(self) -> None:
        """Remove the host and everything it holds; idempotent."""
        ...

    def removal_command(self) -> str:
        """A shell command a user can paste to remove the host by hand."""
        ...
