"""The docker backend: privileged Docker-in-Docker containers on the local Docker engine.

It makes :class:`~pytest_kipik.hosts.docker_host.DockerHost` hosts, lists and removes what
kipik left on the engine, and keeps snapshots (:mod:`pytest_kipik.hosts.snapshots`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import docker
import docker.errors

from pytest_kipik import labels as lbl
from pytest_kipik.errors import HostError
from pytest_kipik.hosts.base import Owned
from pytest_kipik.hosts.bundle import Entry, load_into_engine, read_bundle
from pytest_kipik.hosts.docker_host import DockerHost
from pytest_kipik.hosts.engine import connect, engine_location, ensure_image, owned_resources
from pytest_kipik.hosts.snapshots import Snapshots
from pytest_kipik.hosts.transfer import ensure_default_image
from pytest_kipik.progress import Reporter


class DockerBackend:
    """DinD containers on the local Docker engine (found like the Docker SDK finds it)."""

    name = "docker"
    #: Published ports outlive this process.
    forwards_api = False

    def __init__(
        self,
        image: str | None,
        report: Reporter,
        bundle: Path | None = None,
        dockerd_args: Sequence[str] = (),
    ) -> None:
        self.image = image
        #: More arguments of every host's inner daemon (registry mirrors).
        self.dockerd_args = list(dockerd_args)
        self.report = report
        #: An air-gapped bundle whose images the engine gets on first use (none is pulled).
        self.bundle = bundle
        self._client: docker.DockerClient | None = None
        self._dind_image: str | None = None

    @property
    def client(self) -> docker.DockerClient:
        """The engine's client (connected on first use, the bundle's images loaded then)."""
        if self._client is None:
            client = connect()
            if self.bundle is not None:
                try:
                    load_into_engine(client, self.bundle, self._bundled, self.report)
                except BaseException:
                    client.close()
                    raise
            self._client = client
        return self._client

    def connect(self) -> None:
        """Check now that the engine answers (raises DockerUnavailableError)."""
        _ = self.client  # connects on first use (not in an assert, which python -O drops)

    def preflight(self) -> None:
        """Nothing to check early: the engine is asked when the first cluster is made."""

    def describe(self) -> str:
        """Where DinD containers run."""
        return f"docker engine at {engine_location()}"

    def _image(self) -> str:
        if self._dind_image is None:
            if self.image:  # the client loads the bundle first: a bundled image is not pulled
                ensure_image(self.client, self.image, self.report)
                self._dind_image = self.image
            elif bundled := self._bundled_dind():
                _ = self.client  # loads the bundle
                self._dind_image = bundled
            else:
                self._dind_image = ensure_default_image(self.client, self.report)
        return self._dind_image

    def _bundled_dind(self) -> str | None:
        """The DinD image of the bundle (used when no image is given), if there is one."""
        return next((e.reference for e in self._bundled if e.role == "dind"), None)

    @functools.cached_property
    def _bundled(self) -> list[Entry]:
        """The images of the bundle, read once (none without a bundle)."""
        return [] if self.bundle is None else read_bundle(self.bundle)

    def make_host(
        self, name: str, labels: Mapping[str, str], inner_ports: Sequence[int]
    ) -> DockerHost:
        """A DinD container named ``name`` (not started yet)."""
        return DockerHost(
            self.client,
            image="",
            name=name,
            labels=labels,
            inner_ports=inner_ports,
            resolve_image=self._image,
            dockerd_args=self.dockerd_args,
        )

    def list_owned(self, run_id: str | None = None) -> list[Owned]:
        """Containers and volumes kipik made on this engine."""
        return owned_resources(self.client, run_id)

    def remove_owned(self, resource: Owned) -> None:
        """Remove a kipik container (force, with its anonymous volumes) or volume."""
        if lbl.RUN_ID not in resource.labels:
            raise HostError(f"{resource} has no {lbl.RUN_ID} label: not kipik's, left alone")
        try:
            if resource.kind == "container":
                DockerHost(
                    self.client,
                    image="",
                    name=resource.name,
                    labels=resource.labels,
                    inner_ports=[],
                ).remove()
            elif resource.kind == "volume":
                self.client.volumes.get(resource.name).remove(force=True)
            else:
                raise HostError(f"the docker backend does not make {resource.kind}s")
        except docker.errors.NotFound:
            pass
        except docker.errors.DockerException as exc:
            raise HostError(f"could not remove {resource}: {exc}") from None

    def snapshots(self, prefix: str) -> Snapshots:
        """Snapshots on this engine (volumes named after ``prefix``)."""
        return Snapshots(self.client, self._image(), prefix)

    def close(self) -> None:
        """Close the engine connection."""
        if self._client is not None:
            self._client.close()
            self._client = None


__all__ = ["DockerBackend", "DockerHost"]
