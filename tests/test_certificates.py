"""Deletion certificates, the purge of the raw samples, and what the run does afterwards."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_run
from edge_qmul.devices import runtime
from edge_qmul.export.certificates import verify_certificate

from edge_qmul import pipeline
from edge_qmul.cli import main
from edge_qmul.ledger import Ledger
from edge_qmul.store import SampleStore, sample_sha256

LOOSE = "[budgets]\nmia_gap_to_retrain = 100\nfa_minus_ta = 100\nloss_auc = 1\n"


@pytest.fixture(scope="module")
def certified(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[int, bytes]]:
    """A validated demo run, certified and purged; plus the raw bytes its forget samples had before."""
    tmp = tmp_path_factory.mktemp("certify")
    run = copy_run(demo_run, tmp)
    (tmp / "loose.toml").write_text(LOOSE)
    assert main(["keygen", "--out", str(tmp / "keys")]) == 0
    assert main(["export", "--run", str(run)]) == 0
    assert main(["validate", "--run", str(run), "--device", "x86-server", "--budgets", str(tmp / "loose.toml")]) == 0
    rd = pipeline.load_run_data(run)
    before = {i: rd.source.train.images[i].tobytes() for i in rd.split.forget}
    assert main(["certify", "--run", str(run), "--key", str(tmp / "keys" / "signing_key.pem")]) == 0
    return run, tmp / "keys", before


def test_every_honoured_request_has_a_signed_certificate(certified: tuple[Path, Path, dict[int, bytes]]) -> None:
    run, keys, before = certified
    with Ledger(run / "ledger.sqlite") as ledger:
        rows = ledger.requests()
    assert rows and all(r.honoured_by for r in rows)
    key = runtime.load_public_key(keys / "public_key.hex")
    for r in rows:
        cert = json.loads((run / "certificates" / f"{r.request_id}.json").read_text())
        assert cert["request"]["request_id"] == r.request_id and cert["request"]["samples"] == len(r.sample_ids)
        assert cert["first_honoured_by"] == r.honoured_by == cert["model"]["version"]
        assert cert["request"]["sample_sha256"] == sorted(hashlib_of(before[i]) for i in r.sample_ids)
        assert {"FA", "RA", "TA", "MIA"} <= set(cert["metrics"]) and cert["attack"]["loss_auc"] is not None
        assert verify_certificate(cert, key)
        edited = {**cert, "metrics": {**cert["metrics"], "FA": 0.0}}
        assert not verify_certificate(edited, key)  # any edit breaks the digest
        forged = {**cert, "signature": "00" * 64}
        assert not verify_certificate(forged, key)


def hashlib_of(raw: bytes) -> str:
    return sample_sha256(np.frombuffer(raw, dtype=np.uint8))


def test_purge_leaves_only_hashes_and_the_bytes_are_gone(certified: tuple[Path, Path, dict[int, bytes]]) -> None:
    run, _, before = certified
    store_path = run / "samples.sqlite"
    with sqlite3.connect(store_path) as conn:
        rows = dict(conn.execute("SELECT id, pixels IS NULL FROM samples").fetchall())
        hashes = dict(conn.execute("SELECT id, sha256 FROM samples").fetchall())
    assert all(rows[i] for i in before)  # pixels NULL for every forgotten sample
    assert sum(rows.values()) == len(before)  # and for nothing else
    assert all(hashes[i] == hashlib_of(raw) for i, raw in before.items())  # the hashes remain
    # The raw bytes are in neither the database file nor its WAL: scan them for samples whose bytes are
    # unique in the pool (digits has a few duplicate images, which legitimately remain).
    with SampleStore(store_path) as store:
        images, _, _, purged = store.load()
    kept = {images[i].tobytes() for i in range(len(images)) if i not in purged}
    unique = [raw for raw in before.values() if raw not in kept]
    assert len(unique) > 0.9 * len(before)
    disk = b"".join(p.read_bytes() for p in run.glob("samples.sqlite*"))
    assert not any(raw in disk for raw in unique)
    # the feature cache holds no row for a purged sample either
    features = pipeline.load_payload(run / "features.pt", "features", "")
    assert not set(features["indices"].tolist()) & set(before)


def test_after_the_purge_the_run_cannot_read_them_and_starts_from_the_certified_model(
    certified: tuple[Path, Path, dict[int, bytes]], tmp_path: Path
) -> None:
    run, keys, before = certified
    run = copy_run(run, tmp_path)
    rd = pipeline.load_run_data(run)
    assert rd.purged == frozenset(before)
    assert len(rd.tensors("forget")[0]) == 0 and len(rd.tensors("train")[0]) == len(rd.split.train) - len(before)
    q = pipeline.load_quantized(run)
    assert q.info["base"]["method"] == "qmul"  # re-based on the certified model
    # the base model is the certified one: its test predictions equal the exported ONNX's
    import onnxruntime as ort

    tx, _ = rd.tensors("test")
    sess = ort.InferenceSession(str(run / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    onnx_pred = sess.run(None, {"pixels": tx.numpy()})[0].argmax(1)
    with __import__("torch").no_grad():
        base_pred = q.int8(tx).argmax(1).numpy()
    assert (onnx_pred == base_pred).mean() > 0.99
    # nothing left to unlearn until a new request comes
    assert main(["unlearn", "--run", str(run), "--method", "qmul", "--quiet"]) == 5
    # a new request unlearns from the certified base, without ever touching the purged samples
    fresh = [i for i in rd.split.retain() if i not in rd.purged][:20]
    assert main(["forget", "--run", str(run), "--ids", ",".join(map(str, fresh)), "--request-id", "later"]) == 0
    assert main(["unlearn", "--run", str(run), "--method", "qmul", "--quiet"]) == 0
    assert main(["unlearn", "--run", str(run), "--method", "retrain", "--quiet"]) == 0
    report = pipeline.evaluate(run, ["qmul", "retrain"])
    assert report.forget_count == len(before) + 20
    assert not rd.source.train.images[sorted(before)].any()  # the pool the run reads has no pixels for them
    assert main(["status", "--run", str(run)]) == 0


def test_certify_is_idempotent_and_refuses_without_a_validation(
    certified: tuple[Path, Path, dict[int, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, keys, _ = certified
    run = copy_run(run, tmp_path)
    certs = {p.name: p.read_bytes() for p in (run / "certificates").glob("*.json")}
    # Same ONNX, same validation, same ledger: nothing new to certify or purge.
    assert main(["certify", "--run", str(run), "--key", str(keys / "signing_key.pem")]) == 0
    assert "0 certificate(s) issued" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (run / "certificates").glob("*.json")} == certs
    (run / "validation.json").unlink()
    assert main(["certify", "--run", str(run), "--key", str(keys / "signing_key.pem")]) == 10
    assert "certificates cite a validated model" in capsys.readouterr().err


def snapshot(run: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file()}


def prepared(demo_run: Path, tmp_path: Path, budgets: str, *unlearn: str, method: str = "qmul") -> tuple[Path, str]:
    """A copy of the demo run, optionally unlearned again, exported and validated (passing) with ``budgets``;
    with a fresh signing key."""
    run = copy_run(demo_run, tmp_path)
    (tmp_path / "budgets.toml").write_text(budgets)
    assert main(["keygen", "--out", str(tmp_path / "keys")]) == 0
    if unlearn:
        assert main(["unlearn", "--run", str(run), "--method", method, "--quiet", *unlearn]) == 0
    assert main(["export", "--run", str(run), "--method", method]) == 0
    assert main(["validate", "--run", str(run), "--device", "x86-server", "--budgets",
                 str(tmp_path / "budgets.toml"), "--method", method]) == 0
    return run, str(tmp_path / "keys" / "signing_key.pem")


def test_certificates_and_status_carry_the_evidence_level(certified: tuple[Path, Path, dict[int, bytes]],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    run, _, _ = certified
    (cert_path,) = (run / "certificates").glob("*.json")
    evidence = json.loads(cert_path.read_text())["evidence"]
    # qmul, both forget-set checks conclusive and passing under the budgets it was validated with
    assert evidence["level"] == "approximate-verified" and evidence["accepted_inconclusive"] is False
    assert set(evidence["forget_set_checks"]) == {"fa_minus_ta", "loss_auc"}
    assert all("inconclusive" not in c and c["passed"] for c in evidence["forget_set_checks"].values())
    assert evidence["budgets_limits"]["loss_auc"] == 1.0
    assert main(["status", "--run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["certificates"]["by_level"] == {"approximate-verified": 1}
    assert main(["status", "--run", str(run)]) == 0
    assert "certificates: 1 issued (approximate-verified 1)" in capsys.readouterr().out


def test_a_retrained_model_is_certified_as_exact(demo_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run, key = prepared(demo_run, tmp_path, LOOSE + "ta_drop = 100\n", method="retrain")
    assert main(["certify", "--run", str(run), "--key", key, "--no-purge"]) == 0
    assert "(exact)" in capsys.readouterr().out
    (cert_path,) = (run / "certificates").glob("*.json")
    assert json.loads(cert_path.read_text())["evidence"]["level"] == "exact"


def test_certify_refuses_a_model_that_never_changed(demo_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`unlearn --method finetune --epochs 0` passes validation, but its weights are the deployed model's."""
    run, key = prepared(demo_run, tmp_path, LOOSE + "ta_drop = 100\n", "--epochs", "0", method="finetune")
    before = snapshot(run)
    assert main(["certify", "--run", str(run), "--key", key, "--accept-inconclusive"]) == 10
    err = capsys.readouterr().err
    assert "the finetune result's QAT copy" in err and "nothing was unlearned" in err and "fix:" in err
    assert snapshot(run) == before and not (run / "certificates").exists()


