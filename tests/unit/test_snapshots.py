"""The pure parts of snapshots: which trees of a data root are linked, the meta file, mounts."""

from __future__ import annotations

import pytest

from pytest_kipik.errors import KipikError
from pytest_kipik.hosts.snapshots import (
    CONTAINERD_BLOBS,
    CONTAINERD_SNAPSHOTS,
    Meta,
    NodeVolume,
    _uppers,
    linkable,
    volume_name,
)


def test_only_trees_nothing_writes_are_linked() -> None:
    trees = linkable(
        ["l", "aaa", "bbb", "node1", "node1-init"],
        ["node1"],
        {
            "vol1": NodeVolume(
                uppers=[f"{CONTAINERD_SNAPSHOTS}/12/fs"], snapshot_ids=["2", "12", "3"]
            )
        },
    )
    base = "volumes/vol1/_data"
    assert trees == [
        "overlay2/aaa/diff",  # image layers: the node container's own layers are copied
        "overlay2/bbb/diff",
        f"{base}/{CONTAINERD_BLOBS}",
        f"{base}/{CONTAINERD_SNAPSHOTS}/2/fs",  # committed: the lower dirs of overlay mounts
        f"{base}/{CONTAINERD_SNAPSHOTS}/3/fs",
    ]  # snapshot 12 is a running container's upper dir: copied


def test_uppers_are_read_from_the_overlay_mounts_of_a_node() -> None:
    mounts = (
        "overlay / overlay rw,lowerdir=/var/lib/docker/overlay2/l/A,upperdir=/var/lib/docker/"
        "overlay2/x/diff,workdir=/var/lib/docker/overlay2/x/work 0 0\n"
        "overlay /run/containerd/io.containerd.runtime.v2.task/k8s.io/c1/rootfs overlay "
        f"rw,lowerdir=/var/{CONTAINERD_SNAPSHOTS}/3/fs,upperdir=/var/{CONTAINERD_SNAPSHOTS}/7/fs,"
        f"workdir=/var/{CONTAINERD_SNAPSHOTS}/7/work 0 0\n"
        "tmpfs /tmp tmpfs rw,upperdir=/var/not-overlay 0 0\n"
    )
    assert _uppers(mounts) == ["lib/docker/overlay2/x/diff", f"{CONTAINERD_SNAPSHOTS}/7/fs"]


def test_meta_round_trips_and_other_formats_are_refused() -> None:
    meta = Meta(clusters=["kipik-a1"], ports=[6443], nodes=2, created_at="20261207T000000Z")
    assert Meta.parse(meta.dump()) == meta
    with pytest.raises(KipikError, match="unreadable"):
        Meta.parse("{not json")
    with pytest.raises(KipikError, match="format 99, this kipik reads 1"):
        Meta.parse(meta.dump().replace('"format": 1', '"format": 99'))


def test_a_configuration_has_one_snapshot_volume() -> None:
    assert volume_name("kipik", "0123456789abcdef" * 4) == "kipik-snapshot-0123456789ab"
