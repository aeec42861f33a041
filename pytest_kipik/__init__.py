"""pytest-kipik: ephemeral nested Kubernetes clusters (kind inside Docker-in-Docker) for tests.

The pytest plugin lives in :mod:`pytest_kipik.plugin`; everything it wires up also works without
pytest, for example::

    from pytest_kipik import ClusterFactory, KipikConfig

    with ClusterFactory(KipikConfig.defaults()) as factory:
        cluster = factory.create()
        print(cluster.core_v1.list_node())
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pytest_kipik.cluster import ImageLoad, NestedCluster, NestedNamespace
    from pytest_kipik.config import KipikConfig
    from pytest_kipik.errors import (
        CommandError,
        ConfigError,
        DockerUnavailableError,
        ImageError,
        KindError,
        KipikError,
        ReadinessTimeout,
        WaitTimeout,
    )
    from pytest_kipik.factory import ClusterFactory

#: Where each public name lives. Importing the package imports none of them (nor ``kubernetes``
#: or ``docker``): pytest loads the plugin in every run of a project, used or not.
_HOMES = {
    "ClusterFactory": "pytest_kipik.factory",
    "ImageLoad": "pytest_kipik.cluster",
    "NestedCluster": "pytest_kipik.cluster",
    "NestedNamespace": "pytest_kipik.cluster",
    "KipikConfig": "pytest_kipik.config",
    **dict.fromkeys(
        (
            "CommandError",
            "ConfigError",
            "DockerUnavailableError",
            "ImageError",
            "KindError",
            "KipikError",
            "ReadinessTimeout",
            "WaitTimeout",
        ),
        "pytest_kipik.errors",
    ),
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562); ``__version__`` from the metadata."""
    if name == "__version__":
        try:
            return version("pytest-kipik")
        except PackageNotFoundError:  # run from a checkout that was never installed
            return "0.0.0+unknown"
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pytest_kipik' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


__all__ = [
    "ClusterFactory",
    "CommandError",
    "ConfigError",
    "DockerUnavailableError",
    "ImageError",
    "ImageLoad",
    "KindError",
    "KipikConfig",
    "KipikError",
    "NestedCluster",
    "NestedNamespace",
    "ReadinessTimeout",
    "WaitTimeout",
]