def test_certify_refuses_inconclusive_evidence_unless_accepted(demo_run: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # loss_auc at 0.55 with 99.9% confidence: a 126-sample request cannot tell (noise ~0.09 > margin 0.05)
    run, key = prepared(demo_run, tmp_path, LOOSE.replace("loss_auc = 1", "loss_auc = 0.55") + "confidence = 0.999\n")
    assert "inconclusive" in json.loads((run / "validation.json").read_text())["checks"]["loss_auc"]
    before = snapshot(run)
    assert main(["certify", "--run", str(run), "--key", key]) == 10
    err = capsys.readouterr().err
    assert "is inconclusive: loss_auc: with 126 forget samples" in err and "--accept-inconclusive" in err
    assert snapshot(run) == before and not (run / "certificates").exists()
    with Ledger(run / "ledger.sqlite") as ledger:
        assert all(r.honoured_by is None for r in ledger.requests())  # nothing marked either
    assert main(["certify", "--run", str(run), "--key", key, "--accept-inconclusive", "--no-purge"]) == 0
    assert "(approximate-inconclusive)" in capsys.readouterr().out
    (cert_path,) = (run / "certificates").glob("*.json")
    cert = json.loads(cert_path.read_text())
    assert cert["evidence"]["level"] == "approximate-inconclusive" and cert["evidence"]["accepted_inconclusive"]
    assert verify_certificate(cert, runtime.load_public_key(tmp_path / "keys" / "public_key.hex"))
    assert main(["status", "--run", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["certificates"]["by_level"] == {"approximate-inconclusive": 1}
