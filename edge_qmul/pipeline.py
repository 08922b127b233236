"""Pipeline stages over a run directory (DESIGN §3). The CLI is a thin layer over these functions.

Run directory::

    split.json            train / val / test / forget indices into the original files
    run.json              configs, toolkit version, provenance hashes
    float.pt              float checkpoint (weights + model config + normalisation + recipe)
    quantized.pt          deployed int8 model and its QAT copy (state_dicts), calibration, agreement
    ledger.sqlite         forget requests (SQLite, WAL)
    unlearn/<method>/     result.pt (QAT + int8 state), log.json; retrain also float.pt
    report.json           metrics per method

Stages refuse stale inputs: quantized.pt records the float checkpoint's sha256, every unlearning
result records the quantized artefact's sha256 and the forget set it was computed for.
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_qmul import __version__, data, planner, quant
from edge_qmul.atomic import write_bytes, write_json
from edge_qmul.config import DataConfig, LoopConfig, MethodConfig, QuantConfig, config_hash, method_config
from edge_qmul.errors import CheckpointError, DataError, ForgetRequestError
from edge_qmul.ledger import Ledger
from edge_qmul.metrics import EvalSets, avg_gap, evaluate_model
from edge_qmul.models import DEFAULT_WIDTH, ModelConfig
from edge_qmul.store import SampleStore
from edge_qmul.train import TrainConfig, load_checkpoint, load_payload, save_checkpoint, train_float
from edge_qmul.unlearn import (
    FeatureCache,
    LoopMethod,
    TrainingHistory,
    UnlearnContext,
    UnlearnResult,
    get_method,
    unlearn,
)

QUANTIZED_FORMAT = "edge-qmul/quantized/1"
FEATURES_FORMAT = "edge-qmul/features/1"
RESULT_FORMAT = "edge-qmul/unlearn-result/1"
REFERENCE = "retrain"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()[:16]


def new_run_dir(base: str | Path = "runs") -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(base) / f"{stamp}-{secrets.token_hex(2)}"


def _save_torch(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


def _require_run(run_dir: Path, needed: str, fix: str) -> Path:
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory not found: {run_dir}", "create it with `edge-qmul train --run DIR`")
    path = run_dir / needed
    if not path.exists():
        raise CheckpointError(f"{path} does not exist", fix)
    return path


# ---------------------------------------------------------------------------------------------------
# Loading a run's data
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunData:
    source: data.DatasetSource
    split: data.Split
    # Training samples whose pixels were purged from the run's sample store after their deletion
    # certificates: they exist for no stage any more (every index list is filtered by ``live``).
    purged: frozenset[int] = frozenset()

    def live(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i not in self.purged] if self.purged else ids

    def _where(self, which: str) -> tuple[data.ArrayDataset, list[int]]:
        indices = {
            "train": self.split.train,
            "val": self.split.val,
            "test": self.split.test,
            "forget": self.split.forget,
            "retain": self.split.retain(),
        }[which]
        pool = self.source.pool("test" if which == "test" else "train")
        return pool, indices if which == "test" and not self.split.single_pool else self.live(indices)

    def tensors(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """'train', 'val', 'test', 'forget' or 'retain' as (float pixels in [0,1], labels)."""
        return data.to_tensors(*self._where(which))

    def labels(self, which: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``tensors`` but without the pixels (an empty (0,) placeholder): for feature-cache runs."""
        return torch.empty(0), data.to_labels(*self._where(which))

    def eval_sets(self) -> EvalSets:
        fx, fy = self.tensors("forget")
        rx, ry = self.tensors("retain")
        tx, ty = self.tensors("test")
        return EvalSets(fx, fy, rx, ry, tx, ty)


SAMPLE_STORE = "samples.sqlite"


