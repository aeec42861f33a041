"""``kipik doctor``: a preflight of everything a nested cluster needs, each with its fix.

Two halves: pure judging functions (findings in, a :class:`Result` out; exact unit tests) and thin
probes that gather the findings: the Docker SDK for the engine, one short-lived privileged
container from the configured DinD image (host network, the engine host's ``/lib`` and data root
mounted read-only) for what only the engine's host can tell, and for the pod backend the official
Kubernetes client (SelfSubjectAccessReviews) and one real DinD pod that runs the same probe.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import docker
import docker.errors
from docker.types import Mount
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from pytest_kipik import labels as lbl
from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts import engine
from pytest_kipik.hosts.base import INNER_ADDRESS_POOL, INNER_BRIDGE, Backend
from pytest_kipik.hosts.choice import Choice, choose, make_backend
from pytest_kipik.hosts.engine import engine_location
from pytest_kipik.hosts.outer import RBAC_EXAMPLE, OuterCluster, local_outer_addresses
from pytest_kipik.hosts.transfer import default_image_tag
from pytest_kipik.kind import config as kind

OK, WARN, FAIL = "ok", "warn", "fail"
GIB = 1024**3
#: Free space of the engine's data root: a node image, its copy in each DinD and the nested
#: cluster's images need a few GiB per cluster.
DISK_WARN_BELOW = 10 * GIB
DISK_FAIL_BELOW = 3 * GIB
#: kind's known-issues page ("Pod errors due to too many open files").
INOTIFY_WATCHES = 524288
INOTIFY_INSTANCES = 512
#: What the pod backend asks the outer cluster for, as ``(verb, resource[/subresource])``: the
#: rules of ``examples/rbac.yaml``.
POD_BACKEND_ACCESS: tuple[tuple[str, str], ...] = (
    ("create", "pods"),
    ("get", "pods"),
    ("list", "pods"),
    ("watch", "pods"),
    ("delete", "pods"),
    ("create", "pods/exec"),
    ("get", "pods/exec"),
    ("create", "pods/portforward"),
    ("get", "pods/portforward"),
    ("get", "pods/log"),
    ("get", "events"),
    ("list", "events"),
)
#: Where the probe container sees the engine host's ``/lib`` and the engine's data root.
HOST_LIB = "/kipik-host/lib"
HOST_DATA = "/kipik-host/data"
PROBE_TIMEOUT = 60


@dataclass(frozen=True)
class Result:
    """The verdict of one check: ``ok``, ``warn`` or ``fail``, what was found, how to fix it."""

    status: str
    check: str
    finding: str
    fix: str = ""

    def lines(self) -> list[str]:
        """``status  check: finding`` and, unless ok, an indented fix line."""
        out = [f"{self.status:<4}  {self.check}: {self.finding}"]
        if self.status != OK and self.fix:
            out.append(f"      fix: {self.fix}")
        return out


def passed(results: Iterable[Result]) -> bool:
    """Whether no check failed (warnings pass)."""
    return all(r.status != FAIL for r in results)


def render(results: Sequence[Result], *, as_json: bool = False) -> str:
    """The report: one line per check (plus fix lines) and a summary, or JSON."""
    if as_json:
        return json.dumps(
            {"passed": passed(results), "checks": [asdict(r) for r in results]}, indent=2
        )
    lines = [line for r in results for line in r.lines()]
    counts = {s: sum(r.status == s for r in results) for s in (OK, WARN, FAIL)}
    lines.append(f"{counts[OK]} ok, {counts[WARN]} warn, {counts[FAIL]} fail")
    return "\n".join(lines)


# -- judging (pure) ---------------------------------------------------------------------------


def judge_engine(location: str, version: str | None, error: str | None) -> Result:
    """Judge whether a Docker engine answers where the Docker SDK looks."""
    if version is None:
        return Result(
            FAIL,
            "engine",
            f"no Docker engine answered at {location}: {error}",
            "start Docker (e.g. `sudo systemctl start docker`) or set DOCKER_HOST; "
            "`docker version` must show a Server section",
        )
    return Result(OK, "engine", f"Docker {version} at {location}")


def image_fix(image: str, default: bool) -> str:
    """How to get a missing DinD image."""
    if default:
        return (
            f"kipik builds {image} from its image/ folder on first use (it needs Debian's apt "
            f"archive, GitHub and dl.k8s.io): `docker build -t {image} image/`, or pass --image"
        )
    return (
        f"build it (`docker build -t {image} image/` from pytest-kipik's image/ folder), "
        f"pull it (`docker pull {image}`), or pass --image with one the engine has"
    )


def judge_privileged(
    image: str, *, default: bool, missing: bool, error: str | None, exit_code: int | None
) -> Result:
    """Judge whether a privileged container from the DinD image really started and ran."""
    check = "privileged"
    if missing:
        return Result(
            FAIL, check, f"the DinD image {image} is not on the engine", image_fix(image, default)
        )
    if error is not None:
        fix = "the engine must allow privileged containers (not rootless Docker or userns-remap)"
        if "apply caps" in error:
            fix = (
                "the kernel's capability bounding set lacks a capability Docker asks for in "
                "privileged mode: register image/runc-capfix as the engine's default runtime "
                "(see tests/engine.sh)"
            )
        return Result(FAIL, check, f"a privileged container from {image} did not run: {error}", fix)
    if exit_code != 0:
        return Result(
            FAIL,
            check,
            f"a privileged container from {image} started but its probe exited {exit_code}",
            f"run it by hand: docker run --rm --privileged --entrypoint sh {image} -c id",
        )
    return Result(OK, check, f"a privileged container from {image} started and ran")


def judge_cgroup(version: str | None, nesting: bool | None, detail: str = "") -> Result:
    """Cgroup version of the engine host and whether a privileged container can nest cgroups."""
    check = "cgroup"
    if version is None or nesting is None:
        return Result(WARN, check, "not checked (no probe container ran)", "see the checks above")
    name = f"cgroup v{version}" + (" (hybrid or legacy)" if version == "1" else "")
    suffix = f" ({detail})" if detail else ""
    if nesting:
        how = "child cgroups" if version == "1" else "a writable subtree with controllers"
        return Result(OK, check, f"{name}; a privileged container can make {how}")
    if version == "2":
        return Result(
            FAIL,
            check,
            f"{name}; a privileged container cannot delegate controllers to a child cgroup{suffix}",
            "the DinD needs a private cgroup namespace with a writable /sys/fs/cgroup (Docker's "
            "default for privileged containers on cgroup v2; not with cgroupns=host)",
        )
    return Result(
        FAIL,
        check,
        f"{name}; a privileged container cannot create a child cgroup{suffix}",
        "the engine must mount the cgroup hierarchy writable in privileged containers",
    )


def judge_modules(present: bool | None, kernel: str, entries: int, has_kernel: bool) -> Result:
    """``/lib/modules`` on the engine host: the DinD mounts it, if there is one, for kind."""
    check = "/lib/modules"
    if present is None:
        return Result(WARN, check, "not checked (no probe container ran)", "see the checks above")
    if not present:
        return Result(
            WARN,
            check,
            "the engine host has no /lib/modules: the DinD runs without it, and nothing inside "
            "can load kernel modules",
            f"install the modules of kernel {kernel} on the engine host, or make sure the "
            "modules kube-proxy and your CNI need are built in or loaded",
        )
    if not has_kernel:
        what = (
            "is empty"
            if entries == 0
            else f"has {entries} entr{'y' if entries == 1 else 'ies'} but none for the "
            f"running kernel {kernel}"
        )
        return Result(
            WARN,
            check,
            f"/lib/modules {what}: nothing inside can load kernel modules",
            f"install the modules of kernel {kernel} on the engine host, or make sure the "
            "modules kube-proxy and your CNI need are built in or loaded",
        )
    return Result(OK, check, f"present with the running kernel's modules ({kernel})")


def judge_inotify(watches: int | None, instances: int | None) -> Result:
    """``fs.inotify`` limits: nested kubelets and containers watch many files."""
    check = "inotify"
    if watches is None or instances is None:
        return Result(WARN, check, "not checked (no probe container ran)", "see the checks above")
    low = []
    if watches < INOTIFY_WATCHES:
        low.append(f"max_user_watches={watches} (< {INOTIFY_WATCHES})")
    if instances < INOTIFY_INSTANCES:
        low.append(f"max_user_instances={instances} (< {INOTIFY_INSTANCES})")
    if low:
        return Result(
            WARN,
            check,
            "low limits: " + ", ".join(low) + "; pods may fail with 'too many open files'",
            f"on the engine host: sysctl -w fs.inotify.max_user_watches="
            f"{max(watches, INOTIFY_WATCHES)} fs.inotify.max_user_instances="
            f"{max(instances, INOTIFY_INSTANCES)} (and in /etc/sysctl.d/ to keep it)",
        )
    return Result(OK, check, f"max_user_watches={watches}, max_user_instances={instances}")


def _gib(size: int) -> str:
    return f"{size / GIB:.1f} GiB"


def judge_disk(path: str, free: int | None) -> Result:
    """Free space of the engine's data root (thresholds: :data:`DISK_WARN_BELOW`, ...FAIL...)."""
    check = "disk"
    if free is None:
        return Result(WARN, check, "not checked (no probe container ran)", "see the checks above")
    fix = (
        f"free space under {path} (`docker system prune`, `kipik gc`) or move the engine's "
        "data-root to a larger disk"
    )
    if free < DISK_FAIL_BELOW:
        return Result(FAIL, check, f"{_gib(free)} free in {path} (< {_gib(DISK_FAIL_BELOW)})", fix)
    if free < DISK_WARN_BELOW:
        return Result(WARN, check, f"{_gib(free)} free in {path} (< {_gib(DISK_WARN_BELOW)})", fix)
    return Result(OK, check, f"{_gib(free)} free in {path}")


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None  # a host name: nothing to compare


