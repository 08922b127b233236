"""A device's own state directory (DESIGN.md §8): its key, the pinned fleet key, its samples, requests and models.

A board sees only its own storage and what arrives in Flower messages; everything it knows lives here:

    DIR/device_key.pem   the device's Ed25519 private key (PKCS#8 PEM, mode 0600)
    DIR/state.sqlite     meta (device id, pinned fleet key, where its data is), samples, requests, models
    DIR/models/<version>/ the files of each model a rollout installed (model.onnx, features.onnx, manifest)

The device id is the hex of the device's public key. Samples are indexed by content id
(``edge_qmul.content``): the sha256 of an image file's bytes, or of an ``.npz`` image's uint8 (C, H, W)
pixels, which are the ids the server records for the same data at train time. Requests name those ids;
nothing here names a server path or a server-side index.

A request is queued in one SQLite transaction with ``synchronous=FULL``: once ``forget`` returns it survives
kill -9 and power loss. It is signed when filed, over the canonical JSON of its body, and the network side
sends the stored bytes as they are (``pending``), then reports the server's answers back (``mark``).

Imports: the standard library, numpy and the lean core (errors, content, data's folder and npz readers,
ledger's SQLite base); ``cryptography`` only where a key is made or used. Never torch, export/ or federated/
(``tests/test_layers.py`` checks it), so a device installs ``edge-qmul[device]`` without torch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from edge_qmul.devices import ed25519

from edge_qmul.content import hash_file, hash_pixels, is_sha256_hex
from edge_qmul.errors import ConfigError, DataError, ForgetRequestError, LedgerError
from edge_qmul.ledger import SqliteStore

PROTOCOL = "edge-qmul/device-request/1"  # in every signed body, so a signature cannot be reused for another format
DATASETS = ("imagefolder", "npz")  # the data a device can hold (as the server's --dataset)
KINDS = ("samples", "class", "leave")
# pending: queued, not sent yet; sent: in a message, no answer yet (sent again next round); acknowledged: in
# the server's ledger; refused: the server will not act on it (reason says why); honoured: a model that
# forgot it is running (model_version says which).
STATUSES = ("pending", "sent", "acknowledged", "refused", "honoured")
UNANSWERED = ("pending", "sent")
_NEXT: dict[str, tuple[str, ...]] = {  # allowed status changes; marking the current status again is a no-op
    "pending": ("sent", "acknowledged", "refused", "honoured"),
    "sent": ("pending", "acknowledged", "refused", "honoured"),
    "acknowledged": ("honoured",),
    "refused": (),
    "honoured": (),
}
KEY_FILE = "device_key.pem"
MODELS_DIR = "models"  # DIR/models/<version>/: the files of each installed model (install_model)
STATE_DB = "state.sqlite"
SCHEMA_VERSION = 1
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")  # model versions as the server names them
_SHOWN = 5  # unknown items named in a refusal
_META_KEYS = {"schema_version", "device_id", "fleet_key", "dataset", "data_root", "classes", "created"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (
    sha256 TEXT PRIMARY KEY,       -- content id (edge_qmul.content)
    label  INTEGER NOT NULL,       -- class index as the data source defines it
    source TEXT NOT NULL           -- where the device holds it: a path under the data root, or x_train[i]
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS samples_label ON samples (label);
CREATE TABLE IF NOT EXISTS requests (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,   -- filing order
    request_id    TEXT NOT NULL UNIQUE,                -- random 128-bit hex
    kind          TEXT NOT NULL,                       -- samples | class | leave
    class         INTEGER,                             -- kind 'class'
    samples       INTEGER NOT NULL,                    -- number of hashes in the payload
    created       INTEGER NOT NULL,                    -- unix seconds, as signed
    payload       TEXT NOT NULL,                       -- the canonical JSON body, exactly as signed
    signature     TEXT NOT NULL,                       -- Ed25519 by the device key over payload (hex)
    status        TEXT NOT NULL,
    reason        TEXT NOT NULL DEFAULT '',
    model_version TEXT NOT NULL DEFAULT '',
    updated       INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,
    version   TEXT NOT NULL,
    parent    TEXT NOT NULL,
    activated INTEGER NOT NULL
);
"""


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Where the device's own samples are: as the server's ``--dataset imagefolder|npz --data-root PATH``."""

    dataset: str
    root: Path

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ConfigError(f"a device holds an image folder or an .npz file, not dataset {self.dataset!r}",
                              "pass --dataset imagefolder --data-root DIR or --dataset npz --data-root FILE.npz")
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())


@dataclass(frozen=True)
class Filed:
    """What ``forget`` queued."""

    request_id: str
    kind: str
    samples: int  # hashes named in the request (0 for 'leave': the server resolves the device's contributions)
    klass: int | None
    created: int


@dataclass(frozen=True)
class RequestRecord:
    request_id: str
    kind: str
    klass: int | None
    samples: int
    created: int
    status: str
    reason: str
    model_version: str
    updated: int


@dataclass(frozen=True)
class ModelRecord:
    version: str
    parent: str  # "" for the first model the device ran
    activated: int  # unix seconds


@dataclass(frozen=True)
class DeviceStatus:
    device_id: str
    fleet_key: str
    dataset: str
    data_root: str
    samples: int
    classes: tuple[str, ...]
    active_model: str  # "" before the first rollout
    parent_model: str
    requests: tuple[RequestRecord, ...]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.requests) for s in STATUSES}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["requests"] = [{("class" if k == "klass" else k): v for k, v in r.items()} for r in out["requests"]]
        return {**out, "counts": self.counts()}


# --------------------------------------------------------------------------------------------------
# Keys and signed bodies
# --------------------------------------------------------------------------------------------------


def parse_fleet_key(text: str) -> str:
    """The fleet's Ed25519 public key as 64 lowercase hex digits (``edge-qmul keygen`` writes it as public_key.hex)."""
    value = text.strip().lower() if isinstance(text, str) else ""
    fix = "pass the 64 hex digits of the fleet's public key (public_key.hex from `edge-qmul keygen`)"
    if value and Path(text.strip()).is_file():
        fix = f"pass the hex inside the file, not its path: --fleet-key $(cat {text.strip()})"
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(value) != 64 or len(raw) != 32:
        raise ConfigError(f"fleet key {text!r:.80} is not 32 bytes of hex (64 hex digits)", fix)
    if not ed25519.is_public_key(raw):
        raise ConfigError(f"fleet key {value} is not an Ed25519 public key (not a point of the curve)",
                          "check it for typos: " + fix)
    return value


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII: one encoding per body, so the signed bytes are unambiguous."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def verify_request(signed: Mapping[str, Any]) -> dict[str, Any]:
    """Check one entry of ``pending()`` (its signature by the key its body names) and return the body.

    Anyone holding the entry (the server) can check it without the device: with ``cryptography`` where it is
    installed, pure Python (``devices/ed25519``) otherwise. The caller still decides whether that device id is
    one it registered.
    """
    try:
        payload = str(signed["payload"]).encode("ascii")
        signature = bytes.fromhex(str(signed["signature"]))
        body = json.loads(payload)
        device = bytes.fromhex(body["device_id"])
    except (KeyError, TypeError, ValueError, UnicodeError, RecursionError) as err:  # RecursionError: [[[...]]]
        raise ForgetRequestError("signed request is malformed (payload, signature or device_id)",
                                 "send the entries of DeviceState.pending() as they are") from err
    if not isinstance(body, dict) or body.get("protocol") != PROTOCOL or canonical_json(body) != payload:
        raise ForgetRequestError("signed request is not a canonical device request", f"use protocol {PROTOCOL}")
    if not verify_signature(device, payload, signature):
        raise ForgetRequestError(f"signature of request {body.get('request_id')!s:.40} does not verify with its "
                                 "device key", "send the payload and signature exactly as the device stored them")
    return body


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """``ed25519.verify``, through ``cryptography`` (OpenSSL, ~25x faster) where it is installed: a server checks
    thousands of device-signed requests. Both accept exactly the valid signatures under the key (s < L, points on
    the curve). Bundles keep the pure-Python check itself, because the board's check must agree exactly."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        return ed25519.verify(public_key, message, signature)
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _load_private_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization  # lazy: only signing needs it

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"cannot read the device key {path} ({err.__class__.__name__})",
                          "the state directory is damaged: restore it from a backup") from err
    return key


# --------------------------------------------------------------------------------------------------
# The index of the device's samples
# --------------------------------------------------------------------------------------------------


def index_samples(spec: DataSpec) -> tuple[tuple[str, ...], list[tuple[str, int, str]]]:
    """The class names and one (content id, label, source) per sample the device holds, in reading order.

    Image folders are listed exactly as the server's loader lists them (``data.image_folder_files``) and hashed
    from their bytes, without decoding; an ``.npz`` is read and checked by the server's loader, then each
    image's pixels are hashed. Both pools count (a train/ + test/ folder, x_train and x_test).
    """
    from edge_qmul import data  # numpy-only at import (torch only under TYPE_CHECKING)

    if spec.dataset == "imagefolder":
        classes, files = data.image_folder_files(spec.root)
        return classes, [(hash_file(f.path), f.label, f.path.relative_to(spec.root).as_posix()) for f in files]
    # The device's own .npz (spec.root is on its storage), read with the same validating loader the server uses,
    # so both sides hash the same pixels; nothing here reads a server path.
    source = data.load_dataset("npz", spec.root)
    rows = []
    for key, ds in (("x_train", source.train), ("x_test", source.test)):
        if ds is not None:
            rows += [(hash_pixels(image), int(label), f"{key}[{i}]")
                     for i, (image, label) in enumerate(zip(ds.images, ds.labels, strict=True))]
    return source.classes, rows


def _preview(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


# --------------------------------------------------------------------------------------------------
# The state
# --------------------------------------------------------------------------------------------------


class DeviceState(SqliteStore):
    """One device's state directory. ``DeviceState.init`` sets one up; ``DeviceState.open`` (or the
    constructor) opens an existing one."""

    schema: ClassVar[str] = _SCHEMA
    what: ClassVar[str] = "device state"

    def __init__(self, state_dir: str | Path) -> None:
        self.dir = Path(state_dir)
        if not (self.dir / STATE_DB).is_file() or not (self.dir / KEY_FILE).is_file():
            raise ConfigError(f"{self.dir} holds no device state ({STATE_DB} and {KEY_FILE})",
                              f"set it up first: edge-qmul device init --state {self.dir} --dataset imagefolder|npz "
                              "--data-root PATH --fleet-key HEX")
        super().__init__(self.dir / STATE_DB)
        meta = dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema_version") != str(SCHEMA_VERSION) or not set(meta) >= _META_KEYS:
            self.close()
            raise LedgerError(f"{self.dir / STATE_DB} is not a device state this edge-qmul reads (schema version "
                              f"{meta.get('schema_version')!r}, expected {SCHEMA_VERSION})",
                              "use the edge-qmul that set up this device, or restore the directory from a backup")
        self.device_id: str = meta["device_id"]
        self.fleet_key: str = meta["fleet_key"]
        self.dataset: str = meta["dataset"]
        self.data_root: str = meta["data_root"]
        self.classes: tuple[str, ...] = tuple(json.loads(meta["classes"]))

    @classmethod
    def open(cls, state_dir: str | Path) -> DeviceState:
        return cls(state_dir)

    @classmethod
    def init(cls, state_dir: str | Path, data_spec: DataSpec, fleet_key_hex: str) -> DeviceState:
        """Set up a new state directory: a fresh device key, the pinned fleet key, the index of the samples.

        Everything is checked and written in a temporary directory beside ``state_dir``, which is renamed
        into place last: a refused or interrupted init leaves nothing. An existing state is never touched.
        """
        state_dir = Path(state_dir).expanduser().absolute()
        fleet_key = parse_fleet_key(fleet_key_hex)
        _check_free(state_dir)
        classes, rows = index_samples(data_spec)
        try:
            state_dir.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{state_dir.name}.init-", dir=state_dir.parent))  # mode 0700
        except OSError as err:
            raise ConfigError(f"cannot create the state directory {state_dir} ({err.strerror})",
                              "pass a --state DIR in a place this user can write") from err
        try:
            device_id = _write_new_key(tmp / KEY_FILE)
            conn = sqlite3.connect(tmp / STATE_DB, isolation_level=None)
            try:
                conn.execute("PRAGMA synchronous=FULL")
                conn.executescript(_SCHEMA)
                conn.execute("BEGIN")
                meta = {"schema_version": str(SCHEMA_VERSION), "device_id": device_id, "fleet_key": fleet_key,
                        "dataset": data_spec.dataset, "data_root": str(data_spec.root),
                        "classes": json.dumps(list(classes)), "created": str(int(time.time()))}
                conn.executemany("INSERT INTO meta VALUES (?, ?)", meta.items())
                # the same content twice (a copied photo) is one sample: the first reading keeps it
                conn.executemany("INSERT OR IGNORE INTO samples VALUES (?, ?, ?)", rows)
                conn.execute("COMMIT")
            finally:
                conn.close()
            _fsync_dir(tmp)
            try:
                os.rename(tmp, state_dir)  # replaces an empty directory; fails on anything else
            except OSError as err:
                raise ConfigError(f"{state_dir} was set up by someone else meanwhile ({err.strerror})",
                                  "use that state, or pass another --state DIR") from err
            _fsync_dir(state_dir.parent)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return cls(state_dir)

    # ---- requests ----------------------------------------------------------------------------------

    def forget(
        self,
        *,
        files: Iterable[str | Path] | None = None,
        hashes: Iterable[str] | None = None,
        label: int | None = None,
        leave: bool = False,
    ) -> Filed:
        """Queue one signed deletion request, durably: it is on disk when this returns.

        Exactly one selection: ``files`` (the device's own image files, named by the sha256 of their bytes),
        ``hashes`` (content ids), ``label`` (every local sample of that class, named by their hashes) or
        ``leave=True`` (the device leaves the fleet: everything it contributed, which the server resolves).
        A file, hash or class the device does not hold is refused and nothing is queued.
        """
        chosen = [name for name, value in (("files", files), ("hashes", hashes), ("label", label))
                  if value is not None] + (["leave"] if leave else [])
        if len(chosen) != 1:
            raise ForgetRequestError(
                f"a request selects its samples one way, got {' + '.join(chosen) or 'none'}",
                "pass exactly one of files=..., hashes=..., label=K or leave=True")
        if files is not None:
            kind, klass, selected = "samples", None, self._hashes_of_files(files)
        elif hashes is not None:
            kind, klass, selected = "samples", None, self._held(hashes)
        elif label is not None:
            kind, klass, selected = "class", label, self._class_hashes(label)
        else:
            kind, klass, selected = "leave", None, []
            self._check_not_left()
        return self._queue(kind, klass, sorted(set(selected)))

    def _hashes_of_files(self, files: Iterable[str | Path]) -> list[str]:
        paths = [Path(f) for f in ([files] if isinstance(files, str | Path) else files)]
        if not paths:
            raise ForgetRequestError("no files given", "name at least one of the device's image files")
        if self.dataset != "imagefolder":
            raise ForgetRequestError(
                f"this device's samples are arrays in {self.data_root}, not files",
                "name them by content id (--hashes FILE, one sha256 of the uint8 (C, H, W) pixels per line) or "
                "by class (--class K)")
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ForgetRequestError(f"not a file (missing, or a folder): {_preview(missing)}",
                                     "name the image files this device holds, one path each")
        by_hash = {hash_file(p): p for p in paths}
        unknown = self._unknown(list(by_hash))
        if unknown:
            names = [str(by_hash[h]) for h in unknown]
            raise ForgetRequestError(
                f"{len(unknown)} file(s) are not among this device's samples: {_preview(names)}",
                f"name files whose content is in the device's data ({self.data_root}); the device's index "
                "matches files by the sha256 of their bytes, so an edited copy is a different sample")
        return list(by_hash)

    def _held(self, hashes: Iterable[str]) -> list[str]:
        given = [hashes] if isinstance(hashes, str) else list(hashes)
        if not given:
            raise ForgetRequestError("no hashes given", "name at least one sample by its sha256")
        values = [h.strip().lower() if isinstance(h, str) else h for h in given]
        malformed = [repr(v) for v in values if not is_sha256_hex(v)]
        if malformed:
            raise ForgetRequestError(f"not a sha256 content id (64 hex digits): {_preview(malformed)}",
                                     "give one sha256 hex digest per sample")
        unknown = self._unknown(values)
        if unknown:
            raise ForgetRequestError(
                f"{len(unknown)} hash(es) are not among this device's samples: {_preview(unknown)}",
                "name only samples this device holds (`edge-qmul device status` shows how many it holds)")
        return values

    def _class_hashes(self, label: int) -> list[str]:
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ForgetRequestError(f"class {label!r} is not a class index", "pass a class index 0..K-1")
        found = [r[0] for r in self._conn.execute("SELECT sha256 FROM samples WHERE label = ?", (label,))]
        if not found:
            held = [f"{k} ({self.classes[k]})" if k < len(self.classes) else str(k) for (k,) in
                    self._conn.execute("SELECT DISTINCT label FROM samples ORDER BY label")]
            name = f" ({self.classes[label]})" if label < len(self.classes) else ""
            raise ForgetRequestError(f"this device holds no sample of class {label}{name}",
                                     f"pick a class it holds: {', '.join(held)}")
        return found

    def _check_not_left(self) -> None:
        row = self._conn.execute(
            "SELECT request_id, status FROM requests WHERE kind = 'leave' AND status != 'refused'").fetchone()
        if row is not None:
            raise ForgetRequestError(f"this device already asked to leave the fleet (request {row[0]}, {row[1]})",
                                     "nothing more to file: that request covers everything it contributed")

    def _unknown(self, hashes: Sequence[str]) -> list[str]:
        known: set[str] = set()
        for start in range(0, len(hashes), 500):  # stay under SQLite's bound-parameter limit
            chunk = hashes[start:start + 500]
            marks = ",".join("?" * len(chunk))
            known.update(r[0] for r in self._conn.execute(f"SELECT sha256 FROM samples WHERE sha256 IN ({marks})",
                                                          chunk))
        return list(dict.fromkeys(h for h in hashes if h not in known))

    def _queue(self, kind: str, klass: int | None, hashes: list[str]) -> Filed:
        request_id = os.urandom(16).hex()
        created = int(time.time())
        body = {"protocol": PROTOCOL, "device_id": self.device_id, "request_id": request_id, "kind": kind,
                "hashes": hashes, "class": klass, "created": created}
        payload = canonical_json(body)
        signature = _load_private_key(self.dir / KEY_FILE).sign(payload).hex()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO requests (request_id, kind, class, samples, created, payload, signature, status, updated)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                (request_id, kind, klass, len(hashes), created, payload.decode("ascii"), signature, created))
        return Filed(request_id, kind, len(hashes), klass, created)

    def pending(self) -> list[dict[str, str]]:
        """The requests to send, oldest first: every one the server has not answered (pending or sent).

        Each entry is ``{"request_id", "payload", "signature"}``: the canonical JSON body exactly as signed and
        the device's Ed25519 signature over it in hex (``verify_request`` checks one).
        """
        rows = self._conn.execute(
            f"SELECT request_id, payload, signature FROM requests WHERE status IN ({','.join('?' * len(UNANSWERED))})"
            " ORDER BY seq", UNANSWERED).fetchall()
        return [{"request_id": r[0], "payload": r[1], "signature": r[2]} for r in rows]

    def mark(self, request_id: str, status: str, reason: str = "", model_version: str = "") -> None:
        """Record what became of a request: sent, acknowledged, refused (with ``reason``) or honoured (by
        ``model_version``). Repeating the current status is a no-op; a final status (refused, honoured) stays."""
        if status not in STATUSES:
            raise ConfigError(f"unknown request status {status!r}", f"use one of {', '.join(STATUSES)}")
        if model_version and not _VERSION_RE.match(model_version):
            raise ConfigError(f"model version {model_version!r:.80} is not a version name",
                              "use the server's model version (letters, digits and ._:+-)")
        with self._tx() as conn:
            row = conn.execute("SELECT status FROM requests WHERE request_id = ?", (request_id,)).fetchone()
            if row is None:
                raise ForgetRequestError(f"no request {request_id!r:.80} on this device",
                                         "mark only request ids that pending() returned")
            current = row[0]
            if status == current:
                return
            if status not in _NEXT[current]:
                raise ForgetRequestError(f"request {request_id} is {current}; it cannot become {status}",
                                         f"a {current} request can become: {', '.join(_NEXT[current]) or 'nothing'}")
            conn.execute("UPDATE requests SET status = ?, reason = ?, model_version = ?, updated = ? "
                         "WHERE request_id = ?", (status, reason, model_version, int(time.time()), request_id))

    def requests(self) -> list[RequestRecord]:
        rows = self._conn.execute("SELECT request_id, kind, class, samples, created, status, reason, model_version,"
                                  " updated FROM requests ORDER BY seq").fetchall()
        return [RequestRecord(*r) for r in rows]

    # ---- models ------------------------------------------------------------------------------------

    def set_model(self, version: str, parent: str = "") -> None:
        """Record that ``version`` now runs on the device, replacing ``parent`` (a rollback sets the parent again)."""
        for name, value in (("version", version), ("parent", parent)):
            if (value or name == "version") and not (isinstance(value, str) and _VERSION_RE.match(value)):
                raise ConfigError(f"model {name} {value!r:.80} is not a version name",
                                  "use the server's model version (letters, digits and ._:+-)")
        with self._tx() as conn:
            conn.execute("INSERT INTO models (version, parent, activated) VALUES (?, ?, ?)",
                         (version, parent, int(time.time())))

    def models(self) -> list[ModelRecord]:
        """Every model the device has run, the active one first."""
        rows = self._conn.execute("SELECT version, parent, activated FROM models ORDER BY seq DESC").fetchall()
        return [ModelRecord(*r) for r in rows]

    def model_dir(self, version: str | None = None) -> Path | None:
        """The installed files of model ``version`` (default: the active model) under ``DIR/models``; None when
        that version was never installed here (or no model runs yet)."""
        if version is None:
            models = self.models()
            if not models:
                return None
            version = models[0].version
            if not version:  # deactivated: the factory model runs
                return None
        if not _VERSION_RE.match(version):
            raise ConfigError(f"model version {version!r:.80} is not a version name",
                              "use the server's model version (letters, digits and ._:+-)")
        path = self.dir / MODELS_DIR / version
        return path if path.is_dir() else None

    def install_model(self, version: str, files_dir: str | Path, parent: str = "") -> Path:
        """Copy a verified bundle's extracted files into ``DIR/models/<version>`` and make it the active model.

        The copy is written beside its place and renamed into it (after an fsync), so a crash leaves either
        the complete model or none; installing a version that is already there only re-activates it.
        """
        source = Path(files_dir)
        if not source.is_dir():
            raise ConfigError(f"{source} is not a directory of model files", "pass the extracted bundle's folder")
        if self.model_dir(version) is None:
            root = self.dir / MODELS_DIR
            root.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=root))
            try:
                for f in sorted(source.iterdir()):
                    if f.is_file():
                        shutil.copyfile(f, tmp / f.name)
                        with open(tmp / f.name, "rb") as fh:
                            os.fsync(fh.fileno())
                _fsync_dir(tmp)
                os.rename(tmp, root / version)
                _fsync_dir(root)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
        self.set_model(version, parent)
        return self.dir / MODELS_DIR / version

    def activate(self, version: str) -> None:
        """Run an installed model again (a rollback to the parent): it becomes active, with the current one as
        its parent in the record."""
        if self.model_dir(version) is None:
            raise ConfigError(f"model {version} is not installed on this device",
                              f"install it first (a rollout); installed: {', '.join(self.installed()) or 'none'}")
        models = self.models()
        current = models[0].version if models else ""
        if current != version:
            self.set_model(version, current)

    def deactivate(self) -> None:
        """Stop running any installed model: the factory model (what ran before the first rollout) runs again.
        A rollback of the first model a rollout installed; ``models()`` then lists a record with version ""
        (and the rolled-back version as its parent) first, and ``model_dir()`` is None."""
        models = self.models()
        current = models[0].version if models else ""
        if current:
            with self._tx() as conn:
                conn.execute("INSERT INTO models (version, parent, activated) VALUES ('', ?, ?)",
                             (current, int(time.time())))

    def installed(self) -> list[str]:
        root = self.dir / MODELS_DIR
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []

    # ---- samples and status ------------------------------------------------------------------------
    def held_out(self) -> list[str]:
        """Content ids of the device's held-out pool (an ``.npz``'s ``x_test``, an image folder's ``test/``): samples
        it keeps out of training, the non-members of its on-board forget check. Empty for a single-pool device."""
        rows = self._conn.execute("SELECT sha256 FROM samples WHERE source LIKE 'x\\_test[%' ESCAPE '\\' "
                                  "OR source LIKE 'test/%' ORDER BY source").fetchall()
        return [r[0] for r in rows]

    def contributed_pool(self) -> list[str]:
        """Content ids of every sample outside the held-out pool (what the device can have contributed)."""
        held = set(self.held_out())
        return [r[0] for r in self._conn.execute("SELECT sha256 FROM samples ORDER BY source") if r[0] not in held]

    def request_hashes(self, request_ids: Iterable[str]) -> dict[str, list[str]]:
        """The content ids each of these requests covers, from the device's own records: the hashes a samples or
        class request named (as signed), or for a leave request every sample outside the held-out pool."""
        out: dict[str, list[str]] = {}
        for rid in request_ids:
            row = self._conn.execute("SELECT kind, payload FROM requests WHERE request_id = ?", (rid,)).fetchone()
            if row is None:
                raise ForgetRequestError(f"no request {rid!r:.80} on this device",
                                         "name only requests this device filed")
            out[rid] = self.contributed_pool() if row[0] == "leave" else list(json.loads(row[1])["hashes"])
        return out

    def covered(self) -> list[str]:
        """Content ids that the device's acknowledged or honoured requests cover (what the fleet must forget)."""
        rids = [r.request_id for r in self.requests() if r.status in ("acknowledged", "honoured")]
        return sorted({h for hashes in self.request_hashes(rids).values() for h in hashes})

    def pixels(self, hashes: Sequence[str], image_size: int | None = None,
               color: str = "auto") -> tuple[Any, Any, float]:
        """The device's own samples ``hashes``, read from its data root with the server's loader: uint8 images
        (N, C, H, W), int64 labels and the pixel scale (``images / scale`` lies in [0, 1]), in the given order.

        ``image_size`` and ``color`` apply to image folders as ``--image-size`` / ``--color`` do on the server
        (the model's input decides them). A hash the device does not hold, or whose file changed since
        ``init``, is an error.
        """
        import numpy as np

        from edge_qmul import data

        unknown = self._unknown(list(hashes))
        if unknown:
            raise ForgetRequestError(f"{len(unknown)} sample(s) are not among this device's samples: "
                                     f"{_preview(unknown)}", "name only samples this device holds")
        kwargs: dict[str, Any] = {} if self.dataset == "npz" else {"image_size": image_size, "color": color}
        source = data.load_dataset(self.dataset, self.data_root, **kwargs)
        where: dict[str, tuple[Any, int]] = {}
        for ds in (source.train, source.test):
            if ds is not None:
                for i, cid in enumerate(data.content_ids(ds)):
                    where.setdefault(cid, (ds, i))
        missing = [h for h in hashes if h not in where]
        if missing:
            raise DataError(f"{len(missing)} sample(s) of this device changed or vanished from {self.data_root} "
                            f"since it was set up: {_preview(missing)}",
                            "restore the files, or set the device up again (edge-qmul device init)")
        if not hashes:
            c, h, w = source.train.images.shape[1:]
            return np.zeros((0, c, h, w), np.uint8), np.zeros(0, np.int64), float(source.train.scale)
        images = np.stack([where[h][0].images[where[h][1]] for h in hashes])
        labels = np.array([where[h][0].labels[where[h][1]] for h in hashes], dtype=np.int64)
        return images, labels, float(where[hashes[0]][0].scale)


    def sample_count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0])

    def holds(self, sha256: str) -> bool:
        return self._conn.execute("SELECT 1 FROM samples WHERE sha256 = ?", (sha256,)).fetchone() is not None

    def status(self) -> DeviceStatus:
        models = self.models()
        active = models[0] if models else None
        return DeviceStatus(self.device_id, self.fleet_key, self.dataset, self.data_root, self.sample_count(),
                            self.classes, active.version if active else "", active.parent if active else "",
                            tuple(self.requests()))


