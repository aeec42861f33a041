"""The ``kipik`` command: nested clusters outside of pytest, with the plugin's settings.

``kipik up`` makes a kept cluster and prints ``export KUBECONFIG=...``; ``ls``, ``shell``,
``logs`` and ``down`` work on the clusters found on the backend by their ``kipik.io/`` labels;
``gc`` removes what expired or lost its owner; ``doctor`` checks the machine. Every setting of
:class:`~pytest_kipik.config.KipikConfig` is an option of every subcommand (``--image``,
``--backend``, ``--ttl``...), generated from the one declaration in ``config.py``, and falls back
to its ``KIPIK_*`` environment variable, then its default.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest_kipik
from pytest_kipik import labels as lbl
from pytest_kipik.config import SETTINGS, KipikConfig, Setting, resolve
from pytest_kipik.errors import ConfigError, KipikError, front_end, option
from pytest_kipik.factory import ClusterFactory
from pytest_kipik.hosts import engine
from pytest_kipik.hosts.base import Backend
from pytest_kipik.hosts.bundle import write_bundle
from pytest_kipik.hosts.choice import make_backend
from pytest_kipik.hosts.transfer import ensure_default_image
from pytest_kipik.k8s import kubeconfig
from pytest_kipik.kind.config import API_SERVER_PORT, node_images
from pytest_kipik.kind.driver import KindDriver
from pytest_kipik.ops import doctor, judges, reaper
from pytest_kipik.ops.inventory import (
    CommandFailed,
    FoundCluster,
    attached,
    describe_cluster,
    find_cluster,
    find_clusters,
    kubeconfig_of,
    remove_cluster,
    table,
)
from pytest_kipik.ops.logs import export_logs
from pytest_kipik.process import log_command
from pytest_kipik.progress import stderr_reporter

PROG = "kipik"
#: Exit codes: a check or removal failed; a usage or configuration error.
FAILED, USAGE = 1, 2


# -- options generated from the settings --------------------------------------------------------


def option_name(spec: Setting) -> str:
    """The ``kipik`` option of a setting: ``--node-image`` for ``node_image``."""
    with front_end(PROG):
        return option(spec.name)


def _dest(spec: Setting) -> str:
    return f"setting_{spec.name}"


def settings_parser() -> argparse.ArgumentParser:
    """A parent parser with one option per setting (no defaults: unset falls back to env)."""
    parent = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for group_name in dict.fromkeys(s.group for s in SETTINGS):
        title = "settings" if group_name == "kipik" else f"{group_name} backend settings"
        group = parent.add_argument_group(
            title, "each falls back to its KIPIK_* environment variable, then its default"
        )
        for spec in (s for s in SETTINGS if s.group == group_name):
            shown = spec.default or "see above"
            text = f"{spec.help} [env {spec.env}; default: {shown}]".replace("%", "%%")
            if spec.flag:
                group.add_argument(
                    option_name(spec),
                    action="store_const",
                    const="true",
                    default=None,
                    dest=_dest(spec),
                    help=text,
                )
            else:
                group.add_argument(
                    option_name(spec),
                    default=None,
                    metavar=spec.metavar,
                    dest=_dest(spec),
                    help=text,
                )
    return parent


def config_from(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    *,
    overrides: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> KipikConfig:
    """Resolve the settings: options > ``overrides`` > ``KIPIK_*`` environment > defaults."""
    given = {s.name: getattr(args, _dest(s), None) for s in SETTINGS}
    for name, value in (overrides or {}).items():
        given[name] = value
    where = cwd or Path.cwd()
    return resolve(given, {}, environ, cwd=where, ini_dir=where)


def build_parser() -> argparse.ArgumentParser:
    """The ``kipik`` parser: every subcommand with every setting and its own ``--help``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="pytest-kipik's nested Kubernetes clusters (kind in Docker-in-Docker) "
        "outside of pytest, with the plugin's settings.",
        allow_abbrev=False,
    )
    version = f"%(prog)s {pytest_kipik.__version__}"
    parser.add_argument("--version", action="version", version=version)
    common = [settings_parser()]
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name, help=summary, description=description, parents=common, allow_abbrev=False
        )

    up = add(
        "up",
        "create a kept cluster and print `export KUBECONFIG=...`",
        "Create a nested cluster that outlives this command (kept: the kipik.io/keep label, "
        "removed by `kipik down NAME`, or by `kipik gc` once its ttl is over). Progress goes to "
        "stderr; stdout gets only `export KUBECONFIG=<path>`, e.g. "
        '`eval "$(kipik up)"`. The kubeconfig lives in the per-user state directory (0600).',
    )
    up.add_argument("--name", help="cluster name (default: <name-prefix>-<random id>)")
    up.add_argument(
        "--nodes", type=int, help="1 control plane + NODES-1 workers (default: kind's: one)"
    )
    down = add(
        "down",
        "remove kept clusters",
        "Remove the DinD host (container and volumes, or pod) of each named cluster and its "
        "kubeconfig directory. Only resources with kipik.io/ labels are touched; a cluster of "
        "a running pytest session is refused unless --force.",
    )
    down.add_argument("names", nargs="+", metavar="NAME", help="cluster name (see `kipik ls`)")
    down.add_argument("--force", action="store_true", help="also a running session's cluster")
    ls = add(
        "ls",
        "list kipik clusters on the backend",
        "List the clusters kipik made on the backend (by their kipik.io/ labels): name, "
        "backend, status, kind (kept, reused, warm or session), created, expires and the "
        "kubeconfig, when this user has one.",
    )
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    gc = add(
        "gc",
        "remove kipik resources that are expired or whose owner is gone",
        "Remove the containers and volumes (or pods) pytest-kipik made that are past their "
        "expiry (kipik.io/expires-at, or the lease of kept, reused and warm hosts) or whose "
        "owner is gone (a dead pid on this machine, a deleted owner pod). Resources of live "
        "sessions and anything without kipik.io/ labels are never touched.",
    )
    gc.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing"
    )
    shell = add(
        "shell",
        "a shell (or CMD) with KUBECONFIG set to a cluster's kubeconfig",
        "Run $SHELL (or CMD after --) with KUBECONFIG set to the cluster's kubeconfig and "
        "KIPIK_CLUSTER to its name; exits with its exit code. On the pod backend outside the "
        "outer cluster a port-forward is held open while it runs (with a temporary kubeconfig "
        "pointing at it, removed afterwards).",
    )
    shell.add_argument("name", metavar="NAME", help="cluster name (see `kipik ls`)")
    shell.add_argument(
        "cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="command to run instead"
    )
    logs = add(
        "logs",
        "export a cluster's logs into a directory",
        "Write `kind export logs` of the cluster and the DinD's Docker daemon log "
        "(dind-daemon.log) to DIR/<cluster>/.",
    )
    logs.add_argument("name", metavar="NAME", help="cluster name (see `kipik ls`)")
    logs.add_argument("directory", metavar="DIR", type=Path, help="where the logs go")
    check = add(
        "doctor",
        "check that this machine can run nested clusters",
        "Check the engine, privileged containers, cgroups, /lib/modules, inotify limits, free "
        "disk and subnet overlaps (docker backend), or the outer API server, RBAC and subnets "
        "(pod backend). One line per check: ok / warn / fail, with the fix. Exit code 0 when "
        "no check failed, else 1.",
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of lines")
    bundle = add(
        "bundle",
        "write the DinD, node and extra images into one archive for air-gapped use",
        "Write OUT: the DinD image (--image, else the default one, built if needed), the node "
        "images (--node-image or your kind config's), the --load-images and each IMAGE, all "
        "from the local engine. Use it with --bundle=OUT (pytest: --kipik-bundle=OUT) and the "
        "same --node-image: nothing is pulled then.",
    )
    bundle.add_argument("out", metavar="OUT", type=Path, help="the archive to write (a .tar)")
    bundle.add_argument("images", nargs="*", metavar="IMAGE", help="another image to add")
    return parser


@contextlib.contextmanager
def _backend(config: KipikConfig) -> Iterator[Backend]:
    backend = make_backend(config, stderr_reporter)
    try:
        yield backend
    finally:
        backend.close()


def cmd_up(args: argparse.Namespace, config: KipikConfig) -> int:
    """Create a kept cluster; stdout: ``export KUBECONFIG=...``."""
    factory = ClusterFactory(config, report=stderr_reporter, keep_failures=False)
    name = args.name or lbl.cluster_name(config.name_prefix, factory.run_id, None, 1)
    try:
        cluster = factory.create(name, nodes=args.nodes)
    except BaseException:
        _undo_up(factory.backend, name, factory.run_id)
        factory.close()
        raise
    forwarded = factory.backend.forwards_api
    registry = cluster.registry if config.registry and not forwarded else None
    cluster.close()  # kept: only its client is closed
    factory.clusters.remove(cluster)
    factory.close()
    print(f"export KUBECONFIG={cluster.kubeconfig_path}", flush=True)
    lines = [
        f"kipik: cluster {name} is up (kept for {_duration(config.ttl)}; "
        "`kipik gc` removes it after that)",
        f"  a shell:   kipik shell {name}",
        f"  remove it: kipik down {name}",
    ]
    if registry is not None:
        lines.append(f"  registry:  push to {registry}; pods pull {registry.name_for('NAME:TAG')}")
    if forwarded:
        lines.append(
            "  its kubeconfig names a port-forward that ended with this command: use "
            f"`kipik shell {name}`, which holds one open"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)
    return 0


def _duration(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


def _undo_up(backend: Backend, name: str, run_id: str) -> None:
    """Remove what a failed ``up`` made (kept clusters are not undone by the factory).

    Only this run's resources: a name clash must never remove the cluster it clashed with.
    """
    try:
        found = find_clusters(backend).get(name)
        ours = [r for r in (found.resources if found else []) if r.labels.get(lbl.RUN_ID) == run_id]
        if ours:
            remove_cluster(backend, FoundCluster(name, ours))
            stderr_reporter(f"kipik {name}: removed after the failure")
    except Exception as exc:  # the error that got us here wins
        stderr_reporter(f"kipik {name}: could not remove it after the failure: {exc}")


def cmd_down(args: argparse.Namespace, config: KipikConfig) -> int:
    """Remove the named clusters."""
    with _backend(config) as backend:
        found = [find_cluster(backend, name) for name in args.names]  # all known, or nothing
        for cluster in found:
            verdict = reaper.judge(
                cluster.labels,
                lease=None,
                now=dt.datetime.now(dt.timezone.utc),
                host=reaper.this_host(),
                alive=reaper.pid_alive,
            )
            alive = verdict is not None and verdict.reason.startswith("its session is alive")
            if verdict is not None and alive and not lbl.leased(cluster.labels) and not args.force:
                raise CommandFailed(
                    f"{cluster.name} belongs to a running pytest session ({verdict.reason}); "
                    "it removes the cluster itself. Use --force to remove it anyway."
                )
        for cluster in found:
            for line in remove_cluster(backend, cluster):
                print(f"removed {line}", flush=True)
            print(f"kipik: cluster {cluster.name} removed", file=sys.stderr, flush=True)
    return 0


def cmd_ls(args: argparse.Namespace, config: KipikConfig) -> int:
    """List the clusters on the backend."""
    with _backend(config) as backend:
        clusters = find_clusters(backend)
        rows = [describe_cluster(backend, c) for _, c in sorted(clusters.items())]
        where = f"the {backend.name} backend ({backend.describe()})"
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        columns = ["name", "backend", "status", "kind", "created", "expires", "kubeconfig"]
        print(table(rows, columns))
    else:
        print(f"no kipik clusters on {where}", file=sys.stderr)
    return 0


def cmd_gc(args: argparse.Namespace, config: KipikConfig) -> int:
    """Remove expired and orphaned resources."""
    with _backend(config) as backend:
        problems = reaper.reap(backend, lambda line: print(line, flush=True), dry_run=args.dry_run)
    return FAILED if problems else 0


@contextlib.contextmanager
def _reachable_kubeconfig(backend: Backend, cluster: FoundCluster) -> Iterator[Path]:
    """The cluster's kubeconfig, or a temporary one through a port-forward held meanwhile."""
    path = kubeconfig_of(cluster.name)
    if not path.is_file():
        raise CommandFailed(
            f"no kubeconfig for {cluster.name} at {path}: only clusters made by `kipik up` or "
            "--kipik-keep/--kipik-reuse as this user have one"
        )
    host = attached(backend, cluster)
    if host is None:
        raise CommandFailed(f"the host of {cluster.name} is not running")
    directory = Path(tempfile.mkdtemp(prefix="kipik-shell-"))  # 0700
    try:
        raw = kubeconfig.parse(path.read_text(encoding="utf-8"))
        url = host.api_endpoint(API_SERVER_PORT).url  # a port-forward held meanwhile, maybe
        if kubeconfig.server_of(raw) == url:
            yield path
        else:
            yield kubeconfig.write_private(
                directory / "kubeconfig", kubeconfig.dump(kubeconfig.with_server(raw, url))
            )
    finally:
        host.detach()
        shutil.rmtree(directory, ignore_errors=True)


def shell_command(given: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The command ``kipik shell`` runs: CMD (after ``--``), else ``$SHELL``, else ``/bin/sh``."""
    argv = list(given)
    if argv[:1] == ["--"]:  # argparse keeps or drops it depending on the Python version
        argv = argv[1:]
    return argv or [environ.get("SHELL") or "/bin/sh"]


def cmd_shell(args: argparse.Namespace, config: KipikConfig) -> int:
    """Run ``$SHELL`` or CMD with KUBECONFIG set; its exit code."""
    argv = shell_command(args.cmd, os.environ)
    with _backend(config) as backend:
        cluster = find_cluster(backend, args.name)
        with _reachable_kubeconfig(backend, cluster) as path:
            env = {**os.environ, "KUBECONFIG": str(path), "KIPIK_CLUSTER": cluster.name}
            log_command(argv)
            # interactive: the shell gets this terminal (not process.run, which captures)
            try:
                done = subprocess.run(argv, env=env, check=False)
            except FileNotFoundError:
                raise CommandFailed(f"{argv[0]!r} was not found on PATH") from None
    return done.returncode


def cmd_logs(args: argparse.Namespace, config: KipikConfig) -> int:
    """Export the cluster's logs to DIR/<cluster>/."""
    with _backend(config) as backend:
        cluster = find_cluster(backend, args.name)
        host = attached(backend, cluster)
        if host is None:
            raise CommandFailed(f"the host of {cluster.name} is not running: no logs to export")
        inner = KindDriver(host).clusters()
        names = [cluster.name] if cluster.name in inner else inner  # a warm host's clusters
        if not names:
            raise CommandFailed(f"{cluster.name}'s host has no kind cluster (yet)")
        for name in names:
            written = export_logs(host, name, args.directory, config.timeout)
            print(written, flush=True)
    return 0


def cmd_doctor(args: argparse.Namespace, config: KipikConfig) -> int:
    """Run the preflight checks."""
    _backend_name, results = doctor.run_checks(config)
    print(judges.render(results, as_json=args.json), flush=True)
    return 0 if judges.passed(results) else FAILED


def cmd_bundle(args: argparse.Namespace, config: KipikConfig) -> int:
    """Write an air-gapped bundle of the session's images (see :mod:`pytest_kipik.hosts.bundle`)."""
    nodes = node_images(config.user_kind_config, config.node_image)
    if not nodes:
        raise CommandFailed(
            f"no node image to bundle: pass {option('node_image')} (kind's default node image "
            "comes from a registry, which a bundle is there to avoid)"
        )
    client = engine.connect()
    try:
        dind = config.image or ensure_default_image(client, stderr_reporter)
        wanted = [(dind, "dind"), *((n, "node") for n in nodes)]
        wanted += [(image, "extra") for image in (*config.load_images, *args.images)]
        entries = write_bundle(client, args.out, wanted, stderr_reporter)
    finally:
        client.close()
    size = args.out.stat().st_size / 1024**2
    stderr_reporter(
        f"kipik bundle: {args.out} ({len(entries)} images, {size:.0f} MiB); use it with "
        f"{option('bundle')}={args.out} and {option('node_image')}={nodes[0]}"
    )
    print(args.out, flush=True)
    return 0


COMMANDS = {
    "up": cmd_up,
    "down": cmd_down,
    "ls": cmd_ls,
    "gc": cmd_gc,
    "shell": cmd_shell,
    "logs": cmd_logs,
    "doctor": cmd_doctor,
    "bundle": cmd_bundle,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kipik``; the exit status (1: a command failed, 2: a usage or settings error)."""
    with front_end(PROG):  # errors name --image, not --kipik-image
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {"keep": "true"} if args.command == "up" else {}
    try:
        config = config_from(args, os.environ, overrides=overrides)
    except ConfigError as exc:
        parser.exit(USAGE, f"{PROG} {args.command}: {exc}\n")
    try:
        return COMMANDS[args.command](args, config)
    except ConfigError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return USAGE
    except KipikError as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return USAGE if args.command == "gc" else FAILED
    except KeyboardInterrupt:
        return 130