def overlaps(nested: Mapping[str, str], outer: Mapping[str, str]) -> list[str]:
    """Every overlap among the nested ranges, and between them and the outer ones.

    ``nested``/``outer`` map where a range comes from to a CIDR or a single address.
    """
    found = []
    items = [(name, _network(value), value) for name, value in nested.items()]
    for index, (name, network, text) in enumerate(items):
        if network is None:
            continue
        for other, other_network, other_text in items[index + 1 :]:
            if other_network is not None and network.overlaps(other_network):
                found.append(f"{name} {text} overlaps {other} {other_text}")
        for where, value in outer.items():
            outer_network = _network(value)
            if outer_network is not None and network.overlaps(outer_network):
                found.append(f"{name} {text} overlaps {value} ({where})")
    return found


def judge_overlap(nested: Mapping[str, str], outer: Mapping[str, str]) -> Result:
    """Nested subnets (pods, services, the inner daemon's bridge) against the outer network."""
    check = "subnets"
    found = overlaps(nested, outer)
    if found:
        return Result(
            FAIL,
            check,
            "; ".join(found),
            "choose nested subnets outside these ranges: --pod-subnet / --service-subnet "
            "(KIPIK_POD_SUBNET, KIPIK_SERVICE_SUBNET) or networking in your kind config",
        )
    return Result(
        OK,
        check,
        f"{', '.join(f'{k} {v}' for k, v in nested.items())} overlap none of "
        f"{len(outer)} outer range(s)",
    )


