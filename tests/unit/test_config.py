import dataclasses
from pathlib import Path

import pytest

from pytest_kipik.config import SETTINGS, KipikConfig, parse_bool, parse_duration, resolve
from pytest_kipik.errors import ConfigError

GOOD_KIND = "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\n"


def test_every_setting_has_cli_ini_and_env_names() -> None:
    names = {s.name: (s.cli, s.ini, s.env) for s in SETTINGS}
    assert names == {
        "backend": ("--kipik-backend", "kipik_backend", "KIPIK_BACKEND"),
        "image": ("--kipik-image", "kipik_image", "KIPIK_IMAGE"),
        "node_image": ("--kipik-node-image", "kipik_node_image", "KIPIK_NODE_IMAGE"),
        "kind_config": ("--kipik-kind-config", "kipik_kind_config", "KIPIK_KIND_CONFIG"),
        "timeout": ("--kipik-timeout", "kipik_timeout", "KIPIK_TIMEOUT"),
        "keep": ("--kipik-keep", "kipik_keep", "KIPIK_KEEP"),
        "name_prefix": ("--kipik-name-prefix", "kipik_name_prefix", "KIPIK_NAME_PREFIX"),
        "pod_subnet": ("--kipik-pod-subnet", "kipik_pod_subnet", "KIPIK_POD_SUBNET"),
        "service_subnet": (
            "--kipik-service-subnet", "kipik_service_subnet", "KIPIK_SERVICE_SUBNET"
        ),
        "reuse": ("--kipik-reuse", "kipik_reuse", "KIPIK_REUSE"),
        "warm": ("--kipik-warm", "kipik_warm", "KIPIK_WARM"),
        "snapshots": ("--kipik-snapshots", "kipik_snapshots", "KIPIK_SNAPSHOTS"),
        "ttl": ("--kipik-ttl", "kipik_ttl", "KIPIK_TTL"),
        "load_images": ("--kipik-load-images", "kipik_load_images", "KIPIK_LOAD_IMAGES"),
        "logs_dir": ("--kipik-logs-dir", "kipik_logs_dir", "KIPIK_LOGS_DIR"),
        "bundle": ("--kipik-bundle", "kipik_bundle", "KIPIK_BUNDLE"),
        "registry_mirror": (
            "--kipik-registry-mirror", "kipik_registry_mirror", "KIPIK_REGISTRY_MIRROR"
        ),
        "registry_ca": ("--kipik-registry-ca", "kipik_registry_ca", "KIPIK_REGISTRY_CA"),
        "registry_auth": ("--kipik-registry-auth", "kipik_registry_auth", "KIPIK_REGISTRY_AUTH"),
        "registry": ("--kipik-registry", "kipik_registry", "KIPIK_REGISTRY"),
        "outer_kubeconfig": (
            "--kipik-outer-kubeconfig", "kipik_outer_kubeconfig", "KIPIK_OUTER_KUBECONFIG"
        ),
        "outer_context": ("--kipik-outer-context", "kipik_outer_context", "KIPIK_OUTER_CONTEXT"),
        "namespace": ("--kipik-namespace", "kipik_namespace", "KIPIK_NAMESPACE"),
        "pod_template": ("--kipik-pod-template", "kipik_pod_template", "KIPIK_POD_TEMPLATE"),
        "service_account": (
            "--kipik-service-account", "kipik_service_account", "KIPIK_SERVICE_ACCOUNT"
        ),
        "docker_storage": (
            "--kipik-docker-storage", "kipik_docker_storage", "KIPIK_DOCKER_STORAGE"
        ),
    }  # fmt: skip
    assert {s.name for s in SETTINGS} == {f.name for f in dataclasses.fields(KipikConfig)} - {
        "sources"
    }


def test_defaults(tmp_path: Path) -> None:
    config = resolve({}, {}, {}, cwd=tmp_path, ini_dir=tmp_path)
    assert config == KipikConfig(
        backend="auto",
        image=None,
        node_image=None,
        kind_config=None,
        timeout=300.0,
        keep=False,
        name_prefix="kipik",
        pod_subnet="100.96.0.0/16",
        service_subnet="100.97.0.0/16",
        reuse=False,
        warm=False,
        ttl=14400.0,
    )
    assert config == KipikConfig()  # the declared defaults are the resolved ones
    assert set(config.sources.values()) == {"default"}


def test_cli_beats_env_beats_ini_beats_default(tmp_path: Path) -> None:
    config = resolve(
        {"image": "from-cli", "timeout": None},
        {"image": "from-ini", "timeout": "10", "node_image": "node-ini", "name_prefix": "ini"},
        {"KIPIK_IMAGE": "from-env", "KIPIK_TIMEOUT": "2m", "KIPIK_NAME_PREFIX": "env"},
        cwd=tmp_path,
        ini_dir=tmp_path,
    )
    assert (config.image, config.timeout, config.node_image, config.name_prefix) == (
        "from-cli",
        120.0,
        "node-ini",
        "env",
    )
    assert config.sources == {
        "backend": "default",
        "image": "cli",
        "node_image": "ini",
        "kind_config": "default",
        "timeout": "env",
        "keep": "default",
        "name_prefix": "env",
        **{s.name: "default" for s in SETTINGS[7:]},
    }


