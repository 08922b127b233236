"""The forget-request wire protocol: request model, canonical bytes and Ed25519 signatures.

A device files a deletion request as a ``ForgetRequest``, serialises it to *canonical* JSON (sorted keys,
no whitespace, ASCII) and signs those bytes with its Ed25519 key. The server parses only byte strings
that are already canonical, so every request has exactly one valid encoding and a signature cannot be
moved onto a re-encoded variant of the same content.

Replay protection is carried by the request itself: a per-send random ``nonce`` (128 bits) and the
signing ``timestamp``. The server refuses a (device, nonce) pair it has seen before and a timestamp outside
its acceptance window (see ``intake.py``); a retransmission of a request whose acknowledgement was lost is
a *new* send (new nonce, same request id and content) and is acknowledged as already recorded.

This module needs only the standard library and ``cryptography``: it runs on the device as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_qmul.errors import ForgetRequestError

PROTOCOL = "edge-qmul/forget-request/1"
REQUEST_KINDS = ("samples", "class", "client")
# Prefix of the statement a device signs to prove it holds the key it asks the server to register.
# It is not JSON, so a key proof can never be mistaken for a signed request (and vice versa).
KEY_PROOF_PREFIX = b"edge-qmul/device-key/1\n"

# Request ids show up in logs and the ledger; restricting them to a short identifier alphabet keeps a
# device from smuggling sample contents (or anything else) into those places through the id.
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
_FIELDS = ("class", "device", "kind", "nonce", "protocol", "request_id", "sample_ids", "timestamp")
MAX_SAMPLE_IDS = 100_000  # per request; bounds the work one message can cause

ACCEPTED = "accepted"
ALREADY_RECORDED = "already-recorded"
REFUSED = "refused"
STATUSES = (ACCEPTED, ALREADY_RECORDED, REFUSED)


class ProtocolError(ForgetRequestError):
    """A request or batch is malformed or fails verification.

    ``reason`` is a short machine-readable refusal code (``intake.REFUSAL_REASONS`` explains each); the
    message never contains sample ids or payload contents.
    """

    def __init__(self, reason: str, message: str, fix: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, fix)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ForgetRequest:
    """One deletion request as the device signs it.

    ``sample_ids`` (kind "samples") are indices into the training pool, as listed in split.json 'train';
    ``klass`` (kind "class") asks to forget the device's own samples of that class; kind "client" asks to
    forget every sample the device contributed (the device leaves the fleet).
    """

    request_id: str
    device: int  # partition id of the filing device
    kind: str
    sample_ids: tuple[int, ...] = ()
    klass: int | None = None
    timestamp: int = 0  # unix seconds at signing time
    nonce: str = field(default="")  # 32 lowercase hex digits, fresh for every send

    def __post_init__(self) -> None:
        def bad(what: str) -> ProtocolError:
            return ProtocolError("malformed", f"forget request is malformed: {what}", "fix the device's request")

        if not isinstance(self.request_id, str) or not _REQUEST_ID_RE.match(self.request_id):
            raise bad("request_id must be 1-64 characters of [A-Za-z0-9._:-], starting alphanumeric")
        if not _is_int(self.device) or self.device < 0:
            raise bad("device must be a non-negative integer partition id")
        if self.kind not in REQUEST_KINDS:
            raise bad(f"kind must be one of {REQUEST_KINDS}")
        if not isinstance(self.sample_ids, tuple) or not all(_is_int(i) and i >= 0 for i in self.sample_ids):
            raise bad("sample_ids must be a tuple of non-negative integers")
        if len(set(self.sample_ids)) != len(self.sample_ids) or list(self.sample_ids) != sorted(self.sample_ids):
            raise bad("sample_ids must be sorted and free of duplicates")
        if len(self.sample_ids) > MAX_SAMPLE_IDS:
            raise bad(f"more than {MAX_SAMPLE_IDS} sample ids in one request")
        if (self.kind == "samples") != bool(self.sample_ids):
            raise bad("sample ids are required for kind 'samples' and not allowed otherwise")
        if self.kind == "class":
            if not _is_int(self.klass) or self.klass < 0:  # type: ignore[operator]
                raise bad("kind 'class' needs a non-negative integer class")
        elif self.klass is not None:
            raise bad("a class is only allowed for kind 'class'")
        if not _is_int(self.timestamp) or self.timestamp < 0:
            raise bad("timestamp must be non-negative integer unix seconds")
        if not isinstance(self.nonce, str) or not _NONCE_RE.match(self.nonce):
            raise bad("nonce must be 32 lowercase hex digits")

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL,
            "request_id": self.request_id,
            "device": self.device,
            "kind": self.kind,
            "sample_ids": list(self.sample_ids),
            "class": self.klass,
            "timestamp": self.timestamp,
            "nonce": self.nonce,
        }

    def to_bytes(self) -> bytes:
        """The canonical encoding: the exact bytes that are signed."""
        return canonical_json(self.to_json())

    @classmethod
    def from_bytes(cls, payload: bytes) -> ForgetRequest:
        """Parse canonical bytes; anything else (other encodings, extra keys, wrong types) is refused."""
        try:
            obj = json.loads(payload.decode("ascii"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ProtocolError("malformed", "forget request is not ASCII JSON", "send canonical JSON") from err
        except (RecursionError, ValueError) as err:  # nested too deeply, or an integer of too many digits
            raise ProtocolError("malformed", "forget request nests too deeply or holds a number too long to read",
                                "send canonical JSON of the request's fields") from err
        if not isinstance(obj, dict) or sorted(obj) != list(_FIELDS):
            raise ProtocolError("malformed", f"forget request must have exactly the keys {_FIELDS}")
        if obj["protocol"] != PROTOCOL:
            raise ProtocolError("malformed", f"unsupported protocol {obj['protocol']!r:.40}", f"use {PROTOCOL}")
        if not isinstance(obj["sample_ids"], list):
            raise ProtocolError("malformed", "sample_ids must be a list")
        request = cls(
            request_id=obj["request_id"],
            device=obj["device"],
            kind=obj["kind"],
            sample_ids=tuple(obj["sample_ids"]),
            klass=obj["class"],
            timestamp=obj["timestamp"],
            nonce=obj["nonce"],
        )
        if request.to_bytes() != payload:
            raise ProtocolError("malformed", "forget request is not in canonical form", "serialise with to_bytes()")
        return request


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


@dataclass(frozen=True)
class SignedRequest:
    """Canonical request bytes and the device's Ed25519 signature over them."""

    payload: bytes
    signature: bytes

    @property
    def sha256(self) -> str:
        """Hash of the payload: what logs name when the request id cannot be trusted or parsed."""
        return hashlib.sha256(self.payload).hexdigest()


