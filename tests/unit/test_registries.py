"""Registry settings: parsing, and the exact files, arguments and kind config they make."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from pytest_kipik.config import resolve
from pytest_kipik.errors import ConfigError
from pytest_kipik.hosts.base import Endpoint
from pytest_kipik.hosts.registry import ClusterRegistry
from pytest_kipik.k8s.manifests import local_registry_hosting
from pytest_kipik.kind import config as kind
from pytest_kipik.kind.registries import (
    CONTAINERD_PATCH,
    Mirror,
    Registries,
    hosts_toml,
    load,
    parse_auths,
    parse_ca,
    parse_mirror,
)

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
SECRET = "s3cr3t-pa55"
AUTH = base64.b64encode(f"kipik:{SECRET}".encode()).decode()


def _config_json(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    return path


def test_a_mirror_is_of_docker_hub_unless_a_registry_is_named() -> None:
    assert parse_mirror("https://m.example:5000/") == Mirror("docker.io", "https://m.example:5000")
    assert parse_mirror("ghcr.io=http://10.0.0.5:5000") == Mirror("ghcr.io", "http://10.0.0.5:5000")
    assert parse_mirror("index.docker.io=https://m") == Mirror("docker.io", "https://m")
    assert parse_mirror("https://m/v2/hub").url == "https://m/v2/hub"


@pytest.mark.parametrize("bad", ["m.example:5000", "ftp://m", "https://", "a/b=https://m"])
def test_a_mirror_without_an_http_url_or_with_a_bad_registry_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"mirror|registry host"):
        parse_mirror(bad)


def test_a_ca_names_its_host_and_file() -> None:
    assert parse_ca("m.example:5000=/ca.pem") == ("m.example:5000", "/ca.pem")
    with pytest.raises(ValueError, match="HOST\\[:PORT\\]=PATH"):
        parse_ca("/ca.pem")


def test_credentials_come_from_auths_by_registry_in_either_form() -> None:
    found = parse_auths(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": AUTH},
                    "m.example:5000": {"username": "kipik", "password": SECRET},
                }
            }
        ).encode(),
        "config.json",
    )
    assert found == {"docker.io": {"auth": AUTH}, "m.example:5000": {"auth": AUTH}}


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ({"credsStore": "desktop"}, "credential helper"),
        ({"auths": {}}, "no credentials"),
        ({"auths": {"m": {"auth": base64.b64encode(SECRET.encode()).decode()}}}, "USER:PASSWORD"),
        ({"auths": {"m": {"email": "a@b"}}}, "neither auth nor username"),
    ],
)
def test_unusable_credentials_are_refused_without_showing_a_secret(
    document: object, problem: str
) -> None:
    with pytest.raises(ConfigError, match=problem) as raised:
        parse_auths(json.dumps(document).encode(), "config.json")
    assert SECRET not in str(raised.value)


def test_a_mirrors_credentials_also_serve_the_registry_it_mirrors() -> None:
    registries = Registries(
        mirrors=(Mirror("docker.io", "https://m:5000"),),
        auths={"m:5000": {"auth": AUTH}},
    )
    assert registries.credentials() == {"m:5000": {"auth": AUTH}, "docker.io": {"auth": AUTH}}
    daemon = json.loads(registries.daemon_files()["/root/.docker/config.json"])
    assert daemon == {
        "auths": {"https://index.docker.io/v1/": {"auth": AUTH}, "m:5000": {"auth": AUTH}}
    }
    assert SECRET not in repr(registries)
    assert AUTH not in repr(registries)


def test_the_inner_daemon_mirrors_only_docker_hub_and_trusts_plain_http_ones() -> None:
    registries = Registries(
        mirrors=(
            Mirror("docker.io", "http://m:5000"),
            Mirror("docker.io", "https://n"),
            Mirror("ghcr.io", "https://g"),
        )
    )
    assert registries.dockerd_args() == [
        "--registry-mirror=http://m:5000",
        "--registry-mirror=https://n",
        "--insecure-registry=m:5000",
    ]


def test_each_registry_gets_a_hosts_toml_with_its_mirrors_and_cas() -> None:
    registries = Registries(
        mirrors=(Mirror("docker.io", "https://m:5000"),),
        cas={"m:5000": PEM, "private:443": PEM},
        auths={"m:5000": {"auth": AUTH}},
        local="registry:2",
    )
    files = registries.node_files()
    assert sorted(files) == [
        "/kipik/.registries/certs.d/docker.io/hosts.toml",
        "/kipik/.registries/certs.d/docker.io/m:5000.crt",
        "/kipik/.registries/certs.d/localhost:5001/hosts.toml",
        "/kipik/.registries/certs.d/private:443/hosts.toml",
        "/kipik/.registries/certs.d/private:443/private:443.crt",
        "/kipik/.registries/kubelet-config.json",
    ]
    assert files["/kipik/.registries/certs.d/docker.io/hosts.toml"].decode() == (
        'server = "https://registry-1.docker.io"\n'
        "\n"
        '[host."https://m:5000"]\n'
        '  capabilities = ["pull", "resolve"]\n'
        '  ca = "/etc/containerd/certs.d/docker.io/m:5000.crt"\n'
    )
    assert files["/kipik/.registries/certs.d/localhost:5001/hosts.toml"].decode() == (
        'server = "https://localhost:5001"\n'
        "\n"
        '[host."http://kind-registry:5000"]\n'
        '  capabilities = ["pull", "resolve", "push"]\n'
    )
    assert files["/kipik/.registries/certs.d/private:443/private:443.crt"] == PEM
    kubelet = json.loads(files["/kipik/.registries/kubelet-config.json"])
    assert kubelet["auths"]["https://index.docker.io/v1/"] == {"auth": AUTH}
    assert registries.daemon_files()["/etc/docker/certs.d/m:5000/ca.crt"] == PEM


def test_a_toml_string_is_escaped() -> None:
    assert 'server = "https://a\\"b"' in hosts_toml('a"b', [])


def test_every_node_mounts_the_files_and_containerd_reads_hosts_toml() -> None:
    registries = Registries(
        mirrors=(Mirror("docker.io", "https://m"),), auths={"m": {"auth": AUTH}}
    )
    user = kind.validate_user_config(
        "kind: Cluster\napiVersion: kind.x-k8s.io/v1alpha4\nnodes:\n- role: control-plane\n"
        "  extraMounts: [{hostPath: /a, containerPath: /b}]\n- role: worker\n"
        "containerdConfigPatches: ['# mine']\n"
    )
    built = kind.build_config(user, name="c", cert_sans=[], registries=registries)
    ours = [
        {"hostPath": "/kipik/.registries/certs.d", "containerPath": "/etc/containerd/certs.d",
         "readOnly": True},
        {"hostPath": "/kipik/.registries/kubelet-config.json",
         "containerPath": "/var/lib/kubelet/config.json", "readOnly": True},
    ]  # fmt: skip
    assert built["nodes"][0]["extraMounts"] == [{"hostPath": "/a", "containerPath": "/b"}, *ours]
    assert built["nodes"][1]["extraMounts"] == ours
    assert built["containerdConfigPatches"] == ["# mine", CONTAINERD_PATCH]
    assert AUTH not in kind.dump_config(built)
    assert user["nodes"][1] == {"role": "worker"}  # the user's config is not modified


def test_credentials_alone_mount_only_the_kubelets_file_and_nothing_without_settings() -> None:
    only_auth = kind.build_config(
        None, name="c", cert_sans=[], registries=Registries(auths={"r": {"auth": AUTH}})
    )
    assert [m["containerPath"] for m in only_auth["nodes"][0]["extraMounts"]] == [
        "/var/lib/kubelet/config.json"
    ]
    assert "containerdConfigPatches" not in only_auth
    assert "nodes" not in kind.build_config(None, name="c", cert_sans=[], registries=Registries())


def test_load_reads_the_files_and_names_a_bad_one(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(PEM)
    auth = _config_json(tmp_path, {"auths": {"m": {"auth": AUTH}}})
    loaded = load(("docker.io=https://m",), (f"m={ca}",), auth, "registry:2")
    assert loaded.cas == {"m": PEM}
    assert loaded.auths == {"m": {"auth": AUTH}}
    assert loaded.local == "registry:2"
    assert loaded.configured
    ca.write_text("not a certificate")
    with pytest.raises(ConfigError, match=f"the CA of m \\({ca}\\) holds no PEM"):
        load((), (f"m={ca}",), None, None)


def test_settings_check_the_files_before_anything_starts(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("nope")
    with pytest.raises(ConfigError, match="invalid registry_ca from environment variable"):
        resolve({}, {}, {"KIPIK_REGISTRY_CA": f"m={ca}"}, cwd=tmp_path, ini_dir=tmp_path)
    auth = _config_json(tmp_path, {"credsStore": "osxkeychain"})
    with pytest.raises(ConfigError, match=r"invalid registry_auth from command-line.*helper"):
        resolve({"registry_auth": str(auth)}, {}, {}, cwd=tmp_path, ini_dir=tmp_path)
    with pytest.raises(ConfigError, match="invalid registry_mirror from ini key"):
        resolve({}, {"registry_mirror": "m:5000"}, {}, cwd=tmp_path, ini_dir=tmp_path)
    ca.write_bytes(PEM)
    config = resolve(
        {"registry_mirror": "https://m:5000, ghcr.io=https://g"},
        {"registry_ca": "m:5000=ca.pem"},
        {},
        cwd=Path("/"),
        ini_dir=tmp_path,
    )
    assert config.registry_mirror == ("docker.io=https://m:5000", "ghcr.io=https://g")
    assert config.registry_ca == (f"m:5000={ca}",)  # relative to the ini file
    assert config.registries.cas == {"m:5000": PEM}


def test_the_registry_inside_names_images_without_their_registry() -> None:
    registry = ClusterRegistry("127.0.0.1:49000")
    assert registry.name_for("app") == "localhost:5001/app:latest"
    assert registry.name_for("example.com:5000/team/app:v1") == "localhost:5001/team/app:v1"
    assert registry.name_for("team/app:v1") == "localhost:5001/team/app:v1"
    assert str(registry) == "127.0.0.1:49000"


def test_the_cluster_announces_its_registry_as_kep_1755_says() -> None:
    found = local_registry_hosting("127.0.0.1:49000", "localhost:5001")
    assert found["metadata"] == {"name": "local-registry-hosting", "namespace": "kube-public"}
    assert found["data"]["localRegistryHosting.v1"] == (
        "host: 127.0.0.1:49000\nhostFromContainerRuntime: localhost:5001\n"
    )


def test_an_endpoint_is_one_address_for_urls_and_registries() -> None:
    assert Endpoint("127.0.0.1", 5001).address == "127.0.0.1:5001"
    assert Endpoint("fd00::5", 5001).address == "[fd00::5]:5001"
    assert Endpoint("fd00::5", 6443).url == "https://[fd00::5]:6443"
