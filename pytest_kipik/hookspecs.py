"""The hooks pytest-kipik offers to ``conftest.py`` files and plugins."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pytest_kipik.cluster import NestedCluster


def pytest_kipik_cluster_setup(cluster: NestedCluster) -> None:
    """Prepare a new nested cluster before any test uses it: CRDs, operators, images.

    Called once for each cluster kipik creates, before the cluster is saved as its
    configuration's snapshot; a cluster restored from that snapshot already has what this hook
    did, so the hook is not called for it. ``cluster`` is the
    :class:`~pytest_kipik.NestedCluster` (``apply()``, ``wait_for()``, ``load_image()``,
    ``kubectl()``, ``helm()``...). The hook's source is part of the snapshot's key: changing
    the hook makes a new snapshot. An exception fails the tests that asked for the cluster.
    """
