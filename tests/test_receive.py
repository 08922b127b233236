"""Devices' signed requests reach the server's ledger by content id only (issue 15, items 2-4, server side):
two devices hold their own image files, the server trained on all of them with a provenance CSV naming each
device's key, and the server answers each signed request from a device's queue."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from edge_qmul.devices.state import DataSpec, DeviceState, canonical_json
from edge_qmul.federated.receive import receive
from imagedata import digits_uint8, write_image_folder

import edge_qmul as eq
from edge_qmul import content, data
from edge_qmul.store import SampleStore

CLASSES = [f"c{i}" for i in range(10)]


def _fleet_key() -> str:
    return Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Server data = the union of two devices' folders (300 digits each); a run trained with provenance."""
    tmp = tmp_path_factory.mktemp("fleet")
    images, labels = digits_uint8(600)
    server = tmp / "server-data"
    paths = write_image_folder(server, images, labels, CLASSES)
    devices = {}
    for name, part in (("a", slice(0, 300)), ("b", slice(300, 600))):
        root = tmp / f"device-{name}"
        for p in paths[part]:
            dst = root / p.parent.name / p.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, dst)
        for c in CLASSES:
            (root / c).mkdir(parents=True, exist_ok=True)
        devices[name] = DeviceState.init(tmp / f"state-{name}", DataSpec("imagefolder", root), _fleet_key())
    # provenance: each device's key -> the content ids of its files that are training samples
    source = data.load_dataset("imagefolder", server)
    split = data.make_split(source, 0, val_fraction=0.1, test_fraction=0.2)
    ids = data.content_ids(source.train)
    train = {ids[i] for i in split.train}
    rows = ["device_id,sha256"]
    for name, part in (("a", slice(0, 300)), ("b", slice(300, 600))):
        for p in paths[part]:
            if content.hash_file(p) in train:
                rows.append(f"{devices[name].device_id},{content.hash_file(p)}")
    (tmp / "provenance.csv").write_text("\n".join(rows) + "\n")
    run = tmp / "run"
    eq.Run(run).train(eq.DataConfig(dataset="imagefolder", root=str(server)), eq.TrainConfig(epochs=1),
                      provenance=tmp / "provenance.csv")
    return {"run": run, "devices": devices, "paths": paths, "train": train, "tmp": tmp}


