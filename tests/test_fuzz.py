"""Fuzzing what comes from outside (issue 13, item 7): TOML files (--config, --budgets, device profiles), the
forget-id parser and hashes file of `edge-qmul forget`, and the signed request messages devices send.

Each target must return normally or raise its documented error (an ``EdgeQmulError`` subclass, argparse's usage
error for a flag, ``ProtocolError`` / ``ForgetRequestError`` for a message); anything else is a traceback the user
would see. A fixed budget of derandomized examples keeps the run short and repeatable.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from edge_qmul.devices.profiles import FIELDS, load_profile
from edge_qmul.devices.state import PROTOCOL, canonical_json, verify_request
from edge_qmul.export.budgets import CHECKS, load_budgets
from edge_qmul.federated import messages
from flwr.app import ConfigRecord, RecordDict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_qmul import cli, config
from edge_qmul.errors import EdgeQmulError

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)


def _file(directory: Path, content: str | bytes, name: str = "fuzz.toml") -> Path:
    path = directory / name
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
    else:
        path.write_bytes(content)
    return path


# --- TOML-ish documents ------------------------------------------------------------------------------------------

KNOWN_KEYS = sorted({*(f for cls in (*config.STAGES.values(), *config.METHODS.values())
                       for f in cls.__dataclass_fields__), *CHECKS, *FIELDS, "method", "confidence"})
WORDS = ["profile", "qmul", "retrain", "digits", "npz", "x86", "qnnpack", "aarch64", "x86_64", "neon",
         "CPUExecutionProvider", "all", "classifier", "mixed", "rpi4", ""]

scalars = st.one_of(
    st.booleans(),
    st.integers(),  # unbounded: past 64 bits and past Python's float range
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(WORDS),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=10))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=10)


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are TOML basic-string escapes (bad surrogates: invalid TOML)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_table(table: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {toml_value(v)}\n" for k, v in table.items())


tables = st.dictionaries(keys, values, max_size=6)
sections = st.one_of(st.sampled_from([*config.SECTIONS, "budgets"]), st.text(min_size=1, max_size=8))
config_docs = st.dictionaries(sections, tables, max_size=4).map(
    lambda doc: "".join(f"[{json.dumps(section)}]\n{toml_table(t)}" for section, t in doc.items()))
deep = st.tuples(st.sampled_from(["[", "{a = "]), st.integers(1, 3000)).map(
    lambda t: "x = " + t[0] * t[1] + ("1" + "]" * t[1] if t[0] == "[" else "1" + "}" * t[1]) + "\n")
raw = st.one_of(st.text(max_size=200), st.binary(max_size=200))
documents = st.one_of(config_docs, tables.map(toml_table), deep, raw)


def _refused_or_fine(call: Any, *allowed: type[BaseException]) -> None:
    try:
        call()
    except (EdgeQmulError, *allowed):
        pass


@FUZZ
@given(doc=documents)
def test_config_loader(scratch: Path, doc: str | bytes) -> None:
    path = _file(scratch, doc)
    _refused_or_fine(lambda: config.load_toml(path))


@FUZZ
@given(doc=st.one_of(documents, tables.map(lambda t: "[budgets]\n" + toml_table(t))))
def test_budgets_loader(scratch: Path, doc: str | bytes) -> None:
    path = _file(scratch, doc)
    _refused_or_fine(lambda: load_budgets(path))


RPI4 = {"name": "board", "description": "a board", "arch": "aarch64", "cpu": "cortex-a72", "cores": 4,
        "isa": ["neon"], "ram_mb": 4096, "providers": ["CPUExecutionProvider"], "threads": 4,
        "quant_engine": "qnnpack", "latency_budget_ms": 25.0, "memory_budget_mb": 512.0}


@FUZZ
@given(doc=st.one_of(documents, st.dictionaries(st.sampled_from(FIELDS), values, max_size=4).map(
    lambda changes: toml_table({**RPI4, **changes}))))
def test_profile_loader(scratch: Path, doc: str | bytes) -> None:
    path = _file(scratch, doc, "board.toml")
    _refused_or_fine(lambda: load_profile(path))


# --- the forget verb's ids and hashes ------------------------------------------------------------------------------


@FUZZ
@given(text=st.one_of(st.text(max_size=80), st.lists(st.integers(), max_size=8).map(
    lambda ids: ",".join(map(str, ids)))))
def test_forget_id_parser(text: str) -> None:
    _refused_or_fine(lambda: cli._ids(text), argparse.ArgumentTypeError)


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300), st.lists(
    st.text(alphabet="0123456789abcdef #\t", max_size=70), max_size=5).map("\n".join)))
def test_hashes_file_reader(scratch: Path, content: str | bytes) -> None:
    path = _file(scratch, content, "hashes.txt")
    _refused_or_fine(lambda: cli._read_hashes(path))


def test_hashes_file_reader_refuses_a_directory(scratch: Path) -> None:
    with pytest.raises(EdgeQmulError):
        cli._read_hashes(scratch)


# --- the request messages devices send -----------------------------------------------------------------------------

BATCH_KEYS = ["device-id", "request-ids", "payloads", "signatures", "awaiting"]
ACK_KEYS = ["count", "request-id", "status", "reason"]
int64 = st.integers(-(2**63), 2**63 - 1)
record_values = st.one_of(
    int64, st.floats(), st.text(max_size=20), st.binary(max_size=80), st.booleans(),
    st.lists(int64, max_size=4), st.lists(st.binary(max_size=120), max_size=4),
    st.lists(st.text(max_size=80), max_size=3),
)
DEVICE_KEY = Ed25519PrivateKey.generate()
DEVICE_ID = DEVICE_KEY.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _record(name: str, fields: dict[str, Any]) -> RecordDict:
    try:
        return RecordDict({name: ConfigRecord(fields)})
    except (TypeError, ValueError):  # Flower refuses to build such a record: it never reaches the server
        assume(False)
        raise


@FUZZ
@given(fields=st.dictionaries(st.one_of(st.sampled_from(BATCH_KEYS), st.text(max_size=6)), record_values,
                              max_size=8),
       name=st.sampled_from(["forget-batch", "forget-batch", "other"]))
def test_device_batch_decoder(fields: dict[str, Any], name: str) -> None:
    """What the server does with a forget reply before it touches the ledger: decode it, check each signature."""
    content = _record(name, fields)

    def check() -> None:
        _, entries, _ = messages.content_to_entries(content)
        for entry in entries:
            _refused_or_fine(lambda entry=entry: verify_request(entry))

    _refused_or_fine(check)


@FUZZ
@given(fields=st.dictionaries(st.one_of(st.sampled_from(ACK_KEYS), st.text(max_size=6)), record_values,
                              max_size=6))
def test_acknowledgement_decoder(fields: dict[str, Any]) -> None:
    """What a device does with a query.ack before it marks anything."""
    content = _record("forget-ack", fields)
    _refused_or_fine(lambda: messages.content_to_answers(content))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
request_fields = st.fixed_dictionaries(
    {f: json_values for f in ("request_id", "kind", "hashes", "class", "created")}
).map(lambda obj: {**obj, "protocol": PROTOCOL, "device_id": DEVICE_ID})
payloads = st.one_of(
    st.binary(max_size=300),
    request_fields.map(canonical_json),
    request_fields.map(lambda obj: json.dumps(obj).encode("utf-8")),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
)


@FUZZ
@given(payload=payloads)
def test_signed_request_parser(payload: bytes) -> None:
    """A genuine signature over arbitrary bytes: verification and parsing are reached, and refuse or pass."""
    entry = {"request_id": "r", "payload": payload.decode("latin-1"), "signature": DEVICE_KEY.sign(payload).hex()}
    _refused_or_fine(lambda: verify_request(entry))
