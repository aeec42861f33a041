import stat
from pathlib import Path

import pytest
import yaml

from pytest_kipik.errors import KipikError
from pytest_kipik.k8s import kubeconfig

REFERENCE = Path(__file__).parents[1] / "reference"  # recordings of real kind v0.32.0
KIND_KUBECONFIG = """\
apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0E=
    server: https://0.0.0.0:16443
  name: kind-demo
contexts:
- context:
    cluster: kind-demo
    user: kind-demo
  name: kind-demo
current-context: kind-demo
kind: Config
preferences: {}
users:
- name: kind-demo
  user:
    client-certificate-data: Q0VSVA==
    client-key-data: S0VZ
"""


def test_server_is_rewritten_and_nothing_else() -> None:
    parsed = kubeconfig.parse(KIND_KUBECONFIG)
    assert kubeconfig.server_of(parsed) == "https://0.0.0.0:16443"
    rewritten = kubeconfig.with_server(parsed, "https://127.0.0.1:40123")
    assert kubeconfig.server_of(rewritten) == "https://127.0.0.1:40123"
    assert kubeconfig.server_of(parsed) == "https://0.0.0.0:16443"  # input untouched
    expected = yaml.safe_load(KIND_KUBECONFIG)
    expected["clusters"][0]["cluster"]["server"] = "https://127.0.0.1:40123"
    assert yaml.safe_load(kubeconfig.dump(rewritten)) == expected


def test_parses_what_real_kind_printed() -> None:
    parsed = kubeconfig.parse((REFERENCE / "kubeconfig-external.yaml").read_text())
    assert kubeconfig.server_of(parsed) == "https://0.0.0.0:16443"


@pytest.mark.parametrize("text", ["a: [", "kind: Config\nclusters: []\n", "- 1\n"])
def test_parse_rejects_non_kubeconfigs(text: str) -> None:
    with pytest.raises(KipikError, match="kubeconfig"):
        kubeconfig.parse(text)


def test_write_private_is_0600_in_a_0700_directory_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "private" / "kubeconfig"
    kubeconfig.write_private(path, "first")
    kubeconfig.write_private(path, "second")
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["kubeconfig"]


def test_api_client_uses_only_its_own_kubeconfig(tmp_path: Path) -> None:
    from kubernetes import client as k8s_client

    path = kubeconfig.write_private(
        tmp_path / "k" / "kubeconfig",
        kubeconfig.dump(
            kubeconfig.with_server(kubeconfig.parse(KIND_KUBECONFIG), "https://127.0.0.1:1")
        ),
    )
    before = k8s_client.Configuration.get_default_copy().host
    api = kubeconfig.api_client(path)
    try:
        assert api.configuration.host == "https://127.0.0.1:1"
        assert k8s_client.Configuration.get_default_copy().host == before
        # the client's certificate files live beside the kubeconfig, not in /tmp at large
        assert Path(api.configuration.cert_file).parent == path.parent
    finally:
        api.close()
