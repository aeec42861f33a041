import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_kipik.errors import CommandError, CommandTimeout, KindError, KipikError
from pytest_kipik.process import CommandResult, Output, run, run_in


def test_run_captures_both_streams() -> None:
    result = run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "out\n", "err\n")


def test_failure_carries_argv_code_streams_and_a_pasteable_command() -> None:
    argv = ["sh", "-c", "echo o; echo bad thing >&2; exit 3"]
    with pytest.raises(CommandError) as info:
        run(argv)
    error = info.value
    assert (error.argv, error.exit_code, error.stdout, error.stderr) == (
        argv,
        3,
        "o\n",
        "bad thing\n",
    )
    assert error.pretty_command == "sh -c 'echo o; echo bad thing >&2; exit 3'"
    assert str(error) == (
        "command failed with exit code 3: sh -c 'echo o; echo bad thing >&2; exit 3'\n"
        "  stderr:\n    bad thing\n"
        "  stdout:\n    o"
    )


def test_check_false_returns_the_failure() -> None:
    assert run(["false"], check=False).exit_code == 1


def test_where_prefixes_the_pasteable_command() -> None:
    result = CommandResult(["kind", "get", "clusters"], 1, "", "x", where=["docker", "exec", "c"])
    with pytest.raises(CommandError) as info:
        result.check()
    assert info.value.pretty_command == "docker exec c kind get clusters"


def test_missing_program_and_timeout_are_clear(tmp_path: Path) -> None:
    with pytest.raises(KipikError, match=r"'no-such-program-kipik' was not found on PATH"):
        run(["no-such-program-kipik", "x"])
    with pytest.raises(KipikError, match=r"did not finish within 0\.2s: sleep 5"):
        run(["sleep", "5"], timeout=0.2)


def test_kind_error_shows_kind_stderr_and_daemon_log_tail() -> None:
    failure = CommandError(
        ["kind", "create", "cluster"], 1, "", "ERROR: failed\n", where=["docker", "exec", "h"]
    )
    log = "\n".join(f"line {i}" for i in range(80))
    text = str(KindError("create cluster 'x'", failure, log))
    assert text.startswith(
        "kind failed to create cluster 'x' (exit code 1): docker exec h kind create cluster\n"
    )
    assert "  kind's stderr:\n    ERROR: failed\n" in text
    assert text.endswith("\n".join(f"    line {i}" for i in range(30, 80)))
    assert "line 29\n" not in text


def test_run_in_collects_streams_and_forwards_stderr_lines() -> None:
    lines: list[str] = []

    def runner(out: Output, err: Output) -> int:
        out.add(b"result\n")
        err.add(b"step one\nstep t")
        err.add(b"wo\nlast")
        return 3

    where = ["docker", "exec", "h"]
    result = run_in(where, ["kind", "x"], runner, timeout=5, on_output=lines.append)
    assert result == CommandResult(
        ["kind", "x"], 3, "result\n", "step one\nstep two\nlast", where=["docker", "exec", "h"]
    )
    assert lines == ["step one", "step two", "last"]


def test_run_in_passes_errors_through() -> None:
    def runner(out: Output, err: Output) -> int:
        raise ValueError("inner")

    with pytest.raises(ValueError, match="inner"):
        run_in([], ["x"], runner, timeout=5)


def test_run_in_timeout_carries_the_output_seen_so_far() -> None:
    release = threading.Event()

    def runner(out: Output, err: Output) -> int:
        out.add(b"partial out\n")
        err.add(b"Creating cluster ...\n")
        release.wait(10)
        return 0

    start = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        run_in(["docker", "exec", "h"], ["kind", "create"], runner, timeout=0.3)
    release.set()
    assert time.monotonic() - start < 8  # the runner would have held it 10 s
    assert (info.value.stdout, info.value.stderr) == ("partial out\n", "Creating cluster ...\n")
    assert str(info.value).startswith(
        "command did not finish within 0s: docker exec h kind create\n"
    )
    text = str(KindError("create cluster 'x'", info.value, "daemon line"))
    assert text.startswith("kind failed to create cluster 'x' (did not finish within 0s)")
    assert "Creating cluster ..." in text
    assert "daemon line" in text
