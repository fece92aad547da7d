"""DICOM TLS: with [node] tls set, dcmtk's echoscu/storescu get in only over TLS, and with a
CA configured only with a certificate it signed."""

from __future__ import annotations

import subprocess

import pytest

from tests.node_process import NODE_AE, node_factory  # noqa: F401
from tests.peers import echoscu, skip_unless_tools, storescu, storescu_failures, write_tiny_ct

pytestmark = [pytest.mark.integration, skip_unless_tools("openssl", "echoscu", "storescu")]


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path):
    """A CA, a node certificate and two client certificates: one signed by the CA, one not."""
    folder = tmp_path / "pki"
    folder.mkdir()
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=folder)
    for name in ("node", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=folder)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.crt", cwd=folder)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=stranger",
            "-keyout", "stranger.key", "-out", "stranger.crt", cwd=folder)
    return folder


def tls_args(pki, who: str) -> list[str]:
    return ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.crt"), "+cf", str(pki / "ca.crt")]


def test_tls_with_client_certificates(node_factory, pki, tmp_path):
    node = node_factory(node_extra=f'tls = {{ cert_file = "{pki / "node.crt"}", key_file = "{pki / "node.key"}", '
                                   f'ca_file = "{pki / "ca.crt"}" }}')
    assert echoscu("127.0.0.1", node.port, NODE_AE, extra_args=tls_args(pki, "client")).returncode == 0
    # plain TCP is not spoken on a TLS port
    assert echoscu("127.0.0.1", node.port, NODE_AE, timeout=20).returncode != 0
    # a certificate the CA did not sign is refused
    assert echoscu("127.0.0.1", node.port, NODE_AE, extra_args=tls_args(pki, "stranger"),
                   timeout=20).returncode != 0
    write_tiny_ct(tmp_path / "one.dcm")
    result = storescu("127.0.0.1", node.port, [tmp_path / "one.dcm"], NODE_AE,
                      extra_args=tls_args(pki, "client"))
    assert not storescu_failures(result) and "Success" in result.stdout + result.stderr
