"""Unit tests of the node double's container runtime parts (tests/doubles/node/runtime.py).

Image archives and layers, CRI logs, the kubelet's back-off, `$(VAR)` expansion and pull
policies: pure functions, no engine, no root.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from tests.doubles.node import runtime as rt
from tests.doubles.node import websocket as ws


def test_expansion_follows_kubernetes_rules() -> None:
    env = {"A": "x", "EMPTY": ""}
    assert rt.expand("$(A)-$(A)", env) == "x-x"
    assert rt.expand("$(MISSING) $(EMPTY)|", env) == "$(MISSING) |"
    assert rt.expand("$$(A) $$ $a $", env) == "$(A) $ $a $"
    assert rt.expand("$(A", env) == "$(A"


@pytest.mark.parametrize(
    ("image", "policy"),
    [
        ("busybox", "Always"),
        ("busybox:latest", "Always"),
        ("kipik-test/app:dev", "IfNotPresent"),
        ("localhost:5000/app", "Always"),
        ("localhost:5000/app:v1", "IfNotPresent"),
        ("app@sha256:" + "0" * 64, "IfNotPresent"),
    ],
)
def test_default_pull_policy(image: str, policy: str) -> None:
    assert rt.default_pull_policy(image) == policy


def test_registry_of_a_reference() -> None:
    assert rt.registry_host("docker.io/library/nope:v1") == (
        "registry-1.docker.io",
        "library/nope",
        "v1",
    )
    assert rt.registry_host("localhost:5000/a/b:c") == ("localhost:5000", "a/b", "c")


def test_back_off_doubles_from_10s_to_300s() -> None:
    backoff = rt.BackOff()
    key = "uid/app"
    assert not backoff.in_backoff_since(key, 0.0, 0.0)
    delays = []
    now = 0.0
    for _ in range(8):
        backoff.next(key, now)
        delays.append(backoff.get(key))
        now += backoff.get(key)
    assert delays == [10, 20, 40, 80, 160, 300, 300, 300]
    backoff.next(key, 1000.0)
    assert backoff.in_backoff_since(key, 1001.0, 1005.0)
    assert not backoff.in_backoff_since(key, 1001.0, 1302.0)
    # an entry untouched for twice the cap starts over
    backoff.next(key, 2000.0)
    assert backoff.get(key) == 10


def test_go_durations() -> None:
    assert [rt.go_duration(s) for s in (10, 80, 300, 3725)] == ["10s", "1m20s", "5m0s", "1h2m5s"]


def test_cri_lines_split_long_lines_and_keep_partial_ends() -> None:
    splitter = rt.CriSplitter("stdout")
    assert splitter.feed(b"one\ntw") == [("F", b"one")]
    assert splitter.feed(b"o\n") == [("F", b"two")]
    long = b"x" * (rt.CRI_MAX_LINE + 5)
    assert splitter.feed(long + b"\n") == [("P", b"x" * rt.CRI_MAX_LINE), ("F", b"xxxxx")]
    assert splitter.feed(b"tail") == []
    assert splitter.close() == [("P", b"tail")]
    stamp = 1_700_000_000_123_456_789
    assert rt.cri_entry(stamp, "stderr", "F", b"hi") == (
        b"2023-11-14T22:13:20.123456789Z stderr F hi\n"
    )


def test_rendered_logs_tail_since_timestamps_limit() -> None:
    data = b"".join(
        rt.cri_entry(1_700_000_000_000_000_000 + i * 1_000_000_000, "stdout", tag, text)
        for i, (tag, text) in enumerate(
            [("F", b"a"), ("P", b"b1"), ("F", b"b2"), ("F", b"c"), ("P", b"d")]
        )
    )
    entries = rt.parse_cri(data + b"garbage line\n")
    assert rt.render_log(entries) == b"a\nb1b2\nc\nd"
    assert rt.render_log(entries, tail=2) == b"c\nd"
    assert rt.render_log(entries, tail=0) == b""
    assert rt.render_log(entries, since=1_700_000_003.0) == b"c\nd"
    assert rt.render_log(entries, tail=1, timestamps=True) == b"2023-11-14T22:13:24.000000000Z d"
    assert rt.render_log(entries, limit=4) == b"a\nb1"


def _tar(members: list[tuple[str, bytes | None, str]]) -> bytes:
    """A tar of (name, content or None for a directory, symlink target or "")."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as archive:
        for name, content, link in members:
            info = tarfile.TarInfo(name)
            if link:
                info.type = tarfile.SYMTYPE
                info.linkname = link
                archive.addfile(info)
            elif content is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                archive.addfile(info)
            else:
                info.size = len(content)
                info.mode = 0o755
                archive.addfile(info, io.BytesIO(content))
    return out.getvalue()


