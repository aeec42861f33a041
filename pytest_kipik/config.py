"""Settings: one frozen object, each value resolved CLI > env > ini > default, with its source.

Every setting ``x_y`` exists as the command-line option ``--kipik-x-y``, the ini key ``kipik_x_y``
and the environment variable ``KIPIK_X_Y``. Each is declared once, as a field of
:class:`KipikConfig` whose metadata is its :class:`Setting` (default text, help, parser); the
option list, the parsers, the header and the docs all read that one declaration. Values are
validated here, before anything starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from pytest_kipik import parsing
from pytest_kipik.errors import ConfigError, option
from pytest_kipik.kind import config as kind
from pytest_kipik.kind import registries as registry_files
from pytest_kipik.parsing import BACKENDS, Parser, parse_bool, parse_duration

__all__ = [
    "BACKENDS",
    "SETTINGS",
    "KipikConfig",
    "Setting",
    "parse_bool",
    "parse_duration",
    "resolve",
]


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
        parsing.backend,
        metavar="NAME",
    )
    image: str | None = setting(
        "",
        "the Docker-in-Docker image (a Docker daemon plus kind); default with the docker "
        "backend: pytest-kipik's own image, built from its packaged image/ context when not "
        "present locally; the pod backend needs one the outer cluster can pull",
        parsing.optional,
        metavar="IMAGE",
    )
    node_image: str | None = setting(
        "",
        "the kind node image (a tag or name:tag@sha256:digest); moved into the DinD when the "
        "local engine has it, else pulled by kind; default: the kind in the image decides",
        parsing.optional,
        metavar="IMAGE",
    )
    kind_config: Path | None = setting(
        "",
        "a kind config file (kind.x-k8s.io/v1alpha4 Cluster) to merge: everything in it reaches "
        "kind; kipik sets only the name, API address/port and certSANs",
        parsing.kind_config,
        metavar="PATH",
    )
    timeout: float = setting(
        "300",
        "time allowed to create one cluster until it is ready, in seconds or with s/m/h",
        lambda text, _base: parsing.parse_duration(text),
        metavar="DURATION",
    )
    keep: bool = setting(
        "false",
        "keep clusters after the session and print how to reach and remove them",
        lambda text, _base: parsing.parse_bool(text),
        flag=True,
    )
    name_prefix: str = setting(
        "kipik",
        "prefix of cluster, container, volume and pod names (lowercase letters, digits, '-', at "
        "most 20 characters)",
        parsing.name_prefix,
        metavar="PREFIX",
    )
    pod_subnet: str = setting(
        "100.96.0.0/16",
        "the nested cluster's pod subnet when the kind config sets none; chosen not to overlap "
        "the usual ranges of outer clusters (10.x, 172.16-31.x, 192.168.x)",
        parsing.subnet,
        metavar="CIDR",
    )
    service_subnet: str = setting(
        "100.97.0.0/16",
        "the nested cluster's service subnet when the kind config sets none",
        parsing.subnet,
        metavar="CIDR",
    )
    reuse: bool = setting(
        "false",
        "keep the session cluster after the run and reuse it in the next run with the same "
        "configuration (attached in about a second when healthy, else created again)",
        lambda text, _base: parsing.parse_bool(text),
        flag=True,
    )
    warm: bool = setting(
        "false",
        "keep the DinD host (its inner daemon and the node images in it) between runs; every "
        "run still gets a fresh cluster in it. Concurrent sessions use separate warm hosts",
        lambda text, _base: parsing.parse_bool(text),
        flag=True,
    )
    snapshots: bool = setting(
        "yes",
        "docker backend: save the first cluster of each configuration once it is ready (after "
        "the pytest_kipik_cluster_setup hook) and restore every later one from that snapshot "
        "instead of creating it: in this session, other xdist workers and later runs within the "
        "ttl. no: always create. The pod backend always creates",
        lambda text, _base: parsing.parse_bool(text),
        metavar="yes|no",
    )
    ttl: float = setting(
        "4h",
        "lifetime of what kipik makes without a live owner: the expires-at label, the lease of "
        "kept, reused and warm resources (extended on each use), the pod backend's deadline; "
        "kipik gc removes what is past it",
        lambda text, _base: parsing.parse_duration(text),
        metavar="DURATION",
    )
    load_images: tuple[str, ...] = setting(
        "",
        "images to load into every node of each cluster when it is made, comma-separated: "
        "names on the local engine, or docker save / OCI archive files",
        parsing.image_list,
        metavar="IMAGES",
    )
    logs_dir: Path | None = setting(
        "",
        "a directory: at the end of the session, kind export logs and the DinD daemon log of "
        "every cluster are written there (one folder per cluster) and the path is printed",
        parsing.directory,
        metavar="DIR",
    )
    bundle: Path | None = setting(
        "",
        "an air-gapped bundle (`kipik bundle OUT.tar`): the images it holds are taken from it, "
        "none pulled; the docker backend loads what the engine lacks, the pod backend moves "
        "node and extra images from it (the DinD image must be on the outer nodes already)",
        parsing.existing_file,
        metavar="PATH",
    )
    registry_mirror: tuple[str, ...] = setting(
        "",
        "registry mirrors, comma-separated [REGISTRY=]URL (REGISTRY default docker.io), e.g. "
        "https://mirror.example:5000: the kind nodes pull REGISTRY's images through them, and "
        "the inner Docker daemon pulls Docker Hub's (node images) through docker.io's; an "
        "http:// URL is a mirror served over plain HTTP",
        parsing.mirrors,
        metavar="MIRRORS",
    )
    registry_ca: tuple[str, ...] = setting(
        "",
        "CAs of registries and mirrors with certificates of a private CA, comma-separated "
        "HOST[:PORT]=PATH (a PEM file): trusted by the inner daemon and the kind nodes",
        parsing.registry_cas,
        metavar="CAS",
    )
    registry_auth: Path | None = setting(
        "",
        "a Docker config.json with registry credentials under auths (e.g. written by docker "
        "login): used by the inner daemon and the kind nodes' kubelet; a mirror's credentials "
        "also serve the registry it mirrors. Never printed; written 0600 in the host",
        parsing.registry_auth,
        metavar="PATH",
    )
    registry: str | None = setting(
        "",
        "an image of a Docker registry (e.g. registry:2) to run in each DinD host: the kind "
        "nodes pull localhost:5001/NAME from it, and nested_cluster.registry says where this "
        "process pushes (its push() pushes a local image)",
        parsing.optional,
        metavar="IMAGE",
    )
    outer_kubeconfig: Path | None = setting(
        "",
        "pod backend: kubeconfig of the outer cluster; default: in-cluster config inside a pod, "
        "else the official client's usual resolution (KUBECONFIG, ~/.kube/config)",
        parsing.existing_file,
        metavar="PATH",
        group=POD,
    )
    outer_context: str | None = setting(
        "",
        "pod backend: context of the outer kubeconfig; default: its current context",
        parsing.optional,
        metavar="NAME",
        group=POD,
    )
    namespace: str | None = setting(
        "",
        "pod backend: namespace of the DinD pods; default: the pod's own namespace in-cluster, "
        "else the context's, else default",
        parsing.dns_label,
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
        parsing.pod_template,
        metavar="PATH",
        group=POD,
    )
    service_account: str | None = setting(
        "",
        "pod backend: service account of the DinD pod (its token is never mounted)",
        parsing.dns_subdomain,
        metavar="NAME",
        group=POD,
    )
    docker_storage: str | None = setting(
        "",
        "pod backend: size limit of the emptyDir at /var/lib/docker (e.g. 20Gi); default: none",
        parsing.quantity,
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

    @cached_property
    def registries(self) -> registry_files.Registries:
        """The registry settings with their files read (ConfigError names a bad file)."""
        return registry_files.load(
            self.registry_mirror, self.registry_ca, self.registry_auth, self.registry
        )

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
