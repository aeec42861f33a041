import ssl
import subprocess
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from pytest_kipik.errors import ClusterUnusableError
from pytest_kipik.k8s import readiness
from pytest_kipik.k8s.tls import subject_alt_names
from pytest_kipik.waiting import NotYet


def test_subject_alt_names_of_a_real_certificate(tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=kube-apiserver", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,DNS:kubernetes.default,IP:0.0.0.0,"
         "IP:10.96.0.1,IP:::1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert subject_alt_names(der) == [
        "localhost",
        "kubernetes.default",
        "0.0.0.0",
        "10.96.0.1",
        "::1",
    ]


def test_classify_fails_fast_only_on_what_waiting_cannot_fix() -> None:
    server = "https://127.0.0.1:1"  # nothing listens: the certificate cannot be read
    tls = readiness.classify(
        server, ApiException(status=0, reason="SSLError(CERTIFICATE_VERIFY_FAILED ...)")
    )
    assert isinstance(tls, ClusterUnusableError)
    assert str(tls).startswith(f"the nested API server's certificate does not verify for {server}")
    assert "names in the certificate: (could not be read)" in str(tls)
    forbidden = readiness.classify(server, ApiException(status=403, reason="Forbidden"))
    assert isinstance(forbidden, ClusterUnusableError)
    assert "refused kipik's credentials: HTTP 403" in str(forbidden)
    assert isinstance(readiness.classify(server, ApiException(status=503, reason="x")), NotYet)
    assert isinstance(readiness.classify(server, ConnectionRefusedError(111, "refused")), NotYet)


def test_guard_raises_the_permanent_error_itself() -> None:
    def refused() -> None:
        raise ApiException(status=401, reason="Unauthorized")

    with pytest.raises(ClusterUnusableError, match="HTTP 401"):
        readiness._guard("https://x:1", refused)()
