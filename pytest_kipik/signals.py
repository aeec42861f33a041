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


@contextmanager
def deferred_interrupts(*, reraise: bool = True) -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done: cleanup must not be cut short.

    A signal that came meanwhile is raised as KeyboardInterrupt afterwards (when ``reraise``;
    not while another error is already on its way out). Outside the main thread: no change.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if received and reraise:
        raise KeyboardInterrupt(f"{signal.Signals(received[0]).name} received during cleanup")
