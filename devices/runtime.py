"""On-board check of a shipped int8 ONNX model (ARCHITECTURE.md §7, §9).

Runs on the device with nothing but the Python standard library, numpy and onnxruntime installed (no
torch, no onnx, no other edge_qmul module), so this file can also be copied into a bundle and run on
its own as ``python runtime.py ...``.

What it does, in order:

1. read the model file and, if an expected sha256 is given, verify it *before* onnxruntime sees the
   bytes (the session is then built from exactly the bytes that were hashed);
2. create a CPU session (``intra_op_num_threads`` = threads, one inter-op thread, all graph
   optimisations) and check the ONNX contract: one input ``pixels`` (float), an output ``logits``;
3. run the probe set (``probe.npz``: ``pixels`` float32 NCHW, ``reference_logits`` float32
   [N, classes], produced by the same model on a reference machine) and compare top-1 agreement and
   the largest logit difference;
4. time single-sample runs (batch 1) after a warm-up and record peak RSS;
5. write the result as JSON, atomically.

A signed bundle (``edge-qmul bundle``) is checked first with ``open_bundle``: the Ed25519 signature of
its manifest against the public key pinned on the board, then the sha256 of every file against the
manifest, before any file is extracted or parsed; a bundle failing either is refused with the reason.
Signature verification uses the pure-Python ``ed25519`` module shipped next to this file.

Command line::

    python -m edge_qmul.devices.runtime --model model.int8.onnx --probe probe.npz \\
        [--sha256 HEX] [--threads N] [--runs N] [--warmup N] [--atol X] [--min-top1 X] --out result.json
    python -m edge_qmul.devices.runtime --bundle bundle.tar --public-key KEY [--threads N ...] --out result.json

Exit codes: 0 the check passed, 1 the check ran and failed (see ``reasons`` in the JSON),
2 bad input (missing or invalid file, sha256 mismatch, model not following the contract; nothing is
written and one ``error:`` line on stderr names the file and the fix), 3 unexpected internal error.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

try:  # installed package, or a bundle directory where ed25519.py sits next to this file
    from edge_qmul.devices import ed25519
except ImportError:  # pragma: no cover - exercised by running the bundle's copy on its own
    import ed25519  # type: ignore[no-redef]

try:  # not available on Windows; peak RSS is then reported as null
    import resource
except ImportError:  # pragma: no cover - POSIX boards always have it
    resource = None  # type: ignore[assignment]

INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
RESULT_VERSION = 1
PROBE_BATCH = 256  # probe samples per session.run in the agreement pass

BUNDLE_FORMAT = "edge-qmul/bundle/1"
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
MODEL_FILE, PROBE_FILE = "model.int8.onnx", "probe.npz"
# Optional (bundles of models with a classifier head to cut at): the int8 model up to its head's input, output
# ``features`` float32 [batch, F]; devices compute their own samples' features with it for federated Q-MUL.
FEATURES_FILE, FEATURES_OUTPUT = "features.onnx", "features"
MAX_MEMBER_BYTES = 512 * 1024 * 1024

EXIT_PASSED = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


def _ort_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes onnxruntime raises (pybind classes that derive from Exception directly)."""
    names = (
        "Fail",
        "InvalidArgument",
        "InvalidProtobuf",
        "InvalidGraph",
        "NoSuchFile",
        "NoModel",
        "RuntimeException",
        "NotImplemented",
        "EPFail",
        "ModelLoaded",
        "EngineError",
    )
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as state
    except ImportError:  # pragma: no cover - layout of a future onnxruntime
        return (RuntimeError,)
    found = tuple(cls for n in names if isinstance(cls := getattr(state, n, None), type))
    return (*found, RuntimeError)


ORT_ERRORS = _ort_error_types()


