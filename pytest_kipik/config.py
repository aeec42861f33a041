"""Settings: one frozen object, each value resolved CLI > env > ini > default, with its source.

Every setting ``x_y`` exists as the command-line option ``--kipik-x-y``, the ini key ``kipik_x_y``
and the environment variable ``KIPIK_X_Y``. Values are validated here, before anything starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_kipik import kind
from pytest_kipik.errors import ConfigError

BACKENDS = ("auto", "docker")
NAME_PREFIX_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h)?$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Setting:
    """One setting: its name, default, help text and parser (str -> value, or ConfigError)."""

    name: str
    default: str
    help: str
    metavar: str = "VALUE"
    flag: bool = False

    @property
    def cli(self) -> str:
        """The command-line option."""
        return "--kipik-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        """The ini key."""
        return "kipik_" + self.name

    @property
    def env(self) -> str:
        """The environment variable."""
        return "KIPIK_" + self.name.upper()


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "backend",
        "auto",
        "where the Docker-in-Docker host runs: auto or docker (the local Docker engine, found "
        "like the Docker SDK finds it: DOCKER_HOST etc.)",
        metavar="NAME",
    ),
    Setting(
        "image",
        "",
        "the Docker-in-Docker image (a Docker daemon plus kind); default: pytest-kipik's own "
        "image, built from its packaged image/ context when not present locally",
        metavar="IMAGE",
    ),
    Setting(
        "node_image",
        "",
        "the kind node image; streamed into the DinD when the local engine has it, else pulled "
        "by kind; default: kind's own default node image",
        metavar="IMAGE",
    ),
    Setting(
        "kind_config",
        "",
        "a kind config file (kind.x-k8s.io/v1alpha4 Cluster) to merge: its nodes, patches and "
        "networking are kept, kipik sets only the name, API address/port and certSANs",
        metavar="PATH",
    ),
    Setting(
        "timeout",
        "300",
        "time allowed to create one cluster until it is ready, in seconds or with s/m/h",
        metavar="DURATION",
    ),
    Setting(
        "keep",
        "false",
        "keep clusters after the session and print how to reach and remove them",
        flag=True,
    ),
    Setting(
        "name_prefix",
        "kipik",
        "prefix of cluster, container and volume names (lowercase letters, digits, '-', at most "
        "20 characters)",
        metavar="PREFIX",
    ),
)
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}


def parse_duration(text: str) -> float:
    """Parse ``300``, ``300s``, ``5m``, ``1.5h`` into seconds (> 0)."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration: use seconds like 300, or 300s, 5m, 1h")
    seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


def parse_bool(text: str) -> bool:
    """Parse a yes/no value the way environment variables usually spell it."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(
        f"{text!r} is not a yes/no value: use one of 1, true, yes, on, 0, false, no, off"
    )


def _parse_backend(text: str) -> str:
    value = text.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{text!r} is not a backend: use one of {', '.join(BACKENDS)}")
    return value


def _parse_optional(text: str) -> str | None:
    return text.strip() or None


def _parse_name_prefix(text: str) -> str:
    if not NAME_PREFIX_RE.match(text):
        raise ValueError(
            f"{text!r} is not a valid name prefix: use 1-20 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return text


def _parse_kind_config(text: str, base: Path) -> Path | None:
    if not text.strip():
        return None
    path = (base / Path(text.strip()).expanduser()).resolve()
    kind.load_user_config(path)  # raises ConfigError naming the file and the problem
    return path


_PARSERS: dict[str, Callable[[str, Path], Any]] = {
    "backend": lambda text, _base: _parse_backend(text),
    "image": lambda text, _base: _parse_optional(text),
    "node_image": lambda text, _base: _parse_optional(text),
    "kind_config": _parse_kind_config,
    "timeout": lambda text, _base: parse_duration(text),
    "keep": lambda text, _base: parse_bool(text),
    "name_prefix": lambda text, _base: _parse_name_prefix(text),
}


@dataclass(frozen=True)
class KipikConfig:
    """The resolved settings of one session; ``sources`` says where each value came from."""

    backend: str = "auto"
    image: str | None = None
    node_image: str | None = None
    kind_config: Path | None = None
    timeout: float = 300.0
    keep: bool = False
    name_prefix: str = "kipik"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def defaults(cls) -> KipikConfig:
        """The configuration with every setting at its default."""
        return resolve({}, {}, {}, cwd=Path.cwd(), ini_dir=Path.cwd())

    def describe(self) -> list[str]:
        """One line per setting, ``name=value (source)``, for the pytest header."""
        lines = []
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            shown = "-" if value is None else str(value)
            if setting.name == "timeout":
                shown = f"{value:g}s"
            lines.append(f"{setting.name}={shown} ({self.sources.get(setting.name, 'default')})")
        return lines


def resolve(
    cli: Mapping[str, str | None],
    ini: Mapping[str, str | None],
    environ: Mapping[str, str],
    *,
    cwd: Path,
    ini_dir: Path,
) -> KipikConfig:
    """Resolve every setting CLI > env > ini > default and validate it.

    ``cli`` and ``ini`` map setting names to raw strings (``None`` when not given); paths from the
    ini file are relative to ``ini_dir``, all others to ``cwd``. Raises :class:`ConfigError`
    naming the setting, where it came from, the bad value and what is allowed.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for setting in SETTINGS:
        candidates = (
            (cli.get(setting.name), "cli", f"command-line option {setting.cli}", cwd),
            (environ.get(setting.env), "env", f"environment variable {setting.env}", cwd),
            (ini.get(setting.name), "ini", f"ini key {setting.ini}", ini_dir),
            (setting.default, "default", "the default", cwd),
        )
        raw, short, source, base = next(c for c in candidates if c[0] is not None)
        assert raw is not None
        try:
            values[setting.name] = _PARSERS[setting.name](raw, base)
        except ValueError as exc:
            raise ConfigError(f"invalid {setting.name} from {source}: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"invalid {setting.name} from {source}: {exc}") from None
        sources[setting.name] = short
    return KipikConfig(**values, sources=sources)
