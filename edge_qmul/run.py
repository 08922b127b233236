"""The run directory and its one owner (ARCHITECTURE.md §3).

A run directory holds every artifact of one model's life: the split, the float checkpoint, the deployed
int8 model with its QAT copy, the forget ledger, unlearning results, the exported ONNX, its validation,
bundles, rollouts and certificates. ``ARTIFACTS`` declares each file once: its name, its format, what it
is made from and which command writes it; every stage asks ``Run`` for paths, so a file name is spelled
in exactly one place, and a missing artifact's error names the command that makes it.

Two facts live in one place only:

* the forget set is the union of the requests in the ledger (``Run.forget_ids``); nothing else stores it;
* a model's name is ``model_version()``: ``<method>-<first 12 hex of the int8 ONNX's sha256>``, which
  ledger receipts, bundles and certificates all cite.

Stale inputs are refused: each artifact records the sha256 of the artifacts it was made from
(``made_from``), and the stage that reads it compares them with the files on disk. Silent corruption is
refused too: ``Run.record`` keeps the sha256 of every file artifact when a stage writes it (in
``digests.json``), and ``Run.verified`` checks it before a stage reads the file (exit 4, naming the file).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_qmul.atomic import write_json
from edge_qmul.errors import CheckpointError
from edge_qmul.ledger import Ledger


@dataclass(frozen=True)
class Artifact:
    """One file (or directory) of a run: ``name`` may hold ``{method}`` for per-method results."""

    key: str
    name: str
    format: str  # json | torch | sqlite | onnx | npz | markdown | png | dir
    what: str
    made_by: str  # the command that writes it (the fix when it is missing)
    made_from: tuple[str, ...] = ()  # keys of the artifacts whose digests it records

    def relative(self, **fields: str) -> str:
        return self.name.format(**fields) if fields else self.name


def _declare(*artifacts: Artifact) -> dict[str, Artifact]:
    return {a.key: a for a in artifacts}


ARTIFACTS: dict[str, Artifact] = _declare(
    Artifact("split", "split.json", "json", "train / val / test indices of the dataset", "edge-qmul train"),
    Artifact("run_info", "run.json", "json", "configs, toolkit version, provenance", "edge-qmul train"),
    Artifact("samples", "samples.sqlite", "sqlite", "the server's copy of the training pool with content ids",
             "edge-qmul train"),
    Artifact("float", "float.pt", "torch", "float checkpoint: weights, model spec, normalisation, recipe",
             "edge-qmul train", ("split",)),
    Artifact("generations", "generations.json", "json", "data generations and their training phases",
             "edge-qmul train --generations N"),
    Artifact("generation_checkpoints", "generations", "dir", "float weights after each generation",
             "edge-qmul train --generations N"),
    Artifact("quantized", "quantized.pt", "torch", "deployed int8 model and its QAT copy", "edge-qmul quantize",
             ("float",)),
    Artifact("features", "features.pt", "torch", "the deployed int8 model's head inputs of train / val samples",
             "edge-qmul quantize", ("quantized",)),
    Artifact("ledger", "ledger.sqlite", "sqlite", "forget requests (the forget set lives only here)",
             "edge-qmul forget"),
    Artifact("result", "unlearn/{method}/result.pt", "torch", "unlearned QAT copy and re-converted int8 model",
             "edge-qmul unlearn --method {method}", ("quantized", "ledger")),
    Artifact("result_log", "unlearn/{method}/log.json", "json", "the unlearning method's log",
             "edge-qmul unlearn --method {method}"),
    Artifact("result_float", "unlearn/{method}/float.pt", "torch", "retrained float model (retrain, replay)",
             "edge-qmul unlearn --method retrain"),
    Artifact("latest", "unlearn/latest.json", "json", "which result later stages use by default",
             "edge-qmul unlearn"),
    Artifact("report", "report.json", "json", "FA / RA / TA / MIA / Avg Gap per method", "edge-qmul evaluate"),
    Artifact("int8_onnx", "model.int8.onnx", "onnx", "the unlearned int8 model as it ships", "edge-qmul export",
             ("result",)),
    Artifact("fp32_onnx", "model.fp32.onnx", "onnx", "the float model, for comparison", "edge-qmul export"),
    Artifact("features_onnx", "features.onnx", "onnx",
             "the int8 model up to its head's input: devices' features for federated Q-MUL", "edge-qmul export",
             ("result",)),
    Artifact("validation", "validation.json", "json", "onnxruntime checks against budgets",
             "edge-qmul validate --device PROFILE", ("int8_onnx",)),
    Artifact("validation_md", "validation.md", "markdown", "the validation as a readable report",
             "edge-qmul validate --device PROFILE"),
    Artifact("validation_plot", "validation_{method}.png", "png", "a validation plot",
             "edge-qmul validate --device PROFILE"),
    Artifact("probe", "probe.npz", "npz", "test images with reference logits for the on-board check",
             "edge-qmul validate --device PROFILE", ("int8_onnx",)),
    Artifact("audit", "audit.json", "json", "reference-model membership audit", "edge-qmul audit"),
    Artifact("bundles", "bundles", "dir", "signed bundles", "edge-qmul bundle"),
    Artifact("rollout_db", "rollout.sqlite", "sqlite", "rollout state per wave and device", "edge-qmul rollout"),
    Artifact("rollouts", "rollouts", "dir", "rollout summaries", "edge-qmul rollout"),
    Artifact("federated", "federated", "dir", "federated round summaries", "flwr run (central / federated mode)"),
    Artifact("certificates", "certificates", "dir", "signed deletion certificates", "edge-qmul certify"),
    Artifact("purge", "purge.json", "json", "which certified samples were purged", "edge-qmul certify"),
    Artifact("digests", "digests.json", "json", "sha256 of every file artifact when it was written",
             "every stage that writes one"),
)

# Formats whose files are written once and then only read: their digests are recorded and checked. SQLite
# files change by design (and check their own pages); directories hold artifacts of their own.
CHECKED_FORMATS = ("json", "torch", "onnx", "npz")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ids_hash(ids: Iterable[int]) -> str:
    """A short digest of a set of sample ids (what a result records of the forget set it was made for)."""
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:16]


def model_version(method: str, onnx_sha256: str) -> str:
    """The one name of a model, cited by ledger receipts, bundles and certificates."""
    return f"{method}-{onnx_sha256[:12]}"


Section = Callable[["Run"], dict[str, Any]]  # a layer's part of ``describe``: {key: value}


class Run:
    """A run directory: paths of its artifacts, the forget ledger, the model version, a description.

    The stages (``edge_qmul.pipeline`` in the core; ``edge_qmul.export`` for export, validation, bundles and
    certificates; ``edge_qmul.federated`` for the fleet) take a ``Run`` and use it for every file they touch.
    """

    def __init__(self, path: str | Path) -> None:
        self.root = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    # -- paths ------------------------------------------------------------------------------------------
    def path(self, key: str, **fields: str) -> Path:
        """The path of artifact ``key`` (``fields`` fill ``{method}``)."""
        return self.root / ARTIFACTS[key].relative(**fields)

    def fix(self, key: str, **fields: str) -> str:
        made_by = ARTIFACTS[key].made_by.format(**fields) if fields else ARTIFACTS[key].made_by
        return f"run `{made_by} --run {self.root}`"

    def require(self, key: str, **fields: str) -> Path:
        """The path of an artifact that must exist; the error names the command that makes it."""
        if not self.root.is_dir():
            raise CheckpointError(f"run directory not found: {self.root}",
                                  f"create it with `edge-qmul train --run {self.root}`")
        path = self.path(key, **fields)
        if not path.exists():
            raise CheckpointError(f"{path} does not exist ({ARTIFACTS[key].what})", self.fix(key, **fields))
        return path

    def exists(self, key: str, **fields: str) -> bool:
        return self.path(key, **fields).exists()

    def digest(self, key: str, **fields: str) -> str:
        return sha256_file(self.require(key, **fields))

    # -- integrity ------------------------------------------------------------------------------------------
    def _digests(self) -> dict[str, str] | None:
        path = self.path("digests")
        if not path.exists():
            return None  # a run from before digests were recorded
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path} is unreadable ({err.__class__.__name__})",
                                  "restore it from a backup, or re-run the stages from `edge-qmul train`") from err
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise CheckpointError(f"{path} is not a table of digests", "restore it, or re-run the stages")
        return table

    def record(self, key: str, **fields: str) -> None:
        """Record the sha256 of an artifact a stage has just written (what ``verified`` checks later)."""
        if ARTIFACTS[key].format not in CHECKED_FORMATS:
            raise ValueError(f"artifact {key!r} ({ARTIFACTS[key].format}) has no recorded digest")
        table = self._digests() or {}
        table[ARTIFACTS[key].relative(**fields)] = sha256_file(self.require(key, **fields))
        write_json(self.path("digests"), dict(sorted(table.items())))

    def forget_digest(self, key: str, **fields: str) -> None:
        """Drop an artifact's record (the stage that removes the file calls this)."""
        table = self._digests()
        if table is not None and table.pop(ARTIFACTS[key].relative(**fields), None) is not None:
            write_json(self.path("digests"), table)

    def verified(self, key: str, **fields: str) -> Path:
        """The path of an artifact that exists and still has the sha256 recorded when it was written."""
        path = self.require(key, **fields)
        table = self._digests()
        if table is None or ARTIFACTS[key].format not in CHECKED_FORMATS:
            return path
        expected = table.get(ARTIFACTS[key].relative(**fields))
        if expected is None:
            raise CheckpointError(f"{path} has no recorded digest: edge-qmul did not write it",
                                  self.fix(key, **fields))
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{path} changed after it was written (sha256 {actual[:12]}..., recorded "
                                  f"{expected[:12]}...)", f"restore the file, or {self.fix(key, **fields)}")
        return path

    def results(self) -> list[str]:
        """Methods with an unlearning result in this run, sorted."""
        pattern = ARTIFACTS["result"].name
        parent, _, leaf = pattern.partition("/{method}/")
        return sorted(p.name for p in (self.root / parent).glob("*") if (p / leaf).exists())

    # -- the forget set -----------------------------------------------------------------------------------
    @contextmanager
    def ledger(self) -> Iterator[Ledger]:
        """The forget ledger (created on first use)."""
        with Ledger(self.path("ledger")) as ledger:
            yield ledger

    def forget_ids(self) -> list[int]:
        """The forget set: every sample of every request in the ledger (none without a ledger)."""
        if not self.exists("ledger"):
            return []
        with self.ledger() as ledger:
            return ledger.forget_ids()

    # -- the model's name ---------------------------------------------------------------------------------
    def model_version(self) -> str:
        """The version of the exported int8 model: its method (from the ONNX metadata) and its digest."""
        path = self.require("int8_onnx")
        import onnx  # local import: only the version needs the metadata

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return model_version(meta.get("method", "model"), sha256_file(path))

    # -- status ---------------------------------------------------------------------------------------------
    def describe(self, sections: Iterable[Section] = ()) -> dict[str, Any]:
        """What the run holds: core sections (artifacts, ledger, results) plus ``sections`` contributed by the
        layers above (export: validation, bundles, certificates; federated: rollouts)."""
        if not self.root.is_dir():
            raise CheckpointError(f"run directory {self.root} does not exist", "pass the --run of an edge-qmul run")
        out: dict[str, Any] = {"run": str(self.root)}
        for section in (_artifacts_section, _ledger_section, _models_section, *sections):
            out.update(section(self))
        return out

    def read_json(self, key: str, **fields: str) -> tuple[dict[str, Any] | None, str | None]:
        """(content, None), (None, None) when absent, or (None, error) when unreadable."""
        path = self.path(key, **fields)
        if not path.exists():
            return None, None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            return None, f"{path} is unreadable ({err.__class__.__name__})"
        if not isinstance(value, dict):
            return None, f"{path} is not a JSON object"
        return value, None


