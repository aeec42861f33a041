"""SIGTERM as an interrupt, so that a terminated run cleans up like Ctrl-C.

A cancelled CI job or a stopped Argo step gets SIGTERM; without this, Python dies at once and
its clusters keep running.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, the first SIGTERM raises KeyboardInterrupt; later ones are ignored.

    Ignoring the later ones lets the cleanup that the interrupt starts run to its end. Nothing is
    changed when a SIGTERM handler is already installed, or outside the main thread.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def on_term(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("SIGTERM received: removing nested clusters")

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
