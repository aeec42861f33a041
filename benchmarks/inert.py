"""What the plugin costs a run that uses nothing of it: a one-test run with and without kipik.

Each round runs the same one-test project twice, with the plugin (as installed: pytest loads it
through its entry point) and with ``-p no:kipik``, in alternating order, so the ratio is taken
under the same conditions. Prints the median wall times, their ratio (target: at most 1.10),
and the median time ``import pytest_kipik.plugin`` takes after pytest is imported.

    python3 benchmarks/inert.py --rounds 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pytest_kipik.config import SETTINGS

IMPORT_TIME = """
import time, pytest
start = time.perf_counter()
import pytest_kipik.plugin
print(time.perf_counter() - start)
"""


def clean_environment() -> dict[str, str]:
    """The environment without any kipik setting (a run that sets one uses the plugin)."""
    settings = {setting.env for setting in SETTINGS}
    return {key: value for key, value in os.environ.items() if key not in settings}


def one_run(project: Path, environ: dict[str, str], *extra: str) -> float:
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra]
    start = time.perf_counter()
    subprocess.run(argv, cwd=project, env=environ, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="pairs of runs (default 15)")
    args = parser.parse_args()
    environ = clean_environment()
    with_kipik: list[float] = []
    without: list[float] = []
    imports: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kipik-inert-") as directory:
        project = Path(directory)
        (project / "test_plain.py").write_text("def test_plain():\n    assert 1 + 1 == 2\n")
        (project / "pytest.ini").write_text("[pytest]\n")
        one_run(project, environ)  # warm the file system caches for both
        for index in range(args.rounds):
            if index % 2:
                without.append(one_run(project, environ, "-p", "no:kipik"))
                with_kipik.append(one_run(project, environ))
            else:
                with_kipik.append(one_run(project, environ))
                without.append(one_run(project, environ, "-p", "no:kipik"))
            done = subprocess.run(
                [sys.executable, "-c", IMPORT_TIME],
                env=environ,
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
            imports.append(float(done.stdout.strip()))
    on, off = statistics.median(with_kipik), statistics.median(without)
    print(f"one-test run with the plugin:     {on:.3f} s (median of {args.rounds})")
    print(f"one-test run with -p no:kipik:    {off:.3f} s")
    print(f"ratio (target <= 1.10):           {on / off:.3f}")
    print(f"import pytest_kipik.plugin:       {statistics.median(imports) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
