"""Signed bundles: keygen, bundling only fresh passing validations, and the board refusing tampered bundles."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import copy_run
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from edge_qmul.devices import ed25519, runtime
from edge_qmul.devices.state import verify_signature
from edge_qmul.export.bundle import read_manifest

from edge_qmul.cli import main

LOOSE = "[budgets]\nmia_gap_to_retrain = 100\nfa_minus_ta = 100\nloss_auc = 1\n"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("keys")
    assert main(["keygen", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def validated(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bundle")
    run = copy_run(demo_run, tmp)
    (tmp / "loose.toml").write_text(LOOSE)
    assert main(["export", "--run", str(run)]) == 0
    assert main(["validate", "--run", str(run), "--device", "x86-server", "--budgets", str(tmp / "loose.toml")]) == 0
    return run


@pytest.fixture(scope="module")
def bundle(validated: Path, keys: Path) -> Path:
    assert main(["bundle", "--run", str(validated), "--device", "x86-server", "--key",
                 str(keys / "signing_key.pem")]) == 0
    (path,) = (validated / "bundles").glob("*.tar")
    return path


def public_key(keys: Path) -> bytes:
    return runtime.load_public_key(keys / "public_key.hex")


def rewrite(src: Path, dst: Path, change: dict[str, bytes]) -> Path:
    """A copy of the bundle with some members' bytes replaced (or added)."""
    with tarfile.open(src) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]
    files.update(change)
    with tarfile.open(dst, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return dst


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("check", [ed25519.verify, verify_signature])
def test_pure_python_ed25519_agrees_with_cryptography(check: Any) -> None:
    for i in range(12):
        key = Ed25519PrivateKey.generate()
        pub = key.public_key().public_bytes_raw()
        message = os.urandom(3 * i)
        signature = key.sign(message)
        assert check(pub, message, signature)
        assert not check(pub, message + b"!", signature)
        flipped = bytearray(signature)
        flipped[i % 64] ^= 0x01
        assert not check(pub, message, bytes(flipped))
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert not check(other, message, signature)
        s = int.from_bytes(signature[32:], "little") + ed25519.L  # the same signature with s + L: malleated
        if s < 2**256:
            assert not check(pub, message, signature[:32] + s.to_bytes(32, "little"))
    assert not check(b"\x00" * 31, b"", b"\x00" * 64)  # wrong sizes are simply invalid
    assert not check(b"\x00" * 32, b"", b"\x00" * 64)


def test_request_signatures_verify_in_pure_python_without_cryptography(monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    pub, signature = key.public_key().public_bytes_raw(), key.sign(b"forget")
    for name in ("cryptography.exceptions", "cryptography.hazmat.primitives.asymmetric.ed25519"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert verify_signature(pub, b"forget", signature)
    assert not verify_signature(pub, b"forgot", signature)


def test_keygen_writes_a_private_key_and_refuses_to_overwrite(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (keys / "signing_key.pem").stat().st_mode & 0o777 == 0o600
    assert len(bytes.fromhex((keys / "public_key.hex").read_text().strip())) == 32
    assert main(["keygen", "--out", str(keys)]) == 10
    assert "already exists; refusing to overwrite" in capsys.readouterr().err


def test_bundle_manifest_covers_every_file_and_verifies_on_the_board(bundle: Path, keys: Path,
                                                                     tmp_path: Path) -> None:
    manifest = read_manifest(bundle)
    files = members(bundle)
    assert set(files) == {"manifest.json", "manifest.sig", "model.int8.onnx", "features.onnx", "probe.npz",
                          "runtime.py", "ed25519.py"}
    for name, entry in manifest["files"].items():
        assert hashlib.sha256(files[name]).hexdigest() == entry["sha256"] and len(files[name]) == entry["bytes"]
    assert manifest["device"] == "x86-server" and manifest["method"] == "qmul"
    assert manifest["model_version"].startswith("qmul-") and manifest["honoured_request_ids"]
    assert {"FA", "RA", "TA", "MIA", "loss_auc", "parity_top1"} <= set(manifest["metrics"])
    assert manifest["budgets"]["parity_top1"]["passed"] is True
    result = runtime.check_bundle(bundle, public_key(keys), tmp_path / "board", runs=5, warmup=1)
    assert result["passed"] and result["sha256_verified"] and result["top1_agreement"] == 1.0
    assert result["bundle"]["model_version"] == manifest["model_version"]
    # the feature extractor is extracted beside the model, hash-checked like it, and runs on the board
    board = tmp_path / "board"
    assert hashlib.sha256((board / "features.onnx").read_bytes()).hexdigest() == manifest["files"]["features.onnx"][
        "sha256"]
    with np.load(board / "probe.npz") as probe:
        feats = runtime.compute_features(board / "features.onnx", probe["pixels"][:5])
    assert feats.shape[0] == 5 and feats.dtype == np.float32 and np.isfinite(feats).all()


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("onnx-byte", "hash-mismatch"),
        ("features-byte", "hash-mismatch"),
        ("manifest-edit", "bad-signature"),
        ("other-key", "bad-signature"),
        ("extra-file", "unlisted-file"),
        ("missing-probe", "missing-file"),
        ("path-traversal", "bad-member"),
        ("truncated", "unreadable"),
    ],
)
def test_board_refuses_tampered_bundles(bundle: Path, keys: Path, tmp_path: Path, tamper: str, reason: str) -> None:
    files = members(bundle)
    bad = tmp_path / "bad.tar"
    key = public_key(keys)
    if tamper == "onnx-byte":
        model = bytearray(files["model.int8.onnx"])
        model[len(model) // 2] ^= 0xFF  # one byte in the middle of the weights
        rewrite(bundle, bad, {"model.int8.onnx": bytes(model)})
    elif tamper == "features-byte":
        features = bytearray(files["features.onnx"])
        features[len(features) // 2] ^= 0xFF
        rewrite(bundle, bad, {"features.onnx": bytes(features)})
    elif tamper == "manifest-edit":
        manifest = json.loads(files["manifest.json"])
        manifest["metrics"]["FA"] = 0.0
        rewrite(bundle, bad, {"manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n"})
    elif tamper == "other-key":
        shutil.copy(bundle, bad)
        key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    elif tamper == "extra-file":
        rewrite(bundle, bad, {"payload.sh": b"rm -rf /\n"})
    elif tamper == "missing-probe":
        files.pop("probe.npz")
        with tarfile.open(bad, "w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    elif tamper == "path-traversal":
        rewrite(bundle, bad, {"../evil.py": b"print('x')\n"})
    else:
        bad.write_bytes(bundle.read_bytes()[:3000])
    dest = tmp_path / "board"
    with pytest.raises(runtime.BundleRefused) as err:
        runtime.open_bundle(bad, key, dest)
    assert err.value.reason == reason
    assert not dest.exists()  # nothing was extracted


def test_board_cli_refuses_a_flipped_byte_with_the_reason(bundle: Path, keys: Path, tmp_path: Path) -> None:
    model = bytearray(members(bundle)["model.int8.onnx"])
    model[-100] ^= 0x01
    bad = rewrite(bundle, tmp_path / "bad.tar", {"model.int8.onnx": bytes(model)})
    out = tmp_path / "result.json"
    res = subprocess.run([sys.executable, "-m", "edge_qmul.devices.runtime", "--bundle", str(bad), "--public-key",
                          str(keys / "public_key.hex"), "--out", str(out)], capture_output=True, text=True, check=False)
    assert res.returncode == 2 and not out.exists()
    assert "bundle refused (hash-mismatch): sha256 mismatch for model.int8.onnx" in res.stderr
    ok = subprocess.run([sys.executable, "-m", "edge_qmul.devices.runtime", "--bundle", str(bundle), "--public-key",
                         str(keys / "public_key.hex"), "--runs", "5", "--out", str(out)],
                        capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(out.read_text())["bundle"]["device"] == "x86-server"


def test_fresh_process_check_reports_the_runtime_own_peak_memory(bundle: Path, keys: Path, tmp_path: Path) -> None:
    """A device app measures the bundle in a new process: its peak RSS is the runtime's, not the caller's."""
    ballast = np.ones(300 * 1024 * 1024 // 8)  # lift this process's high-water mark by 300 MB
    caller_peak = runtime.peak_rss_mb()
    result = runtime.check_bundle_in_fresh_process(bundle, public_key(keys), tmp_path / "board", runs=5, warmup=1)
    assert result["passed"] and (tmp_path / "board" / "model.int8.onnx").exists()
    assert caller_peak is not None and caller_peak > 300 and result["peak_rss_mb"] < caller_peak - 200
    del ballast

    model = bytearray(members(bundle)["model.int8.onnx"])
    model[-100] ^= 0x01
    bad = rewrite(bundle, tmp_path / "bad.tar", {"model.int8.onnx": bytes(model)})
    with pytest.raises(runtime.BadInputError) as err:
        runtime.check_bundle_in_fresh_process(bad, public_key(keys), tmp_path / "board2", runs=5, warmup=1)
    assert err.value.message.startswith("bundle refused (hash-mismatch): sha256 mismatch for model.int8.onnx")
    assert not (tmp_path / "board2").exists()


def test_the_bundled_runtime_runs_on_its_own(bundle: Path, keys: Path, tmp_path: Path) -> None:
    """The board has only the bundle's files, numpy and onnxruntime: no edge_qmul package on the path."""
    board = tmp_path / "board"
    board.mkdir()
    for name in ("runtime.py", "ed25519.py"):
        (board / name).write_bytes(members(bundle)[name])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages .pth processing, so the (editable) edge_qmul install is invisible; only the
    # directories holding numpy and onnxruntime are put on the path.
    import numpy
    import onnxruntime

    libs = sorted({str(Path(m.__file__).parents[1]) for m in (numpy, onnxruntime)})  # type: ignore[arg-type]
    res = subprocess.run([sys.executable, "-S", "-c",
                          "import sys; sys.path[:0] = [sys.argv[1], *sys.argv[2].split('|')]; "
                          "import runtime; assert 'edge_qmul' not in sys.modules; "
                          "sys.exit(runtime.main(sys.argv[3:]))",
                          str(board), "|".join(libs), "--bundle", str(bundle),
                          "--public-key", str(keys / "public_key.hex"), "--runs", "3",
                          "--out", str(tmp_path / "r.json")],
                         cwd=board, env=env, capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_bundle_refuses_missing_stale_failed_or_foreign_validation(validated: Path, keys: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    key = str(keys / "signing_key.pem")
    run = copy_run(validated, tmp_path)
    shutil.rmtree(run / "bundles", ignore_errors=True)

    def bundle_exit() -> tuple[int, str]:
        code = main(["bundle", "--run", str(run), "--device", "x86-server", "--key", key])
        return code, capsys.readouterr().err

    report = json.loads((run / "validation.json").read_text())
    (run / "validation.json").write_text(json.dumps({**report, "device": "rpi4"}))
    code, err = bundle_exit()
    assert code == 10 and "validated the model for device 'rpi4'" in err
    (run / "validation.json").write_text(json.dumps({**report, "passed": False}))
    code, err = bundle_exit()
    assert code == 10 and "failed validation" in err
    (run / "validation.json").write_text(json.dumps({**report, "model_sha256": "0" * 64}))
    code, err = bundle_exit()
    assert code == 10 and "validation.json is stale" in err
    (run / "validation.json").unlink()
    code, err = bundle_exit()
    assert code == 10 and "was never validated" in err and "edge-qmul validate" in err
    (run / "validation.json").write_text(json.dumps(report))
    assert main(["forget", "--run", str(run), "--ids", "3,5", "--request-id", "late"]) == 0  # ledger moved on
    code, err = bundle_exit()
    assert code == 10 and "does not honour the current forget ledger" in err
    code = main(["bundle", "--run", str(validated), "--device", "x86-server", "--key", str(tmp_path / "nokey.pem")])
    assert code == 10 and "signing key" in capsys.readouterr().err
    assert not (run / "bundles").exists()  # nothing half-written


def snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.rglob("*"))
            if p.is_file()}


def edit_record(run: Path, change: object) -> None:
    path = run / "validation.json"
    record = json.loads(path.read_text())
    change(record)  # type: ignore[operator]
    path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def failed(validated: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the validated run whose validation failed honestly (max_logit_diff over a tight budget)."""
    tmp = tmp_path_factory.mktemp("failed")
    run = copy_run(validated, tmp)
    shutil.rmtree(run / "bundles", ignore_errors=True)
    (tmp / "tight.toml").write_text(LOOSE + "max_logit_diff = 0.001\n")
    assert main(["validate", "--run", str(run), "--device", "x86-server", "--budgets", str(tmp / "tight.toml")]) == 9
    return run


def _flip_passed(r: dict) -> None:  # type: ignore[type-arg]
    r["passed"] = True
    r["checks"]["max_logit_diff"]["passed"] = True


def _edit_value(r: dict) -> None:  # type: ignore[type-arg]
    _flip_passed(r)
    r["checks"]["max_logit_diff"]["value"] = 0.0001


@pytest.mark.parametrize(
    ("tamper", "code", "message"),
    [
        ("flipped-passed", 10, "check max_logit_diff records passed=True, its value and limit give False"),
        ("edited-check-value", 10, "check max_logit_diff records value 0.0001, recomputed"),
        ("edited-derived-metric", 10, "metric fa_minus_ta is -50.0 but its parts give"),
        ("made-inconclusive", 10, "check loss_auc is recorded as inconclusive but is not"),
        ("fp32-copied-over", 10, "validation.json is stale"),
        ("fp32-and-its-hash", 8, "the optimised graph has no int8 kernels"),
        ("skipped-reference", 10, "check mia_gap_to_retrain skipped"),
    ],
)
def test_bundle_recomputes_every_verdict_and_refuses_an_edited_record(
    validated: Path, failed: Path, keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str,
    code: int, message: str,
) -> None:
    """A bundle trusts no flag it did not compute: each tampering is refused and nothing is written."""
    run = copy_run(failed if tamper in ("flipped-passed", "edited-check-value") else validated, tmp_path)
    shutil.rmtree(run / "bundles", ignore_errors=True)
    if tamper == "flipped-passed":
        edit_record(run, _flip_passed)
    elif tamper == "edited-check-value":
        edit_record(run, _edit_value)
    elif tamper == "edited-derived-metric":  # edited where the check reads it, consistently
        edit_record(run, lambda r: (r["metrics"].update(fa_minus_ta=-50.0), r["checks"]["fa_minus_ta"].update(
            value=-50.0)))
    elif tamper == "made-inconclusive":
        edit_record(run, lambda r: r["checks"]["loss_auc"].update(inconclusive="too few samples"))
    elif tamper == "skipped-reference":  # the run has a retrain: its gap check cannot have been skipped
        edit_record(run, lambda r: (r["metrics"].update(MIA_retrain=None, mia_gap_to_retrain=None),
                                    r["checks"].update(mia_gap_to_retrain={"value": None, "limit": 100.0,
                                                                           "passed": True,
                                                                           "skipped": "no retrained reference"})))
    else:
        shutil.copy(run / "model.fp32.onnx", run / "model.int8.onnx")
        if tamper == "fp32-and-its-hash":
            size = (run / "model.int8.onnx").stat().st_size
            sha = hashlib.sha256((run / "model.int8.onnx").read_bytes()).hexdigest()
            edit_record(run, lambda r: (r.update(model_sha256=sha), r["metrics"].update(size_bytes=size),
                                        r["checks"]["size_bytes"].update(value=float(size))))
    before = snapshot(run)
    out = tmp_path / "out.tar"
    assert main(["bundle", "--run", str(run), "--device", "x86-server", "--key", str(keys / "signing_key.pem"),
                 "--out", str(out)]) == code
    err = capsys.readouterr().err
    assert message in err and "fix:" in err
    assert snapshot(run) == before and not out.exists() and not (run / "bundles").exists()


def test_bundle_refuses_when_the_budgets_file_changed_after_validation(
    validated: Path, keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(validated, tmp_path)
    shutil.rmtree(run / "bundles", ignore_errors=True)
    budgets = tmp_path / "mine.toml"
    budgets.write_text(LOOSE)
    assert main(["validate", "--run", str(run), "--device", "x86-server", "--budgets", str(budgets)]) == 0
    record = json.loads((run / "validation.json").read_text())
    assert record["budgets_file"] == str(budgets.resolve()) and record["budgets_limits"]["loss_auc"] == 1.0
    key = str(keys / "signing_key.pem")

    def bundle_exit() -> tuple[int, str]:
        code = main(["bundle", "--run", str(run), "--device", "x86-server", "--key", key, "--out",
                     str(tmp_path / "b.tar")])
        return code, capsys.readouterr().err

    before = snapshot(run)
    budgets.write_text(LOOSE.replace("loss_auc = 1", "loss_auc = 0.55"))  # a limit edited after validation
    code, err = bundle_exit()
    assert code == 10 and "the budgets changed since validation (loss_auc 1.0 -> 0.55)" in err
    budgets.unlink()
    code, err = bundle_exit()
    assert code == 10 and "cannot be loaded again" in err and str(budgets) in err
    assert snapshot(run) == before and not (tmp_path / "b.tar").exists()
    budgets.write_text(LOOSE + "# a comment changes nothing the verdicts read\n")
    code, err = bundle_exit()
    assert code == 0, err
    assert read_manifest(tmp_path / "b.tar")["evidence_level"] == "approximate-verified"
