#!/usr/bin/env python3
"""Build the container images the test suite uses, on machines that cannot pull any image.

    python3 tests/images/build.py            # build what is missing or out of date
    python3 tests/images/build.py --force    # rebuild everything

Two images come out of it:

- ``kipik-test/dind:dev``: the project's own Docker-in-Docker recipe on a Debian root filesystem
  made with mmdebstrap (from the machine's apt sources) and imported with `docker import`, because
  no base image can be pulled here. It starts exactly like the default image in ``image/`` (same
  entrypoint, runc wrapper, volume, healthcheck and labels: the block between the
  ``kipik:common`` markers of ``image/Dockerfile`` is reused verbatim), with a real ``kind`` and
  ``kubectl`` from ``--kind-bin DIR`` (``bash ../shared/realkind/build.sh bin`` prints such a
  folder: kind v0.32.0 and kubectl v1.22.3) where the default image downloads them. Without
  ``--kind-bin`` it is not built (said so), and the real-kind tier takes its images from
  ``KIPIK_E2E_IMAGE`` / ``KIPIK_E2E_NODE_IMAGE`` or skips.
- ``kipik-test/app:dev``: a test app of a couple of MB, built FROM scratch: the host's static
  ``/bin/busybox`` (Debian's ``busybox-static``), its applet links, and an httpd serving
  ``/www/index.html`` (``kipik app``) on port 8080.

The kind node image is not built here: ``bash ../shared/realkind/build.sh`` builds a real one
(``kipik.local/kind-node:v1.22.3``).

Everything is cached by content: a root filesystem is tagged ``kipik-test/rootfs-<name>:<hash of
suite, variant, architecture, packages and options>`` and is built only when that tag is missing;
a final image carries ``kipik-test.image-hash`` (over every input file, the Dockerfile text and
the root filesystem tag) and is rebuilt only when that hash changes. Needs a Docker engine, and,
when a root filesystem must be built, root and mmdebstrap (``apt-get install mmdebstrap``); the app
image needs ``apt-get install busybox-static``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "image"

SUITE = "bookworm"
VARIANT = "minbase"
# Documentation, manual pages and translations are dead weight in images that only tests use (and
# the node image is streamed into every DinD container).
DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
ROOTFS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

HASH_LABEL = "kipik-test.image-hash"
COMMON_BEGIN = "# kipik:common begin"
COMMON_END = "# kipik:common end"
# Caches that appear in a double's folder when it is run or linted; they are not inputs.
IGNORED_NAMES = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})
IGNORED_SUFFIXES = (".pyc", ".pyo")


class BuildFailure(Exception):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class Rootfs:
    """A Debian root filesystem made by mmdebstrap and imported as an image."""

    name: str
    packages: tuple[str, ...]

    @property
    def repository(self) -> str:
        """Image repository of this root filesystem."""
        return f"kipik-test/rootfs-{self.name}"

    def tag(self, arch: str) -> str:
        """Image tag naming exactly this suite, variant, architecture and package list."""
        recipe = json.dumps(
            {
                "suite": SUITE,
                "variant": VARIANT,
                "arch": arch,
                "packages": sorted(self.packages),
                "dpkg_options": list(DPKG_OPTIONS),
                "import_changes": import_changes(self.packages),
            },
            sort_keys=True,
        )
        return f"{self.repository}:{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"


@dataclass(frozen=True)
class ImageRecipe:
    """A final test image: a Dockerfile over a root filesystem, plus the files it copies."""

    tag: str
    rootfs: Rootfs | None  # None: FROM scratch
    dockerfile: str  # `{rootfs}` is replaced by the root filesystem's tag
    files: Mapping[str, Path]  # name in the build context -> file or folder to copy there
    texts: Mapping[str, str] = field(default_factory=dict)  # name in the context -> content

    def render(self, rootfs_tag: str) -> str:
        """Dockerfile text for a given root filesystem tag."""
        return self.dockerfile.replace("{rootfs}", rootfs_tag)


DIND_ROOTFS = Rootfs(
    "dind",
    ("docker.io", "iptables", "ca-certificates", "procps", "openssl", "tini", "jq"),
)
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary, no libraries
APP_INDEX = "kipik app\n"


def common_dind_block(dockerfile: Path) -> str:
    """The lines of the default image's Dockerfile that the test DinD image shares."""
    lines = dockerfile.read_text().splitlines()
    try:
        begin, end = lines.index(COMMON_BEGIN), lines.index(COMMON_END)
    except ValueError:
        raise BuildFailure(
            f"{dockerfile} has no '{COMMON_BEGIN}' ... '{COMMON_END}' block to share"
        ) from None
    return "\n".join(lines[begin : end + 1])


