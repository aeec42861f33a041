"""Time to a ready nested cluster: kipik's phases, and its overhead over the same steps by hand.

Each round runs the steps by hand with the docker CLI (and kubectl for readiness), then kipik's
ClusterFactory, one after the other on the same machine, so the ratio is taken under the same
conditions. Prints per-phase times (median over the rounds) and kipik_total / by_hand_total.

    python3 benchmarks/time_to_ready.py --image kipik-test/dind:dev \
        --node-image kipik.local/kind-node:v1.22.3
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from pytest_kipik import ClusterFactory, KipikConfig

KIND_CONFIG = """\
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  apiServerAddress: 0.0.0.0
  apiServerPort: 6443
kubeadmConfigPatches:
- |
  kind: ClusterConfiguration
  apiServer:
    certSANs: [localhost, 0.0.0.0, 127.0.0.1]
"""


def sh(*argv: str, stdin: bytes | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, check=True, timeout=600)
    return done.stdout.decode()


def poll(check: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark step did not finish")
        time.sleep(0.2)


def ok(*argv: str) -> bool:
    return subprocess.run(argv, capture_output=True, check=False, timeout=60).returncode == 0


def by_hand(image: str, node_image: str, workdir: Path) -> dict[str, float]:
    """The same steps kipik takes, typed out with the docker CLI and kubectl."""
    name = f"bench-{uuid.uuid4().hex[:6]}"
    times: dict[str, float] = {}
    start = time.monotonic()

    def mark(phase: str) -> None:
        nonlocal start
        now = time.monotonic()
        times[phase] = now - start
        start = now

    sh("docker", "volume", "create", f"{name}-docker")
    try:
        sh("docker", "run", "-d", "--privileged", "--name", name, "-v",
           f"{name}-docker:/var/lib/docker", "-p", "127.0.0.1::6443", image)  # fmt: skip
        mark("DinD up")
        poll(lambda: ok("docker", "exec", name, "docker", "version"))
        mark("inner daemon ready")
        save = subprocess.Popen(["docker", "save", node_image], stdout=subprocess.PIPE)
        subprocess.run(["docker", "exec", "-i", name, "docker", "load", "-q"], stdin=save.stdout,
                       check=True, capture_output=True)  # fmt: skip
        save.wait()
        mark("node image in")
        sh("docker", "exec", "-i", name, "sh", "-c", "mkdir -p /k && cat > /k/c.yaml",
           stdin=KIND_CONFIG.encode())  # fmt: skip
        sh("docker", "exec", name, "kind", "create", "cluster", "--name", "b",
           "--config", "/k/c.yaml", "--image", node_image,
           "--kubeconfig", "/k/kc")  # fmt: skip
        mark("kind create")
        port = sh("docker", "port", name, "6443/tcp").split(":")[-1].strip()
        text = sh("docker", "exec", name, "kind", "get", "kubeconfig", "--name", "b")
        kubeconfig = workdir / f"{name}.kubeconfig"
        kubeconfig.write_text(re.sub(r"server: .*", f"server: https://127.0.0.1:{port}", text))
        kubeconfig.chmod(0o600)
        kc = ("kubectl", "--kubeconfig", str(kubeconfig))
        poll(lambda: ok(*kc, "get", "--raw", "/readyz"))
        sh(*kc, "wait", "--for=condition=Ready", "nodes", "--all", "--timeout=300s")
        poll(lambda: ok(*kc, "get", "serviceaccount", "default", "-n", "default"))
        mark("kubeconfig + readiness")
    finally:
        sh("docker", "rm", "-f", "-v", name)
        sh("docker", "volume", "rm", f"{name}-docker")
        mark("teardown")
    return times


def with_kipik(image: str, node_image: str) -> dict[str, float]:
    """The phases kipik reports in its progress lines (docker backend)."""
    return phase_times(
        KipikConfig(image=image, node_image=node_image, timeout=600, snapshots=False)
    )


def phase_times(config: KipikConfig) -> dict[str, float]:
    """One cluster made and removed with ``config``; the phase times kipik reports."""
    lines: list[str] = []
    with ClusterFactory(config, report=lines.append) as factory:
        factory.create()
    times: dict[str, float] = {}
    for line in lines:
        found = re.match(r"kipik \S+: (.+) \((\d+\.\d+)s\)$", line)
        if found:
            phase = re.sub(r"node image \S+ in", "node image in", found.group(1))
            times[phase] = float(found.group(2))
    return times


def bench_arguments(doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: the DinD image, the node image, the rounds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--image", default="kipik-test/dind:dev", help="the DinD image")
    parser.add_argument(
        "--node-image", default="kipik.local/kind-node:v1.22.3", help="the node image"
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    return parser


def main() -> int:
    parser = bench_arguments(__doc__)
    args = parser.parse_args()
    hand: list[dict[str, float]] = []
    kipik: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="kipik-bench-") as tmp:
        for round_ in range(1, args.rounds + 1):
            hand.append(by_hand(args.image, args.node_image, Path(tmp)))
            kipik.append(with_kipik(args.image, args.node_image))
            print(f"round {round_}: by hand {sum(hand[-1].values()):.1f}s, "
                  f"kipik {sum(kipik[-1].values()):.1f}s", file=sys.stderr)  # fmt: skip
    phases = list(hand[0])
    print(f"{'phase':<26}{'by hand':>10}{'kipik':>10}")
    for phase in phases:
        h = statistics.median(r[phase] for r in hand)
        k = statistics.median(r.get(phase, 0.0) for r in kipik)
        print(f"{phase:<26}{h:>9.2f}s{k:>9.2f}s")
    hand_total = statistics.median(sum(r.values()) for r in hand)
    kipik_total = statistics.median(sum(r.values()) for r in kipik)
    ready_hand = statistics.median(sum(v for p, v in r.items() if p != "teardown") for r in hand)
    ready_kipik = statistics.median(sum(v for p, v in r.items() if p != "teardown") for r in kipik)
    print(f"{'time to ready':<26}{ready_hand:>9.2f}s{ready_kipik:>9.2f}s")
    print(f"{'total with teardown':<26}{hand_total:>9.2f}s{kipik_total:>9.2f}s")
    print(f"overhead ratio (kipik / by hand, total): {kipik_total / hand_total:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
