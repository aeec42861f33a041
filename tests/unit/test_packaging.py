"""The package's metadata: its version is the git tag (or the commit since), not a hand-set one."""

import re
import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest

import pytest_kipik

ROOT = Path(pytest_kipik.__file__).resolve().parent.parent


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False, timeout=30
    )


def test_the_version_comes_from_git() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("installed from an archive: the version is the archive's")
    installed = version("pytest-kipik")
    assert pytest_kipik.__version__ == installed
    tag = _git("describe", "--tags", "--exact-match", "HEAD")
    if tag.returncode == 0 and _git("status", "--porcelain").stdout == "":
        assert installed == tag.stdout.strip().removeprefix("v")
        return
    # between tags (or with local changes): X.Y.devN+g<commit>[.dDATE]
    found = re.search(r"\+(?:.*\.)?g([0-9a-f]{7,40})", installed)
    assert found, f"{installed!r} names no commit"
    head = _git("rev-parse", "HEAD").stdout.strip()
    assert head.startswith(found.group(1)), (installed, head)


def test_the_project_urls_share_one_home_and_name_pages_that_exist() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Issues", "Security"}
    home = urls["Homepage"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/pytest-kipik", home), home
    assert all(url.startswith(home + "/") for name, url in urls.items() if name != "Homepage")
    for name, path in (("Documentation", "docs"), ("Changelog", "CHANGELOG.md")):
        assert urls[name].endswith(f"/main/{path}")
        assert (ROOT / path).exists(), path
    assert (ROOT / "SECURITY.md").is_file()  # what GitHub shows as the security policy
