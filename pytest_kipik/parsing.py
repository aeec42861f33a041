"""Parsers of the settings' raw text: each returns the value or raises ValueError saying why.

``base`` is the directory relative paths start from (the ini file's, else the working
directory). Pure, but for checking that named files exist and hold what they should.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_kipik.errors import ConfigError
from pytest_kipik.hosts import pod_manifest
from pytest_kipik.kind import registries

BACKENDS = ("auto", "docker", "pod")
NAME_PREFIX_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)?$")
_QUANTITY_RE = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

#: Parses the raw text of a setting; ``base`` is the directory relative paths start from.
Parser = Callable[[str, Path], Any]


def parse_duration(text: str) -> float:
    """Parse ``300``, ``300s``, ``5m``, ``1.5h``, ``2d`` into seconds (> 0)."""
    match = _DURATION_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration: use seconds like 300, or 300s, 5m, 1h, 2d")
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    seconds = float(match.group(1)) * units[match.group(2) or "s"]
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


def optional(text: str, _base: Path) -> str | None:
    """Text, or None when empty."""
    return text.strip() or None


def backend(text: str, _base: Path) -> str:
    """One of BACKENDS."""
    value = text.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{text!r} is not a backend: use one of {', '.join(BACKENDS)}")
    return value


def name_prefix(text: str, _base: Path) -> str:
    """A name prefix that fits every resource name kipik makes."""
    if not NAME_PREFIX_RE.match(text):
        raise ValueError(
            f"{text!r} is not a valid name prefix: use 1-20 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return text


def kind_config(text: str, base: Path) -> Path | None:
    """An absolute path (the file is read and validated once the settings are resolved)."""
    if not text.strip():
        return None
    return (base / Path(text.strip()).expanduser()).resolve()  # read by resolve(), once


def image_list(text: str, base: Path) -> tuple[str, ...]:
    """Comma-separated images; an entry that names an existing file is that archive's path."""
    found = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        path = (base / Path(entry).expanduser()).resolve()
        found.append(str(path) if path.is_file() else entry)
    return tuple(found)


def directory(text: str, base: Path) -> Path | None:
    """An absolute path that is a directory or does not exist yet, or None."""
    if not text.strip():
        return None
    path = (base / Path(text.strip()).expanduser()).resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory")
    return path


def existing_file(text: str, base: Path) -> Path | None:
    """The absolute path of an existing file, or None when empty."""
    if not text.strip():
        return None
    path = (base / Path(text.strip()).expanduser()).resolve()
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    return path


def pod_template(text: str, base: Path) -> Path | None:
    """An existing file that holds a valid pod template, or None."""
    path = existing_file(text, base)
    if path is not None:
        pod_manifest.load_template(path)  # raises ConfigError naming the file and the problem
    return path


def dns_label(text: str, _base: Path) -> str | None:
    """A namespace name (a DNS label), or None."""
    value = text.strip()
    if value and not _DNS_LABEL_RE.match(value):
        raise ValueError(f"{text!r} is not a valid namespace name (a DNS label: a-z, 0-9, '-')")
    return value or None


def dns_subdomain(text: str, _base: Path) -> str | None:
    """A DNS subdomain name, or None."""
    value = text.strip()
    if value and not _DNS_SUBDOMAIN_RE.match(value):
        raise ValueError(f"{text!r} is not a valid name (a DNS subdomain: a-z, 0-9, '-', '.')")
    return value or None


def quantity(text: str, _base: Path) -> str | None:
    """A Kubernetes quantity (20Gi), or None."""
    value = text.strip()
    if value and not _QUANTITY_RE.match(value):
        raise ValueError(f"{text!r} is not a Kubernetes quantity: use e.g. 20Gi, 500Mi, 1G")
    return value or None


def subnet(text: str, _base: Path) -> str:
    """An IPv4 or IPv6 subnet in CIDR form, /24 or larger for IPv4."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a subnet in CIDR form ({exc})") from None
    if network.version == 4 and network.prefixlen > 24:
        raise ValueError(f"{text!r} is too small for a cluster: use /24 or larger")
    return str(network)


def mirrors(text: str, _base: Path) -> tuple[str, ...]:
    """Comma-separated ``[REGISTRY=]URL`` mirrors, checked and normalised."""
    found = []
    for entry in (e.strip() for e in text.split(",")):
        if entry:
            mirror = registries.parse_mirror(entry)
            found.append(f"{mirror.registry}={mirror.url}")
    return tuple(found)


def registry_cas(text: str, base: Path) -> tuple[str, ...]:
    """Comma-separated ``HOST[:PORT]=PATH``: each path an existing PEM file (made absolute)."""
    found = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        host, path = registries.parse_ca(entry)
        resolved = existing_file(path, base)
        assert resolved is not None
        registries.check_pem(resolved.read_bytes(), f"the CA of {host} ({resolved})")
        found.append(f"{host}={resolved}")
    return tuple(found)


def registry_auth(text: str, base: Path) -> Path | None:
    """An existing Docker ``config.json`` with credentials under ``auths``, or None."""
    path = existing_file(text, base)
    if path is not None:
        registries.parse_auths(path.read_bytes(), str(path))  # raises ConfigError saying why
    return path
