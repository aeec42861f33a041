"""Bundles on the real engine: written from local images, loaded back, spooled for a pod."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from pytest_kipik.config import resolve
from pytest_kipik.hosts.bundle import load_into_engine, read_bundle, spool_from_bundle, write_bundle
from pytest_kipik.hosts.pod import PodBackend
from pytest_kipik.hosts.transfer import archive_images
from tests.conftest import APP_IMAGE

pytestmark = pytest.mark.docker


@pytest.fixture
def app_tag(docker_client: docker.DockerClient) -> Iterator[str]:
    """A tag of its own on the small test app image, removed afterwards."""
    try:
        image = docker_client.images.get(APP_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"the test image {APP_IMAGE} is missing: bash tests/run.sh builds it")
    tag = f"kipik-bundle-test/app:{uuid.uuid4().hex[:8]}"
    image.tag(tag)
    yield tag
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(tag)


def test_a_bundle_brings_back_an_image_the_engine_lost(
    docker_client: docker.DockerClient, app_tag: str, tmp_path: Path
) -> None:
    lines: list[str] = []
    image_id = str(docker_client.images.get(app_tag).id)
    bundle = tmp_path / "bundle.tar"
    entries = write_bundle(
        docker_client, bundle, [(app_tag, "dind"), (app_tag, "extra")], lines.append
    )
    assert [(e.reference, e.id, e.role) for e in entries] == [(app_tag, image_id, "dind")]
    assert read_bundle(bundle) == entries
    assert [p.name for p in tmp_path.iterdir()] == ["bundle.tar"]  # no partial file left

    docker_client.images.remove(app_tag)
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(app_tag)
    assert load_into_engine(docker_client, bundle, read_bundle(bundle), lines.append) == 1
    assert str(docker_client.images.get(app_tag).id) == image_id
    assert f"kipik: {app_tag} from the bundle bundle.tar" in lines
    assert (
        load_into_engine(docker_client, bundle, read_bundle(bundle), lines.append) == 0
    )  # present: not again

    path = spool_from_bundle(bundle, entries[0])
    try:
        assert [found.id for found in archive_images(path)] == [image_id]
        assert path.stat().st_mode & 0o077 == 0  # in the private spool directory
    finally:
        path.unlink()


def test_bundling_an_image_the_engine_lacks_names_it(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    missing = f"kipik-bundle-test/missing:{uuid.uuid4().hex[:8]}"
    with pytest.raises(Exception, match=f"'{missing}' is not on the local Docker engine"):
        write_bundle(docker_client, tmp_path / "b.tar", [(missing, "node")], print)
    assert list(tmp_path.iterdir()) == []


def test_the_pod_backend_without_an_engine_moves_images_from_the_bundle(
    docker_client: docker.DockerClient,
    app_tag: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle = tmp_path / "bundle.tar"
    (entry,) = write_bundle(docker_client, bundle, [(app_tag, "extra")], print)
    # as in an Argo step: no Docker engine where the test process runs
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    config = resolve(
        {"backend": "pod", "image": "reg/dind:1", "bundle": str(bundle)},
        {},
        {},
        cwd=tmp_path,
        ini_dir=tmp_path,
    )
    backend = PodBackend(config, print)
    try:
        assert backend.local_image_id(app_tag) == entry.id
        assert backend.local_image_id("kipik-bundle-test/not-in-it:1") is None
        assert backend.spool_image("kipik-bundle-test/not-in-it:1") is None
        spooled = backend.spool_image(app_tag)
        assert spooled is not None
        image_id, path = spooled
        try:
            assert [found.id for found in archive_images(path)] == [image_id] == [entry.id]
        finally:
            path.unlink()
    finally:
        backend.close()