def render_status(st: DeviceStatus) -> str:
    """``edge-qmul device status``: who the device is, what it holds and runs, and each request's fate."""
    counts = st.counts()
    if st.active_model:
        model = st.active_model + (f" (parent {st.parent_model})" if st.parent_model else " (the first model)")
    elif st.parent_model:
        model = f"the factory model (rolled back from {st.parent_model})"
    else:
        model = "none yet (no rollout has reached this device)"
    lines = [
        f"device    {st.device_id}",
        f"fleet key {st.fleet_key}",
        f"data      {st.dataset} {st.data_root}: {st.samples} samples, {len(st.classes)} classes",
        f"model     {model}",
        "requests  " + (", ".join(f"{counts[s]} {s}" for s in STATUSES) if st.requests else "none filed"),
    ]
    for r in st.requests:
        what = {"samples": f"{r.samples} sample(s)", "class": f"class {r.klass} ({r.samples} sample(s))",
                "leave": "leave the fleet"}[r.kind]
        filed = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r.created))
        note = f"  reason: {r.reason}" if r.status == "refused" else ""
        note += f"  by model {r.model_version}" if r.model_version else ""
        lines.append(f"  {r.status:<12} {r.request_id}  {what:<28} filed {filed}{note}")
    return "\n".join(lines)


def _check_free(state_dir: Path) -> None:
    """Refuse a directory that already holds a device state, or anything else."""
    if (state_dir / STATE_DB).exists() or (state_dir / KEY_FILE).exists():
        raise ConfigError(f"{state_dir} already holds a device state; init never overwrites one",
                          "use it as it is (`edge-qmul device status --state DIR`), or pass another --state DIR "
                          "(deleting it discards the device key and its queued requests)")
    if state_dir.exists() and not state_dir.is_dir():
        raise ConfigError(f"{state_dir} is a file, not a directory", "pass a new or empty directory as --state")
    if state_dir.is_dir() and any(state_dir.iterdir()):
        raise ConfigError(f"{state_dir} is not empty", "pass a new or empty directory as --state")


def _write_new_key(path: Path) -> str:
    """Write a fresh Ed25519 private key (PEM, mode 0600, fsync'd); return the public key's hex (the device id)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

