"""Pure parts of the docker host."""

from __future__ import annotations

import docker.errors

from pytest_kipik.hosts.docker_host import _missing_modules


def test_an_engine_host_without_lib_modules_is_told_apart_from_other_refusals() -> None:
    missing = docker.errors.APIError(
        "400 Client Error",
        explanation='invalid mount config for type "bind": bind source path does not exist: '
        "/lib/modules",
    )
    assert _missing_modules(missing)
    other_path = docker.errors.APIError(
        "400",
        explanation='invalid mount config for type "bind": bind source path does not '
        "exist: /srv/data",
    )
    assert not _missing_modules(other_path)
    refused = docker.errors.APIError("500", explanation="unable to apply caps")
    assert not _missing_modules(refused)


def test_files_go_into_a_host_as_one_archive_of_exactly_those_files() -> None:
    import io
    import tarfile

    import pytest

    from pytest_kipik.errors import HostError
    from pytest_kipik.hosts.base import files_archive

    files = {"/kipik/.kubelet/answer.sh": (b"#!/bin/sh\n", 0o644), "/etc/x.json": (b"{}", 0o600)}
    data = files_archive(files, mtime=1700000000)
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        members = archive.getmembers()
        assert [(m.name, m.type, m.mode, m.size, m.mtime, m.uid) for m in members] == [
            ("kipik/.kubelet/answer.sh", tarfile.REGTYPE, 0o644, 10, 1700000000, 0),
            ("etc/x.json", tarfile.REGTYPE, 0o600, 2, 1700000000, 0),
        ]  # no directory entries: existing directories keep their modes
        assert archive.extractfile(members[0]).read() == b"#!/bin/sh\n"  # type: ignore[union-attr]
    assert files_archive(files, mtime=1700000000) == data  # the same input, the same bytes
    for bad in ("relative/path", "/", "/etc/../root/x"):
        with pytest.raises(HostError, match="not an absolute path"):
            files_archive({bad: (b"", 0o600)}, mtime=0)
