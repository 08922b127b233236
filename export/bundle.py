"""Signed bundles: what ships to a board (ARCHITECTURE.md §9).

A bundle is one uncompressed tar archive holding

- ``model.int8.onnx`` — the validated int8 model;
- ``probe.npz`` — probe inputs with the reference outputs the validation recorded;
- ``features.onnx`` — the int8 model up to its head's input (when export wrote one): devices compute their own
  samples' features with it for federated Q-MUL (``edge_qmul.federated.fedqmul``);
- ``runtime.py`` and ``ed25519.py`` — the on-board runtime (numpy + onnxruntime only) and its signature
  check, for boards that do not have it installed yet;
- ``manifest.json`` — format, model version, parent model version, device profile, the sha256 and size
  of every other file, the validation metrics and budget checks, the honoured request ids;
- ``manifest.sig`` — the Ed25519 signature of manifest.json's exact bytes.

The signature covers the manifest and the manifest covers every file, so one signature check plus one
hash per file verifies the whole bundle (``edge_qmul.devices.runtime.open_bundle``, run by the board's
installed runtime with the fleet's public key pinned on the board).

A model is bundled only with a validation report for it that is present, fresh (same model sha256, same
device profile, same forget ledger) and passed, and the bundle trusts no flag it did not compute
(``fresh_validation``): the model's graph is checked again for float ops inside the int8 region
(``check_fusion``, exit 8, as ``validate`` does); the budgets file the record names is loaded again and its
merged limits table must equal the one recorded (so an edited budgets file, or a changed profile budget, is
refused, naming the limit); every check's value, limit, noise and verdict are recomputed from the recorded
metrics (``edge_qmul.export.validate.recheck``); and what the record says about the run (sample counts,
whole-class forgetting, which references existed) must match the run. The manifest carries the evidence
level of the requests the model honours (``evidence_level``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edge_qmul.devices import ed25519, runtime
from edge_qmul.devices.profiles import DeviceProfile
from edge_qmul.export.budgets import CHECKS, Budgets, load_budgets
from edge_qmul.export.onnx_export import check_fusion
from edge_qmul.export.validate import forgotten_classes, recheck

from edge_qmul import __version__, pipeline
from edge_qmul.atomic import write_bytes
from edge_qmul.errors import BundleError, ConfigError
from edge_qmul.run import Run, ids_hash, model_version, sha256_file

KEY_FILE, PUBLIC_KEY_FILE = "signing_key.pem", "public_key.hex"
MANIFEST_METRICS = ("FA", "RA", "TA", "MIA", "loss_auc", "tpr_at_1fpr", "parity_top1", "max_logit_diff",
                    "latency_ms_p50", "latency_ms_p95", "peak_memory_mb", "size_bytes", "MIA_retrain",
                    "TA_retained", "FA_retrain")

# What a deletion is backed by (certificates, manifests, status; ARCHITECTURE.md §9):
#   exact                    the model was retrained without the data (``retrain``, or ``auto`` that replayed);
#   approximate-verified     approximate unlearning whose every forget-set check was conclusive and passed;
#   approximate-inconclusive approximate unlearning with a forget-set check that could not tell at this size
#                            (or was not budgeted): certified only when the operator accepts it explicitly.
LEVELS = ("exact", "approximate-verified", "approximate-inconclusive")
FORGET_SET_CHECKS = tuple(name for name, c in CHECKS.items() if c.statistical)


# ---------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------


def keygen(out_dir: Path) -> tuple[Path, Path]:
    """A new Ed25519 signing key (PKCS#8 PEM, mode 0600) and its public key (hex) in ``out_dir``."""
    key_path, pub_path = out_dir / KEY_FILE, out_dir / PUBLIC_KEY_FILE
    for path in (key_path, pub_path):
        if path.exists():
            raise BundleError(f"{path} already exists; refusing to overwrite a key",
                              "choose another --out directory, or move the old key away deliberately")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    write_bytes(pub_path, public_key_hex(key).encode() + b"\n")
    return key_path, pub_path


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    fix = "pass the signing_key.pem written by `edge-qmul keygen --out DIR`"
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as err:
        raise BundleError(f"signing key {path} does not exist", fix) from err
    except (ValueError, TypeError, OSError) as err:
        raise BundleError(f"signing key {path} cannot be read ({err.__class__.__name__})", fix) from err
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"signing key {path} is not an Ed25519 key", fix)
    return key


