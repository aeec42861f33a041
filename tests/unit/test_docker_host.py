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
