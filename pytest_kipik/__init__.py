"""pytest-kipik: ephemeral nested Kubernetes clusters (kind inside Docker-in-Docker) for tests.

The pytest plugin lives in :mod:`pytest_kipik.plugin`; everything it wires up also works without
pytest, for example::

    from pytest_kipik import ClusterFactory, KipikConfig

    with ClusterFactory(KipikConfig.defaults()) as factory:
        cluster = factory.create()
        print(cluster.core_v1.list_node())
"""

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
