"""Settings: one frozen object, each value resolved CLI > env > ini > default, with its source.

Every setting ``x_y`` exists as the command-line option ``--kipik-x-y``, the ini key ``kipik_x_y``
and the environment variable ``KIPIK_X_Y``. Each is declared once, as a field of
:class:`KipikConfig` whose metadata is its :class:`Setting` (default text, help, parser); the
option list, the parsers, the header and the docs all read that one declaration. Values are
validated here, before anything starts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pytest_kipik.errors import ConfigError, option
from pytest_kipik.hosts import pod_manifest
from pytest_kipik.kind import config as kind

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


@dataclass(frozen=True)
class Setting:
    """How one setting is given and parsed: its default text, help, parser and group."""

    default: str
    help: str
    parse: Parser
    metavar: str = "VALUE"
    flag: bool = False
    group: str = "kipik"
    name: str = ""

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


# -- parsers ----------------------------------------------------------------------------------


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


def _optional(text: str, _base: Path) -> str | None:
    return text.strip() or None


def _backend(text: str, _base: Path) -> str:
    value = text.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{text!r} is not a backend: use one of {', '.join(BACKENDS)}")
    return value


def _name_prefix(text: str, _base: Path) -> str:
    if not NAME_PREFIX_RE.match(text):
        raise ValueError(
            f"{text!r} is not a valid name prefix: use 1-20 lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    return text


def _kind_config(text: str, base: Path) -> Path | None:
    if not text.strip():
        return None
    return (base / Path(text.strip()).expanduser()).resolve()  # read by resolve(), once


def _image_list(text: str, base: Path) -> tuple[str, ...]:
    """Comma-separated images; an entry that names an existing file is that archive's path."""
    found = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        path = (base / Path(entry).expanduser()).resolve()
        found.append(str(path) if path.is_file() else entry)
    return tuple(found)


def _directory(text: str, base: Path) -> Path | None:
    if not text.strip():
        return None
    path = (base / Path(text.strip()).expanduser()).resolve()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} exists and is not a directory")
    return path


def _existing_file(text: str, base: Path) -> Path | None:
    if not text.strip():
        return None
    path = (base / Path(text.strip()).expanduser()).resolve()
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file")
    return path


def _pod_template(text: str, base: Path) -> Path | None:
    path = _existing_file(text, base)
    if path is not None:
        pod_manifest.load_template(path)  # raises ConfigError naming the file and the problem
    return path


def _dns_label(text: str, _base: Path) -> str | None:
    value = text.strip()
    if value and not _DNS_LABEL_RE.match(value):
        raise ValueError(f"{text!r} is not a valid namespace name (a DNS label: a-z, 0-9, '-')")
    return value or None


def _dns_subdomain(text: str, _base: Path) -> str | None:
    value = text.strip()
    if value and not _DNS_SUBDOMAIN_RE.match(value):
        raise ValueError(f"{text!r} is not a valid name (a DNS subdomain: a-z, 0-9, '-', '.')")
    return value or None


def _quantity(text: str, _base: Path) -> str | None:
    value = text.strip()
    if value and not _QUANTITY_RE.match(value):
        raise ValueError(f"{text!r} is not a Kubernetes quantity: use e.g. 20Gi, 500Mi, 1G")
    return value or None


def _subnet(text: str, _base: Path) -> str:
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a subnet in CIDR form ({exc})") from None
    if network.version == 4 and network.prefixlen > 24:
        raise ValueError(f"{text!r} is too small for a cluster: use /24 or larger")
    return str(network)


def setting(
    default: str,
    help: str,
    parse: Parser,
    *,
    metavar: str = "VALUE",
    flag: bool = False,
    group: str = "kipik",
) -> Any:
    """Declare a field of :class:`KipikConfig` as a setting (its default parsed from text)."""
    spec = Setting(default, help, parse, metavar, flag, group)
    return field(default=parse(default, Path()), metadata={"setting": spec})


# -- the settings -----------------------------------------------------------------------------

POD = "pod"