def load_run_data(run_dir: Path) -> RunData:
    """The run's split and data; training samples come from the run's sample store when it has one."""
    split_path = _require_run(run_dir, "split.json", "re-run `edge-qmul train --run DIR`")
    split = data.Split.load(split_path)
    source = data.load_dataset(split.dataset, split.root, seed=split.seed)
    store_path = run_dir / SAMPLE_STORE
    if not store_path.exists():
        return RunData(source, split)
    with SampleStore(store_path) as store:
        images, labels, scale, purged = store.load()
    if images.shape[1:] != source.train.images.shape[1:] or len(images) != len(source.train.images):
        raise DataError(f"{store_path} does not hold this run's training pool", "re-run `edge-qmul train --run DIR`")
    pool = data.ArrayDataset(images, labels, scale)
    return RunData(replace(source, train=pool), split, frozenset(purged))


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------


def train(run_dir: Path, data_cfg: DataConfig, train_cfg: TrainConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Split the dataset, train the float model, write split.json, float.pt and run.json."""
    source = data.load_dataset(data_cfg.dataset, data_cfg.root or None, seed=data_cfg.seed)
    split = data.make_split(
        source, data_cfg.seed, val_fraction=data_cfg.val_fraction, test_fraction=data_cfg.test_fraction
    )
    if data_cfg.train_fraction < 1.0:  # the list is a seeded shuffle: its head is a random subset
        split.train = split.train[: max(1, round(data_cfg.train_fraction * len(split.train)))]
    mean, std = data.channel_stats(source.train, split.train)
    c, h, _ = source.input_shape
    model_cfg = ModelConfig(
        train_cfg.model, c, h, source.num_classes, tuple(mean), tuple(std),
        width=train_cfg.width or DEFAULT_WIDTH[train_cfg.model],
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    if train_cfg.generations > 1:
        model, log = _train_generations(run_dir, source, split, model_cfg, train_cfg, quiet)
    else:
        x, y = data.to_tensors(source.train, split.train)
        model, log = train_float(model_cfg, train_cfg, x, y, quiet=quiet)
    with SampleStore(run_dir / SAMPLE_STORE) as store:  # the server's own copy, from here on the source
        store.ingest(source.train.images, source.train.labels, source.train.scale)
    split.save(run_dir / "split.json")
    save_checkpoint(
        run_dir / "float.pt", model, model_cfg, train_cfg,
        {"dataset": source.name, "classes": list(source.classes), "split_sha256": sha256_file(run_dir / "split.json")},
    )
    write_json(
        run_dir / "run.json",
        {
            "toolkit_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "config_hash": config_hash(data_cfg, train_cfg),
            "data": asdict(data_cfg),
            "train": asdict(train_cfg),
            "model": model_cfg.to_dict(),
            "train_seconds": log["seconds"],
        },
    )
    return log


GENERATIONS_FORMAT = "edge-qmul/generations/1"


def _train_generations(
    run_dir: Path, source: data.DatasetSource, split: data.Split, model_cfg: ModelConfig, cfg: TrainConfig,
    quiet: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    """Generation-by-generation training with a checkpoint per phase; writes generations.json."""
    generations = planner.assign_generations(split.train, cfg.generations)
    pool_x, pool_y = data.to_tensors(source.train, list(range(len(source.train.labels))))
    model, phases = planner.train_phases(model_cfg, cfg, pool_x, pool_y, generations,
                                         checkpoint_dir=run_dir / "generations", quiet=quiet)
    write_json(run_dir / "generations.json", {
        "format": GENERATIONS_FORMAT, "phase_epochs": planner.phase_epochs(cfg), "generations": generations,
        "phases": [asdict(p) for p in phases],
    })
    with torch.no_grad():
        x, y = pool_x[split.train], pool_y[split.train]
        acc = 100.0 * float(torch.cat([model(b).argmax(1) for b in x.split(1024)]).eq(y).float().mean())
    return model, {"epochs": [{"phase": p.phase, "train_acc": acc} for p in phases],
                   "seconds": sum(p.seconds for p in phases)}


def training_history(run_dir: Path, rd: RunData, forget_ids: list[int], q: Quantized) -> TrainingHistory:
    """The run's training record for exact replay: generations + checkpoints, or one phase (from run.json)."""
    live = rd.live
    pool_x, pool_y = data.to_tensors(rd.source.train, list(range(len(rd.source.train.labels))))
    gen_path = run_dir / "generations.json"
    if gen_path.exists():
        record = json.loads(gen_path.read_text())
        generations = [live(g) for g in record["generations"]]
        phases, ckpt = record["phases"], run_dir / "generations"
    else:
        run_info = json.loads((run_dir / "run.json").read_text())
        generations = [live(rd.split.train)]
        phases = [{"phase": 0, "samples": len(rd.split.train), "epochs": q.train_cfg.epochs,
                   "seconds": float(run_info.get("train_seconds", 0.0)) or 1.0}]
        ckpt = None
    return TrainingHistory(generations, phases, ckpt, pool_x, pool_y, forget_ids,
                           float(q.info.get("seconds", 1.0)))


@dataclass
class Quantized:
    """The deployed int8 model and the QAT copy, with what made them."""

    float_model: nn.Module
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    backend: str
    calibration_size: int
    int8: nn.Module
    qat: nn.Module
    sha256: str  # of quantized.pt
    info: dict[str, Any]


def _calib_batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return list(x[:size].split(256))


def quantize(run_dir: Path, quant_cfg: QuantConfig, *, quiet: bool = False) -> dict[str, Any]:
    """PTQ → deployed int8 model; QAT copy calibrated on the same batches; their top-1 agreement."""
    float_path = _require_run(run_dir, "float.pt", "train first: `edge-qmul train --run DIR`")
    model, model_cfg, _, _ = load_checkpoint(float_path)
    rd = load_run_data(run_dir)
    x, _ = rd.tensors("train")
    calib = _calib_batches(x, quant_cfg.calibration_size)
    t_quant = time.perf_counter()
    int8 = quant.quantize_ptq(model, calib, quant_cfg.backend)
    qat = quant.prepare_qat(model, quant_cfg.backend, calib[0])
    quant.calibrate_qat(qat, calib)
    quant_seconds = time.perf_counter() - t_quant
    tx, ty = rd.tensors("test")
    with torch.no_grad():
        ptq_pred = torch.cat([int8(b).argmax(1) for b in tx.split(1024)])
        qat_int8 = quant.convert(qat)
        qat_pred = torch.cat([qat_int8(b).argmax(1) for b in tx.split(1024)])
        float_pred = torch.cat([model(b).argmax(1) for b in tx.split(1024)])
    info = {
        "backend": quant_cfg.backend,
        "calibration_size": quant_cfg.calibration_size,
        "ptq_qat_agreement": 100.0 * float((ptq_pred == qat_pred).float().mean()),
        "float_test_acc": 100.0 * float((float_pred == ty).float().mean()),
        "int8_test_acc": 100.0 * float((ptq_pred == ty).float().mean()),
        "seconds": quant_seconds,  # PTQ + QAT copy with calibration: what a retrain's quantization costs
    }
    _save_torch(
        run_dir / "quantized.pt",
        {
            "format": QUANTIZED_FORMAT,
            "version": __version__,
            "float_sha256": sha256_file(float_path),
            "info": info,
            "int8_state": int8.state_dict(),
            "qat_state": quant.save_qat_state(qat),
        },
    )
    _save_features(run_dir, qat, rd)
    return info


def rebase(run_dir: Path, method: str) -> dict[str, Any]:
    """Make an unlearning result the run's deployed model (``quantized.pt``: its int8 model and QAT copy).

    Used after a purge: the purged samples are gone, so later unlearning must start from a model that
    already forgot them. The float model stays the original (the retrain reference trains from scratch on
    what is left). Results made against the old base become stale, as does the feature cache, which is
    rebuilt here without the purged samples.
    """
    q = load_quantized(run_dir)
    result = load_result_full(run_dir, method, q, ledger_forget_ids(run_dir))
    info = {**q.info, "base": {"method": method, "result_sha256": sha256_file(result.path),
                               "since": datetime.now(UTC).isoformat(timespec="seconds")}}
    payload = load_payload(run_dir / "quantized.pt", "quantized model", "re-run `edge-qmul quantize --run DIR`")
    _save_torch(
        run_dir / "quantized.pt",
        {**payload, "info": info, "int8_state": result.int8.state_dict(), "qat_state": result.qat_state},
    )
    _save_features(run_dir, result.qat(q), load_run_data(run_dir))
    return info


def _save_features(run_dir: Path, qat: nn.Module, rd: RunData) -> None:
    """Cache the deployed int8 model's classifier inputs for every train / val sample.

    Classifier-mode unlearning never changes the convs, so these stay valid for every later request
    against this deployed model; stored as the uint8 values with their scale and zero point (exact).
    """
    indices = rd.live(rd.split.train + rd.split.val)
    x, _ = data.to_tensors(rd.source.train, indices)
    extractor = quant.int8_features(qat, dequantize=False)
    with torch.no_grad():
        chunks = [extractor(b) for b in x.split(1024)]
    _save_torch(
        run_dir / "features.pt",
        {
            "format": FEATURES_FORMAT,
            "quantized_sha256": sha256_file(run_dir / "quantized.pt"),
            "indices": torch.tensor(indices, dtype=torch.long),
            "values": torch.cat([c.int_repr() for c in chunks]).flatten(1),
            "scale": float(chunks[0].q_scale()),
            "zero_point": int(chunks[0].q_zero_point()),
        },
    )


def load_features(
    run_dir: Path, q: Quantized, split: data.Split, purged: frozenset[int] = frozenset()
) -> FeatureCache | None:
    """The cached features of this run's forget / retain / val samples, or None if absent or stale."""
    path = run_dir / "features.pt"
    if not path.exists():
        return None
    payload = load_payload(path, "feature cache", "re-run `edge-qmul quantize --run DIR`")
    if payload["format"] != FEATURES_FORMAT or payload["quantized_sha256"] != q.sha256:
        return None  # made for another deployed model: computed afresh instead
    indices, values, scale, zp = payload["indices"], payload["values"], payload["scale"], payload["zero_point"]
    gone = torch.tensor(sorted(purged), dtype=torch.long)
    sets = (torch.tensor(ids, dtype=torch.long) for ids in (split.forget, split.retain(), split.val))
    wanted = [t[~torch.isin(t, gone)] for t in sets]  # purged samples left out, in RunData.tensors' order
    # row_of[sample id] = its row in the cache, -1 if absent: one vectorised lookup per set
    every = torch.cat([indices, *wanted])
    row_of = torch.full((int(every.max()) + 1 if len(every) else 0,), -1, dtype=torch.long)
    row_of[indices] = torch.arange(len(indices))
    rows = [row_of[t] for t in wanted]
    if any(bool((r < 0).any()) for r in rows):
        return None  # the cache lacks a requested sample: computed afresh instead
    # dequantized in place: (q - zp) * scale in one float buffer per set, not three (the retain set's is
    # ~300 MB on Fashion-MNIST; the temporaries cost 0.6 s of page faults)
    forget, retain, val = (values[r].float().sub_(zp).mul_(scale) for r in rows)
    return FeatureCache(forget, retain, val)


def load_quantized(run_dir: Path) -> Quantized:
    float_path = _require_run(run_dir, "float.pt", "train first: `edge-qmul train --run DIR`")
    q_path = _require_run(run_dir, "quantized.pt", "quantize first: `edge-qmul quantize --run DIR`")
    fix = "re-create it with `edge-qmul quantize --run DIR`"
    payload = load_payload(q_path, "quantized model", fix)
    if payload["format"] != QUANTIZED_FORMAT:
        raise CheckpointError(f"{q_path} has format {payload['format']!r}, expected {QUANTIZED_FORMAT!r}", fix)
    if payload["float_sha256"] != sha256_file(float_path):
        raise CheckpointError(f"{q_path} is stale: float.pt changed after it was made", fix)
    model, model_cfg, train_cfg, _ = load_checkpoint(float_path)
    info = payload["info"]
    example = torch.zeros(2, model_cfg.in_channels, model_cfg.image_size, model_cfg.image_size)
    int8 = _int8_from_state(model, info["backend"], example, payload["int8_state"], q_path)
    qat = quant.restore_qat(model, info["backend"], example, payload["qat_state"])
    return Quantized(
        model, model_cfg, train_cfg, info["backend"], info["calibration_size"], int8, qat, sha256_file(q_path), info
    )


def _int8_from_state(
    float_model: nn.Module, backend: str, example: torch.Tensor, state: dict[str, Any], path: Path
) -> nn.Module:
    """Rebuild the int8 graph's structure from the float model, then load the saved int8 weights."""
    int8 = quant.quantize_ptq(float_model, [example], backend)
    try:
        int8.load_state_dict(state)
    except (RuntimeError, KeyError) as err:
        raise CheckpointError(f"int8 weights in {path} do not fit the model", "re-run the stage that wrote it") from err
    return int8


def forget(
    run_dir: Path,
    *,
    ids: list[int] | None = None,
    klass: int | None = None,
    count: int | None = None,
    fraction: float | None = None,
    request_id: str | None = None,
    seed: int = 0,
    source: str = "cli",
) -> dict[str, Any]:
    """File a deletion request in the ledger (idempotent by request id) and update split.json's forget list."""
    rd = load_run_data(run_dir)
    chosen = data.select_forget(
        rd.split, rd.source.train.labels, fraction=fraction, count=count, klass=klass, ids=ids,
        seed=seed, pool_size=len(rd.source.train),
    )
    kind, spec = (
        ("samples", {"ids": len(chosen)}) if ids is not None
        else ("class", {"class": klass}) if klass is not None
        else ("count", {"count": count, "seed": seed}) if count is not None
        else ("fraction", {"fraction": fraction, "seed": seed})
    )
    rid = request_id or f"req-{kind}-{ids_hash(chosen)}"
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        added = ledger.add(rid, kind, spec, chosen, source=source)
        all_ids = ledger.forget_ids()
    rd.split.forget = all_ids
    rd.split.save(run_dir / "split.json")
    return {"request_id": rid, "added": added, "samples": len(chosen), "forget_total": len(all_ids)}


def run_unlearn(run_dir: Path, cfg: MethodConfig, *, quiet: bool = False) -> dict[str, Any]:
    """Unlearn every request in the ledger with the method of ``type(cfg)``; saves unlearn/<cfg.name>/."""
    q = load_quantized(run_dir)
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        requests = ledger.requests()
        forget_ids = ledger.forget_ids()
    if not forget_ids:
        raise ForgetRequestError(
            f"the forget ledger of {run_dir} has no requests", "file one: `edge-qmul forget --run DIR --fraction 0.1`"
        )
    rd = load_run_data(run_dir)
    if rd.split.forget != forget_ids:  # the ledger is the source of truth
        rd.split.forget = forget_ids
        rd.split.save(run_dir / "split.json")
    fx, fy = rd.tensors("forget")
    if len(fy) == 0:
        raise ForgetRequestError(
            f"every sample in the forget ledger of {run_dir} was already purged (the base model honours them)",
            "nothing to unlearn until a new request is filed",
        )
    head_mode = isinstance(cfg, LoopConfig) and cfg.layers == "classifier"
    features = load_features(run_dir, q, rd.split, rd.purged) if head_mode else None
    # A method that trains only the head on cached features never reads retain / val pixels: load labels only
    # (0.3 s and ~150 MB of float pixels on Fashion-MNIST, bench/profile_unlearn.py).
    head_only = features is not None and type(get_method(cfg)).run is LoopMethod.run
    rx, ry = (rd.labels if head_only else rd.tensors)("retain")
    vx, vy = (rd.labels if head_only else rd.tensors)("val")
    ctx = UnlearnContext(
        qat=q.qat, forget_x=fx, forget_y=fy, retain_x=rx, retain_y=ry, num_classes=q.model_cfg.num_classes,
        model_cfg=q.model_cfg, train_cfg=q.train_cfg, backend=q.backend, calib_size=q.calibration_size,
        val_x=vx, val_y=vy, quiet=quiet, features=features,
        history=training_history(run_dir, rd, rd.live(forget_ids), q) if needs_history(run_dir, cfg) else None,
    )
    result = unlearn(ctx, cfg)
    return save_result(run_dir, cfg.name, q, result, [r.request_id for r in requests], forget_ids)


def needs_history(run_dir: Path, cfg: MethodConfig) -> bool:
    return cfg.name == "auto" or (cfg.name == REFERENCE and (run_dir / "generations.json").exists())


def save_result(
    run_dir: Path, name: str, q: Quantized, result: UnlearnResult, request_ids: list[str], forget_ids: list[int]
) -> dict[str, Any]:
    """Write unlearn/<name>/{result.pt, log.json} (what evaluate / export read) and make it the latest."""
    out = run_dir / "unlearn" / name
    out.mkdir(parents=True, exist_ok=True)
    if result.float_model is not None:
        save_checkpoint(out / "float.pt", result.float_model, q.model_cfg, q.train_cfg, {"retrain": True})
    meta = {
        "method": name,
        "forget_hash": ids_hash(forget_ids),
        "forget_count": len(forget_ids),
        "request_ids": request_ids,
        "quantized_sha256": q.sha256,
        "seconds": result.log["seconds"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _save_torch(
        out / "result.pt",
        {
            "format": RESULT_FORMAT,
            "version": __version__,
            "meta": meta,
            "qat_state": quant.save_qat_state(result.qat),
            "int8_state": result.int8.state_dict(),
        },
    )
    write_json(out / "log.json", {**meta, "log": result.log})
    set_latest(run_dir, name)
    return meta


def set_latest(run_dir: Path, method: str) -> None:
    """Record which unlearning result later stages (export) use by default."""
    write_json(run_dir / "unlearn" / "latest.json", {"method": method})


def latest_method(run_dir: Path) -> str:
    path = run_dir / "unlearn" / "latest.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir} has no unlearning result", "run `edge-qmul unlearn --run DIR --method qmul`")
    try:
        return str(json.loads(path.read_text())["method"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is corrupt", "re-run `edge-qmul unlearn`, or pass --method") from err


@dataclass
class LoadedResult:
    int8: nn.Module
    meta: dict[str, Any]
    qat_state: dict[str, torch.Tensor]
    path: Path

    def qat(self, q: Quantized) -> nn.Module:
        """The unlearned QAT (fake-quant) copy, rebuilt by re-preparing the float model."""
        example = torch.zeros(2, q.model_cfg.in_channels, q.model_cfg.image_size, q.model_cfg.image_size)
        return quant.restore_qat(q.float_model, q.backend, example, self.qat_state)


def load_result_full(run_dir: Path, method: str, q: Quantized, forget_ids: list[int]) -> LoadedResult:
    path = run_dir / "unlearn" / method / "result.pt"
    fix = f"re-run `edge-qmul unlearn --run {run_dir} --method {method}`"
    payload = load_payload(path, "unlearning result", fix)
    if payload["format"] != RESULT_FORMAT:
        raise CheckpointError(f"{path} has format {payload['format']!r}, expected {RESULT_FORMAT!r}", fix)
    meta = payload["meta"]
    if meta["quantized_sha256"] != q.sha256:
        raise CheckpointError(f"{path} is stale: it was made from another quantized model", fix)
    if meta["forget_hash"] != ids_hash(forget_ids):
        raise CheckpointError(f"{path} is stale: the forget ledger changed after it was made", fix)
    example = torch.zeros(2, q.model_cfg.in_channels, q.model_cfg.image_size, q.model_cfg.image_size)
    int8 = _int8_from_state(q.float_model, q.backend, example, payload["int8_state"], path)
    return LoadedResult(int8, meta, payload["qat_state"], path)


def load_result(run_dir: Path, method: str, q: Quantized, forget_ids: list[int]) -> tuple[nn.Module, dict[str, Any]]:
    res = load_result_full(run_dir, method, q, forget_ids)
    return res.int8, res.meta


def ledger_forget_ids(run_dir: Path) -> list[int]:
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        return ledger.forget_ids()


def evaluate(run_dir: Path, methods: list[str] | None = None) -> dict[str, Any]:
    """Metrics of the untouched int8 model (``none``) and of each unlearning result; writes report.json."""
    q = load_quantized(run_dir)
    rd = load_run_data(run_dir)
    with Ledger(run_dir / "ledger.sqlite") as ledger:
        forget_ids = ledger.forget_ids()
    if not forget_ids:
        raise ForgetRequestError(f"the forget ledger of {run_dir} has no requests", "file one with `edge-qmul forget`")
    rd.split.forget = forget_ids
    sets = rd.eval_sets()
    available = sorted(p.name for p in (run_dir / "unlearn").glob("*") if (p / "result.pt").exists())
    chosen = available if methods is None else methods
    rows: dict[str, dict[str, Any]] = {"none": {**evaluate_model(q.int8, sets), "seconds": 0.0}}
    for method in chosen:
        model, meta = load_result(run_dir, method, q, forget_ids)
        rows[method] = {**evaluate_model(model, sets), "seconds": float(meta["seconds"])}
    for row in rows.values():
        row["avg_gap"] = avg_gap(row, rows[REFERENCE]) if REFERENCE in rows else None
    report = {
        "toolkit_version": __version__,
        "dataset": rd.split.dataset,
        "seed": rd.split.seed,
        "forget_count": len(forget_ids),
        "backend": q.backend,
        "reference": REFERENCE if REFERENCE in rows else None,
        "methods": rows,
    }
    if REFERENCE in rows and rows[REFERENCE]["seconds"] > 0:
        report["time_ratio_to_retrain"] = {
            m: r["seconds"] / rows[REFERENCE]["seconds"] for m, r in rows.items() if m != "none"
        }
    write_json(run_dir / "report.json", report)
    return report


def format_table(report: dict[str, Any]) -> str:
    header = f"{'method':<14}{'FA':>8}{'RA':>8}{'TA':>8}{'MIA':>8}{'AvgGap':>9}{'seconds':>10}"
    lines = [header, "-" * len(header)]
    for name, r in report["methods"].items():
        gap = "-" if r["avg_gap"] is None else f"{r['avg_gap']:.2f}"
        lines.append(
            f"{name:<14}{r['FA']:8.2f}{r['RA']:8.2f}{r['TA']:8.2f}{r['MIA']:8.2f}{gap:>9}{r['seconds']:10.2f}"
        )
    return "\n".join(lines)


DEMO_METHODS = ("retrain", "qmul", "finetune", "random_label", "grad_ascent", "famr")


def demo(
    run_dir: Path,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    quant_cfg: QuantConfig,
    *,
    forget_fraction: float = 0.1,
    methods: tuple[str, ...] = DEMO_METHODS,
    unlearn_overrides: dict[str, Any] | None = None,
    quiet: bool = False,
    echo: Any = print,
) -> dict[str, Any]:
    """The whole slice: train → quantize → forget → unlearn with each method → evaluate."""
    for m in methods:
        method_config(m, unlearn_overrides if m == "qmul" else None)  # fail on a bad config before any work
    t0 = time.perf_counter()
    train(run_dir, data_cfg, train_cfg, quiet=quiet)
    echo(f"trained {train_cfg.model} on {data_cfg.dataset} ({time.perf_counter() - t0:.1f}s)")
    info = quantize(run_dir, quant_cfg, quiet=quiet)
    echo(
        f"quantized ({info['backend']}): float TA {info['float_test_acc']:.2f}, int8 TA {info['int8_test_acc']:.2f}, "
        f"PTQ/QAT agreement {info['ptq_qat_agreement']:.2f}%"
    )
    req = forget(run_dir, fraction=forget_fraction, seed=data_cfg.seed)
    echo(f"forget request {req['request_id']}: {req['samples']} samples")
    for m in methods:
        meta = run_unlearn(run_dir, method_config(m, unlearn_overrides if m == "qmul" else None), quiet=quiet)
        echo(f"unlearned with {m} ({meta['seconds']:.1f}s)")
    if "qmul" in methods:
        set_latest(run_dir, "qmul")  # a demo run exports Q-MUL's model by default
    report = evaluate(run_dir, list(methods))
    echo(format_table(report))
    for m, ratio in report.get("time_ratio_to_retrain", {}).items():
        if m != REFERENCE:
            echo(f"{m} / retrain wall time: {ratio:.3f}")
    return report
