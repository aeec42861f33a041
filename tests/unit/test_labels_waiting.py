import datetime as dt
import os
import socket
from collections.abc import Iterator

import pytest

from pytest_kipik import labels
from pytest_kipik.errors import WaitTimeout
from pytest_kipik.waiting import NotYet, wait_until


def test_cluster_names() -> None:
    assert labels.cluster_name("kipik", "1a2b3c4d", None, 1) == "kipik-1a2b3c4d"
    assert labels.cluster_name("kipik", "1a2b3c4d", "gw1", 1) == "kipik-1a2b3c4d-gw1"
    assert labels.cluster_name("ci", "1a2b3c4d", "gw0", 3) == "ci-1a2b3c4d-gw0-3"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("ok.name-1", None),
        ("Bad_Name", "'Bad_Name' is not a valid cluster name: kind requires names matching "
                     "^[a-z0-9.-]+$"),
        ("x" * 41, f"'{'x' * 41}' is too long: at most 40 characters"),
    ],
)  # fmt: skip
def test_check_cluster_name(name: str, problem: str | None) -> None:
    assert labels.check_cluster_name(name) == problem


def test_owner_labels() -> None:
    now = dt.datetime(2026, 11, 22, 3, 4, 5, tzinfo=dt.timezone.utc)
    got = labels.owner_labels(
        run_id="r1", cluster="c", role="dind", worker=None, keep=False, now=now
    )
    assert got == {
        "kipik.io/run-id": "r1",
        "kipik.io/cluster": "c",
        "kipik.io/role": "dind",
        "kipik.io/owner-host": labels.label_value(socket.gethostname()),
        "kipik.io/owner-pid": str(os.getpid()),
        "kipik.io/created-at": "20261122T030405Z",
        "kipik.io/expires-at": "20261122T070405Z",
        "kipik.io/worker": "main",
    }
    kept = labels.owner_labels(run_id="r1", cluster="c", role="dind", worker="gw0", keep=True)
    assert (kept["kipik.io/keep"], kept["kipik.io/worker"]) == ("true", "gw0")
    shared = labels.owner_labels(
        run_id="r1", cluster="c", role="dind", worker="gw1", keep=False, now=now, ttl=90,
        owner_pid=4242, owner_pod="ci-step-7x2k/0", reuse_key="0123456789abcdef", warm_slot=3,
    )  # fmt: skip
    assert {k: v for k, v in shared.items() if k not in got or got[k] != v} == {
        "kipik.io/owner-pid": "4242",
        "kipik.io/expires-at": "20261122T030535Z",
        "kipik.io/worker": "gw1",
        "kipik.io/owner-pod": "ci-step-7x2k-0",
        "kipik.io/reuse-key": "0123456789abcdef",
        "kipik.io/warm-slot": "3",
    }
    assert [labels.leased(x) for x in (got, kept, shared, None)] == [False, True, True, False]
    for value in [*got.values(), *kept.values(), *shared.values()]:  # valid for both
        assert labels.LABEL_VALUE_RE.match(value), value
        assert len(value) <= 63, value
    assert labels.parse_timestamp(got["kipik.io/created-at"]) == now


@pytest.mark.parametrize(
    ("text", "value"),
    [("ci-runner_7.example.com", "ci-runner_7.example.com"),
     ("-weird:host/name-", "weird-host-name"), ("x" * 80, "x" * 63), ("::", "")],
)  # fmt: skip
def test_label_value_makes_any_text_a_valid_label_value(text: str, value: str) -> None:
    assert labels.label_value(text) == value
    assert labels.LABEL_VALUE_RE.match(value)


def test_wait_until_returns_once_the_check_passes() -> None:
    seen = []

    def check() -> str:
        seen.append(1)
        if len(seen) < 3:
            raise NotYet(f"attempt {len(seen)}")
        return "done"

    assert wait_until(check, what="x", timeout=10, hint="h", interval=0.01) == "done"
    assert len(seen) == 3


def test_wait_until_reports_what_it_awaited_and_the_last_state() -> None:
    attempts = []

    def check() -> None:
        attempts.append(1)
        raise NotYet(f"state {len(attempts)}")

    with pytest.raises(WaitTimeout) as info:
        wait_until(check, what="the thing", timeout=0.05, hint="look there", interval=0.01)
    assert str(info.value).startswith("timed out after 0s waiting for the thing\n")
    assert f"  last state seen: state {len(attempts)}\n" in str(info.value)
    assert str(info.value).endswith("  hint: look there")


def test_wait_until_lets_other_errors_through() -> None:
    def check() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        wait_until(check, what="x", timeout=5, hint="h")


@pytest.fixture
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM as a terminal's pytest has them; the inherited ones come back after.

    A job a non-interactive shell starts in the background inherits SIGINT ignored.
    """
    import signal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


@pytest.mark.usefixtures("interruptible")
def test_sigterm_becomes_an_interrupt_once_then_is_ignored() -> None:
    import os
    import signal

    from pytest_kipik.signals import terminate_as_interrupt

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with terminate_as_interrupt():
        with pytest.raises(KeyboardInterrupt, match="SIGTERM received"):
            os.kill(os.getpid(), signal.SIGTERM)  # os.kill runs pending handlers before returning
        os.kill(os.getpid(), signal.SIGTERM)  # ignored while cleanup runs
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_existing_sigterm_handler_is_left_alone() -> None:
    import signal

    from pytest_kipik.signals import terminate_as_interrupt

    def mine(signum: int, frame: object) -> None:
        raise AssertionError("not called here")

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with terminate_as_interrupt():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.usefixtures("interruptible")
def test_interrupts_wait_until_cleanup_is_done() -> None:
    import os
    import signal

    from pytest_kipik.signals import deferred_interrupts

    done = []

    def cleanup() -> None:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("cleanup finished")

    with pytest.raises(KeyboardInterrupt, match="SIGINT received during cleanup"):
        cleanup()
    assert done == ["cleanup finished"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with deferred_interrupts(reraise=False):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