def dind_recipe(kind_bin: Path) -> ImageRecipe:
    """The test DinD image: the default image's recipe with the real kind and kubectl given."""
    dockerfile = f"""\
FROM {{rootfs}}
COPY kind kubectl /usr/local/bin/
RUN chmod 0755 /usr/local/bin/kind /usr/local/bin/kubectl \\
    && kind version && kubectl version --client
LABEL org.opencontainers.image.title="kipik-test-dind" \\
      org.opencontainers.image.description="pytest-kipik DinD image with a real kind (test build)"
{common_dind_block(IMAGE_DIR / "Dockerfile")}
"""
    return ImageRecipe(
        tag="kipik-test/dind:dev",
        rootfs=DIND_ROOTFS,
        dockerfile=dockerfile,
        files={
            "entrypoint.sh": IMAGE_DIR / "entrypoint.sh",
            "runc-capfix": IMAGE_DIR / "runc-capfix",
            "kind": kind_bin / "kind",
            "kubectl": kind_bin / "kubectl",
        },
    )


# The classic builder runs exec-form RUN without a shell, so the static busybox can make its own
# applet links in an image that has nothing else.
APP_RECIPE = ImageRecipe(
    tag="kipik-test/app:dev",
    rootfs=None,
    dockerfile="""\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY index.html /www/index.html
LABEL org.opencontainers.image.title="kipik-test-app" \\
      org.opencontainers.image.description="pytest-kipik test app (busybox httpd on 8080)" \\
      kipik-test.image="app"
EXPOSE 8080
CMD ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
""",
    files={"busybox": BUSYBOX},
    texts={"index.html": APP_INDEX},
)


def recipes(kind_bin: Path | None) -> list[ImageRecipe]:
    """The test images to build: the DinD image only when real kind binaries are given."""
    if kind_bin is None:
        say(
            "kipik-test/dind:dev: not built (no --kind-bin folder with a real kind and kubectl; "
            "bash ../shared/realkind/build.sh bin prints one)"
        )
        return [APP_RECIPE]
    return [dind_recipe(kind_bin), APP_RECIPE]


# --- output --------------------------------------------------------------------------------------


def say(message: str) -> None:
    """One line of progress."""
    print(f"build.py: {message}", flush=True)


@contextmanager
def step(what: str) -> Iterator[None]:
    """Report one step on one line, with how long it took."""
    print(f"build.py: {what} ...", end="", flush=True)
    started = time.monotonic()
    try:
        yield
    except BaseException:
        print(f" failed after {time.monotonic() - started:.1f} s", flush=True)
        raise
    print(f" done in {time.monotonic() - started:.1f} s", flush=True)


# --- inputs and hashing --------------------------------------------------------------------------


def is_ignored(path: Path) -> bool:
    """Whether a path is a cache file rather than an input."""
    return path.name in IGNORED_NAMES or path.name.endswith(IGNORED_SUFFIXES)