def public_key_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def sign_json(key: Ed25519PrivateKey, obj: dict[str, Any]) -> tuple[bytes, bytes]:
    """Canonical JSON bytes of ``obj`` and their Ed25519 signature."""
    blob = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode() + b"\n"
    return blob, key.sign(blob)


# ---------------------------------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------------------------------


def evidence_level(method: str, result_log: dict[str, Any] | None, checks: dict[str, Any]) -> str:
    """The level (``LEVELS``) of a validated model's evidence for the requests it honours.

    ``result_log`` is the unlearning method's log (``unlearn/<method>/log.json``'s ``log``): ``auto`` is exact
    only when its planner chose, and ran, an exact replay."""
    log = result_log or {}
    plan = log.get("plan")
    if method == pipeline.REFERENCE or (method == "auto" and isinstance(plan, dict) and plan.get("choice") == "exact"
                                        and "replay" in log):
        return "exact"
    verified = all(isinstance(c := checks.get(name), dict) and c.get("value") is not None
                   and "inconclusive" not in c and c.get("passed") is True for name in FORGET_SET_CHECKS)
    return "approximate-verified" if verified else "approximate-inconclusive"


def run_evidence_level(run: Run, report: dict[str, Any]) -> str:
    """``evidence_level`` of a run's validated model (its method's log read from the run)."""
    log, _ = run.read_json("result_log", method=str(report["method"]))
    inner = (log or {}).get("log")
    return evidence_level(str(report["method"]), inner if isinstance(inner, dict) else None, report["checks"])


def _validated_budgets(report: dict[str, Any], report_path: Path, validate: str) -> Budgets:
    """The budgets the record says it was judged against, loaded again from their file."""
    if "budgets_limits" not in report:
        raise BundleError(f"{report_path} records no budgets table: it was written by an older toolkit", validate)
    path = report.get("budgets_file")
    try:
        return load_budgets(None if path is None else Path(str(path)))
    except ConfigError as err:
        raise BundleError(f"{report_path}: the budgets file it was validated against cannot be loaded again "
                          f"({err.message})", f"restore {path}, or {validate} --budgets FILE") from err


def _check_run_facts(run: Run, report: dict[str, Any], report_path: Path, validate: str) -> None:
    """What the record says about the run must be true of it: the sample counts that set the statistical
    checks' noise, whole-class forgetting, and that every check a run's validation can judge was judged."""
    m = report["metrics"]
    rd = pipeline.load_run_data(run)
    classes = forgotten_classes(run, rd)
    facts = {
        "test_samples": len(rd.split.test),
        "forgotten_classes": None if classes is None else sorted(classes),
    }
    wrong = [f"{k} {m.get(k)!r} (the run has {v!r})" for k, v in facts.items() if m.get(k) != v]
    # the forget samples it measured: those not purged then (a purge after certification removes some since)
    live, every = len(rd.live(rd.split.forget)), len(rd.split.forget)
    n_forget = m.get("forget_samples")
    if not isinstance(n_forget, int) or not live <= n_forget <= every:
        wrong.append(f"forget_samples {n_forget!r} (the run has {live} unpurged of {every})")
    must_judge = ["parity_top1", "max_logit_diff", "ta_drop"]
    if run.exists("result", method=pipeline.REFERENCE):
        must_judge += ["mia_gap_to_retrain"] + (["class_fa_gap_to_retrain"] if classes else [])
    checks = report["checks"]
    wrong += [f"check {n} skipped" for n in must_judge if n in checks and "skipped" in checks[n]]
    if wrong:
        raise BundleError(f"{report_path} does not describe this run: {'; '.join(wrong)}", validate)