def _fresh_run(fleet: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(fleet["run"], dst)
    return dst


def _ledger(run: Path) -> dict:
    with eq.Run(run).ledger() as ledger:
        return {r.request_id: r for r in ledger.requests()}


def _trained_file(fleet: dict, device: str, k: int = 0) -> Path:
    part = fleet["paths"][:300] if device == "a" else fleet["paths"][300:]
    return [p for p in part if content.hash_file(p) in fleet["train"]][k]


def test_a_devices_request_is_acknowledged_after_it_is_in_the_ledger(fleet: dict, tmp_path: Path) -> None:
    run = _fresh_run(fleet, tmp_path)
    dev = fleet["devices"]["a"]
    own = _trained_file(fleet, "a")
    device_file = Path(dev.data_root) / own.parent.name / own.name
    filed = dev.forget(files=[device_file])
    (answer,) = receive(run, [e for e in dev.pending() if e["request_id"] == filed.request_id])
    assert answer.status == "acknowledged" and answer.recorded
    row = _ledger(run)[filed.request_id]
    assert row.spec["device"] == dev.device_id and row.source == "device"
    with SampleStore(eq.Run(run).require("samples")) as store:
        assert set(store.hashes(row.sample_ids).values()) == {content.hash_file(own)}
    # the same signed entry again: acknowledged, not recorded twice
    again = receive(run, [e for e in dev.pending() if e["request_id"] == filed.request_id])
    assert again[0].status == "acknowledged" and not again[0].recorded and len(_ledger(run)) == 1


def test_forged_and_tampered_requests_are_refused(fleet: dict, tmp_path: Path) -> None:
    run = _fresh_run(fleet, tmp_path)
    a = fleet["devices"]["a"]
    theirs = content.hash_file(_trained_file(fleet, "b"))
    # a body naming device a with b's sample, signed by someone else's key
    body = {"protocol": "edge-qmul/device-request/1", "device_id": a.device_id, "request_id": "f" * 32,
            "kind": "samples", "hashes": [theirs], "class": None, "created": 0}
    payload = canonical_json(body)
    forged = {"request_id": "f" * 32, "payload": payload.decode(), "signature": Ed25519PrivateKey.generate().sign(
        payload).hex()}
    # a genuine entry whose payload was edited after signing
    own = _trained_file(fleet, "a", 1)
    filed = a.forget(files=[Path(a.data_root) / own.parent.name / own.name])
    entry = next(e for e in a.pending() if e["request_id"] == filed.request_id)
    edited = dict(entry, payload=entry["payload"].replace(content.hash_file(own), theirs))
    answers = receive(run, [forged, edited, {"garbage": True}])
    assert [x.status for x in answers] == ["refused"] * 3
    assert all(x.reason.startswith("bad-signature") for x in answers)
    assert _ledger(run) == {}


def test_a_device_cannot_ask_for_another_devices_sample(fleet: dict, tmp_path: Path) -> None:
    """b holds a copy of a's file: its own index accepts it, the server's provenance does not."""
    run = _fresh_run(fleet, tmp_path)
    b = fleet["devices"]["b"]
    theirs = content.hash_file(_trained_file(fleet, "a"))
    key_path = b.dir / "device_key.pem"
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(key_path.read_bytes(), password=None)
    body = {"protocol": "edge-qmul/device-request/1", "device_id": b.device_id, "request_id": "b" * 32,
            "kind": "samples", "hashes": [theirs], "class": None, "created": 0}
    payload = canonical_json(body)
    entry = {"request_id": "b" * 32, "payload": payload.decode(), "signature": key.sign(payload).hex()}
    (answer,) = receive(run, [entry])
    assert answer.status == "refused" and answer.reason.startswith("not-owner")
    assert "other devices" in answer.reason and _ledger(run) == {}


def test_a_sample_the_device_holds_but_never_contributed_is_refused(fleet: dict, tmp_path: Path) -> None:
    run = _fresh_run(fleet, tmp_path)
    a = fleet["devices"]["a"]
    held_out = next(p for p in fleet["paths"][:300] if content.hash_file(p) not in fleet["train"])
    filed = a.forget(files=[Path(a.data_root) / held_out.parent.name / held_out.name])
    (answer,) = receive(run, [e for e in a.pending() if e["request_id"] == filed.request_id])
    assert answer.status == "refused" and "not in the training set" in answer.reason


def test_class_and_leave_requests(fleet: dict, tmp_path: Path) -> None:
    run = _fresh_run(fleet, tmp_path)
    b = fleet["devices"]["b"]
    cls = b.forget(label=2)
    leave = b.forget(leave=True)
    answers = {x.request_id: x for x in receive(run, b.pending())}
    assert answers[cls.request_id].status == "acknowledged" and answers[leave.request_id].status == "acknowledged"
    rows = _ledger(run)
    with SampleStore(eq.Run(run).require("samples")) as store:
        mine = set(store.contributed_by(b.device_id))
        left = set(store.hashes(rows[leave.request_id].sample_ids).values())
        cls_hashes = set(store.hashes(rows[cls.request_id].sample_ids).values())
    assert left == mine and cls_hashes < mine  # only its own samples, all of them for leave
    assert rows[leave.request_id].kind == "client"


def test_the_answers_are_json_for_a_flower_message(fleet: dict, tmp_path: Path) -> None:
    run = _fresh_run(fleet, tmp_path)
    answers = receive(run, [{"request_id": "x", "payload": "{}", "signature": "00"}])
    assert json.loads(json.dumps([a.to_dict() for a in answers]))[0]["status"] == "refused"
    assert np.all([a.request_id == "x" for a in answers])
