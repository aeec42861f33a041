"""Progress output: one line per phase of a cluster's life, with its duration."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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