class BadInputError(Exception):
    """An input file or option is unusable; ``message`` names it and ``fix`` says what to do (exit 2)."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, fix: str) -> None:
        self.message = " ".join(message.split())  # one line, whatever onnxruntime put in it
        self.fix = fix
        super().__init__(f"{self.message} (fix: {fix})")


@dataclass
class CheckResult:
    """Everything the on-board check measured; serialised as the result JSON."""

    passed: bool
    reasons: list[str]
    warnings: list[str]
    top1_agreement: float
    max_abs_diff: float | None  # None when the model produced non-finite logits
    within_atol: bool
    atol: float
    min_top1: float
    n_probe: int
    num_classes: int
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_mean: float
    latency_batch: int
    runs: int
    warmup: int
    threads: int
    peak_rss_mb: float | None
    model: str
    probe: str
    sha256: str
    sha256_verified: bool
    machine: str
    python_version: str
    onnxruntime_version: str
    numpy_version: str
    providers: list[str] = field(default_factory=list)
    result_version: int = RESULT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------- inputs


def _normalise_sha256(value: str) -> str:
    digest = value.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BadInputError(
            f"--sha256 {value!r} is not a sha256 digest (64 hex characters)",
            "pass the model's sha256 from the bundle manifest",
        )
    return digest


def read_model(model_path: Path, expected_sha256: str | None) -> tuple[bytes, str]:
    """Read the model file and verify its sha256 (if one is expected) before anything parses it."""
    try:
        blob = model_path.read_bytes()
    except FileNotFoundError as err:
        raise BadInputError(f"model file not found: {model_path}", "check the --model path") from err
    except OSError as err:
        raise BadInputError(f"cannot read model file {model_path}: {err}", "check the file's permissions") from err
    digest = hashlib.sha256(blob).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise BadInputError(
            f"sha256 mismatch for model file {model_path}: expected {expected_sha256}, got {digest}; "
            "refusing to load it",
            "the file is corrupt or not the one the manifest describes: fetch the bundle again",
        )
    return blob, digest


def load_probe(probe_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Load ``pixels`` (N, C, H, W) and ``reference_logits`` (N, classes), both float32."""
    fix = "build the probe with np.savez(path, pixels=float32 NCHW, reference_logits=float32 [N, classes])"
    try:
        with open(probe_path, "rb") as handle:
            magic = handle.read(4)
    except FileNotFoundError as err:
        raise BadInputError(f"probe file not found: {probe_path}", "check the --probe path") from err
    except OSError as err:
        raise BadInputError(f"cannot read probe file {probe_path}: {err}", "check the file's permissions") from err
    if magic != b"PK\x03\x04":  # an .npz is a zip archive of .npy arrays
        raise BadInputError(f"probe file {probe_path} is not a readable .npz archive (not a zip file)", fix)
    try:
        archive = np.load(probe_path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise BadInputError(f"probe file {probe_path} is not a readable .npz archive: {err}", fix) from err
    with archive:
        missing = [k for k in ("pixels", "reference_logits") if k not in archive.files]
        if missing:
            raise BadInputError(
                f"probe file {probe_path} lacks array(s) {', '.join(missing)} (has: {', '.join(archive.files)})", fix
            )
        try:
            pixels, reference = archive["pixels"], archive["reference_logits"]
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise BadInputError(f"probe file {probe_path} has an unreadable array: {err}", fix) from err
    for key, array, ndim in (("pixels", pixels, 4), ("reference_logits", reference, 2)):
        if array.dtype != np.float32:
            raise BadInputError(f"probe file {probe_path}: {key} has dtype {array.dtype}, expected float32", fix)
        if array.ndim != ndim:
            raise BadInputError(f"probe file {probe_path}: {key} has shape {array.shape}, expected {ndim} dims", fix)
    if len(pixels) == 0 or len(pixels) != len(reference):
        raise BadInputError(
            f"probe file {probe_path}: {len(pixels)} pixel samples but {len(reference)} reference rows", fix
        )
    return np.ascontiguousarray(pixels), reference


def create_session(blob: bytes, model_path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads, one inter-op thread and all graph optimisations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: warnings would clutter the board's log
    try:
        return ort.InferenceSession(blob, sess_options=options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as err:
        if "PROTOBUF" in str(err).upper():
            message = f"model file {model_path} is not a valid ONNX model: {err}"
        else:
            message = f"onnxruntime {ort.__version__} cannot load model file {model_path}: {err}"
        raise BadInputError(message, "pass the model.int8.onnx shipped in the bundle (re-export it if needed)") from err


def _check_contract(session: ort.InferenceSession, model_path: Path, pixels: np.ndarray, reference: np.ndarray) -> int:
    """Check the model's input/output names, types and fixed dims against the probe; return the batch dim.

    The returned batch is 0 when the model's batch dimension is dynamic, otherwise the fixed size.
    """
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    fix = f"export the model with input_names=['{INPUT_NAME}'] and output_names=['{OUTPUT_NAME}'] (ARCHITECTURE.md §3)"
    if INPUT_NAME not in inputs:
        raise BadInputError(
            f"model file {model_path} has input(s) {', '.join(inputs)}, not the required {INPUT_NAME!r}", fix
        )
    if len(inputs) > 1:
        extra = ", ".join(n for n in inputs if n != INPUT_NAME)
        raise BadInputError(f"model file {model_path} has extra input(s) {extra} besides {INPUT_NAME!r}", fix)
    if OUTPUT_NAME not in outputs:
        raise BadInputError(
            f"model file {model_path} has output(s) {', '.join(outputs)}, not the required {OUTPUT_NAME!r}", fix
        )
    declared = inputs[INPUT_NAME]
    if declared.type != "tensor(float)":
        raise BadInputError(f"model file {model_path}: input {INPUT_NAME!r} is {declared.type}, not float32", fix)
    shape = list(declared.shape)
    if len(shape) != pixels.ndim or any(
        isinstance(want, int) and want != got for want, got in zip(shape[1:], pixels.shape[1:], strict=True)
    ):
        raise BadInputError(
            f"model file {model_path} expects {INPUT_NAME} of shape {shape}, the probe has {list(pixels.shape)}",
            "use the probe set built for this model",
        )
    out_shape = list(outputs[OUTPUT_NAME].shape)
    if len(out_shape) == 2 and isinstance(out_shape[1], int) and out_shape[1] != reference.shape[1]:
        raise BadInputError(
            f"model file {model_path} outputs {out_shape[1]} classes, the probe's reference has {reference.shape[1]}",
            "use the probe set built for this model",
        )
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 0
    if batch and len(pixels) % batch:
        raise BadInputError(
            f"model file {model_path} has a fixed batch of {batch}; the probe's {len(pixels)} samples do not divide",
            "export with a dynamic batch axis",
        )
    return batch


# ------------------------------------------------------------------------------------------ measuring


def _run(session: ort.InferenceSession, model_path: Path, batch: np.ndarray) -> np.ndarray:
    try:
        (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch})
    except ORT_ERRORS as err:
        raise BadInputError(
            f"model file {model_path} failed on a probe batch of shape {list(batch.shape)}: {err}",
            "use the probe set built for this model",
        ) from err
    return np.asarray(logits)


def infer_all(session: ort.InferenceSession, model_path: Path, pixels: np.ndarray, batch: int) -> np.ndarray:
    """Logits for every probe sample, ``batch`` (or PROBE_BATCH) samples per run."""
    step = batch or PROBE_BATCH
    return np.concatenate([_run(session, model_path, pixels[i : i + step]) for i in range(0, len(pixels), step)])


def compute_features(model_path: Path, pixels: np.ndarray, threads: int = 1, batch: int = PROBE_BATCH) -> np.ndarray:
    """``features`` of a bundle's ``features.onnx`` for float32 NCHW ``pixels`` in [0, 1], ``batch`` per run."""
    blob, _ = read_model(Path(model_path), None)
    session = create_session(blob, Path(model_path), threads)
    names = [o.name for o in session.get_outputs()]
    if [i.name for i in session.get_inputs()] != [INPUT_NAME] or FEATURES_OUTPUT not in names:
        raise BadInputError(f"{model_path} is not a feature extractor (input {INPUT_NAME!r}, output "
                            f"{FEATURES_OUTPUT!r}); it has outputs {names}",
                            f"use the {FEATURES_FILE} shipped in the model's bundle")
    out = []
    for i in range(0, len(pixels), batch):
        chunk = np.ascontiguousarray(pixels[i : i + batch], dtype=np.float32)
        try:
            (values,) = session.run([FEATURES_OUTPUT], {INPUT_NAME: chunk})
        except ORT_ERRORS as err:
            raise BadInputError(f"{model_path} failed on a batch of shape {list(chunk.shape)}: {err}",
                                "pass images of the shape the model was trained on") from err
        out.append(np.asarray(values, dtype=np.float32).reshape(len(chunk), -1))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def top_classes(logits: np.ndarray) -> np.ndarray:
    """Boolean mask (n, classes) of each sample's top-scoring classes: several where logits tie at the top.

    An int8 model's logits lie on a grid (one output quantization step apart), so exact ties are common.
    """
    x = np.asarray(logits, dtype=np.float64)
    best = x.max(axis=1, keepdims=True) if x.shape[0] else np.zeros((0, 1))
    return np.asarray(x >= best - 1e-6 * np.maximum(1.0, np.abs(best)))


def top1_agrees(logits: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per sample: does ``logits`` pick the same class as ``reference``?

    Where classes tie at the top, argmax names the first by index, which is not a prediction. Two outputs
    agree when their sets of top-scoring classes intersect: a 1-step difference that breaks a tie the
    other way is agreement, a different winner is not.
    """
    return np.asarray((top_classes(logits) & top_classes(reference)).any(axis=1))


def measure_latency(
    session: ort.InferenceSession, model_path: Path, pixels: np.ndarray, batch: int, runs: int, warmup: int
) -> np.ndarray:
    """Wall time in ms of ``runs`` single-batch runs (batch 1 unless the model fixes it), after warm-up."""
    size = batch or 1
    samples = [pixels[i : i + size] for i in range(0, len(pixels) - size + 1, size)]
    for i in range(warmup):
        _run(session, model_path, samples[i % len(samples)])
    times = np.empty(runs, dtype=np.float64)
    feed_name, fetch = INPUT_NAME, [OUTPUT_NAME]
    for i in range(runs):
        feed = {feed_name: samples[i % len(samples)]}
        start = time.perf_counter()
        session.run(fetch, feed)
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def peak_rss_mb() -> float | None:
    """Peak resident set size of this process in MiB.

    Linux: VmHWM from /proc/self/status, which starts afresh at exec. ru_maxrss does not: it carries
    the peak of the process that forked us (a 500 MB validator would report 500 MB for this runtime).
    Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass  # no procfs: fall back to getrusage below
    if resource is None:  # pragma: no cover
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def run_check(
    model_path: str | os.PathLike[str],
    probe_path: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    atol: float = 1e-4,
    min_top1: float = 0.999,
) -> dict[str, Any]:
    """Verify, run and time the model on the probe set; return the :class:`CheckResult` as a dict.

    ``passed`` is true when the top-1 agreement with the reference logits is at least ``min_top1`` (and
    every logit is finite). ``within_atol`` reports separately whether the largest logit difference is
    at most ``atol``: int8 kernels may legitimately differ in the last bit between CPUs, so exceeding it
    is a warning, not a failure. Raises :class:`BadInputError` for unusable inputs.
    """
    if threads < 1 or runs < 1 or warmup < 0:
        raise BadInputError(
            f"invalid options threads={threads}, runs={runs}, warmup={warmup}",
            "use threads >= 1, runs >= 1, warmup >= 0",
        )
    if not (0.0 <= min_top1 <= 1.0) or not atol >= 0.0:
        raise BadInputError(f"invalid options min_top1={min_top1}, atol={atol}", "use 0 <= min_top1 <= 1 and atol >= 0")
    model_path, probe_path = Path(model_path), Path(probe_path)
    expected = _normalise_sha256(expected_sha256) if expected_sha256 is not None else None

    blob, digest = read_model(model_path, expected)  # hash first: nothing parses unverified bytes
    pixels, reference = load_probe(probe_path)
    session = create_session(blob, model_path, threads)
    del blob
    batch = _check_contract(session, model_path, pixels, reference)

    logits = infer_all(session, model_path, pixels, batch)
    if logits.shape != reference.shape:
        raise BadInputError(
            f"model file {model_path} produced logits of shape {list(logits.shape)}, "
            f"the probe's reference has {list(reference.shape)}",
            "use the probe set built for this model",
        )
    times = measure_latency(session, model_path, pixels, batch, runs, warmup)

    reasons: list[str] = []
    warnings: list[str] = []
    same = top1_agrees(logits, reference)
    agreement = float(same.mean())
    if agreement < min_top1:
        reasons.append(
            f"top-1 agreement {agreement:.4f} is below the minimum {min_top1} "
            f"({int((~same).sum())} of {len(same)} probe samples changed class)"
        )
    finite = bool(np.isfinite(logits).all())
    max_abs_diff = float(np.max(np.abs(logits.astype(np.float64) - reference))) if finite else None
    if not finite:
        reasons.append("the model produced non-finite logits (NaN or inf)")
    within_atol = max_abs_diff is not None and max_abs_diff <= atol
    if finite and not within_atol:
        warnings.append(f"max |logit difference| {max_abs_diff:.3g} exceeds atol {atol:g}")

    result = CheckResult(
        passed=not reasons,
        reasons=reasons,
        warnings=warnings,
        top1_agreement=agreement,
        max_abs_diff=max_abs_diff,
        within_atol=within_atol,
        atol=atol,
        min_top1=min_top1,
        n_probe=len(pixels),
        num_classes=int(reference.shape[1]),
        latency_ms_p50=float(np.percentile(times, 50)),
        latency_ms_p95=float(np.percentile(times, 95)),
        latency_ms_mean=float(times.mean()),
        latency_batch=batch or 1,
        runs=runs,
        warmup=warmup,
        threads=threads,
        peak_rss_mb=peak_rss_mb(),
        model=str(model_path),
        probe=str(probe_path),
        sha256=digest,
        sha256_verified=expected is not None,
        machine=platform.machine(),
        python_version=platform.python_version(),
        onnxruntime_version=ort.__version__,
        numpy_version=np.__version__,
        providers=list(session.get_providers()),
    )
    return result.to_dict()


# --------------------------------------------------------------------------------------------- bundles


class BundleRefused(BadInputError):
    """The bundle failed verification; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, message: str, fix: str) -> None:
        self.reason = reason
        super().__init__(f"bundle refused ({reason}): {message}", fix)


def load_public_key(value: str | os.PathLike[str]) -> bytes:
    """The 32-byte Ed25519 public key from 64 hex characters or a file holding them."""
    text = str(value).strip()
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        path = Path(value)
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise BadInputError(f"public key {value!r} is neither 64 hex characters nor a readable file",
                                "pass the fleet's public_key.hex (from `edge-qmul keygen`)") from err
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise BadInputError(f"public key {value!r} is not a 32-byte hex key",
                            "pass public_key.hex from `edge-qmul keygen`")
    return raw


def _read_members(archive: Path) -> dict[str, bytes]:
    """Every member of the bundle archive, by name; only plain regular files with flat names."""
    refetch = "fetch the bundle again from the server"
    try:
        tar = tarfile.open(archive, mode="r:")  # noqa: SIM115  (closed by the with block below)
    except FileNotFoundError as err:
        raise BadInputError(f"bundle file not found: {archive}", "check the --bundle path") from err
    except (tarfile.TarError, OSError) as err:
        raise BundleRefused("unreadable", f"{archive} is not a readable bundle archive: {err}", refetch) from err
    members: dict[str, bytes] = {}
    with tar:
        try:
            for info in tar:
                name = info.name
                if not info.isfile() or "/" in name or "\\" in name or name in ("", ".", ".."):
                    raise BundleRefused("bad-member", f"{archive} holds {name!r}, which is not a plain file name",
                                        refetch)
                if name in members:
                    raise BundleRefused("bad-member", f"{archive} holds {name!r} twice", refetch)
                if info.size > MAX_MEMBER_BYTES:
                    raise BundleRefused("bad-member", f"{archive}: {name} is {info.size} bytes", refetch)
                handle = tar.extractfile(info)
                members[name] = handle.read() if handle is not None else b""
        except (tarfile.TarError, OSError, EOFError) as err:
            raise BundleRefused("unreadable", f"{archive} is truncated or corrupt: {err}", refetch) from err
    return members


def open_bundle(archive: str | os.PathLike[str], public_key: bytes, dest: str | os.PathLike[str]) -> dict[str, Any]:
    """Verify a bundle, then write its files into ``dest``; returns the manifest.

    Order: the manifest's signature against ``public_key``, then every listed file's sha256, then no
    unlisted files. Nothing is written, parsed or run unless all of that holds.
    """
    archive, dest = Path(archive), Path(dest)
    members = _read_members(archive)
    refetch = "fetch the bundle again from the server; do not install it"
    for name in (MANIFEST, SIGNATURE):
        if name not in members:
            raise BundleRefused("incomplete", f"{archive} has no {name}", refetch)
    if not ed25519.verify(public_key, members[MANIFEST], members[SIGNATURE]):
        raise BundleRefused(
            "bad-signature",
            f"the signature of {archive}'s manifest does not verify with the pinned key "
            f"{public_key.hex()[:16]}...: the manifest was modified or signed by another key",
            refetch,
        )
    try:
        manifest = json.loads(members[MANIFEST])
        files = manifest["files"]
        listed = {str(n): str(f["sha256"]) for n, f in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise BundleRefused("bad-manifest", f"{archive}'s signed manifest is malformed: {err}", refetch) from err
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleRefused("bad-manifest", f"{archive} has format {manifest.get('format')!r}, not {BUNDLE_FORMAT}",
                            "update the on-board runtime")
    for name in (MODEL_FILE, PROBE_FILE):
        if name not in listed:
            raise BundleRefused("incomplete", f"{archive}'s manifest lists no {name}", refetch)
    for name, digest in sorted(listed.items()):
        if name not in members:
            raise BundleRefused("missing-file", f"{archive} lacks {name}, which its manifest lists", refetch)
        actual = hashlib.sha256(members[name]).hexdigest()
        if actual != digest:
            raise BundleRefused(
                "hash-mismatch",
                f"sha256 mismatch for {name} in {archive}: manifest {digest[:16]}..., file {actual[:16]}...; "
                "the file was modified after signing",
                refetch,
            )
    extra = sorted(set(members) - set(listed) - {MANIFEST, SIGNATURE})
    if extra:
        raise BundleRefused("unlisted-file", f"{archive} holds file(s) {extra} its manifest does not cover", refetch)
    dest.mkdir(parents=True, exist_ok=True)
    for name in [*listed, MANIFEST, SIGNATURE]:
        _write_bytes_atomic(dest / name, members[name])
    return dict(manifest)


def check_bundle(
    archive: str | os.PathLike[str], public_key: bytes, dest: str | os.PathLike[str], **options: Any
) -> dict[str, Any]:
    """``open_bundle`` then ``run_check`` on its model and probe; the result carries the bundle's identity."""
    manifest = open_bundle(archive, public_key, dest)
    dest = Path(dest)
    result = run_check(dest / MODEL_FILE, dest / PROBE_FILE,
                       expected_sha256=manifest["files"][MODEL_FILE]["sha256"], **options)
    result["bundle"] = {k: manifest.get(k) for k in ("model_version", "parent_version", "device", "method")}
    return result


def run_in_fresh_process(cli_args: list[str]) -> tuple[dict[str, Any] | None, subprocess.CompletedProcess[str]]:
    """This module's CLI in a new Python process: the result JSON (None if it wrote none) and the process.

    Peak RSS is a process's high-water mark, so measured inside a device app (torch, its data partition),
    a validator or a test process it is theirs, not the runtime's (a rollout test once failed a 1024 MB
    budget at 1033 MB of pytest's own peak); a board runs the runtime alone.
    """
    with tempfile.TemporaryDirectory(prefix="edge-qmul-check-") as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, "-m", "edge_qmul.devices.runtime", *cli_args, "--out", str(out)],
                              capture_output=True, text=True, check=False)
        return (dict(json.loads(out.read_text())) if out.exists() else None), proc


def check_bundle_in_fresh_process(
    archive: str | os.PathLike[str], public_key: bytes, dest: str | os.PathLike[str], *, threads: int = 1,
    runs: int = 50, warmup: int = 5,
) -> dict[str, Any]:
    """``check_bundle`` as the board runs it (``run_in_fresh_process``). A refused bundle raises
    ``BadInputError`` with the runtime's reason."""
    result, proc = run_in_fresh_process(
        ["--bundle", str(archive), "--public-key", public_key.hex(), "--extract-to", str(dest),
         "--threads", str(threads), "--runs", str(runs), "--warmup", str(warmup)])
    if result is not None:
        return result
    lines = proc.stderr.strip().splitlines()
    last = lines[-1].removeprefix("error: ") if lines else f"exit code {proc.returncode}"
    if proc.returncode == EXIT_BAD_INPUT and " (fix: " in last:
        message, _, fix = last.partition(" (fix: ")
        raise BadInputError(message, fix.removesuffix(")"))
    raise BadInputError(f"the on-board runtime failed (exit {proc.returncode}): {last}",
                        "run `python -m edge_qmul.devices.runtime --bundle ...` on the board and read its error")


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------- output


def write_json_atomic(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write JSON through a temporary file in the same directory and ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m edge_qmul.devices.runtime",
        description="On-board check of an int8 ONNX model: sha256, parity with reference logits, latency, memory.",
        epilog="exit codes: 0 passed, 1 check failed, 2 bad input (nothing written), 3 internal error",
    )
    parser.add_argument("--model", type=Path, help="the int8 ONNX model (model.int8.onnx)")
    parser.add_argument("--probe", type=Path, help="probe.npz with pixels and reference_logits")
    parser.add_argument("--bundle", type=Path, help="a signed bundle (instead of --model/--probe/--sha256)")
    parser.add_argument("--public-key", help="with --bundle: the pinned public key (64 hex chars or a file)")
    parser.add_argument("--extract-to", type=Path,
                        help="with --bundle: where verified files go (default: beside --out)")
    parser.add_argument("--sha256", help="expected sha256 of the model file; verified before it is loaded")
    parser.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--runs", type=_positive_int, default=50, help="timed batch-1 runs (default 50)")
    parser.add_argument("--warmup", type=_non_negative_int, default=5, help="untimed warm-up runs (default 5)")
    parser.add_argument("--atol", type=float, default=1e-4, help="logit tolerance for within_atol (default 1e-4)")
    parser.add_argument("--min-top1", type=float, default=0.999, help="minimum top-1 agreement to pass (default 0.999)")
    parser.add_argument("--out", required=True, type=Path, help="where to write the result JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.bundle is None and (args.model is None or args.probe is None):
        parser.error("give --model and --probe, or --bundle and --public-key")
    if args.bundle is not None and (args.public_key is None or args.model or args.probe or args.sha256):
        parser.error("--bundle needs --public-key and replaces --model, --probe and --sha256")
    options: dict[str, Any] = dict(threads=args.threads, runs=args.runs, warmup=args.warmup, atol=args.atol,
                                   min_top1=args.min_top1)
    try:
        if args.bundle is not None:
            dest = args.extract_to or args.out.parent / f"{args.bundle.stem}.verified"
            result = check_bundle(args.bundle, load_public_key(args.public_key), dest, **options)
        else:
            result = run_check(args.model, args.probe, expected_sha256=args.sha256, **options)
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception:  # a bug, not a verdict on the model: keep it distinct from exit 1
        traceback.print_exc()
        print("error: internal error in the on-board runtime (a bug: please report the traceback)", file=sys.stderr)
        return EXIT_INTERNAL
    try:
        write_json_atomic(args.out, result)
    except OSError as err:
        print(f"error: cannot write result file {args.out}: {err} (fix: check --out)", file=sys.stderr)
        return EXIT_BAD_INPUT
    summary = (
        f"top-1 agreement {result['top1_agreement']:.4f} on {result['n_probe']} samples, "
        f"max |dlogit| {result['max_abs_diff']}, p95 {result['latency_ms_p95']:.3f} ms "
        f"at {result['threads']} thread(s); result in {args.out}"
    )
    if result["passed"]:
        print(f"PASS: {summary}")
        return EXIT_PASSED
    print(f"FAIL: {'; '.join(result['reasons'])}; {summary}")
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
