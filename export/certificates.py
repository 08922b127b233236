"""Deletion certificates and the purge that follows them (DESIGN §9).

``certify(run_dir, key)`` takes the run's validated int8 model (fresh, passed; the same checks as
bundling) and, for every request that model honours and that has no certificate yet:

1. marks the request honoured in the ledger if nothing had (``first_honoured_by`` keeps the earliest);
2. writes ``certificates/<request id>.json``: the request (kind, source, filing time, sample count and the
   sha256 of every sample's raw bytes), the model version that first honoured it, the validated model's
   identity, its metrics and attack results, timestamps, and a signed digest: sha256 over the canonical
   JSON of everything else, signed with Ed25519 (``verify_certificate`` checks it with only the public key);
3. then purges the certified samples' pixels from the run's sample store (only their hashes remain),
   and re-bases the run on the certified model: ``quantized.pt`` becomes that model (int8 + QAT copy), so
   later unlearning starts from a model that already forgot the purged samples and never needs them.

Each step is idempotent and ordered so that a crash leaves nothing half-done that a re-run would not
finish: certificates are written before anything is purged, and the purge before the re-base.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from edge_qmul.devices import ed25519
from edge_qmul.devices.profiles import load_profile
from edge_qmul.export.bundle import fresh_validation, load_signing_key, public_key_hex

from edge_qmul import pipeline
from edge_qmul.atomic import write_json
from edge_qmul.errors import BundleError
from edge_qmul.run import Run, model_version, sha256_file
from edge_qmul.store import SampleStore

CERT_FORMAT = "edge-qmul/deletion-certificate/1"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def certify(run_dir: Run | Path, key_path: Path, *, purge: bool = True) -> dict[str, Any]:
    """Issue the missing certificates for the validated model, then purge and re-base (see module doc)."""
    run = pipeline.as_run(run_dir)
    run_dir = run.root
    key = load_signing_key(key_path)
    report_path = run.path("validation")
    if not report_path.exists():
        raise BundleError(f"{report_path} does not exist: certificates cite a validated model",
                          f"run `edge-qmul validate --run {run_dir} --device PROFILE` first")
    device = json.loads(report_path.read_text()).get("device", "")
    report, meta = fresh_validation(run_dir, load_profile(device))
    onnx_sha = report["model_sha256"]
    version = model_version(report["method"], onnx_sha)
    honoured = set(json.loads(meta.get("honoured_request_ids", "[]")))
    m = report["metrics"]
    model = {"version": version, "method": report["method"], "onnx_sha256": onnx_sha, "device": device,
             "validation_sha256": sha256_file(report_path)}
    metrics = {k: m.get(k) for k in ("FA", "RA", "TA", "MIA", "MIA_retrain", "TA_before", "FA_before")}
    attack = {"loss_auc": m.get("loss_auc"), "loss_auc_interval": m.get("loss_auc_interval"),
              "tpr_at_1fpr": m.get("tpr_at_1fpr"), "mia_efficacy": m.get("MIA")}

    out_dir = run.path("certificates")
    with run.ledger() as ledger:
        fresh = [r.request_id for r in ledger.requests() if r.request_id in honoured and r.honoured_by is None]
        if fresh:
            ledger.mark_honoured(fresh, version)
        rows = [r for r in ledger.requests() if r.request_id in honoured]
    store_path = run.path("samples")
    issued = []
    for r in rows:
        path = out_dir / f"{r.request_id}.json"
        if path.exists():
            continue
        hashes: dict[int, str] = {}
        if store_path.exists():
            with SampleStore(store_path) as store:
                hashes = store.hashes(r.sample_ids)
        body = {
            "format": CERT_FORMAT,
            "request": {"request_id": r.request_id, "kind": r.kind, "spec": r.spec, "source": r.source,
                        "filed_at": r.created_at, "samples": len(r.sample_ids),
                        "sample_sha256": sorted(hashes.values())},
            "first_honoured_by": r.honoured_by,
            "model": model,
            "metrics": metrics,
            "attack": attack,
            "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "purge": "the raw samples are deleted from the server's store after this certificate; "
                     "only the sha256 above remain",
        }
        digest = hashlib.sha256(_canonical(body)).hexdigest()
        cert = {**body, "digest": digest, "signature": key.sign(bytes.fromhex(digest)).hex(),
                "signing_key": public_key_hex(key)}
        write_json(path, cert)
        issued.append(r.request_id)
    result: dict[str, Any] = {"model_version": version, "issued": issued, "certified": len(rows), "purged": 0}
    if purge and rows:
        result["purged"] = purge_certified(run, {r.request_id: r.sample_ids for r in rows}, report["method"])
    return result


def purge_certified(run_dir: Run | Path, ids_by_request: dict[str, list[int]], method: str) -> int:
    """Drop the certified samples from the sample store, then re-base the run on the certified model."""
    run = pipeline.as_run(run_dir)
    store_path = run.path("samples")
    if not store_path.exists():
        raise BundleError(f"{store_path} does not exist: this run reads the dataset directory directly",
                          "runs made by `edge-qmul train` since the sample store exists have one; re-train")
    with SampleStore(store_path) as store:
        n = store.purge(ids_by_request)
        total = len(store.purged())
    if n:
        pipeline.rebase(run, method)
    write_json(run.path("purge"), {"purged": total, "last": datetime.now(UTC).isoformat(timespec="seconds"),
                                        "base": method})
    return n


def verify_certificate(cert: dict[str, Any], public_key: bytes) -> bool:
    """True iff the certificate's digest matches its content and its signature verifies with ``public_key``."""
    body = {k: v for k, v in cert.items() if k not in ("digest", "signature", "signing_key")}
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    if digest != cert.get("digest"):
        return False
    try:
        signature = bytes.fromhex(str(cert.get("signature", "")))
    except ValueError:
        return False
    return ed25519.verify(public_key, bytes.fromhex(digest), signature)
