"""TLS material for a Flower fleet: a CA, the SuperLink's server certificate, and SuperNode key pairs.

``edge-qmul fleet certs --out DIR --host 192.0.2.10`` writes, with ``cryptography``:

- ``ca.pem``: the fleet CA's self-signed certificate. Every SuperNode (``--root-certificates``) and every
  ``flwr`` CLI connection (``root-certificates`` in ``$FLWR_HOME/config.toml``) gets a copy.
- ``ca.key``: the CA's private key (mode 0600). Only needed to issue the next server certificate; keep it
  offline.
- ``server.pem`` / ``server.key`` (0600): the SuperLink's certificate, signed by the CA, with a subject
  alternative name for each ``--host`` (IP addresses as IP SANs, names as DNS SANs). A SuperNode checks
  that the address in its ``--superlink HOST:PORT`` is one of them.

``edge-qmul fleet node-key --out PATH`` writes a SuperNode's authentication key pair (Flower 1.41
SuperNode authentication): ``PATH``, an EC P-384 private key in OpenSSH format (0600) for
``flower-supernode --auth-supernode-private-key``, and ``PATH.pub``, its OpenSSH public key for
``flwr supernode register PATH.pub <connection>`` on the server side. Flower accepts only NIST EC curves.

Nothing is overwritten: if any target file exists, nothing is written and the error names it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_qmul.errors import ConfigError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.pem", "ca.key", "server.pem", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_DAYS = 3650
# RFC 1123 host names (letters, digits, hyphens; dot-separated labels of at most 63 characters).
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class FleetCerts:
    """Paths of the files ``make_certs`` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    hosts: tuple[str, ...]


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair: OpenSSH private key and ``.pub`` public key."""

    private: Path
    public: Path


def _san(host: str) -> x509.GeneralName:
    """An IP SAN for an address, a DNS SAN for a host name; anything else is refused."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host.rstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(f"--host {host!r} is neither an IP address nor a valid host name",
                          "pass the address or DNS name the SuperNodes use in --superlink, e.g. --host 192.0.2.10")
    return x509.DNSName(name.lower())


def _check_free(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise ConfigError(f"refusing to overwrite {', '.join(existing)}",
                          "choose another --out, or move the old files away if you mean to replace them")


def _write(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` (O_EXCL: never follows or replaces an existing file), fsync it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError as err:
        raise ConfigError(f"refusing to overwrite {path}", "choose another --out") from err
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, mode)  # the umask may have narrowed it; keys stay 0600 either way


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory", "pass a new or empty directory")
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ConfigError(f"cannot create {out}: {err.strerror}", "pass a writable directory") from err
    return out


def make_certs(out: Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365,
               name: str = "edge-qmul fleet") -> FleetCerts:
    """Write a CA and a SuperLink server certificate for ``hosts`` into ``out`` (see the module docstring)."""
    if not hosts:
        raise ConfigError("no --host given", "pass the SuperLink's address, e.g. --host 192.0.2.10")
    if not 1 <= days <= CA_DAYS:
        raise ConfigError(f"--days {days} is out of range", f"pass 1..{CA_DAYS}")
    sans = [_san(h) for h in hosts]  # validate before touching the disk
    paths = FleetCerts(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, tuple(hosts))
    files = (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key)
    if out.is_dir():
        _check_free(files)
    _out_dir(out)

    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate small clock skew between machines
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} SuperLink")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    _write(paths.ca_key, _private_pem(ca_key), 0o600)
    _write(paths.server_key, _private_pem(server_key), 0o600)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def make_node_key(out: Path, comment: str = "edge-qmul supernode") -> NodeKey:
    """Write a SuperNode authentication key pair: ``out`` (OpenSSH EC P-384 private key, 0600) and ``out.pub``."""
    pair = NodeKey(out, out.with_name(out.name + ".pub"))
    _check_free([pair.private, pair.public])
    if out.parent.exists() and not out.parent.is_dir():
        raise ConfigError(f"{out.parent} is not a directory", "pass --out DIR/NAME")
    _out_dir(out.parent)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(pair.private, private, 0o600)
    _write(pair.public, public + f" {comment}\n".encode(), 0o644)
    return pair