def judge_outer_api(server: str, source: str, version: str | None, error: str | None) -> Result:
    """Judge whether the outer cluster's API server answers."""
    if version is None:
        return Result(
            FAIL,
            "outer API",
            f"the outer cluster at {server} did not answer ({source}): {error}",
            "check --outer-kubeconfig / --outer-context (or KUBECONFIG) and that this machine "
            "reaches that address",
        )
    return Result(OK, "outer API", f"Kubernetes {version} at {server} ({source})")


def judge_access(
    namespace: str,
    allowed: Mapping[tuple[str, str], bool | None],
    *,
    direct: bool,
    error: str | None = None,
) -> Result:
    """The pod backend's permissions, from one SelfSubjectAccessReview per (verb, resource).

    ``allowed`` maps ``(verb, resource)`` to the review's answer (None: not asked). Port-forward
    is only needed outside the outer cluster (``direct`` is False).
    """
    check = "rbac"
    fix = f"grant the Role in {RBAC_EXAMPLE} (kubectl apply -n {namespace} -f {RBAC_EXAMPLE})"
    if error is not None:
        return Result(FAIL, check, f"could not ask the outer cluster: {error}", fix)
    missing = [f"{verb} {res}" for (verb, res), ok in allowed.items() if ok is False]
    needed = [m for m in missing if direct is False or "portforward" not in m]
    if needed:
        return Result(FAIL, check, f"missing in namespace {namespace}: {', '.join(needed)}", fix)
    if missing:
        return Result(
            WARN,
            check,
            f"missing in namespace {namespace}: {', '.join(missing)} (only needed outside the "
            "outer cluster)",
            fix,
        )
    return Result(OK, check, f"all {len(allowed)} permissions in namespace {namespace}")


