"""Driving kind inside a host: argv builders (pure) and :class:`KindDriver`.

The driver runs kind only through ``host.exec(...)``, so every host (a local DinD container,
a DinD pod) shares all kind logic.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pytest_kipik.errors import CommandError, KindError
from pytest_kipik.kind.config import HOST_DIR, dump_config

if TYPE_CHECKING:
    from pytest_kipik.hosts.base import Host, OutputSink


@dataclass(frozen=True)
class ClusterPaths:
    """Where kipik keeps one cluster's files inside the host."""

    config: str
    kubeconfig: str

    @classmethod
    def for_cluster(cls, name: str) -> ClusterPaths:
        """The paths for cluster ``name``."""
        base = f"{HOST_DIR}/{name}"
        return cls(config=f"{base}/kind-config.yaml", kubeconfig=f"{base}/kubeconfig")


def create_argv(
    name: str,
    *,
    config_path: str,
    kubeconfig_path: str,
    image: str | None,
    retain: bool,
) -> list[str]:
    """``kind create cluster`` for one cluster.

    No ``--wait``: kind's wait exits 0 when it times out, so kipik's own readiness checks do the
    waiting, with the time that is left, and say precisely what they waited for.
    """
    argv = ["kind", "create", "cluster", "--name", name, "--config", config_path]
    if image:
        argv += ["--image", image]
    argv += ["--kubeconfig", kubeconfig_path]
    if retain:
        argv.append("--retain")
    return argv


def get_kubeconfig_argv(name: str, *, internal: bool = False) -> list[str]:
    """``kind get kubeconfig`` of cluster ``name``.

    The server is the address kind published in the host, or (``internal``) the control-plane
    container's name, valid on the host's ``kind`` network.
    """
    return ["kind", "get", "kubeconfig", "--name", name, *(["--internal"] if internal else [])]


def load_argv(name: str, images: Sequence[str]) -> list[str]:
    """``kind load docker-image`` of images the host's daemon has, into every node."""
    return ["kind", "load", "docker-image", *images, "--name", name]


_NOT_YET_PRESENT = re.compile(r'not yet present on node "([^"]+)"')


def nodes_loaded(output: str) -> list[str]:
    """The nodes ``kind load docker-image`` said it loads into (none: all had every image)."""
    return list(dict.fromkeys(_NOT_YET_PRESENT.findall(output)))


def get_clusters_argv() -> list[str]:
    """``kind get clusters``: one name per line (a warm host lists the previous run's)."""
    return ["kind", "get", "clusters"]


def delete_argv(name: str) -> list[str]:
    """``kind delete cluster`` (the kubeconfig kind wrote into the host goes with it)."""
    paths = ClusterPaths.for_cluster(name)
    return ["kind", "delete", "cluster", "--name", name, "--kubeconfig", paths.kubeconfig]


class KindDriver:
    """Runs kind inside a host, only through ``host.exec`` and ``host.write_file``."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def _fail(self, action: str, error: CommandError) -> KindError:
        return KindError(action, error, self.host.daemon_log(lines=50))

    def create(
        self,
        config: Mapping[str, Any],
        *,
        image: str | None,
        timeout: float,
        retain: bool,
        on_output: OutputSink | None = None,
    ) -> None:
        """Write ``config`` into the host and run ``kind create cluster`` with it."""
        name = str(config["name"])
        paths = ClusterPaths.for_cluster(name)
        self.host.write_file(paths.config, dump_config(config).encode())
        argv = create_argv(
            name,
            config_path=paths.config,
            kubeconfig_path=paths.kubeconfig,
            image=image,
            retain=retain,
        )
        try:
            self.host.exec(argv, timeout=timeout, on_output=on_output).check()
        except CommandError as exc:
            raise self._fail(f"create cluster {name!r}", exc) from None

    def clusters(self) -> list[str]:
        """The kind clusters in the host."""
        try:
            out = self.host.exec(get_clusters_argv(), timeout=60).check().stdout
        except CommandError as exc:
            raise self._fail("list clusters", exc) from None
        return [line.strip() for line in out.splitlines() if line.strip()]

    def delete(self, name: str, *, timeout: float = 120) -> None:
        """Delete cluster ``name`` in the host (its node containers and kubeconfig)."""
        try:
            self.host.exec(delete_argv(name), timeout=timeout).check()
        except CommandError as exc:
            raise self._fail(f"delete cluster {name!r}", exc) from None

    def kubeconfig(self, name: str, *, internal: bool = False) -> str:
        """The kubeconfig kind reports for the cluster (see :func:`get_kubeconfig_argv`)."""
        try:
            argv = get_kubeconfig_argv(name, internal=internal)
            return self.host.exec(argv, timeout=60).check().stdout
        except CommandError as exc:
            raise self._fail(f"get the kubeconfig of {name!r}", exc) from None

    def load(self, name: str, images: Sequence[str], *, timeout: float) -> list[str]:
        """Load images of the host's daemon into every node of ``name``; the nodes loaded.

        kind skips a node that has an image of the same id already.
        """
        try:
            result = self.host.exec(load_argv(name, images), timeout=timeout).check()
        except CommandError as exc:
            raise self._fail(f"load {', '.join(images)} into {name!r}", exc) from None
        return nodes_loaded(result.stdout + result.stderr)
