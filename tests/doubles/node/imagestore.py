"""TEST DOUBLE: the node's image store behind the crictl and ctr doubles and the kubelet.

Archives imported with `ctr images import` (what `kind load docker-image` and `kind load
image-archive` stream in: `docker save` archives, legacy or OCI-based, and OCI image layouts) are
kept under /kind/images as <image id>.tar with an index of image ID -> repository tags, as
containerd would report them; the kubelet double unpacks them from there.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

if __package__:
    from . import runtime
else:  # run from /kipik-node/ by the ctr, crictl and kubelet doubles
    import runtime  # type: ignore[import-not-found,no-redef]

STORE = Path(os.environ.get("KIPIK_IMAGE_STORE", "/kind/images"))
INDEX = STORE / "index.json"


def normalize(reference: str) -> str:
    """Fully qualify an image reference the way containerd names images."""
    if "@" in reference:
        return reference
    first, _, rest = reference.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost"):
        repository = reference if rest else f"library/{reference}"
        reference = f"docker.io/{repository}"
    last = reference.rsplit("/", 1)[-1]
    if ":" not in last:
        reference += ":latest"
    return reference


def load_index() -> list[dict[str, Any]]:
    if not INDEX.exists():
        return []
    images: list[dict[str, Any]] = json.loads(INDEX.read_text())["images"]
    return images


def save_index(images: list[dict[str, Any]]) -> None:
    STORE.mkdir(parents=True, exist_ok=True)
    tmp = INDEX.with_suffix(".tmp")
    tmp.write_text(json.dumps({"images": images}, indent=2) + "\n")
    tmp.replace(INDEX)


def find(reference: str) -> dict[str, Any] | None:
    """Look an image up by reference (short or qualified) or by ID (full or a prefix)."""
    wanted = normalize(reference)
    for image in load_index():
        hex_id = image["id"].removeprefix("sha256:")
        if wanted in image["repoTags"] or reference in (image["id"], hex_id):
            return image
        if len(reference.removeprefix("sha256:")) >= 12 and hex_id.startswith(
            reference.removeprefix("sha256:")
        ):
            return image
    return None


def import_archive(stream: Any) -> list[tuple[str, str]]:
    """Import a `docker save` archive from a binary stream; return (reference, id) pairs."""
    STORE.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=STORE, suffix=".part", delete=False) as part:
        while chunk := stream.read(1 << 20):
            part.write(chunk)
    imported: list[tuple[str, str]] = []
    try:
        with tarfile.open(part.name) as archive:
            archived = runtime.read_archive(archive)
        images = load_index()
        for entry in archived:
            image_id = entry.image_id
            tags = [normalize(t) for t in entry.names]
            for image in images:
                image["repoTags"] = [t for t in image["repoTags"] if t not in tags]
            existing = next((i for i in images if i["id"] == image_id), None)
            archive_path = STORE / f"{image_id.removeprefix('sha256:')}.tar"
            if existing is None:
                existing = {"id": image_id, "repoTags": [], "size": 0}
                images.append(existing)
            existing["repoTags"] = sorted(set(existing["repoTags"]) | set(tags))
            existing["size"] = os.path.getsize(part.name)
            if archive_path.exists():
                archive_path.unlink()  # the newest import is what the kubelet unpacks
            os.link(part.name, archive_path)
            imported += [(t, image_id) for t in tags] or [(image_id, image_id)]
        save_index(images)
    finally:
        os.unlink(part.name)
    return imported
