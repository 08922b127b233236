"""`edge-qmul fleet certs` / `fleet node-key` (federated/certs.py): the files a TLS SuperLink with SuperNode
authentication needs. Checked with real TLS handshakes and with Flower's own key loaders; the deployment tests
(test_federated_deploy.py) run the SuperLink and SuperNodes on them."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from edge_qmul.federated.certs import make_certs, make_node_key

from edge_qmul.cli import main
from edge_qmul.errors import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _handshake(certs_dir: Path, server_hostname: str) -> None:
    """A TLS server on 127.0.0.1 with server.pem / server.key; a client that trusts only ca.pem connects,
    checking the certificate chain and that ``server_hostname`` is one of its SANs."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs_dir / "server.pem", certs_dir / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(certs_dir / "ca.pem"))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused the certificate

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                assert tls.recv(2) == b"ok"
        finally:
            thread.join(timeout=10)


def test_certs_give_a_verifiable_chain_with_the_requested_sans(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    made = make_certs(out, hosts=("127.0.0.1", "superlink.example.org", "::1"))
    assert {p.name for p in out.iterdir()} == {"ca.pem", "ca.key", "server.pem", "server.key"}
    assert _mode(made.ca_key) == _mode(made.server_key) == 0o600
    assert _mode(out) == 0o700
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    _handshake(out, "127.0.0.1")


def test_a_host_outside_the_certificate_fails_the_handshake(tmp_path: Path) -> None:
    make_certs(tmp_path / "certs", hosts=("127.0.0.1",))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tmp_path / "certs", "localhost")


def test_certs_refuse_to_overwrite_and_leave_the_old_files(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    (out / "server.key").write_text("the key in use")
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*server\.key"):
        make_certs(out)
    assert [p.name for p in out.iterdir()] == ["server.key"]  # nothing else written
    assert (out / "server.key").read_text() == "the key in use"


@pytest.mark.parametrize("hosts", [("bad host",), ("-leading.example",), ("",), ()], ids=repr)
def test_certs_refuse_bad_hosts_before_writing(tmp_path: Path, hosts: tuple[str, ...]) -> None:
    with pytest.raises(ConfigError, match="--host"):
        make_certs(tmp_path / "certs", hosts=hosts)
    assert not (tmp_path / "certs").exists()


def test_node_key_is_what_flower_supernode_auth_loads(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key  # what `flwr supernode register` runs

    pair = make_node_key(tmp_path / "keys" / "node0")
    assert _mode(pair.private) == 0o600 and pair.public.name == "node0.pub"
    private = load_ssh_private_key(pair.private.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = load_ssh_public_key(pair.public.read_bytes())
    assert public == private.public_key()
    assert try_load_public_key(pair.public)  # Flower's own check: an OpenSSH NIST-curve EC key
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        make_node_key(pair.private)
    assert load_ssh_private_key(pair.private.read_bytes(), password=None).public_key() == public


def test_cli_fleet_verbs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "certs"
    assert main(["fleet", "certs", "--out", str(out), "--host", "127.0.0.1", "--host", "localhost"]) == 0
    assert "127.0.0.1, localhost" in capsys.readouterr().out
    _handshake(out, "localhost")
    assert main(["fleet", "certs", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["fleet", "node-key", "--out", str(tmp_path / "node0")]) == 0
    assert "flwr supernode register" in capsys.readouterr().out
    assert main(["fleet", "certs", "--out", str(tmp_path / "x"), "--days", "0"]) == 2
    assert main(["fleet"]) == 2  # an action is required


def test_fleet_verbs_run_without_torch(tmp_path: Path) -> None:
    """A board makes its SuperNode key on a device install (no torch, no scikit-learn, no matplotlib)."""
    script = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'sklearn', 'matplotlib'):\n"
        "            raise ImportError(f'{name} is not installed on a device')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from edge_qmul.cli import main\n"
        "sys.exit(main(['fleet', 'node-key', '--out', sys.argv[1]]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "key")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