def test_describe_shows_value_and_source(tmp_path: Path) -> None:
    config = resolve({"keep": "true"}, {}, {"KIPIK_TIMEOUT": "90"}, cwd=tmp_path, ini_dir=tmp_path)
    assert config.describe() == [
        "backend=auto (default)",
        "image=- (default)",
        "node_image=- (default)",
        "kind_config=- (default)",
        "timeout=90s (env)",
        "keep=True (cli)",
        "name_prefix=kipik (default)",
        "pod_subnet=100.96.0.0/16 (default)",
        "service_subnet=100.97.0.0/16 (default)",
        "reuse=False (default)",
        "warm=False (default)",
        "snapshots=True (default)",
        "ttl=14400s (default)",
        "load_images=- (default)",
        "logs_dir=- (default)",
        "bundle=- (default)",
        "registry_mirror=- (default)",
        "registry_ca=- (default)",
        "registry_auth=- (default)",
        "registry=- (default)",
    ]
    assert config.describe("pod") == [
        "outer_kubeconfig=- (default)",
        "outer_context=- (default)",
        "namespace=- (default)",
        "pod_template=- (default)",
        "service_account=- (default)",
        "docker_storage=- (default)",
    ]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("300", 300.0),
        ("45s", 45.0),
        ("5m", 300.0),
        ("1.5h", 5400.0),
        (" 2m ", 120.0),
        ("2d", 172800.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5", "5w", "0", "1m30s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration|longer than zero"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "value"), [("1", True), ("Yes", True), ("off", False), ("", False)]
)
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        (
            {"backend": "podman"},
            "invalid backend from command-line option --kipik-backend: 'podman' is not a "
            "backend: use one of auto, docker, pod",
        ),
        (
            {"pod_subnet": "10.0.0.0/33"},
            "invalid pod_subnet from command-line option --kipik-pod-subnet: '10.0.0.0/33' is "
            "not a subnet in CIDR form",
        ),
        (
            {"namespace": "Not_A_Namespace"},
            "invalid namespace from command-line option --kipik-namespace: 'Not_A_Namespace' is "
            "not a valid namespace name",
        ),
        (
            {"docker_storage": "lots"},
            "invalid docker_storage from command-line option --kipik-docker-storage: 'lots' is "
            "not a Kubernetes quantity",
        ),
        (
            {"outer_kubeconfig": "/nonexistent/kubeconfig"},
            "invalid outer_kubeconfig from command-line option --kipik-outer-kubeconfig: "
            "'/nonexistent/kubeconfig' is not a file",
        ),
        (
            {"keep": "maybe"},
            "invalid keep from command-line option --kipik-keep: 'maybe' is not a yes/no value",
        ),
        (
            {"name_prefix": "Bad_Prefix"},
            "invalid name_prefix from command-line option --kipik-name-prefix: 'Bad_Prefix' is "
            "not a valid name prefix",
        ),
        ({"timeout": "0"}, "invalid timeout from command-line option --kipik-timeout: '0' must"),
    ],
)
def test_invalid_values_name_setting_source_value_and_choices(
    tmp_path: Path, cli: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        resolve(cli, {}, {}, cwd=tmp_path, ini_dir=tmp_path)
    assert str(info.value).startswith(message)


def test_env_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="from environment variable KIPIK_TIMEOUT: 'soon'"):
        resolve({}, {}, {"KIPIK_TIMEOUT": "soon"}, cwd=tmp_path, ini_dir=tmp_path)


def test_kind_config_paths_resolve_against_their_source(tmp_path: Path) -> None:
    (tmp_path / "ini").mkdir()
    (tmp_path / "ini" / "kind.yaml").write_text(GOOD_KIND)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "kind.yaml").write_text(GOOD_KIND)
    from_ini = resolve(
        {}, {"kind_config": "kind.yaml"}, {}, cwd=tmp_path / "cwd", ini_dir=tmp_path / "ini"
    )
    assert from_ini.kind_config == tmp_path / "ini" / "kind.yaml"
    from_env = resolve(
        {},
        {},
        {"KIPIK_KIND_CONFIG": "kind.yaml"},
        cwd=tmp_path / "cwd",
        ini_dir=tmp_path / "ini",
    )
    assert from_env.kind_config == tmp_path / "cwd" / "kind.yaml"


def test_missing_kind_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        resolve({"kind_config": "nope.yaml"}, {}, {}, cwd=tmp_path, ini_dir=tmp_path)
    assert str(info.value) == (
        "invalid kind_config from command-line option --kipik-kind-config: cannot read kind "
        f"config file {tmp_path / 'nope.yaml'}: No such file or directory"
    )


def test_load_images_are_names_or_the_paths_of_existing_archives(tmp_path: Path) -> None:
    (tmp_path / "app.tar").write_bytes(b"")
    config = resolve(
        {"load_images": " busybox:1.36, app.tar ,,localhost:5000/x:1 , missing.tar"},
        {},
        {},
        cwd=tmp_path,
        ini_dir=tmp_path,
    )
    assert config.load_images == (
        "busybox:1.36",
        str(tmp_path / "app.tar"),
        "localhost:5000/x:1",
        "missing.tar",
    )
    assert resolve({}, {}, {}, cwd=tmp_path, ini_dir=tmp_path).load_images == ()


def test_logs_dir_must_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        resolve({"logs_dir": "f"}, {}, {}, cwd=tmp_path, ini_dir=tmp_path)
    config = resolve({}, {}, {"KIPIK_LOGS_DIR": "logs"}, cwd=tmp_path, ini_dir=tmp_path)
    assert config.logs_dir == tmp_path / "logs"


def test_a_bundle_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid bundle from command-line option"):
        resolve({"bundle": "missing.tar"}, {}, {}, cwd=tmp_path, ini_dir=tmp_path)
