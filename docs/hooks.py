"""mkdocs hook: the site's pages are the repository's own Markdown files, and what they link to.

The README is the home page; every other page keeps its path, so the links between them (and to
the examples they name) work on the site as they do on the repository.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    "image/README.md",
    "examples/argo/README.md",
    "tests/doubles/README.md",
    "CHANGELOG.md",
    "CONTRIBUTING.md",
    "SECURITY.md",
]
#: Files the pages link to, served as they are.
LINKED = ["examples/*.py", "examples/*.yaml", "examples/*.yml", "examples/argo/*.yaml", "LICENSE"]


def on_files(files: Files, config: Any) -> Files:
    """Add the README as ``index.md``, the other pages and the files they link to."""
    files.append(File.generated(config, "index.md", abs_src_path=str(ROOT / "README.md")))
    for page in PAGES:
        files.append(File.generated(config, page, abs_src_path=str(ROOT / page)))
    for pattern in LINKED:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
