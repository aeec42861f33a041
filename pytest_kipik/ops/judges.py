"""The doctor's judges: findings in, a :class:`Result` with its fix out; no I/O.

Each judge has exact unit tests; :mod:`pytest_kipik.ops.probe` gathers the findings and
:mod:`pytest_kipik.ops.doctor` runs the checks of a backend.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

from pytest_kipik.hosts.outer import RBAC_EXAMPLE

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


def as_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """``text`` as a network (an address is a /32 or /128), or None when it is neither."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None  # a host name: nothing to compare


def overlaps(nested: Mapping[str, str], outer: Mapping[str, str]) -> list[str]:
    """Every overlap among the nested ranges, and between them and the outer ones.

    ``nested``/``outer`` map where a range comes from to a CIDR or a single address.
    """
    found = []
    items = [(name, as_network(value), value) for name, value in nested.items()]
    for index, (name, network, text) in enumerate(items):
        if network is None:
            continue
        for other, other_network, other_text in items[index + 1 :]:
            if other_network is not None and network.overlaps(other_network):
                found.append(f"{name} {text} overlaps {other} {other_text}")
        for where, value in outer.items():
            outer_network = as_network(value)
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