@dataclass(frozen=True)
class KipikConfig:
    """The resolved settings of one session; ``sources`` says where each value came from."""

    backend: str = setting(
        "auto",
        "where the Docker-in-Docker host runs: docker (the local Docker engine, found like the "
        "Docker SDK finds it: DOCKER_HOST etc.), pod (a privileged pod in an outer Kubernetes "
        "cluster), or auto (pod when running in a pod with no Docker engine, else docker)",
        _backend,
        metavar="NAME",
    )
    image: str | None = setting(
        "",
        "the Docker-in-Docker image (a Docker daemon plus kind); default with the docker "
        "backend: pytest-kipik's own image, built from its packaged image/ context when not "
        "present locally; the pod backend needs one the outer cluster can pull",
        _optional,
        metavar="IMAGE",
    )
    node_image: str | None = setting(
        "",
        "the kind node image (a tag or name:tag@sha256:digest); moved into the DinD when the "
        "local engine has it, else pulled by kind; default: the kind in the image decides",
        _optional,
        metavar="IMAGE",
    )
    kind_config: Path | None = setting(
        "",
        "a kind config file (kind.x-k8s.io/v1alpha4 Cluster) to merge: everything in it reaches "
        "kind; kipik sets only the name, API address/port and certSANs",
        _kind_config,
        metavar="PATH",
    )
    timeout: float = setting(
        "300",
        "time allowed to create one cluster until it is ready, in seconds or with s/m/h",
        lambda text, _base: parse_duration(text),
        metavar="DURATION",
    )
    keep: bool = setting(
        "false",
        "keep clusters after the session and print how to reach and remove them",
        lambda text, _base: parse_bool(text),
        flag=True,
    )
    name_prefix: str = setting(
        "kipik",
        "prefix of cluster, container, volume and pod names (lowercase letters, digits, '-', at "
        "most 20 characters)",
        _name_prefix,
        metavar="PREFIX",
    )
    pod_subnet: str = setting(
        "100.96.0.0/16",
        "the nested cluster's pod subnet when the kind config sets none; chosen not to overlap "
        "the usual ranges of outer clusters (10.x, 172.16-31.x, 192.168.x)",
        _subnet,
        metavar="CIDR",
    )
    service_subnet: str = setting(
        "100.97.0.0/16",
        "the nested cluster's service subnet when the kind config sets none",
        _subnet,
        metavar="CIDR",
    )
    reuse: bool = setting(
        "false",
        "keep the session cluster after the run and reuse it in the next run with the same "
        "configuration (attached in about a second when healthy, else created again)",
        lambda text, _base: parse_bool(text),
        flag=True,
    )
    warm: bool = setting(
        "false",
        "keep the DinD host (its inner daemon and the node images in it) between runs; every "
        "run still gets a fresh cluster in it. Concurrent sessions use separate warm hosts",
        lambda text, _base: parse_bool(text),
        flag=True,
    )
    snapshots: bool = setting(
        "yes",
        "docker backend: save the first cluster of each configuration once it is ready (after "
        "the pytest_kipik_cluster_setup hook) and restore every later one from that snapshot "
        "instead of creating it: in this session, other xdist workers and later runs within the "
        "ttl. no: always create. The pod backend always creates",
        lambda text, _base: parse_bool(text),
        metavar="yes|no",
    )
    ttl: float = setting(
        "4h",
        "lifetime of what kipik makes without a live owner: the expires-at label, the lease of "
        "kept, reused and warm resources (extended on each use), the pod backend's deadline; "
        "kipik gc removes what is past it",
        lambda text, _base: parse_duration(text),
        metavar="DURATION",
    )
    load_images: tuple[str, ...] = setting(
        "",
        "images to load into every node of each cluster when it is made, comma-separated: "
        "names on the local engine, or docker save / OCI archive files",
        _image_list,
        metavar="IMAGES",
    )
    logs_dir: Path | None = setting(
        "",
        "a directory: at the end of the session, kind export logs and the DinD daemon log of "
        "every cluster are written there (one folder per cluster) and the path is printed",
        _directory,
        metavar="DIR",
    )
    bundle: Path | None = setting(
        "",
        "an air-gapped bundle (`kipik bundle OUT.tar`): the images it holds are taken from it, "
        "none pulled; the docker backend loads what the engine lacks, the pod backend moves "
        "node and extra images from it (the DinD image must be on the outer nodes already)",
        _existing_file,
        metavar="PATH",
    )
    outer_kubeconfig: Path | None = setting(
        "",
        "pod backend: kubeconfig of the outer cluster; default: in-cluster config inside a pod, "
        "else the official client's usual resolution (KUBECONFIG, ~/.kube/config)",
        _existing_file,
        metavar="PATH",
        group=POD,
    )
    outer_context: str | None = setting(
        "",
        "pod backend: context of the outer kubeconfig; default: its current context",
        _optional,
        metavar="NAME",
        group=POD,
    )
    namespace: str | None = setting(
        "",
        "pod backend: namespace of the DinD pods; default: the pod's own namespace in-cluster, "
        "else the context's, else default",
        _dns_label,
        metavar="NAME",
        group=POD,
    )
    pod_template: Path | None = setting(
        "",
        "pod backend: a YAML Pod (or Pod spec fragment) merged into the generated DinD pod: "
        "nodeSelector, tolerations, affinity, resources, runtimeClassName, imagePullSecrets, "
        "annotations, labels, priorityClassName. The DinD pod requests 1 CPU / 2Gi by default, "
        "so only one fits on a 2-CPU node; set smaller (or larger) requests here, e.g. "
        "spec: {containers: [{name: dind, resources: {requests: {cpu: 500m, memory: 1Gi}}}]}",
        _pod_template,
        metavar="PATH",
        group=POD,
    )
    service_account: str | None = setting(
        "",
        "pod backend: service account of the DinD pod (its token is never mounted)",
        _dns_subdomain,
        metavar="NAME",
        group=POD,
    )
    docker_storage: str | None = setting(
        "",
        "pod backend: size limit of the emptyDir at /var/lib/docker (e.g. 20Gi); default: none",
        _quantity,
        metavar="QUANTITY",
        group=POD,
    )
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    @cached_property
    def user_kind_config(self) -> dict[str, Any] | None:
        """The kind config file's content, validated like kind does; None without one.

        Read once, when the settings are resolved; everything that needs the user's kind
        config reads it here.
        """
        return kind.load_user_config(self.kind_config) if self.kind_config else None

    @property
    def given(self) -> bool:
        """Whether any setting was given (option, environment or ini), not all defaults."""
        return any(source != "default" for source in self.sources.values())

    @classmethod
    def defaults(cls) -> KipikConfig:
        """The configuration with every setting at its default."""
        return resolve({}, {}, {}, cwd=Path.cwd(), ini_dir=Path.cwd())

    def describe(self, group: str = "kipik") -> list[str]:
        """One line per setting of ``group``, ``name=value (source)``, for the pytest header."""
        lines = []
        for spec in settings(group):
            value = getattr(self, spec.name)
            shown = "-" if value is None else str(value)
            if isinstance(value, tuple):
                shown = ",".join(value) or "-"
            if spec.name in ("timeout", "ttl"):
                shown = f"{value:g}s"
            lines.append(f"{spec.name}={shown} ({self.sources.get(spec.name, 'default')})")
        return lines