def walk(source: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of a file or of every entry under a folder, in a stable order.

    The top level is followed if it is a symlink (it is copied that way); links inside a folder are
    inputs as links.
    """
    source = source.resolve()
    if not source.is_dir():
        yield "", source
        return
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not is_ignored(Path(d)))
        for name in sorted(files):
            path = Path(root) / name
            if not is_ignored(path):
                yield path.relative_to(source).as_posix(), path


def input_hash(image: ImageRecipe, dockerfile_text: str, rootfs_tag: str) -> str:
    """Hash over every input file (name, mode and content), the Dockerfile and the rootfs tag."""
    digest = hashlib.sha256()
    for text in (rootfs_tag, dockerfile_text):
        digest.update(text.encode() + b"\0")
    for name in sorted(image.texts):
        digest.update(f"{name}\0".encode() + hashlib.sha256(image.texts[name].encode()).digest())
    for name in sorted(image.files):
        for relative, path in walk(image.files[name]):
            digest.update(f"{name}/{relative}\0".encode())
            if path.is_symlink():
                digest.update(b"symlink\0" + os.readlink(path).encode() + b"\0")
            else:
                digest.update(oct(path.stat().st_mode & 0o777).encode() + b"\0")
                digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def check_inputs(image: ImageRecipe) -> None:
    """Fail with the missing path when an input of the image does not exist."""
    for name, source in image.files.items():
        if source == BUSYBOX and not source.exists():
            raise BuildFailure(
                f"{image.tag}: {BUSYBOX} is missing; the test app image is the static busybox "
                "of Debian's busybox-static package: apt-get install busybox-static"
            )
        if not source.exists():
            raise BuildFailure(f"{image.tag}: input '{name}' is missing: {source} does not exist")


# --- Docker --------------------------------------------------------------------------------------


def connect() -> docker.DockerClient:
    """A client of the local engine, or a failure that says how to get one."""
    try:
        client = docker.from_env(timeout=600)
        client.ping()
    except docker.errors.DockerException as exc:
        raise BuildFailure(
            f"no Docker engine answers ({exc}); start one (as root: bash tests/engine.sh) "
            "or point DOCKER_HOST at one"
        ) from exc
    return client


def image_labels(client: docker.DockerClient, tag: str) -> dict[str, str] | None:
    """Labels of a local image, or None when there is no such image."""
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    labels: dict[str, str] | None = image.labels
    return labels or {}


def image_id(client: docker.DockerClient, tag: str) -> str | None:
    """Id of a local image, or None."""
    try:
        found: str | None = client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None
    return found


def import_changes(packages: Sequence[str]) -> list[str]:
    """The Dockerfile instructions `docker import` applies to a root filesystem."""
    return [
        f"ENV PATH={ROOTFS_PATH}",
        f'LABEL kipik-test.rootfs-packages="{",".join(packages)}"',
        f'LABEL kipik-test.rootfs-suite="{SUITE}"',
    ]


def engine_arch(client: docker.DockerClient) -> str:
    """The engine's architecture, in Debian's (and Docker's) spelling."""
    machine = str(client.version().get("Arch", "")) or os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def build_rootfs(client: docker.DockerClient, rootfs: Rootfs, tag: str, arch: str) -> None:
    """Make the root filesystem with mmdebstrap and import it as `tag`."""
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise BuildFailure(
            f"{tag} must be built and mmdebstrap is not installed: apt-get install mmdebstrap"
        )
    if os.geteuid() != 0:
        raise BuildFailure(f"{tag} must be built and mmdebstrap needs root here: run as root")
    with tempfile.TemporaryDirectory(prefix="kipik-rootfs-") as scratch:
        tarball = Path(scratch) / f"{rootfs.name}.tar"
        argv = [
            mmdebstrap,
            f"--variant={VARIANT}",
            f"--architectures={arch}",
            f"--include={','.join(rootfs.packages)}",
            *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
            SUITE,
            str(tarball),
        ]
        with step(f"{tag}: mmdebstrap {SUITE} with {len(rootfs.packages)} packages"):
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                output = (done.stdout + done.stderr).strip().splitlines()[-30:]
                raise BuildFailure(
                    f"mmdebstrap failed with exit code {done.returncode}:\n  "
                    + " ".join(argv)
                    + "\n"
                    + "\n".join(output)
                )
        repository, _, version = tag.partition(":")
        changes = import_changes(rootfs.packages)
        with step(f"{tag}: docker import ({tarball.stat().st_size / 2**20:.0f} MiB)"):
            client.api.import_image_from_file(
                str(tarball), repository=repository, tag=version, changes=changes
            )


def copy_into(context: Path, files: Mapping[str, Path]) -> None:
    """Lay the image's input files out in a build context folder."""
    for name, link in files.items():
        source, target = link.resolve(), context / name
        if source.is_dir():
            shutil.copytree(
                source,
                target,
                symlinks=True,
                ignore=lambda _dir, names: [n for n in names if is_ignored(Path(n))],
            )
        else:
            shutil.copy2(source, target)


def build_image(
    client: docker.DockerClient, image: ImageRecipe, dockerfile: str, digest: str
) -> None:
    """Build `image` from a temporary context with the classic builder."""
    with tempfile.TemporaryDirectory(prefix="kipik-context-") as scratch:
        context = Path(scratch)
        (context / "Dockerfile").write_text(dockerfile)
        copy_into(context, image.files)
        for name, text in image.texts.items():
            (context / name).write_text(text)
        log: list[str] = []
        stream: Iterator[dict[str, Any]] = client.api.build(
            path=str(context),
            tag=image.tag,
            labels={HASH_LABEL: digest},
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
        )
        for chunk in stream:
            if "stream" in chunk:
                log.extend(str(chunk["stream"]).splitlines())
            if "error" in chunk:
                tail = "\n".join(log[-30:])
                raise BuildFailure(f"docker build of {image.tag} failed: {chunk['error']}\n{tail}")


def remove_if_untagged(client: docker.DockerClient, old_id: str | None) -> None:
    """Drop the image a rebuilt tag used to name, unless something still uses it."""
    if old_id is None:
        return
    try:
        if not client.images.get(old_id).tags:
            client.images.remove(old_id)
    except docker.errors.DockerException:
        pass  # in use by a container, or already gone: not ours to force


def ensure(client: docker.DockerClient, image: ImageRecipe, arch: str, force: bool) -> None:
    """Bring one test image (and its root filesystem) up to date."""
    check_inputs(image)
    if image.rootfs is None:
        rootfs_tag = "scratch"
    else:
        rootfs_tag = image.rootfs.tag(arch)
        if force or image_id(client, rootfs_tag) is None:
            build_rootfs(client, image.rootfs, rootfs_tag, arch)
        else:
            say(f"{rootfs_tag}: present, kept")
    dockerfile = image.render(rootfs_tag)
    digest = input_hash(image, dockerfile, rootfs_tag)
    labels = image_labels(client, image.tag)
    if not force and labels is not None and labels.get(HASH_LABEL) == digest:
        say(f"{image.tag}: up to date ({HASH_LABEL}={digest[:16]}...), kept")
        return
    old_id = image_id(client, image.tag)
    reason = "missing" if labels is None else ("forced" if force else "inputs changed")
    with step(f"{image.tag}: docker build ({reason})"):
        build_image(client, image, dockerfile, digest)
    remove_if_untagged(client, old_id)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python3 tests/images/build.py",
        description=(
            "Build kipik-test/dind:dev (with the real kind and kubectl of --kind-bin) and "
            "kipik-test/app:dev, the images the test suite uses on machines that cannot pull "
            "anything, from a Debian root filesystem made with mmdebstrap (the app image from the "
            "host's static busybox). Cached by content hash: unchanged images are kept."
        ),
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="rebuild the root filesystems and the images even when they are up to date",
    )
    parser.add_argument(
        "--kind-bin",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder holding a real kind and kubectl for the DinD image (e.g. what "
        "bash ../shared/realkind/build.sh bin prints); without it only the app image is built",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build what is missing or out of date; 0 on success, 1 with a message on failure."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    try:
        client = connect()
        arch = engine_arch(client)
        for image in recipes(args.kind_bin.resolve() if args.kind_bin else None):
            ensure(client, image, arch, args.force)
    except BuildFailure as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 1
    except docker.errors.DockerException as exc:
        print(f"build.py: error: the Docker engine refused: {exc}", file=sys.stderr)
        return 1
    say(f"all images ready in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