def fresh_validation(run_dir: Run | Path, profile: DeviceProfile) -> tuple[dict[str, Any], dict[str, str]]:
    """The run's validation report, if it is for the current model, this device and this ledger, and passed
    by verdicts recomputed here (see the module docstring); with the ONNX model's metadata (honoured
    request ids, forget hash, ...)."""
    run = pipeline.as_run(run_dir)
    run_dir = run.root
    model = run.path("int8_onnx")
    report_path = run.path("validation")
    validate = f"run `edge-qmul validate --run {run_dir} --device {profile.name}`"
    if not model.exists():
        raise BundleError(f"{model} does not exist", f"run `edge-qmul export --run {run_dir}`, then validate")
    if not report_path.exists():
        raise BundleError(f"{report_path} does not exist: the model was never validated", validate)
    try:
        report = json.loads(report_path.read_text())
        validated_sha, device, passed = report["model_sha256"], report["device"], report["passed"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise BundleError(f"{report_path} is unreadable or incomplete ({err.__class__.__name__})", validate) from err
    if not isinstance(report.get("checks"), dict) or not isinstance(report.get("metrics"), dict):
        raise BundleError(f"{report_path} has no checks or metrics", validate)
    actual = sha256_file(model)
    if validated_sha != actual:
        raise BundleError(f"{report_path} is stale: it validated model sha256 {validated_sha[:12]}..., "
                          f"{model.name} is now {actual[:12]}...", validate)
    if device != profile.name:
        raise BundleError(f"{report_path} validated the model for device {device!r}, not {profile.name!r}", validate)
    if passed is not True:  # the record's own verdict: a failed model never ships, whatever else it says
        failed = sorted(n for n, c in report["checks"].items() if not (isinstance(c, dict) and c.get("passed")))
        raise BundleError(f"{report_path}: the model failed validation ({', '.join(failed) or 'see the report'})",
                          "fix the model (unlearning settings or budgets) and validate again; failed models never ship")
    check_fusion(model)  # a float op inside the int8 region: FusionError (exit 8), whatever the record says
    meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    ledger_hash = ids_hash(run.forget_ids())
    if meta.get("forget_hash") != ledger_hash:
        raise BundleError(f"{model.name} does not honour the current forget ledger (new requests arrived after it "
                          "was made)", f"unlearn, export and validate again, then bundle: {validate}")
    # and a passed flag is only believed when the recorded values give it again
    budgets = _validated_budgets(report, report_path, validate)
    _, problems = recheck(report, model, profile, budgets)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BundleError(f"{report_path} does not agree with what it records: {'; '.join(problems[:3])}{more}",
                          f"never edit a validation record; {validate}")
    _check_run_facts(run, report, report_path, validate)
    probe = run.path("probe")
    if not probe.exists() or ("probe_sha256" in report and report["probe_sha256"] != sha256_file(probe)):
        raise BundleError(f"{probe} is missing or not the probe set the validation wrote", validate)
    return report, meta


def build_bundle(
    run_dir: Run | Path, profile: DeviceProfile, key_path: Path, *, out: Path | None = None, parent: str | None = None
) -> Path:
    """Check the validation, write and sign the bundle; returns its path (default: the run's bundles).

    ``parent`` is the model version this one replaces on the fleet (None: the factory model); the fleet
    layer knows which (``edge_qmul.federated.rollout.current_fleet_version``)."""
    run = pipeline.as_run(run_dir)
    key = load_signing_key(key_path)
    report, meta = fresh_validation(run, profile)
    model_bytes = run.path("int8_onnx").read_bytes()
    version = model_version(report["method"], hashlib.sha256(model_bytes).hexdigest())
    devices_dir = Path(runtime.__file__).parent
    files = {
        runtime.MODEL_FILE: model_bytes,
        runtime.PROBE_FILE: run.path("probe").read_bytes(),
        "runtime.py": (devices_dir / "runtime.py").read_bytes(),
        "ed25519.py": (devices_dir / "ed25519.py").read_bytes(),
    }
    features = _features_file(run, model_bytes)
    if features is not None:
        files[runtime.FEATURES_FILE] = features
    manifest: dict[str, Any] = {
        "format": runtime.BUNDLE_FORMAT,
        "model_version": version,
        "parent_version": parent,
        "method": report["method"],
        "device": profile.name,
        "profile": {"arch": profile.arch, "cpu": profile.cpu, "threads": profile.threads,
                    "quant_engine": profile.quant_engine, "latency_budget_ms": profile.latency_budget_ms,
                    "memory_budget_mb": profile.memory_budget_mb},
        "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in sorted(files.items())},
        "metrics": {k: report["metrics"].get(k) for k in MANIFEST_METRICS},
        "budgets": report["checks"],
        "validation_sha256": run.digest("validation"),
        "honoured_request_ids": json.loads(meta.get("honoured_request_ids", "[]")),
        # one model, one body of evidence: the level of every request it honours (certificates cite the same)
        "evidence_level": run_evidence_level(run, report),
        "forget_hash": meta.get("forget_hash"),
        "dataset": meta.get("dataset"),
        "signing_key": public_key_hex(key),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "toolkit_version": __version__,
    }
    blob, signature = sign_json(key, manifest)
    if not ed25519.verify(bytes.fromhex(manifest["signing_key"]), blob, signature):  # the board's check must agree
        raise BundleError(f"the signature made with {key_path} does not verify on the board's verifier",
                          "report this as a bug; do not ship the bundle")
    path = out or run.path("bundles") / f"{version}-{profile.name}.tar"
    write_bytes(path, _tar({**files, runtime.MANIFEST: blob, runtime.SIGNATURE: signature}))
    return path


def _features_file(run: Run, model_bytes: bytes) -> bytes | None:
    """The run's ``features.onnx`` (what devices run for federated Q-MUL), if export wrote one, checked to be cut
    from exactly this model and to run int8 like it; None for a model without one (exported before it existed,
    or without a classifier head to cut at): such a bundle installs and runs, but its devices cannot take part in
    federated Q-MUL."""
    path = run.path("features_onnx")
    if not path.exists():
        return None
    blob = run.verified("features_onnx").read_bytes()
    meta = {p.key: p.value for p in onnx.load_from_string(blob).metadata_props}
    if meta.get("model_sha256") != hashlib.sha256(model_bytes).hexdigest():
        raise BundleError(f"{path} was exported with another model than {run.path('int8_onnx').name}",
                          f"export again (`edge-qmul export --run {run.root}`), validate, then bundle")
    check_fusion(path)
    return blob


def _tar(files: dict[str, bytes]) -> bytes:
    """A deterministic tar of flat files (fixed mtime, owner and mode)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The manifest of a bundle this server built (no signature check: for status and certificates)."""
    try:
        with tarfile.open(bundle, mode="r:") as tar:
            member = tar.extractfile(runtime.MANIFEST)
            if member is None:
                raise KeyError(runtime.MANIFEST)
            return dict(json.loads(member.read()))
    except (OSError, tarfile.TarError, KeyError, json.JSONDecodeError) as err:
        raise BundleError(f"{bundle} is not a readable bundle ({err.__class__.__name__})",
                          "rebuild it with `edge-qmul bundle`") from err


def describe_section(run: Run) -> dict[str, Any]:
    """The export layer's part of ``Run.describe``: validation, bundles, certificates, purged samples."""
    out: dict[str, Any] = {}
    errors: list[str] = []
    validation, error = run.read_json("validation")
    if validation:
        out["validation"] = {k: validation.get(k) for k in ("method", "device", "passed", "model_sha256")}
    bundles = []
    for path in sorted(run.path("bundles").glob("*.tar")):
        try:
            m = read_manifest(path)
        except BundleError as err:
            errors.append(f"{path}: {err.message}")
            continue
        bundles.append({"path": str(path), **{k: m.get(k) for k in ("model_version", "parent_version", "device",
                                                                      "created", "evidence_level")},
                        "honoured_requests": len(m.get("honoured_request_ids", []))})
    out["bundles"] = bundles
    certs = sorted(run.path("certificates").glob("*.json"))
    by_level: dict[str, int] = {}
    for path in certs:
        try:
            level = json.loads(path.read_text(encoding="utf-8")).get("evidence", {}).get("level", "unrecorded")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            errors.append(f"{path} is unreadable ({err.__class__.__name__})")
            continue
        by_level[str(level)] = by_level.get(str(level), 0) + 1
    out["certificates"] = {"issued": len(certs), "by_level": by_level, "files": [c.name for c in certs[-5:]]}
    purge, purge_error = run.read_json("purge")
    if purge:
        out["purged_samples"] = purge.get("purged", 0)
    errors += [e for e in (error, purge_error) if e]
    if errors:
        out["errors"] = errors
    return out