def _declared() -> tuple[Setting, ...]:
    declared = []
    for item in dataclasses.fields(KipikConfig):
        spec = item.metadata.get("setting")
        if spec is not None:
            declared.append(dataclasses.replace(spec, name=item.name))
    return tuple(declared)


#: Every setting, in declaration order.
SETTINGS: tuple[Setting, ...] = _declared()


def settings(group: str | None = None) -> tuple[Setting, ...]:
    """The settings of ``group`` (all of them when None)."""
    return tuple(s for s in SETTINGS if group is None or s.group == group)


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
    for spec in SETTINGS:
        candidates = (
            (cli.get(spec.name), "cli", f"command-line option {option(spec.name)}", cwd),
            (environ.get(spec.env), "env", f"environment variable {spec.env}", cwd),
            (ini.get(spec.name), "ini", f"ini key {spec.ini}", ini_dir),
            (spec.default, "default", "the default", cwd),
        )
        raw, short, source, base = next(c for c in candidates if c[0] is not None)
        assert raw is not None
        try:
            values[spec.name] = spec.parse(raw, base)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"invalid {spec.name} from {source}: {exc}") from None
        sources[spec.name] = short
    config = KipikConfig(**values, sources=sources)
    try:
        config.user_kind_config  # noqa: B018 - read (and validated) once, now
    except ConfigError as exc:
        raise ConfigError(
            f"invalid kind_config from {_source_text(sources['kind_config'], 'kind_config')}: {exc}"
        ) from None
    return config


def _source_text(short: str, name: str) -> str:
    spec = next(s for s in SETTINGS if s.name == name)
    return {
        "cli": f"command-line option {option(name)}",
        "env": f"environment variable {spec.env}",
        "ini": f"ini key {spec.ini}",
    }.get(short, "the default")
