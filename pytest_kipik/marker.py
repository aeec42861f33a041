"""``@pytest.mark.kipik(nodes=..., node_image=..., kind_config=..., fresh=...)``: clusters per mark.

A marker's arguments in, a hashable :class:`ClusterSpec` out (the session-scoped
``nested_cluster`` fixture is parametrized with it, so pytest keeps one value per spec); a
kind config file the marker names is read to check it at collection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pytest_kipik.errors import ConfigError
from pytest_kipik.kind import config as kind


@dataclass(frozen=True)
class ClusterSpec:
    """A ``@pytest.mark.kipik(...)`` configuration: what ``nested_cluster`` gives there."""

    nodes: int | None = None
    node_image: str | None = None
    #: A kind config file's path, or a kind config given as a mapping (as YAML text).
    kind_config: str | None = None
    kind_config_is_text: bool = False
    #: With ``fresh``: the node id of the module, class or test that gets its own cluster.
    fresh_for: str | None = None

    @property
    def id(self) -> str:
        """The test-id part (``kipik-nodes3-...``)."""
        parts = ["kipik"]
        if self.nodes is not None:
            parts.append(f"nodes{self.nodes}")
        if self.node_image:
            parts.append(self.node_image.rsplit("/", 1)[-1])
        if self.kind_config:
            parts.append("config" if self.kind_config_is_text else Path(self.kind_config).stem)
        if self.fresh_for is not None:
            parts.append("fresh-" + self.fresh_for.rsplit("/", 1)[-1].replace("::", "-"))
        return "-".join(parts)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`ClusterFactory.shared` (and ``create``)."""
        config: Any = self.kind_config
        if self.kind_config and self.kind_config_is_text:
            config = yaml.safe_load(self.kind_config)
        return {"nodes": self.nodes, "node_image": self.node_image, "kind_config": config}


MARKER_ARGUMENTS = ("nodes", "node_image", "kind_config", "fresh")


def marker_spec(
    args: Sequence[Any], kwargs: Mapping[str, Any], base: Path, owner: str = ""
) -> ClusterSpec:
    """The :class:`ClusterSpec` of a ``kipik`` marker's arguments (relative paths from ``base``).

    ``owner``: the node id of what the marker is on (a module, class or test), which gets its
    own cluster with ``fresh=True``. Raises ConfigError naming what is wrong.
    """
    unknown = sorted(set(kwargs) - set(MARKER_ARGUMENTS))
    if args or unknown:
        raise ConfigError(
            f"@pytest.mark.kipik takes only the keyword arguments {', '.join(MARKER_ARGUMENTS)}"
            + (f"; got {', '.join(unknown)}" if unknown else "; got positional arguments")
        )
    nodes = kwargs.get("nodes")
    if nodes is not None and (not isinstance(nodes, int) or isinstance(nodes, bool) or nodes < 1):
        raise ConfigError(
            f"@pytest.mark.kipik(nodes=...) must be a whole number >= 1, not {nodes!r}"
        )
    fresh = kwargs.get("fresh", False)
    if not isinstance(fresh, bool):
        raise ConfigError(f"@pytest.mark.kipik(fresh=...) must be True or False, not {fresh!r}")
    fresh_for = owner if fresh else None
    found = kwargs.get("kind_config")
    if isinstance(found, Mapping):
        text = yaml.safe_dump(dict(found))
        return ClusterSpec(nodes, kwargs.get("node_image"), text, True, fresh_for)
    if found is not None:
        path = (base / Path(found)).resolve()
        kind.load_user_config(path)  # raises ConfigError naming the file and the problem
        found = str(path)
    return ClusterSpec(nodes, kwargs.get("node_image"), found, fresh_for=fresh_for)
