"""The documentation site's hook (docs/hooks.py): the generated settings tables and the links.

``docs`` is not a package and mkdocs is only installed in the docs environment, so the hook is
loaded from its file; it imports mkdocs only inside the hooks mkdocs calls.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import yaml

import pytest_kipik
from pytest_kipik.config import SETTINGS, Setting

ROOT = Path(pytest_kipik.__file__).resolve().parent.parent


def _load_hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kipik_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks = _load_hooks()


def _row(table: str, setting: Setting) -> str:
    rows = [line for line in table.splitlines() if f"| `{setting.ini}` |" in line]
    assert len(rows) == 1, (setting.name, rows)
    return rows[0]


def _cells(row: str) -> list[str]:
    """The cells of a table row as mkdocs splits it: at pipes neither escaped nor in code."""
    cells, current, escaped, in_code = [], "", False, False
    for char in row.strip().removeprefix("|").removesuffix("|"):
        if char == "|" and not escaped and not in_code:
            cells.append(current.strip())
            current = ""
        else:
            current += char
        in_code = in_code != (char == "`" and not escaped)
        escaped = char == "\\" and not escaped
    return [*cells, current.strip()]


def test_every_setting_is_a_row_with_its_names_default_and_help() -> None:
    table = hooks.settings_table()
    assert SETTINGS, "no settings declared"
    for setting in SETTINGS:
        cli, ini, env, default, meaning = _cells(_row(table, setting))
        shown = setting.cli if setting.flag else f"{setting.cli}={setting.metavar}"
        assert cli == f"`{shown}`"
        assert ini == f"`{setting.ini}`"
        assert env == f"`{setting.env}`"
        assert default == (f"`{setting.default}`" if setting.default else "unset")
        assert meaning == hooks.cell(setting.help)


def test_pod_backend_settings_are_in_their_own_table() -> None:
    table = hooks.settings_table()
    pod_heading = "## Pod backend settings"
    general, _, pod = table.partition(pod_heading)
    assert pod, f"no {pod_heading!r} in the generated page"
    assert general.startswith("## Settings of every backend")
    pod_settings = [s for s in SETTINGS if s.group == "pod"]
    assert pod_settings, "no setting of the pod group"
    for setting in SETTINGS:
        in_pod_table = f"| `{setting.ini}` |" in pod
        in_general_table = f"| `{setting.ini}` |" in general
        assert (in_pod_table, in_general_table) == (
            setting.group == "pod",
            setting.group != "pod",
        ), setting.name


def test_help_text_cannot_break_the_table() -> None:
    base = SETTINGS[0]
    odd = dataclasses.replace(base, name="odd", help="yes | no, <b>a</b> or `a|b`\n  next line")
    row = hooks.settings_row(odd)
    assert len(_cells(row)) == 5
    assert row.endswith(r"| yes \| no, &lt;b&gt;a&lt;/b&gt; or `a|b` next line |")


def test_settings_page_puts_the_tables_between_the_markers_once() -> None:
    template = (ROOT / "docs" / "settings.md").read_text(encoding="utf-8")
    page = hooks.settings_page(template, "## TABLES\n")
    assert page.count("## TABLES") == 1
    assert hooks.TABLE_START not in page
    assert hooks.TABLE_END not in page
    before, after = page.split("## TABLES\n")
    assert template.startswith(before)
    assert after.startswith("\n")
    assert template.rstrip().endswith(after.strip())
    with pytest.raises(ValueError, match="must hold the lines"):
        hooks.settings_page("# Settings without markers\n", "## TABLES\n")


def _nav_pages(nav: object) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    raise AssertionError(f"unexpected nav entry {nav!r}")


def test_every_page_in_the_nav_exists() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages = _nav_pages(config["nav"])
    assert "index.md" in pages
    assert "settings.md" in pages
    for page in pages:
        source = ROOT / hooks.repo_path(page)
        assert source.is_file(), f"nav page {page} has no source ({source})"
        added = page == hooks.HOME[0] or page in hooks.PAGES
        assert added or (ROOT / "docs" / page).is_file(), page
    assert set(hooks.PAGES) <= set(pages), "a page the hook adds is missing from the nav"
    hand_written = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert hand_written <= set(pages), "a page under docs/ is missing from the nav"


@pytest.mark.parametrize(
    ("page", "target", "expected"),
    [
        ("index.md", "docs/fixtures.md#nested_cluster", "fixtures.md#nested_cluster"),
        ("index.md", "image/README.md", "image/README.md"),
        ("index.md", "CONTRIBUTING.md", "CONTRIBUTING.md"),
        ("fixtures.md", "../examples/test_workload.py", "examples/test_workload.py"),
        ("fixtures.md", "lifecycle.md#snapshots", "lifecycle.md#snapshots"),
        ("fixtures.md", "../README.md#two-commands", "index.md#two-commands"),
        ("image/README.md", "../docs/backends.md", "../backends.md"),
        ("image/README.md", "../README.md", "../index.md"),
        ("CONTRIBUTING.md", "docs/how-it-works.md", "how-it-works.md"),
        ("examples/argo/README.md", "../rbac.yaml", "../rbac.yaml"),
        ("fixtures.md", "#working-with-the-cluster", "#working-with-the-cluster"),
        ("fixtures.md", "https://kind.sigs.k8s.io/", "https://kind.sigs.k8s.io/"),
        ("fixtures.md", "../../outside.md", "../../outside.md"),
    ],
)
def test_links_written_for_the_repository_work_on_the_site(
    page: str, target: str, expected: str
) -> None:
    assert hooks.site_link(page, target) == expected


def test_rewrite_links_changes_only_link_targets() -> None:
    text = "See [the fixtures](docs/fixtures.md) and `docs/fixtures.md`, ![x](docs/img.png)."
    assert hooks.rewrite_links(text, "index.md") == (
        "See [the fixtures](fixtures.md) and `docs/fixtures.md`, ![x](img.png)."
    )
