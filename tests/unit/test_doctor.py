"""``kipik doctor``'s judging functions and parsers: findings in, exact verdicts out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pytest_kipik.config import KipikConfig
from pytest_kipik.ops import doctor, judges, probe
from pytest_kipik.ops.judges import FAIL, GIB, OK, WARN, Result

ROOT = Path(__file__).resolve().parents[2]


def test_result_lines_and_render() -> None:
    results = [
        Result(OK, "engine", "Docker 20.10"),
        Result(WARN, "inotify", "low", "raise it"),
        Result(FAIL, "rbac", "missing create pods/exec", "apply examples/rbac.yaml"),
    ]
    assert judges.render(results) == (
        "ok    engine: Docker 20.10\n"
        "warn  inotify: low\n"
        "      fix: raise it\n"
        "fail  rbac: missing create pods/exec\n"
        "      fix: apply examples/rbac.yaml\n"
        "1 ok, 1 warn, 1 fail"
    )
    assert judges.passed(results) is False
    assert judges.passed(results[:2]) is True
    parsed = json.loads(judges.render(results, as_json=True))
    assert parsed["passed"] is False
    assert parsed["checks"][2] == {
        "status": "fail",
        "check": "rbac",
        "finding": "missing create pods/exec",
        "fix": "apply examples/rbac.yaml",
    }


def test_engine() -> None:
    assert judges.judge_engine("unix:///s", "24.0.7", None) == Result(
        OK, "engine", "Docker 24.0.7 at unix:///s"
    )
    down = judges.judge_engine("unix:///s", None, "connection refused")
    assert (down.status, down.finding) == (
        FAIL,
        "no Docker engine answered at unix:///s: connection refused",
    )
    assert "DOCKER_HOST" in down.fix


def test_privileged() -> None:
    ran = judges.judge_privileged("d:1", default=False, missing=False, error=None, exit_code=0)
    assert ran == Result(OK, "privileged", "a privileged container from d:1 started and ran")
    missing = judges.judge_privileged(
        "d:1", default=False, missing=True, error=None, exit_code=None
    )
    assert (missing.status, missing.finding) == (FAIL, "the DinD image d:1 is not on the engine")
    assert "docker build -t d:1 image/" in missing.fix
    default = judges.judge_privileged(
        "pytest-kipik/dind:abc", default=True, missing=True, error=None, exit_code=None
    )
    assert default.fix.startswith("kipik builds pytest-kipik/dind:abc from its image/ folder")
    caps = judges.judge_privileged(
        "d:1",
        default=False,
        missing=False,
        error="OCI runtime create failed: unable to apply caps: operation not permitted",
        exit_code=None,
    )
    assert caps.status == FAIL
    assert caps.finding.startswith("a privileged container from d:1 did not run: OCI runtime")
    assert "image/runc-capfix" in caps.fix
    refused = judges.judge_privileged(
        "d:1", default=False, missing=False, error="privileged mode is disabled", exit_code=None
    )
    assert "rootless" in refused.fix
    exited = judges.judge_privileged("d:1", default=False, missing=False, error=None, exit_code=3)
    assert (exited.status, exited.finding) == (
        FAIL,
        "a privileged container from d:1 started but its probe exited 3",
    )


def test_cgroup() -> None:
    assert judges.judge_cgroup("1", True) == Result(
        OK, "cgroup", "cgroup v1 (hybrid or legacy); a privileged container can make child cgroups"
    )
    assert judges.judge_cgroup("2", True, "controllers: cpu memory") == Result(
        OK,
        "cgroup",
        "cgroup v2; a privileged container can make a writable subtree with controllers",
    )
    v2 = judges.judge_cgroup("2", False, "controllers: none")
    assert (v2.status, v2.finding) == (
        FAIL,
        "cgroup v2; a privileged container cannot delegate controllers to a child cgroup "
        "(controllers: none)",
    )
    assert "private cgroup namespace" in v2.fix
    assert judges.judge_cgroup("1", False).status == FAIL
    assert judges.judge_cgroup(None, None).status == WARN


def test_modules() -> None:
    assert judges.judge_modules(True, "6.1.0", 3, True) == Result(
        OK, "/lib/modules", "present with the running kernel's modules (6.1.0)"
    )
    empty = judges.judge_modules(True, "6.1.0", 0, False)
    assert (empty.status, empty.finding) == (
        WARN,
        "/lib/modules is empty: nothing inside can load kernel modules",
    )
    other = judges.judge_modules(True, "6.1.0", 1, False)
    assert other.finding == (
        "/lib/modules has 1 entry but none for the running kernel 6.1.0: nothing inside can "
        "load kernel modules"
    )
    absent = judges.judge_modules(False, "6.1.0", 0, False)
    assert (absent.status, absent.finding) == (
        WARN,
        "the engine host has no /lib/modules: the DinD runs without it, and nothing inside can "
        "load kernel modules",
    )
    assert absent.fix.startswith("install the modules of kernel 6.1.0 on the engine host")


@pytest.mark.parametrize(
    ("watches", "instances", "status", "finding"),
    [
        (524288, 512, OK, "max_user_watches=524288, max_user_instances=512"),
        (1048576, 8192, OK, "max_user_watches=1048576, max_user_instances=8192"),
        (
            192536, 128, WARN,
            "low limits: max_user_watches=192536 (< 524288), max_user_instances=128 (< 512); "
            "pods may fail with 'too many open files'",
        ),
        (
            524288, 511, WARN,
            "low limits: max_user_instances=511 (< 512); pods may fail with 'too many open files'",
        ),
    ],
)  # fmt: skip
def test_inotify(watches: int, instances: int, status: str, finding: str) -> None:
    result = judges.judge_inotify(watches, instances)
    assert (result.status, result.finding) == (status, finding)


def test_inotify_fix_never_lowers_a_limit() -> None:
    fix = judges.judge_inotify(1048576, 128).fix
    assert "fs.inotify.max_user_watches=1048576 fs.inotify.max_user_instances=512" in fix


@pytest.mark.parametrize(
    ("free", "status", "finding"),
    [
        (50 * GIB, OK, "50.0 GiB free in /var/lib/docker"),
        (10 * GIB, OK, "10.0 GiB free in /var/lib/docker"),
        (10 * GIB - 1, WARN, "10.0 GiB free in /var/lib/docker (< 10.0 GiB)"),
        (3 * GIB, WARN, "3.0 GiB free in /var/lib/docker (< 10.0 GiB)"),
        (3 * GIB - 1, FAIL, "3.0 GiB free in /var/lib/docker (< 3.0 GiB)"),
        (0, FAIL, "0.0 GiB free in /var/lib/docker (< 3.0 GiB)"),
    ],
)
def test_disk_thresholds(free: int, status: str, finding: str) -> None:
    result = judges.judge_disk("/var/lib/docker", free)
    assert (result.status, result.finding) == (status, finding)


def test_overlaps_between_nested_ranges_and_with_outer_ones() -> None:
    nested = {"nested podSubnet": "10.244.0.0/16", "nested serviceSubnet": "10.96.0.0/12"}
    outer = {
        "Docker network bridge": "172.17.0.0/16",
        "outer pod web": "10.244.3.7",
        "the outer API server": "kubernetes.example",  # a name: nothing to compare
    }
    assert judges.overlaps(nested, outer) == [
        "nested podSubnet 10.244.0.0/16 overlaps 10.244.3.7 (outer pod web)"
    ]
    clash = {"nested podSubnet": "100.96.0.0/16", "nested serviceSubnet": "100.96.128.0/17"}
    assert judges.overlaps(clash, {}) == [
        "nested podSubnet 100.96.0.0/16 overlaps nested serviceSubnet 100.96.128.0/17"
    ]
    result = judges.judge_overlap(nested, outer)
    assert result.status == FAIL
    assert "--pod-subnet" in result.fix


def test_default_ranges_overlap_nothing_usual() -> None:
    ranges = doctor.nested_ranges(KipikConfig())
    assert ranges == {
        "nested podSubnet": "100.96.0.0/16",
        "nested serviceSubnet": "100.97.0.0/16",
        "inner Docker bridge": "100.99.0.0/24",
        "inner Docker address pool": "100.98.0.0/16",
    }
    usual = {"docker0": "172.17.0.0/16", "lan": "192.168.1.0/24", "kind": "10.244.0.0/16"}
    result = judges.judge_overlap(ranges, usual)
    assert result == Result(
        OK,
        "subnets",
        "nested podSubnet 100.96.0.0/16, nested serviceSubnet 100.97.0.0/16, inner Docker "
        "bridge 100.99.0.0/24, inner Docker address pool 100.98.0.0/16 overlap none of 3 "
        "outer range(s)",
    )


def test_outer_api() -> None:
    assert judges.judge_outer_api("https://o:6443", "kubeconfig k", "v1.31.0", None) == Result(
        OK, "outer API", "Kubernetes v1.31.0 at https://o:6443 (kubeconfig k)"
    )
    down = judges.judge_outer_api("https://o:6443", "kubeconfig k", None, "timed out")
    assert (down.status, down.finding) == (
        FAIL,
        "the outer cluster at https://o:6443 did not answer (kubeconfig k): timed out",
    )


def test_access_names_what_is_missing_and_where_to_get_it() -> None:
    everything = dict.fromkeys(judges.POD_BACKEND_ACCESS, True)
    assert judges.judge_access("ci", everything, direct=False) == Result(
        OK, "rbac", "all 12 permissions in namespace ci"
    )
    denied = {**everything, ("create", "pods/exec"): False, ("list", "events"): False}
    result = judges.judge_access("ci", denied, direct=False)
    assert (result.status, result.finding) == (
        FAIL,
        "missing in namespace ci: create pods/exec, list events",
    )
    assert (
        result.fix
        == "grant the Role in examples/rbac.yaml (kubectl apply -n ci -f examples/rbac.yaml)"
    )
    forward = {**everything, ("create", "pods/portforward"): False}
    assert judges.judge_access("ci", forward, direct=False).status == FAIL
    inside = judges.judge_access("ci", forward, direct=True)
    assert (inside.status, inside.finding) == (
        WARN,
        "missing in namespace ci: create pods/portforward (only needed outside the outer cluster)",
    )
    refused = judges.judge_access("ci", {}, direct=False, error="HTTP 403 Forbidden")
    assert (refused.status, refused.finding) == (
        FAIL,
        "could not ask the outer cluster: HTTP 403 Forbidden",
    )


def test_access_list_is_the_example_role() -> None:
    documents = list(yaml.safe_load_all((ROOT / "examples" / "rbac.yaml").read_text()))
    role = next(d for d in documents if d["kind"] == "Role")
    granted = {(verb, res) for rule in role["rules"] for res in rule["resources"]
               for verb in rule["verbs"]}  # fmt: skip
    assert set(judges.POD_BACKEND_ACCESS) == granted


def test_parse_probe_route_and_statfs() -> None:
    facts = probe.parse_probe(
        "kernel=6.1.0\nroute=eth0 00000000 00000000\nroute=docker0 000011AC 0000FFFF\n"
        "noise without equals\ndisk=20348636 4096\n"
    )
    assert facts == {
        "kernel": ["6.1.0"],
        "route": ["eth0 00000000 00000000", "docker0 000011AC 0000FFFF"],
        "disk": ["20348636 4096"],
    }
    assert probe.parse_route("docker0 000011AC 0000FFFF") == ("docker0", "172.17.0.0/16")
    assert probe.parse_route("eth0 0002A8C0 00FFFFFF") == ("eth0", "192.168.2.0/24")
    assert probe.parse_route("eth0 00000000 00000000") is None  # the default route
    assert probe.parse_route("garbage") is None
    assert probe.parse_statfs("20348636 4096") == 20348636 * 4096
    assert probe.parse_statfs("") is None


def test_pod_probe() -> None:
    assert judges.judge_pod_probe("r/dind:1", None, 0) == Result(
        OK, "privileged", "a privileged DinD pod from r/dind:1 ran and its Docker answered"
    )
    refused = judges.judge_pod_probe("r/dind:1", "HTTP 403: create pods/exec", None)
    assert (refused.status, refused.finding) == (
        FAIL,
        "a privileged DinD pod from r/dind:1 did not come up: HTTP 403: create pods/exec",
    )
    assert "pod-security.kubernetes.io/enforce=privileged" in refused.fix
    broken = judges.judge_pod_probe("r/dind:1", None, 2)
    assert (broken.status, broken.finding) == (
        FAIL,
        "a privileged DinD pod from r/dind:1 runs, but its probe exited 2",
    )


def test_facts_are_judged_the_same_wherever_the_probe_ran() -> None:
    facts = probe.parse_probe(
        "kernel=6.1.0\nmodules=yes\nmodules_entries=1\nmodules_kernel=yes\n"
        "inotify_watches=524288\ninotify_instances=512\ndisk=5242880 4096\n"
        "cgroup=2\ncgroup_controllers=cpu memory pids\nnesting=yes\n"
    )
    judged = probe.judge_facts(facts, "/var/lib/docker")
    assert [(r.check, r.status) for r in judged] == [
        ("cgroup", OK),
        ("/lib/modules", OK),
        ("inotify", OK),
        ("disk", OK),
    ]
    assert judged[0] == judges.judge_cgroup("2", True, "controllers: cpu memory pids")
    assert judged[3] == judges.judge_disk("/var/lib/docker", 5242880 * 4096)
    # nothing printed: every check says it could not tell
    assert [r.check for r in probe.judge_facts({}, "/d")] == [
        "cgroup", "/lib/modules", "inotify", "disk"
    ]  # fmt: skip


def test_probe_script_looks_where_it_is_told() -> None:
    script = probe.probe_script("/lib", "/var/lib/docker")
    assert "if [ -d /lib/modules ]; then" in script
    assert "stat -f -c '%a %S' /var/lib/docker" in script
    assert probe.probe_script(probe.HOST_LIB, probe.HOST_DATA) == probe.PROBE_SCRIPT
