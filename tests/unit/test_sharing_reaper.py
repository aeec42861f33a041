"""The pure parts of sharing and reaping: session hand-over, keys, records, leases, verdicts."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import pytest

from pytest_kipik import labels
from pytest_kipik.config import KipikConfig
from pytest_kipik.hosts.base import Owned
from pytest_kipik.ops import reaper
from pytest_kipik.ops.reaper import Verdict, judge
from pytest_kipik.sharing.session import (
    KeptNotes,
    Lease,
    Record,
    Session,
    cluster_key,
    warm_host_key,
)

NOW = dt.datetime(2026, 11, 23, 12, 0, 0, tzinfo=dt.timezone.utc)
HOST = "ci-1"


def test_session_is_handed_to_workers_as_json() -> None:
    owner = Session("r1", 4242, Path("/c/sessions/r1"), warm_slot=2)
    worker = Session.for_worker(owner.to_json(), "gw3")
    assert worker == Session("r1", 4242, Path("/c/sessions/r1"), owner=False, worker="gw3",
                             warm_slot=2)  # fmt: skip
    assert owner.owner


def _key(config: KipikConfig, **overrides: object) -> str:
    args: dict[str, object] = {
        "backend": "docker", "user_config": None, "nodes": None, "node_image": None
    }  # fmt: skip
    args.update(overrides)
    return cluster_key(config, **args)  # type: ignore[arg-type]


def test_cluster_key_changes_with_what_shapes_the_cluster_only() -> None:
    base = KipikConfig(image="dind:1", node_image="node:1")
    key = _key(base)
    assert len(key) == 16
    assert key == _key(KipikConfig(image="dind:1", node_image="node:1"))
    # settings that do not shape the cluster
    for same in (
        KipikConfig(image="dind:1", node_image="node:1", timeout=10, keep=True, reuse=True),
        KipikConfig(image="dind:1", node_image="node:1", warm=True, ttl=60),
    ):
        assert _key(same) == key
    # everything that does
    changed = {
        _key(KipikConfig(image="dind:2", node_image="node:1")),
        _key(KipikConfig(image="dind:1", node_image="node:2")),
        _key(KipikConfig(image="dind:1", node_image="node:1", pod_subnet="100.90.0.0/16")),
        _key(KipikConfig(image="dind:1", node_image="node:1", name_prefix="other")),
        _key(base, backend="pod"),
        _key(base, nodes=2),
        _key(base, node_image="node:3"),
        _key(base, user_config={"kind": "Cluster", "featureGates": {"X": True}}),
    }
    assert key not in changed
    assert len(changed) == 8


def test_record_round_trips_and_unreadable_ones_are_none(tmp_path: Path) -> None:
    record = Record("c", "c-dind", {"kipik.io/run-id": "r1"}, "https://127.0.0.1:1", "/k", 2)
    path = tmp_path / "c.json"
    record.write(path)
    assert Record.load(path) == record
    assert path.stat().st_mode & 0o777 == 0o600
    restored = dataclasses.replace(record, kind_name="c-from-a-snapshot")
    restored.write(path)
    assert Record.load(path) == restored  # kind's own name of a restored cluster goes along
    (tmp_path / "bad.json").write_text("{not json")
    assert Record.load(tmp_path / "bad.json") is None
    assert Record.load(tmp_path / "missing.json") is None


def test_lease_round_trips() -> None:
    lease = Lease.new(90, 77, now=NOW)
    assert lease.expires_at == "20261123T120130Z"
    assert lease.holder_pid == 77
    assert Lease.parse(lease.dump().decode()) == lease
    assert Lease.parse('{"expires_at": "tomorrow", "holder_host": "h", "holder_pid": 1}') is None
    assert Lease.parse("") is None


def _labels(**extra: str) -> dict[str, str]:
    found = {
        labels.RUN_ID: "r1",
        labels.OWNER_HOST: HOST,
        labels.OWNER_PID: "100",
        labels.EXPIRES_AT: "20261123T130000Z",
    }
    found.update(extra)
    return found


ALIVE = {100, 200}


@pytest.mark.parametrize(
    ("found", "lease", "verdict"),
    [
        ({"other.tool": "x"}, None, None),
        (_labels(), None, Verdict(False, "its session is alive (pid 100)")),
        (_labels(**{labels.OWNER_PID: "101"}), None,
         Verdict(True, f"its owner pid 101 on {HOST} is gone")),
        (_labels(**{labels.OWNER_PID: "101", labels.EXPIRES_AT: "20261123T110000Z"}), None,
         Verdict(True, "expired at 20261123T110000Z")),
        # a live owner wins over expiry: never touch a live session
        (_labels(**{labels.EXPIRES_AT: "20261123T110000Z"}), None,
         Verdict(False, "its session is alive (pid 100)")),
        # another machine's: judged by expiry only
        (_labels(**{labels.OWNER_HOST: "elsewhere", labels.OWNER_PID: "101"}), None,
         Verdict(False, "owned by elsewhere pid 101; not expired")),
        (_labels(**{labels.OWNER_HOST: "elsewhere", labels.EXPIRES_AT: "20261123T115959Z"}),
         None, Verdict(True, "expired at 20261123T115959Z")),
        # kept, reused, warm: their lease decides, not their (long gone) owner
        (_labels(**{labels.OWNER_PID: "101", labels.KEEP: "true"}), None,
         Verdict(False, "kept on purpose until 20261123T130000Z")),
        (_labels(**{labels.OWNER_PID: "101", labels.REUSE_KEY: "k"}),
         Lease("20261124T000000Z", HOST, 300),
         Verdict(False, "kept on purpose until 20261124T000000Z")),
        (_labels(**{labels.OWNER_PID: "101", labels.WARM_SLOT: "0"}),
         Lease("20261123T100000Z", HOST, 300), Verdict(True, "expired at 20261123T100000Z")),
        (_labels(**{labels.OWNER_PID: "101", labels.WARM_SLOT: "0"}),
         Lease("20261123T100000Z", HOST, 200), Verdict(False, "in use by pid 200")),
        (_labels(**{labels.OWNER_PID: "101", labels.WARM_SLOT: "0"}),
         Lease("20261123T100000Z", "elsewhere", 200),
         Verdict(True, "expired at 20261123T100000Z")),
        # an owner pod on another machine that was deleted
        (_labels(**{labels.OWNER_HOST: "pod-a", labels.OWNER_POD: "gone-pod"}), None,
         Verdict(True, "its owner pod gone-pod is gone")),
        (_labels(**{labels.OWNER_HOST: "pod-a", labels.OWNER_POD: "live-pod"}), None,
         Verdict(False, "owned by pod-a pid 100; not expired")),
        # no readable pid: expiry only
        (_labels(**{labels.OWNER_PID: "x"}), None,
         Verdict(False, "owned by ci-1 pid ?; not expired")),
    ],
)  # fmt: skip
def test_judge(found: dict[str, str], lease: Lease | None, verdict: Verdict | None) -> None:
    assert (
        judge(
            found,
            lease=lease,
            now=NOW,
            host=HOST,
            alive=lambda pid: pid in ALIVE,
            pod_exists=lambda name: name == "live-pod",
        )
        == verdict
    )


# -- kept clusters of a worker that died: the owner says what it could not ------------------------


def test_kept_notes_left_told_and_untold(tmp_path: Path) -> None:
    session = Session("r1", 1, tmp_path / "sessions" / "r1")
    notes = KeptNotes(session)
    assert notes.untold("kipik-r1-dind") is None  # never noted: half-made or not a worker's
    notes.leave("kipik-r1-dind", "kipik-r1", "use it / remove it")
    notes.leave("kipik-r1-dind", "kipik-r1-2", "the other one")
    assert notes.untold("kipik-r1-dind") == ["use it / remove it", "the other one"]
    notes.told("kipik-r1-dind", "kipik-r1")
    assert notes.untold("kipik-r1-dind") == ["the other one"]
    notes.told("kipik-r1-dind", "kipik-r1-2")
    assert notes.untold("kipik-r1-dind") == []
    notes.told("kipik-r9-dind")  # a host its worker spoke of without a cluster in it
    assert notes.untold("kipik-r9-dind") == []
    assert (tmp_path / "sessions" / "r1" / "kept").stat().st_mode & 0o077 == 0


class _ListingBackend:
    """A double of a backend that lists given resources and records removals."""

    name = "docker"

    def __init__(self, owned: list[Owned]) -> None:
        self.owned = owned
        self.removed: list[str] = []

    def list_owned(self, run_id: str | None = None) -> list[Owned]:
        return [o for o in self.owned if o.labels.get(labels.RUN_ID) == run_id]

    def make_host(self, name: str, found: object, ports: object) -> _ListingBackend.Host:
        return self.Host(name)

    def remove_owned(self, resource: Owned) -> None:
        self.removed.append(str(resource))

    class Host:
        def __init__(self, name: str) -> None:
            self.name = name

        def removal_command(self) -> str:
            return f"docker rm --force --volumes {self.name}"


def test_sweep_says_what_a_dead_worker_kept_and_removes_the_rest() -> None:
    def owned(name: str, worker: str, *, keep: bool, run_id: str = "r1") -> Owned:
        found = labels.owner_labels(
            run_id=run_id, cluster=name.removesuffix("-dind"), role="dind", worker=worker, keep=keep
        )
        return Owned("container", name, found)

    backend = _ListingBackend(
        [
            owned("kipik-r1-gw0-1-dind", "gw0", keep=True),  # noted, its worker died
            owned("kipik-r1-gw1-1-dind", "gw1", keep=True),  # its worker said it already
            owned("kipik-r1-gw0-2-dind", "gw0", keep=True),  # its worker died making it
            owned("kipik-r1-2-dind", "main", keep=True),  # the owner's: it speaks for itself
            owned("kipik-r1-gw1-3-dind", "gw1", keep=False),  # not kept: removed
            owned("kipik-r2-gw0-1-dind", "gw0", keep=True, run_id="r2"),  # another session's
        ]
    )
    untold = {"kipik-r1-gw0-1-dind": ["note of gw0-1"], "kipik-r1-gw1-1-dind": []}
    lines: list[str] = []
    problems = reaper.sweep(backend, "r1", lines.append, untold.get)  # type: ignore[arg-type]
    assert problems == []
    assert lines[:2] == [
        "note of gw0-1",
        "kipik: kept kipik-r1-gw0-2-dind, left half-made when the process making it ended; "
        "remove it: docker rm --force --volumes kipik-r1-gw0-2-dind",
    ]
    assert backend.removed == ["container kipik-r1-gw1-3-dind"]
    assert not any("gw1-1" in line or "r1-2-dind" in line or "r2" in line for line in lines)


def test_a_warm_host_made_with_other_daemon_arguments_or_ports_is_another_host() -> None:
    plain = warm_host_key("docker", "dind:1")
    assert plain == warm_host_key("docker", "dind:1", ())
    mirrored = warm_host_key("docker", "dind:1", ["--registry-mirror=https://m"])
    assert len({plain, mirrored, warm_host_key("docker", "dind:1", ["registry inside"])}) == 3
    assert mirrored == warm_host_key("docker", "dind:1", ["--registry-mirror=https://m"])