LAYER_1 = _tar(
    [
        ("etc/", None, ""),
        ("etc/keep", b"keep", ""),
        ("etc/gone", b"gone", ""),
        ("data/", None, ""),
        ("data/old", b"old", ""),
        ("escape", None, "/"),
        ("bin/", None, ""),
        ("bin/sh", b"#!", ""),
    ]
)
LAYER_2 = _tar(
    [
        ("etc/.wh.gone", b"", ""),
        ("data/.wh..wh..opq", b"", ""),
        ("data/new", b"new", ""),
        ("escape/outside", b"stays inside the root", ""),
        ("../evil", b"never written", ""),
    ]
)
CONFIG = {"config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]}, "rootfs": {"type": "layers"}}


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def docker_save_archive(path: Path) -> str:
    """A legacy `docker save` archive; returns the image ID."""
    config = json.dumps(CONFIG).encode()
    image_id = "a" * 64
    with tarfile.open(path, "w") as archive:
        _add(archive, f"{image_id}.json", config)
        _add(archive, "l1/layer.tar", LAYER_1)
        _add(archive, "l2/layer.tar", LAYER_2)
        manifest = [
            {
                "Config": f"{image_id}.json",
                "RepoTags": ["example.local/app:v1"],
                "Layers": ["l1/layer.tar", "l2/layer.tar"],
            }
        ]
        _add(archive, "manifest.json", json.dumps(manifest).encode())
    return f"sha256:{image_id}"


def oci_archive(path: Path) -> str:
    """An OCI image layout (gzip layers, a nested index); returns the image ID."""
    import gzip
    import hashlib

    blobs: dict[str, bytes] = {}

    def blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return digest

    config = blob(json.dumps(CONFIG).encode())
    layers = [blob(gzip.compress(LAYER_1)), blob(gzip.compress(LAYER_2))]
    manifest = blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"digest": config},
                "layers": [
                    {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d}
                    for d in layers
                ],
            }
        ).encode()
    )
    nested = blob(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest}
                ],
            }
        ).encode()
    )
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": nested,
                "annotations": {"io.containerd.image.name": "example.local/oci:v2"},
            }
        ],
    }
    with tarfile.open(path, "w") as archive:
        _add(archive, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        _add(archive, "index.json", json.dumps(index).encode())
        for digest, data in blobs.items():
            _add(archive, "blobs/sha256/" + digest.split(":")[1], data)
    return config


@pytest.mark.parametrize("make", [docker_save_archive, oci_archive])
def test_archives_unpack_in_layer_order_with_whiteouts(make: object, tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    image_id = make(path)  # type: ignore[operator]
    with tarfile.open(path) as archive:
        images = rt.read_archive(archive)
    assert [i.image_id for i in images] == [image_id]
    assert images[0].names in (("example.local/app:v1",), ("example.local/oci:v2",))
    root = tmp_path / "root"
    config = rt.unpack_image(str(path), image_id, str(root))
    assert config == CONFIG
    assert (root / "etc/keep").read_bytes() == b"keep"
    assert not (root / "etc/gone").exists()  # whiteout
    assert sorted(os.listdir(root / "data")) == ["new"]  # opaque directory
    # a symlink to / in the image resolves inside the root filesystem
    assert (root / "outside").read_bytes() == b"stays inside the root"
    assert not (tmp_path / "evil").exists()
    assert os.readlink(root / "escape") == "/"


def test_an_archive_that_is_no_image_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as archive:
        _add(archive, "hello", b"hi")
    with tarfile.open(path) as archive, pytest.raises(rt.ArchiveError, match="not an image"):
        rt.read_archive(archive)


@pytest.mark.parametrize(
    ("ports", "expected"),
    [
        ([], (400, 'query parameter "port" is required')),
        ([""], (400, 'query parameter "port" cannot be empty')),
        (
            ["80,x"],
            (
                400,
                'unable to parse "80,x" as a port: strconv.ParseUint: parsing "x": invalid syntax',
            ),
        ),
        (["0"], (400, 'port "0" must be > 0')),
        (["80,8080", "9090"], [80, 8080, 9090]),
    ],
)
def test_port_forward_ports(ports: list[str], expected: object) -> None:
    query = {"ports": ports} if ports else {}
    if isinstance(expected, list):
        assert ws.forward_ports(query) == expected
        return
    with pytest.raises(ws.Refusal) as refused:
        ws.forward_ports(query)
    assert (refused.value.code, refused.value.text) == expected
