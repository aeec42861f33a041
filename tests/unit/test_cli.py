"""The ``kipik`` command's parsing: options generated from SETTINGS, env fallback, subcommands."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_kipik import cli
from pytest_kipik.config import SETTINGS, KipikConfig
from pytest_kipik.errors import ConfigError, front_end, option
from pytest_kipik.hosts.base import Owned
from pytest_kipik.kind import config as kind
from pytest_kipik.ops import inventory


def _config(argv: list[str], environ: dict[str, str], tmp_path: Path) -> KipikConfig:
    args = cli.build_parser().parse_args(argv)
    return cli.config_from(args, environ, cwd=tmp_path)


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_subcommand_has_help_with_every_setting(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: kipik {command} ")
    for spec in SETTINGS:
        assert cli.option_name(spec) in out, spec.name
        assert spec.env in out, spec.name  # the help names the environment fallback
    assert {cli.option_name(s) for s in SETTINGS} >= {"--backend", "--node-image", "--ttl"}


def test_a_setting_as_option_and_as_environment_variable(tmp_path: Path) -> None:
    from_flag = _config(["ls", "--timeout", "5m", "--node-image", "n:1"], {}, tmp_path)
    assert (from_flag.timeout, from_flag.node_image) == (300.0, "n:1")
    assert (from_flag.sources["timeout"], from_flag.sources["node_image"]) == ("cli", "cli")

    environ = {"KIPIK_TIMEOUT": "2m", "KIPIK_NODE_IMAGE": "n:2"}
    from_env = _config(["ls"], environ, tmp_path)
    assert (from_env.timeout, from_env.node_image) == (120.0, "n:2")
    assert (from_env.sources["timeout"], from_env.sources["node_image"]) == ("env", "env")

    both = _config(["ls", "--timeout=1m"], environ, tmp_path)  # the option wins
    assert (both.timeout, both.sources["timeout"], both.node_image) == (60.0, "cli", "n:2")

    default = _config(["ls"], {}, tmp_path)
    assert (default.timeout, default.sources["timeout"]) == (300.0, "default")


def test_flag_settings_take_no_value(tmp_path: Path) -> None:
    assert _config(["ls", "--warm"], {}, tmp_path).warm is True
    assert _config(["ls"], {"KIPIK_WARM": "yes"}, tmp_path).warm is True
    assert _config(["ls"], {}, tmp_path).warm is False


def test_up_always_keeps_and_takes_name_and_nodes(tmp_path: Path) -> None:
    args = cli.build_parser().parse_args(["up", "--name", "demo", "--nodes", "2"])
    assert (args.command, args.name, args.nodes) == ("up", "demo", 2)
    config = cli.config_from(args, {"KIPIK_KEEP": "false"}, overrides={"keep": "true"})
    assert config.keep is True


def test_bad_values_are_config_errors_naming_the_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"invalid backend from command-line option"):
        _config(["ls", "--backend", "podman"], {}, tmp_path)
    with pytest.raises(ConfigError, match=r"invalid ttl from environment variable KIPIK_TTL"):
        _config(["ls"], {"KIPIK_TTL": "soon"}, tmp_path)


def test_main_exits_2_on_a_bad_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["ls", "--backend", "podman"])
    assert exited.value.code == cli.USAGE
    err = capsys.readouterr().err
    assert "kipik ls: invalid backend from command-line option --backend: 'podman'" in err
    assert "--kipik-" not in err  # kipik's users type --backend


def test_errors_below_the_front_ends_spell_options_as_each_front_ends_users_type_them() -> None:
    assert option("node_image") == "--kipik-node-image"  # pytest, the default
    with front_end("kipik"):
        assert option("node_image") == "--node-image"
        with pytest.raises(ConfigError, match=r"\(--pod-subnet / --service-subnet, or"):
            kind.check_no_overlap({"pod subnet": "10.0.0.0/8"}, {"eth0": "10.1.2.3"})
    assert option("node_image") == "--kipik-node-image"  # restored on the way out


def test_no_abbreviations_so_name_is_not_name_prefix() -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["ls", "--name", "x"])  # ls has no --name
    args = cli.build_parser().parse_args(["up", "--name", "x"])
    assert (args.name, args.setting_name_prefix) == ("x", None)


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        (["shell", "c1"], {"SHELL": "/bin/zsh"}, ["/bin/zsh"]),
        (["shell", "c1"], {}, ["/bin/sh"]),
        (["shell", "c1", "--", "sh", "-c", "echo $X"], {}, ["sh", "-c", "echo $X"]),
        (["shell", "c1", "--", "kubectl", "--namespace", "x"], {}, ["kubectl", "--namespace", "x"]),
    ],
)  # fmt: skip
def test_shell_runs_the_command_after_dashes_else_the_shell(
    argv: list[str], environ: dict[str, str], expected: list[str]
) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.name == "c1"
    assert cli.shell_command(args.cmd, environ) == expected


def test_logs_and_down_arguments() -> None:
    logs = cli.build_parser().parse_args(["logs", "c1", "out/dir"])
    assert (logs.name, logs.directory) == ("c1", Path("out/dir"))
    down = cli.build_parser().parse_args(["down", "a", "b", "--force"])
    assert (down.names, down.force) == (["a", "b"], True)


def test_found_cluster_kind_and_host() -> None:
    run = {"kipik.io/run-id": "r1", "kipik.io/cluster": "c"}
    volume = Owned("volume", "v1", {**run})
    dind = Owned("container", "c-dind", {**run, "kipik.io/keep": "true"})
    kept = inventory.FoundCluster("c", [volume, dind])
    assert (kept.kind, kept.host) == ("kept", dind)
    warm = inventory.FoundCluster(
        "w", [Owned("container", "w", {**run, "kipik.io/warm-slot": "0"})]
    )
    assert warm.kind == "warm"
    reuse_key = {**run, "kipik.io/reuse-key": "abc"}
    reused = inventory.FoundCluster("r", [Owned("pod", "r", reuse_key)])
    assert reused.kind == "reused"
    assert inventory.FoundCluster("s", [Owned("container", "s", run)]).kind == "session"
    assert inventory.FoundCluster("v", [volume]).host is None


def test_table_pads_columns_and_shows_missing_values_as_dashes() -> None:
    rows: list[dict[str, str | None]] = [
        {"name": "a", "status": "running"},
        {"name": "longer", "status": None},
    ]
    assert inventory.table(rows, ["name", "status"]) == (
        "NAME    STATUS\na       running\nlonger  -"
    )


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"kipik {version('pytest-kipik')}"
