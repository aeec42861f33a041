"""Building the default DinD image when it is missing, through the real engine's builder.

The real image/ context needs a registry (its base image) and GitHub, which these machines
cannot reach, so the build path is exercised with small contexts built FROM a local test image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from pytest_kipik.errors import ImageError
from pytest_kipik.hosts.transfer import REPOSITORY, context_dir, context_hash, ensure_default_image

pytestmark = pytest.mark.docker


@pytest.fixture
def context(tmp_path: Path, test_images: tuple[str, str]) -> Path:
    (tmp_path / "Dockerfile").write_text(f"FROM {test_images[1]}\nRUN echo built > /built\n")
    return tmp_path


@pytest.fixture
def cleanup_tag(docker_client: docker.DockerClient, context: Path) -> Iterator[str]:
    tag = f"{REPOSITORY}:{context_hash(context)}"
    yield tag
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(tag, force=True)


def test_missing_default_image_is_built_once_with_progress(
    docker_client: docker.DockerClient, context: Path, cleanup_tag: str
) -> None:
    lines: list[str] = []
    assert ensure_default_image(docker_client, lines.append, context) == cleanup_tag
    assert lines[0] == f"kipik: building the default DinD image {cleanup_tag} from {context} (once)"
    assert any(line.startswith("kipik: image build: Step 2/2 : RUN echo built") for line in lines)
    assert lines[-1] == f"kipik: built {cleanup_tag}"
    assert docker_client.images.get(cleanup_tag)
    again: list[str] = []
    assert ensure_default_image(docker_client, again.append, context) == cleanup_tag
    assert again == []  # present: nothing is rebuilt


def test_a_failing_build_names_the_step_and_what_to_do(
    docker_client: docker.DockerClient, context: Path, cleanup_tag: str
) -> None:
    (context / "Dockerfile").write_text((context / "Dockerfile").read_text() + "RUN exit 7\n")
    with pytest.raises(ImageError) as info:
        ensure_default_image(docker_client, lambda line: None, context)
    text = str(info.value)
    assert text.startswith(f"building the default DinD image {REPOSITORY}:")
    assert "returned a non-zero code: 7" in text
    assert "Step 3/3 : RUN exit 7" in text
    assert text.endswith("Pass --kipik-image to use an image you built or pulled yourself.")


def test_the_tag_follows_the_packaged_context() -> None:
    directory = context_dir()
    assert (directory / "Dockerfile").is_file()
    assert (directory / "entrypoint.sh").is_file()
    assert len(context_hash(directory)) == 12
