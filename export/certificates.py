"""Deletion certificates and the purge that follows them (ARCHITECTURE.md §9).

``certify(run_dir, key)`` takes the run's validated int8 model (fresh, passed; the same checks as
bundling, verdicts recomputed) and, for every request that model honours and that has no certificate yet:

0. refuses (``BundleError``, exit 10, nothing written) a model whose weights equal those of the deployed model
   that saw the data (its QAT copy or its int8 weights bit-identical to ``quantized.pt``'s: nothing was
   unlearned), and evidence of level ``approximate-inconclusive`` unless the operator passes
   ``accept_inconclusive`` (``--accept-inconclusive``), which the certificate records;
1. marks the request honoured in the ledger if nothing had (``first_honoured_by`` keeps the earliest);
2. writes ``certificates/<request id>.json``: the request (kind, source, filing time, sample count and the
   sha256 of every sample's raw bytes), the model version that first honoured it, the validated model's
   identity, its metrics and attack results, the evidence (its level — ``exact``, ``approximate-verified``
   or ``approximate-inconclusive``, see ``edge_qmul.export.bundle.LEVELS`` — the forget-set checks it rests
   on, the budgets, and whether the operator accepted inconclusive evidence), timestamps, and a signed
   digest: sha256 over the canonical JSON of everything else, signed with Ed25519 (``verify_certificate``
   checks it with only the public key);
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

import torch
from edge_qmul.devices import ed25519
from edge_qmul.devices.profiles import load_profile
from edge_qmul.export.bundle import (
    FORGET_SET_CHECKS,
    LEVELS,
    fresh_validation,
    load_signing_key,
    public_key_hex,
    run_evidence_level,
)

from edge_qmul import pipeline, quant
from edge_qmul.atomic import write_json
from edge_qmul.errors import BundleError
from edge_qmul.run import Run, model_version, sha256_file
from edge_qmul.store import SampleStore

CERT_FORMAT = "edge-qmul/deletion-certificate/1"
__all__ = ["LEVELS", "certify", "purge_certified", "verify_certificate"]


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def certify(
    run_dir: Run | Path, key_path: Path, *, purge: bool = True, accept_inconclusive: bool = False
) -> dict[str, Any]:
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
        pending = [r for r in ledger.requests()
                   if r.request_id in honoured and not (out_dir / f"{r.request_id}.json").exists()]
    level = run_evidence_level(run, report)
    if pending:  # refusals come before anything is written
        _refuse_unchanged(run, report["method"])
        if level == "approximate-inconclusive" and not accept_inconclusive:
            raise BundleError(
                f"the evidence for {version} is inconclusive: {_why_inconclusive(report['checks'])}; "
                f"{len(pending)} request(s) would be certified on it",
                "file requests large enough to make the forget-set checks conclusive (validation.md says how "
                "many), or unlearn exactly (`unlearn --method retrain`); to certify anyway, pass "
                "--accept-inconclusive (recorded in each certificate)",
            )
    evidence = {
        "level": level,
        "accepted_inconclusive": level == "approximate-inconclusive",  # only reachable with accept_inconclusive
        "forget_set_checks": {n: report["checks"].get(n) for n in FORGET_SET_CHECKS},
        "budgets": report.get("budgets"),
        "budgets_limits": report.get("budgets_limits"),
        "confidence": report.get("confidence"),
    }
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
            "evidence": evidence,
            "issued_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "purge": "the raw samples are deleted from the server's store after this certificate; "
                     "only the sha256 above remain",
        }
        digest = hashlib.sha256(_canonical(body)).hexdigest()
        cert = {**body, "digest": digest, "signature": key.sign(bytes.fromhex(digest)).hex(),
                "signing_key": public_key_hex(key)}
        write_json(path, cert)
        issued.append(r.request_id)
    result: dict[str, Any] = {"model_version": version, "level": level, "issued": issued, "certified": len(rows),
                              "purged": 0}
    if purge and rows:
        result["purged"] = purge_certified(run, {r.request_id: r.sample_ids for r in rows}, report["method"])
    return result


def _why_inconclusive(checks: dict[str, Any]) -> str:
    reasons = []
    for name in FORGET_SET_CHECKS:
        c = checks.get(name)
        if not isinstance(c, dict):
            reasons.append(f"{name} is not budgeted")
        elif "inconclusive" in c:
            reasons.append(f"{name}: {c['inconclusive']}")
        elif c.get("value") is None:
            reasons.append(f"{name} was skipped")
    return "; ".join(reasons) or "a forget-set check did not pass"


def _refuse_unchanged(run: Run, method: str) -> None:
    """Refuse a result whose QAT copy or int8 weights are bit-identical to the deployed model's (the model
    that saw the data): e.g. ``unlearn --method finetune --epochs 0``."""
    q = pipeline.load_quantized(run)
    result = pipeline.load_result_full(run, method, q, run.forget_ids())
    same = [what for what, a, b in (("QAT copy", result.qat_state, quant.save_qat_state(q.qat)),
                                    ("int8 weights", result.int8.state_dict(), q.int8.state_dict()))
            if _same_state(a, b)]
    if same:
        raise BundleError(
            f"the {method} result's {' and '.join(same)} equal the deployed model's in {run.path('quantized').name}, "
            "the model that saw the data: nothing was unlearned",
            f"unlearn with settings that change the model (e.g. `edge-qmul unlearn --run {run.root} --method qmul`), "
            "then export, validate and certify again",
        )


def _same_state(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.is_quantized or b.is_quantized:
            return a.is_quantized and b.is_quantized and a.qscheme() == b.qscheme() and torch.equal(
                a.int_repr(), b.int_repr()) and torch.equal(a.dequantize(), b.dequantize())
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


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