def new_nonce() -> str:
    return os.urandom(16).hex()


def sign(request: ForgetRequest, key: Ed25519PrivateKey) -> SignedRequest:
    payload = request.to_bytes()
    return SignedRequest(payload, key.sign(payload))


def verify(signed: SignedRequest, public_key: Ed25519PublicKey) -> ForgetRequest:
    """Check the signature first (unauthenticated bytes are never parsed further), then parse."""
    try:
        public_key.verify(signed.signature, signed.payload)
    except InvalidSignature as err:
        raise ProtocolError(
            "bad-signature",
            f"signature of request payload {signed.sha256[:16]} does not verify with the device's registered key",
            "sign with the key the device registered",
        ) from err
    return ForgetRequest.from_bytes(signed.payload)


@dataclass
class DeviceBatch:
    """A device's reply to the forget query: who it is, its key (with proof of possession), its requests."""

    partition_id: int
    num_partitions: int
    public_key: bytes  # raw Ed25519, 32 bytes
    key_proof: bytes
    entries: list[SignedRequest] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    """What the server tells the device about one entry of its batch (matched by ``index``)."""

    index: int
    request_id: str  # "" if the payload could not be verified and parsed
    status: str  # accepted | already-recorded | refused
    reason: str = ""  # refusal code (intake.REFUSAL_REASONS)

    @property
    def recorded(self) -> bool:
        """True once the request is durably in the server's ledger."""
        return self.status in (ACCEPTED, ALREADY_RECORDED)


# ---------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_bytes(raw: bytes) -> Ed25519PublicKey:
    if not isinstance(raw, bytes) or len(raw) != 32:
        raise ProtocolError("malformed-key", "a device public key must be 32 raw bytes (Ed25519)")
    return Ed25519PublicKey.from_public_bytes(raw)


def public_key_from_hex(text: str) -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(text)
    except (TypeError, ValueError) as err:
        raise ProtocolError("malformed-key", "a device public key must be 64 hex digits (Ed25519)") from err
    return public_key_from_bytes(raw)


def key_fingerprint(raw: bytes) -> str:
    """Short, log-safe identifier of a public key."""
    return hashlib.sha256(raw).hexdigest()[:16]


def private_key_bytes(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_key_from_bytes(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The device key stored at ``path`` (PKCS#8 PEM, mode 0600); created on first use.

    Creation uses O_EXCL so two processes racing on a fresh device cannot end up with different keys: the
    loser reads the winner's file.
    """
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = generate_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first: use theirs
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            return key
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, OSError) as err:
        raise ForgetRequestError(
            f"device key {path} cannot be read ({err.__class__.__name__})",
            "restore the key file; a new key would be refused by the server (key-mismatch)",
        ) from err
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ForgetRequestError(f"device key {path} is not an Ed25519 key", "use an Ed25519 PKCS#8 PEM key")
    return loaded


def key_proof(key: Ed25519PrivateKey, device: int) -> bytes:
    """Signature over (device, public key): proves possession of the key the device asks to register."""
    return key.sign(_key_statement(device, public_key_bytes(key)))


def verify_key_proof(public_key: Ed25519PublicKey, device: int, proof: bytes) -> None:
    try:
        public_key.verify(proof, _key_statement(device, public_key_bytes(public_key)))
    except InvalidSignature as err:
        raise ProtocolError(
            "bad-key-proof",
            f"device {device} did not prove possession of the key it presented",
            "sign the key statement with the device key (protocol.key_proof)",
        ) from err


def _key_statement(device: int, raw_public: bytes) -> bytes:
    return KEY_PROOF_PREFIX + f"{device}\n{raw_public.hex()}".encode("ascii")


def load_key_file(path: Path) -> dict[int, bytes]:
    """Pre-registered device keys: a JSON object {partition id: public key hex}."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ForgetRequestError(f"cannot read the device key file {path}: {err}", "write it as JSON") from err
    if not isinstance(obj, dict):
        raise ForgetRequestError(f"{path} must be a JSON object of partition id -> public key hex")
    keys: dict[int, bytes] = {}
    for device, text in obj.items():
        if not str(device).isdigit() or not isinstance(text, str):
            raise ForgetRequestError(f"{path}: entry {device!r:.20} must map a partition id to a hex string")
        keys[int(device)] = public_key_bytes(public_key_from_hex(text))
    return keys


def sorted_ids(ids: Sequence[int]) -> tuple[int, ...]:
    return tuple(sorted({int(i) for i in ids}))
