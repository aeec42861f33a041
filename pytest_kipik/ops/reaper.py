"""Reaping: what a finished session leaves to its owner, and ``kipik gc`` for what nobody owns.

:func:`judge` decides from labels, a lease, "is this pid alive" and the time alone (pure, tested
exactly); :func:`collect`, :func:`reap` and :func:`sweep` do the I/O through a backend.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pytest_kipik import labels as lbl
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts.base import Backend, Owned
from pytest_kipik.progress import Reporter, phase
from pytest_kipik.sharing.session import LEASE_PATH, Lease

#: Is process ``pid`` alive on this machine?
PidAlive = Callable[[int], bool]
#: Does the pod of this name exist (None: cannot tell)?
PodExists = Callable[[str], "bool | None"]


@dataclass(frozen=True)
class Verdict:
    """Whether ``kipik gc`` removes a resource, and why."""

    reap: bool
    reason: str


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists here (one of another user counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def this_host() -> str:
    """The name of this machine, as the ``owner-host`` label spells it."""
    return lbl.label_value(socket.gethostname())


def _time(text: str | None) -> dt.datetime | None:
    try:
        return lbl.parse_timestamp(text or "")
    except ValueError:
        return None


def _pid(text: str | None) -> int | None:
    return int(text) if text and text.isdigit() else None


def judge(
    found: Mapping[str, str],
    *,
    lease: Lease | None,
    now: dt.datetime,
    host: str,
    alive: PidAlive,
    pod_exists: PodExists = lambda name: None,
) -> Verdict | None:
    """Decide about one resource from its labels (None: not kipik's, never touched).

    Never reaped: a resource whose owning session runs on this machine (its owner pid is
    alive), or whose lease holder does. Reaped: what is past its lease (kept, reused, warm:
    the lease in the host, else ``expires-at``) or past ``expires-at``; what an owner left that
    is not kept (owner pid gone on this machine, owner pod deleted). Anything else is kept:
    an owner on another machine is judged only by expiry.
    """
    if lbl.RUN_ID not in found:
        return None
    owner_host = found.get(lbl.OWNER_HOST)
    owner_pid = _pid(found.get(lbl.OWNER_PID))
    if owner_host == host and owner_pid is not None and alive(owner_pid):
        return Verdict(False, f"its session is alive (pid {owner_pid})")
    if lease is not None and lease.holder_host == host and alive(lease.holder_pid):
        return Verdict(False, f"in use by pid {lease.holder_pid}")
    expiry = _time(lease.expires_at) if lease is not None else _time(found.get(lbl.EXPIRES_AT))
    if expiry is not None and expiry <= now:
        return Verdict(True, f"expired at {lbl.timestamp(expiry)}")
    if lbl.leased(found):
        until = f" until {lbl.timestamp(expiry)}" if expiry is not None else ""
        return Verdict(False, f"kept on purpose{until}")
    if owner_host == host and owner_pid is not None:
        return Verdict(True, f"its owner pid {owner_pid} on {host} is gone")
    owner_pod = found.get(lbl.OWNER_POD)
    if owner_pod and pod_exists(owner_pod) is False:
        return Verdict(True, f"its owner pod {owner_pod} is gone")
    return Verdict(False, f"owned by {owner_host or '?'} pid {owner_pid or '?'}; not expired")


def _lease_of(backend: Backend, resource: Owned) -> Lease | None:
    """The lease a kept/reused/warm container carries inside (None when it cannot be read)."""
    if resource.kind == "volume" or not lbl.leased(resource.labels):
        return None
    try:
        host = backend.make_host(resource.name, resource.labels, [])
        if not host.attach():
            return None
        result = host.exec(["cat", LEASE_PATH], timeout=15)
    except (KipikError, OSError):
        return None
    return Lease.parse(result.stdout) if result.exit_code == 0 else None


def collect(
    backend: Backend,
    *,
    now: dt.datetime | None = None,
    alive: PidAlive = pid_alive,
    pod_exists: PodExists = lambda name: None,
) -> list[tuple[Owned, Verdict]]:
    """Every kipik resource of the backend with what ``kipik gc`` would do with it."""
    moment = now or dt.datetime.now(dt.timezone.utc)
    host = this_host()
    judged = []
    for resource in backend.list_owned():
        verdict = judge(
            resource.labels,
            lease=_lease_of(backend, resource),
            now=moment,
            host=host,
            alive=alive,
            pod_exists=pod_exists,
        )
        if verdict is not None:
            judged.append((resource, verdict))
    return judged


def reap(backend: Backend, report: Reporter, *, dry_run: bool = False) -> list[Exception]:
    """Remove (or with ``dry_run`` only list) what is expired or orphaned; returns problems."""
    problems: list[Exception] = []
    judged = [(r, v) for r, v in collect(backend) if v.reap]
    judged.sort(key=lambda item: item[0].kind == "volume")  # containers take volumes along
    for resource, verdict in judged:
        if dry_run:
            report(f"would remove {resource} ({verdict.reason})")
            continue
        try:
            backend.remove_owned(resource)
        except KipikError as exc:
            problems.append(exc)
            report(f"could not remove {resource}: {exc}")
        else:
            report(f"removed {resource} ({verdict.reason})")
    if not judged:
        report("nothing to remove")
    return problems


def sweep(
    backend: Backend,
    run_id: str,
    report: Reporter,
    untold: Callable[[str], list[str] | None] = lambda host: [],
) -> list[Exception]:
    """Remove what session ``run_id`` made and did not keep (by its owner, at the end).

    Under xdist this is the controller: shared clusters outlive any one worker, and a crashed
    worker's half-made cluster is found here too. What a worker that made a kept host could
    not say (``untold(host)``: its notes, None when it never noted the host) is said here.
    """
    problems: list[Exception] = []
    owned = backend.list_owned(run_id)
    for resource in owned:
        if resource.kind != "volume" and resource.labels.get(lbl.KEEP) == "true":
            notes = untold(resource.name)
            for note in notes or []:
                report(note)
            if notes is None and resource.labels.get(lbl.WORKER, "main") != "main":
                removal = backend.make_host(resource.name, resource.labels, []).removal_command()
                report(
                    f"kipik: kept {resource.name}, left half-made when the process making it "
                    f"ended; remove it: {removal}"
                )
    found = [r for r in owned if not lbl.leased(r.labels)]
    found.sort(key=lambda resource: resource.kind == "volume")
    for resource in found:
        try:
            if resource.kind != "volume":
                with phase(report, resource.labels.get(lbl.CLUSTER, resource.name), "teardown"):
                    backend.remove_owned(resource)
            else:
                backend.remove_owned(resource)
        except KipikError as exc:
            problems.append(exc)
    return problems
