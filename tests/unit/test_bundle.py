"""Reading bundles and what a bundle refuses to hold (no Docker needed)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any, cast

import pytest

from pytest_kipik.errors import ImageError
from pytest_kipik.hosts.bundle import META, Entry, read_bundle, write_bundle


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_a_bundle_lists_its_images_in_order(tmp_path: Path) -> None:
    meta = {
        "format": 1,
        "images": [
            {"reference": "d:1", "id": "sha256:aa", "member": "images/0.tar", "role": "dind"},
            {"reference": "n:1", "id": "sha256:bb", "member": "images/1.tar", "role": "node"},
        ],
    }
    path = _tar(tmp_path / "b.tar", {META: json.dumps(meta).encode()})
    assert read_bundle(path) == [
        Entry("d:1", "sha256:aa", "images/0.tar", "dind"),
        Entry("n:1", "sha256:bb", "images/1.tar", "node"),
    ]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"manifest.json": b"[]"}, r"is not a kipik bundle \(no kipik-bundle.json of format 1\)"),
        ({META: b'{"format": 2, "images": []}'}, "is not a kipik bundle"),
        ({META: b'{"format": 1, "images": [{"reference": "x"}]}'}, "is malformed"),
        ({META: b"not json"}, "cannot read it"),
    ],
)
def test_what_is_not_a_bundle_is_named(
    tmp_path: Path, members: dict[str, bytes], message: str
) -> None:
    with pytest.raises(ImageError, match=message):
        read_bundle(_tar(tmp_path / "b.tar", members))


def test_a_file_that_is_no_tar_is_named(tmp_path: Path) -> None:
    path = tmp_path / "b.tar"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(ImageError, match=f"bundle {path}: cannot read it"):
        read_bundle(path)


def test_a_digest_pinned_image_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    pinned = "kindest/node:v1@sha256:" + "a" * 64
    with pytest.raises(ImageError, match="is pinned by digest: a bundle holds images by tag"):
        write_bundle(cast(Any, None), tmp_path / "b.tar", [(pinned, "node")], print)
    assert list(tmp_path.iterdir()) == []