def _artifacts_section(run: Run) -> dict[str, Any]:
    return {"artifacts": [a.relative() for a in ARTIFACTS.values() if "{" not in a.name and run.exists(a.key)]}


def _ledger_section(run: Run) -> dict[str, Any]:
    if not run.exists("ledger"):
        return {}
    with run.ledger() as ledger:
        rows = ledger.requests()
    by_source: dict[str, int] = {}
    by_model: dict[str, int] = {}
    for r in rows:
        by_source[r.source.split(":")[0]] = by_source.get(r.source.split(":")[0], 0) + 1
        if r.honoured_by:
            by_model[r.honoured_by] = by_model.get(r.honoured_by, 0) + 1
    return {"ledger": {
        "requests": len(rows),
        "honoured": sum(r.honoured_by is not None for r in rows),
        "pending": [r.request_id for r in rows if r.honoured_by is None],
        "samples": len({i for r in rows for i in r.sample_ids}),
        "by_source": by_source,
        "by_model": by_model,
    }}


def _models_section(run: Run) -> dict[str, Any]:
    results, errors = [], []
    for method in run.results():
        meta, error = run.read_json("result_log", method=method)
        if error:
            errors.append(error)
        results.append({k: (meta or {}).get(k) for k in ("method", "forget_count", "seconds", "created")}
                       | {"method": method})
    latest, error = run.read_json("latest")
    if error:
        errors.append(error)
    out: dict[str, Any] = {"results": results, "latest": latest.get("method") if latest else None}
    if errors:
        out["errors"] = errors
    return {"models": out}
