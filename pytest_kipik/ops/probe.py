"""The doctor's probe: one shell script that reports what only the host of a DinD can tell.

It runs in a short-lived privileged container from the DinD image on the engine (host network,
the engine host's ``/lib`` and data root mounted read-only) or in a real DinD pod of the outer
cluster; its ``key=value`` lines are parsed (pure) and judged by :mod:`pytest_kipik.ops.judges`.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
from docker.types import Mount

from pytest_kipik import labels as lbl
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts.base import Backend
from pytest_kipik.ops.judges import (
    Result,
    judge_cgroup,
    judge_disk,
    judge_inotify,
    judge_modules,
)

#: Where the probe container sees the engine host's ``/lib`` and the engine's data root.
HOST_LIB = "/kipik-host/lib"
HOST_DATA = "/kipik-host/data"
PROBE_TIMEOUT = 60


def parse_probe(text: str) -> dict[str, list[str]]:
    """``key=value`` lines of the probe script, grouped by key (routes repeat)."""
    facts: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            facts.setdefault(key.strip(), []).append(value.strip())
    return facts


def parse_route(line: str) -> tuple[str, str] | None:
    """``IFACE DEST MASK`` in ``/proc/net/route`` hex (little-endian) → ``(iface, CIDR)``.

    None for the default route (it "overlaps" everything) and for lines that do not parse.
    """
    parts = line.split()
    if len(parts) != 3:
        return None
    iface, dest, mask = parts
    try:
        address = ipaddress.IPv4Address(int(dest, 16).to_bytes(4, "little"))
        netmask = ipaddress.IPv4Address(int(mask, 16).to_bytes(4, "little"))
        network = ipaddress.IPv4Network(f"{address}/{netmask}", strict=False)
    except (ValueError, OverflowError):
        return None
    if network.prefixlen == 0:
        return None
    return iface, str(network)


def parse_statfs(text: str) -> int | None:
    """``stat -f -c '%a %S'`` (available blocks, block size) → free bytes."""
    parts = text.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]) * int(parts[1])


def _int(values: Sequence[str] | None) -> int | None:
    return int(values[0]) if values and values[0].isdigit() else None


def _first(facts: Mapping[str, Sequence[str]], key: str) -> str | None:
    values = facts.get(key)
    return values[0] if values else None


def probe_script(lib: str, data: str) -> str:
    """Shell that prints ``key=value`` lines about the host; run privileged.

    ``lib`` is where it sees the host's ``/lib``, ``data`` the Docker data root to measure.
    """
    return f"""
echo "kernel=$(uname -r)"
if [ -d {lib}/modules ]; then
  echo modules=yes
  echo "modules_entries=$(ls -A {lib}/modules | wc -l)"
  if [ -d "{lib}/modules/$(uname -r)" ]; then echo modules_kernel=yes
  else echo modules_kernel=no; fi
else echo modules=no; fi
echo "inotify_watches=$(cat /proc/sys/fs/inotify/max_user_watches)"
echo "inotify_instances=$(cat /proc/sys/fs/inotify/max_user_instances)"
echo "disk=$(stat -f -c '%a %S' {data})"
tail -n +2 /proc/net/route | while read -r iface dest gw flags ref use metric mask rest; do
  echo "route=$iface $dest $mask"
done
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  echo cgroup=2
  controllers=$(cat /sys/fs/cgroup/cgroup.controllers)
  echo "cgroup_controllers=$controllers"
  mkdir -p /sys/fs/cgroup/kipik-init && \\
    for p in $(cat /sys/fs/cgroup/cgroup.procs); do
      echo "$p" > /sys/fs/cgroup/kipik-init/cgroup.procs 2>/dev/null || true
    done
  wanted=$(echo "$controllers" | sed -e 's/^/+/' -e 's/ / +/g')
  if [ -n "$controllers" ] && echo "$wanted" > /sys/fs/cgroup/cgroup.subtree_control
  then echo nesting=yes; else echo nesting=no; fi
