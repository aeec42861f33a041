"""``@pytest.mark.kipik(nodes=..., node_image=..., kind_config=...)``: a cluster per configuration.

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
        return "-".join(parts)

    def arguments(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`ClusterFactory.shared`."""
        config: Any = self.kind_config
        if self.kind_config and self.kind_config_is_text:
            config = yaml.safe_load(self.kind_config)
        return {"nodes": self.nodes, "node_image": self.node_image, "kind_config": config}


MARKER_ARGUMENTS = ("nodes", "node_image", "kind_config")


def marker_spec(args: Sequence[Any], kwargs: Mapping[str, Any], base: Path) -> ClusterSpec:
    """The :class:`ClusterSpec` of a ``kipik`` marker's arguments (relative paths from ``base``).

    Raises ConfigError naming what is wrong.
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
    found = kwargs.get("kind_config")
    if isinstance(found, Mapping):
        return ClusterSpec(nodes, kwargs.get("node_image"), yaml.safe_dump(dict(found)), True)
    if found is not None:
        path = (base / Path(found)).resolve()
        kind.load_user_config(path)  # raises ConfigError naming the file and the problem
        found = str(path)
    return ClusterSpec(nodes, kwargs.get("node_image"), found)
