"""Per-user directories: kept kubeconfigs (state) and locks and hand-offs (cache).

Never the working directory, never a fixed name under /tmp that another user could create
first. Read from the environment when called, not at import.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_kipik.errors import KipikError

APP = "pytest-kipik"


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable, "")
    base = Path(value) if value and Path(value).is_absolute() else Path.home() / fallback
    return base / APP


def state_home() -> Path:
    """``$XDG_STATE_HOME/pytest-kipik`` (default ``~/.local/state/pytest-kipik``)."""
    return _xdg("XDG_STATE_HOME", ".local/state")


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/pytest-kipik`` (default ``~/.cache/pytest-kipik``)."""
    return _xdg("XDG_CACHE_HOME", ".cache")


def private_dir(base: Path, *parts: str) -> Path:
    """``base/parts...`` created with mode 0700, refusing one another user owns."""
    path = base.joinpath(*parts)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for directory in (base, path):
        info = directory.stat()
        if info.st_uid != os.getuid():
            raise KipikError(
                f"{directory} belongs to another user (uid {info.st_uid}); pytest-kipik keeps "
                "private files there. Remove it, or set XDG_STATE_HOME / XDG_CACHE_HOME."
            )
    path.chmod(0o700)
    return path