else
  echo cgroup=1
  own=$(grep -E '^[0-9]+:memory:' /proc/self/cgroup | cut -d: -f3)
  base=/sys/fs/cgroup/memory
  # with the host's cgroup namespace the mount is the container's own cgroup, or all of it
  if [ -n "$own" ] && [ -d "$base$own" ]; then base="$base$own"; fi
  probe="$base/kipik-probe-$$"
  if mkdir "$probe" && rmdir "$probe"; then echo nesting=yes; else echo nesting=no; fi
fi
"""


#: The probe of the engine host, in a privileged, host-network container (see run_probe).
PROBE_SCRIPT = probe_script(HOST_LIB, HOST_DATA)


def judge_facts(facts: Mapping[str, Sequence[str]], data_root: str) -> list[Result]:
    """Cgroups, ``/lib/modules``, inotify and disk, from what a probe printed."""
    nesting = _first(facts, "nesting")
    modules = _first(facts, "modules")
    return [
        judge_cgroup(
            _first(facts, "cgroup"),
            None if nesting is None else nesting == "yes",
            f"controllers: {_first(facts, 'cgroup_controllers') or 'none'}"
            if _first(facts, "cgroup") == "2"
            else "",
        ),
        judge_modules(
            None if modules is None else modules == "yes",
            _first(facts, "kernel") or "?",
            _int(facts.get("modules_entries")) or 0,
            _first(facts, "modules_kernel") == "yes",
        ),
        judge_inotify(_int(facts.get("inotify_watches")), _int(facts.get("inotify_instances"))),
        judge_disk(data_root, parse_statfs(_first(facts, "disk") or "")),
    ]


@dataclass(frozen=True)
class Probe:
    """What the probe container found (``error``: it did not run)."""

    image: str
    missing: bool = False
    error: str | None = None
    exit_code: int | None = None
    facts: Mapping[str, Sequence[str]] | None = None


def run_probe(client: docker.DockerClient, image: str, data_root: str, prefix: str) -> Probe:
    """Run :data:`PROBE_SCRIPT` in a privileged container from ``image``; always removed."""
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return Probe(image, missing=True)
    run_id = lbl.new_run_id()
    found = lbl.owner_labels(
        run_id=run_id, cluster="doctor", role="doctor", worker=None, keep=False, ttl=600
    )
    container: Any = None
    try:
        container = client.containers.run(
            image,
            entrypoint=["sh", "-c", PROBE_SCRIPT],
            command=[],
            name=f"{prefix}-doctor-{run_id}",
            detach=True,
            privileged=True,
            network_mode="host",
            labels=found,
            mounts=[
                Mount(HOST_LIB, "/lib", type="bind", read_only=True),
                Mount(HOST_DATA, data_root, type="bind", read_only=True),
            ],
        )
        status = container.wait(timeout=PROBE_TIMEOUT)
        output = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
        return Probe(image, exit_code=int(status["StatusCode"]), facts=parse_probe(output))
    except docker.errors.DockerException as exc:
        text = getattr(exc, "explanation", None) or str(exc)
        return Probe(image, error=str(text))
    except OSError as exc:  # e.g. the wait timed out
        return Probe(image, error=f"{exc}")
    finally:
        if container is not None:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True, v=True)


#: The DinD pod's Docker data root (an emptyDir, or the pod template's volume).
POD_DATA_ROOT = "/var/lib/docker"


def run_pod_probe(backend: Backend, image: str, prefix: str, timeout: float) -> Probe:
    """Start a real DinD pod (as a cluster's host), run the probe in it; always removed."""
    run_id = lbl.new_run_id()
    found = lbl.owner_labels(
        run_id=run_id, cluster="doctor", role="doctor", worker=None, keep=False, ttl=600
    )
    host = backend.make_host(f"{prefix}-doctor-{run_id}", found, [])
    try:
        host.start()
        host.wait_ready(timeout)
        done = host.exec(["sh", "-c", probe_script("/lib", POD_DATA_ROOT)], timeout=PROBE_TIMEOUT)
        return Probe(image, exit_code=done.exit_code, facts=parse_probe(done.stdout))
    except KipikError as exc:
        return Probe(image, error=" ".join(str(exc).split()))
    finally:
        with contextlib.suppress(KipikError):
            host.remove()