# -- parsing probe output (pure) --------------------------------------------------------------


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


def nested_ranges(config: KipikConfig) -> dict[str, str]:
    """The nested cluster's subnets and the inner daemon's, labelled."""
    user = config.user_kind_config
    found = kind.subnets(user, config.pod_subnet, config.service_subnet)
    ranges = {f"nested {key}": value for key, value in found.items()}
    ranges["inner Docker bridge"] = str(ipaddress.ip_network(INNER_BRIDGE, strict=False))
    ranges["inner Docker address pool"] = INNER_ADDRESS_POOL
    return ranges


# -- probing (I/O) ----------------------------------------------------------------------------


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


def judge_pod_probe(image: str, error: str | None, exit_code: int | None) -> Result:
    """Whether a privileged DinD pod from ``image`` came up and the probe ran in it."""
    check = "privileged"
    if error is not None:
        return Result(
            FAIL,
            check,
            f"a privileged DinD pod from {image} did not come up: {error}",
            "the namespace must admit privileged pods (Pod Security "
            "`pod-security.kubernetes.io/enforce=privileged`), the nodes must pull the image "
            "and run privileged containers; the lines above say which",
        )
    if exit_code != 0:
        return Result(
            FAIL,
            check,
            f"a privileged DinD pod from {image} runs, but its probe exited {exit_code}",
            "look at the pod's kernel and cgroup setup: the probe is `kipik doctor`'s shell",
        )
    return Result(OK, check, f"a privileged DinD pod from {image} ran and its Docker answered")


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


def docker_checks(config: KipikConfig) -> list[Result]:
    """Engine, privileged container, cgroups, modules, inotify, disk and subnets."""
    location = engine_location()
    try:
        client = engine.client(timeout=PROBE_TIMEOUT + 10)
        version = str(client.version().get("Version", "?"))
    except docker.errors.DockerException as exc:
        return [judge_engine(location, None, str(exc))]
    try:
        results = [judge_engine(location, version, None)]
        info = client.info()
        data_root = str(info.get("DockerRootDir") or "/var/lib/docker")
        image = config.image or default_image_tag()
        probe = run_probe(client, image, data_root, config.name_prefix)
        results.append(
            judge_privileged(
                image,
                default=config.image is None,
                missing=probe.missing,
                error=probe.error,
                exit_code=probe.exit_code,
            )
        )
        facts = probe.facts or {}
        ran = probe.facts is not None
        results.extend(judge_facts(facts, data_root))
        outer: dict[str, str] = {}
        for line in facts.get("route", []) if ran else []:
            route = parse_route(line)
            if route is not None:
                outer[f"engine host route via {route[0]}"] = route[1]
        for network in client.api.networks():
            for index, entry in enumerate((network.get("IPAM") or {}).get("Config") or []):
                if entry.get("Subnet"):
                    suffix = f" #{index + 1}" if index else ""
                    outer[f"Docker network {network.get('Name')}{suffix}"] = entry["Subnet"]
        results.append(judge_overlap(nested_ranges(config), outer))
        return results
    finally:
        client.close()


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


def _review(api: k8s_client.ApiClient, namespace: str, verb: str, resource: str) -> bool:
    name, _, sub = resource.partition("/")
    review = k8s_client.V1SelfSubjectAccessReview(
        spec=k8s_client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=k8s_client.V1ResourceAttributes(
                namespace=namespace, verb=verb, resource=name, subresource=sub or None
            )
        )
    )
    answer: Any = k8s_client.AuthorizationV1Api(api).create_self_subject_access_review(
        review, _request_timeout=15
    )
    return bool(answer.status.allowed)


def pod_checks(config: KipikConfig) -> list[Result]:
    """The pod backend's checks: image, outer API, RBAC, a real DinD pod, and subnets.

    RBAC is asked with SelfSubjectAccessReviews; in the DinD pod the probe also judges cgroups,
    modules, inotify and disk.
    """
    results = []
    if config.image:
        results.append(
            Result(OK, "image", f"{config.image} (the outer cluster's nodes must pull it)")
        )
    else:
        results.append(
            Result(
                FAIL,
                "image",
                "the pod backend needs a DinD image the outer cluster's nodes can pull",
                "build pytest-kipik's image/ and push it: docker build -t REGISTRY/kipik-dind:1 "
                "image/ && docker push REGISTRY/kipik-dind:1; then --image=REGISTRY/kipik-dind:1",
            )
        )
    outer = OuterCluster(config)
    try:
        try:
            api = outer.api
        except KipikError as exc:
            return [*results, judge_outer_api("?", "no configuration", None, str(exc))]
        server = str(api.configuration.host)
        source = outer.describe()
        try:
            code: Any = k8s_client.VersionApi(api).get_code(_request_timeout=15)
        except Exception as exc:  # any failure here means: unreachable
            return [*results, judge_outer_api(server, source, None, str(exc).splitlines()[0])]
        results.append(judge_outer_api(server, source, str(code.git_version), None))
        namespace = outer.namespace
        allowed: dict[tuple[str, str], bool | None] = {}
        error = None
        try:
            for verb, resource in POD_BACKEND_ACCESS:
                allowed[(verb, resource)] = _review(api, namespace, verb, resource)
        except ApiException as exc:
            error = f"SelfSubjectAccessReview refused: HTTP {exc.status} {exc.reason}"
        results.append(judge_access(namespace, allowed, direct=outer.direct, error=error))
        if config.image:
            backend = make_backend(config, lambda line: None, Choice("pod", "doctor"))
            try:
                probe = run_pod_probe(backend, config.image, config.name_prefix, config.timeout)
            finally:
                backend.close()
            results.append(judge_pod_probe(config.image, probe.error, probe.exit_code))
            if probe.facts is not None:
                results.extend(judge_facts(probe.facts, POD_DATA_ROOT))
        addresses = local_outer_addresses()
        host = urlsplit(server).hostname or ""
        if _network(host) is not None:
            addresses["the outer API server"] = host
        with contextlib.suppress(ApiException, OSError):  # only adds ranges to compare
            pods: Any = outer.core.list_namespaced_pod(namespace, _request_timeout=15)
            for pod in pods.items:
                if pod.status.pod_ip:
                    addresses[f"outer pod {pod.metadata.name}"] = str(pod.status.pod_ip)
        results.append(judge_overlap(nested_ranges(config), addresses))
        return results
    finally:
        outer.close()


#: Runs the checks of one backend.
Checks = Callable[[KipikConfig], list[Result]]


def run_checks(config: KipikConfig) -> tuple[str, list[Result]]:
    """The backend the config selects and its checks' results."""
    choice = choose(config)
    checks: Checks = pod_checks if choice.name == "pod" else docker_checks
    results = [Result(OK, "backend", f"{choice.name} ({choice.reason})"), *checks(config)]
    return choice.name, results
