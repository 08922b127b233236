"""The core stages over a run directory (ARCHITECTURE.md §3): train / import, quantize, forget, unlearn, evaluate.

Every file is named by ``edge_qmul.run.ARTIFACTS`` and reached through a ``Run``; ``eq.Run`` and the CLI
are thin layers over these functions. Stages refuse stale inputs: the quantized model records the float
checkpoint's sha256, every unlearning result records the quantized model's sha256 and the forget set
(from the ledger, the only place it is stored) it was computed for.
"""

from __future__ import annotations

import io
import json
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_qmul import __version__, data, planner, quant, usermodel
from edge_qmul.atomic import write_bytes, write_json
from edge_qmul.config import DataConfig, LoopConfig, MethodConfig, QuantConfig, config_hash
from edge_qmul.errors import CheckpointError, ConfigError, DataError, ForgetRequestError
from edge_qmul.ledger import Ledger
from edge_qmul.methods import (
    FeatureCache,
    LoopMethod,
    TrainingHistory,
    UnlearnContext,
    UnlearnResult,
    get_method,
    unlearn,
)
from edge_qmul.metrics import EvalSets, avg_gap, evaluate_model
from edge_qmul.models import DEFAULT_HEAD, DEFAULT_WIDTH, ModelConfig, build_model, is_user_spec
from edge_qmul.provenance import check_in_training_set
from edge_qmul.provenance import read_csv as read_provenance
from edge_qmul.run import Run, ids_hash, sha256_file
from edge_qmul.store import SampleStore
from edge_qmul.train import TrainConfig, load_checkpoint, load_payload, save_checkpoint, train_float

QUANTIZED_FORMAT = "edge-qmul/quantized/1"
FEATURES_FORMAT = "edge-qmul/features/1"
RESULT_FORMAT = "edge-qmul/unlearn-result/1"
REFERENCE = "retrain"


def _save_torch(path: Path, payload: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


def as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else Run(run)


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


def load_run_data(run_dir: Run | Path) -> RunData:
    """The run's split, its forget set (from the ledger) and its data; training samples come from the run's
    sample store when it has one."""
    run = as_run(run_dir)
    split = data.Split.load(run.verified("split"))
    split.forget = run.forget_ids()
    # image folders are read with the options the run was trained with (size, colour)
    options = json.loads(run.verified("run_info").read_text()).get("data", {}) if run.exists("run_info") else {}
    source = data.load_dataset(split.dataset, split.root, seed=split.seed,
                               image_size=options.get("image_size") or None, color=options.get("color", "auto"))
    store_path = run.path("samples")
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


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` (or an import of the user's weights) made: the float model's accuracy and cost."""

    model: str
    imported: bool  # True: the user's weights, not trained here
    train_acc: float  # on the training list, percent
    test_acc: float
    seconds: float
    epochs: list[dict[str, Any]]


def load_source(data_cfg: DataConfig) -> data.DatasetSource:
    return data.load_dataset(data_cfg.dataset, data_cfg.root or None, seed=data_cfg.seed,
                             image_size=data_cfg.image_size or None, color=data_cfg.color)


def train(
    run_dir: Run | Path,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    *,
    weights: Path | None = None,
    head: str = "",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    provenance: Path | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Split the dataset and train the float model, or import the user's trained weights (``weights``).

    ``provenance`` is a CSV of ``device_id,sha256`` (``edge_qmul.provenance``): which device contributed which
    training sample; it is checked against the training split and kept in the run's sample store.

    The model is a built-in name or the user's ``FILE.py:FACTORY`` / ``module:FACTORY``; ``head`` names its
    trainable head (default: the last nn.Linear). The normalisation inside the graph is the dataset's
    (trained here) or, for imported weights, ``mean`` / ``std`` as the user trained with (default: none,
    the model reads pixels in [0, 1]). Everything is checked before anything is written: the data, the
    model's input and output shapes, that torch.fx can trace it, the head, and the weights' keys and shapes.
    """
    run = as_run(run_dir)
    source = load_source(data_cfg)
    split = data.make_split(
        source, data_cfg.seed, val_fraction=data_cfg.val_fraction, test_fraction=data_cfg.test_fraction
    )
    if data_cfg.train_fraction < 1.0:  # the list is a seeded shuffle: its head is a random subset
        split.train = split.train[: max(1, round(data_cfg.train_fraction * len(split.train)))]
    split = _frozen_split(run, split)
    c, h, w = source.input_shape
    if h != w:
        raise DataError(f"{source.name} images are {h}x{w}; the models take square images",
                        "pass --image-size N to resize an image folder")
    if weights is None and (mean is None) != (std is None):
        raise ConfigError("give both --mean and --std, or neither", "e.g. --mean 0.5 --std 0.25")
    if mean is None or std is None:
        if weights is None:
            mean_l, std_l = data.channel_stats(source.train, split.train)
            mean, std = tuple(mean_l), tuple(std_l)
        else:  # imported weights: the normalisation they were trained with, if the user gives it
            mean, std = mean or (0.0,) * c, std or (1.0,) * c
    user = is_user_spec(train_cfg.model)
    model_cfg = ModelConfig(
        train_cfg.model, c, h, source.num_classes, tuple(mean), tuple(std),
        width=train_cfg.width or DEFAULT_WIDTH.get(train_cfg.model, 32), width_multiplier=train_cfg.width_multiplier,
        source_sha256=usermodel.source_sha256(train_cfg.model) if user else "",
    )
    probe = build_model(model_cfg)
    usermodel.check_model(probe, model_cfg)
    model_cfg = replace(model_cfg, head=usermodel.head_name(probe, head or DEFAULT_HEAD.get(train_cfg.model, "")))
    if weights is not None:
        usermodel.load_user_weights(probe, Path(weights))
    ids = data.content_ids(source.train)
    owners: list[tuple[str, str]] = []
    if provenance is not None:
        owners = read_provenance(provenance)
        check_in_training_set(owners, {ids[i] for i in split.train}, provenance)
    run.root.mkdir(parents=True, exist_ok=True)
    log: dict[str, Any]
    if weights is not None:
        model, log = probe.eval(), {"epochs": [], "seconds": 0.0}
    elif train_cfg.generations > 1:
        model, log = _train_generations(run, source, split, model_cfg, train_cfg, quiet)
    else:
        x, y = data.to_tensors(source.train, split.train)
        model, log = train_float(model_cfg, train_cfg, x, y, quiet=quiet)
    train_acc = _accuracy(model, *data.to_tensors(source.train, split.train))
    test_acc = _accuracy(model, *data.to_tensors(source.pool("test"), split.test))
    with SampleStore(run.path("samples")) as store:  # the server's own copy, from here on the source
        store.ingest(source.train.images, source.train.labels, source.train.scale, ids)
        if owners:
            store.record_provenance(owners)
    split.save(run.path("split"))
    run.record("split")
    save_checkpoint(
        run.path("float"), model, model_cfg, train_cfg,
        {"dataset": source.name, "classes": list(source.classes), "split_sha256": run.digest("split")},
    )
    run.record("float")
    result = TrainResult(train_cfg.model, weights is not None, train_acc, test_acc, float(log["seconds"]),
                         list(log["epochs"]))
    write_json(
        run.path("run_info"),
        {
            "toolkit_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "config_hash": config_hash(data_cfg, train_cfg),
            "data": asdict(data_cfg),
            "train": asdict(train_cfg),
            "model": model_cfg.to_dict(),
            "weights": None if weights is None else {"file": str(weights), "sha256": sha256_file(Path(weights))},
            "float_train_acc": train_acc,
            "float_test_acc": test_acc,
            "train_seconds": log["seconds"],
        },
    )
    run.record("run_info")
    return result


def _frozen_split(run: Run, fresh: data.Split) -> data.Split:
    """The split to train on: ``fresh``, or, once the run's ledger holds requests, the run's own split.

    Forget requests name training samples of this split; re-splitting could move a forgotten sample into
    val or test, where it would be evaluated rather than forgotten. So the split is frozen: retraining a run
    with requests (another seed, another recipe, imported weights) keeps it, and another dataset is refused.
    """
    forgotten = run.forget_ids() if run.exists("split") else []
    if not forgotten:
        return fresh
    frozen = data.Split.load(run.verified("split"))
    if (frozen.dataset, frozen.root) != (fresh.dataset, fresh.root):
        raise ForgetRequestError(
            f"{run.root} has {len(forgotten)} forgotten samples of {frozen.dataset} ({frozen.root or 'embedded'}); "
            f"it cannot be re-trained on {fresh.dataset} ({fresh.root or 'embedded'})",
            "start a new run directory for another dataset",
        )
    moved = sorted(set(forgotten) - set(frozen.train))
    if moved:  # cannot happen through edge-qmul: the ledger only accepts training samples
        raise ForgetRequestError(f"{len(moved)} forgotten id(s) are not training samples of {run.path('split')}",
                                 "restore the split file the requests were filed against")
    return frozen


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(y) == 0:
        return 0.0
    model.eval()
    return 100.0 * float(torch.cat([model(b).argmax(1) for b in x.split(1024)]).eq(y).float().mean())


GENERATIONS_FORMAT = "edge-qmul/generations/1"


def _train_generations(
    run: Run, source: data.DatasetSource, split: data.Split, model_cfg: ModelConfig, cfg: TrainConfig,
    quiet: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    """Generation-by-generation training with a checkpoint per phase; writes the generations record."""
    generations = planner.assign_generations(split.train, cfg.generations)
    pool_x, pool_y = data.to_tensors(source.train, list(range(len(source.train.labels))))
    model, phases = planner.train_phases(model_cfg, cfg, pool_x, pool_y, generations,
                                         checkpoint_dir=run.path("generation_checkpoints"), quiet=quiet)
    write_json(run.path("generations"), {
        "format": GENERATIONS_FORMAT, "phase_epochs": planner.phase_epochs(cfg), "generations": generations,
        "phases": [asdict(p) for p in phases],
    })
    run.record("generations")
    with torch.no_grad():
        x, y = pool_x[split.train], pool_y[split.train]
        acc = 100.0 * float(torch.cat([model(b).argmax(1) for b in x.split(1024)]).eq(y).float().mean())
    return model, {"epochs": [{"phase": p.phase, "train_acc": acc} for p in phases],
                   "seconds": sum(p.seconds for p in phases)}


def training_history(run_dir: Run | Path, rd: RunData, forget_ids: list[int], q: Quantized) -> TrainingHistory:
    """The run's training record for exact replay: generations + checkpoints, or one phase (from run_info)."""
    run = as_run(run_dir)
    live = rd.live
    pool_x, pool_y = data.to_tensors(rd.source.train, list(range(len(rd.source.train.labels))))
    if run.exists("generations"):
        record = json.loads(run.verified("generations").read_text())
        generations = [live(g) for g in record["generations"]]
        phases, ckpt = record["phases"], run.path("generation_checkpoints")
    else:
        run_info = json.loads(run.verified("run_info").read_text())
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


@dataclass(frozen=True)
class QuantizeResult:
    """The deployed int8 model's accuracy next to the float model's, and how well the QAT copy agrees."""

    backend: str
    calibration_size: int
    ptq_qat_agreement: float  # percent of test samples where convert(QAT copy) and PTQ agree on top-1
    float_test_acc: float
    int8_test_acc: float
    seconds: float  # PTQ + QAT copy with calibration: what a retrain's quantization costs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantize(run_dir: Run | Path, quant_cfg: QuantConfig, *, quiet: bool = False) -> QuantizeResult:
    """PTQ → deployed int8 model; QAT copy calibrated on the same batches; their top-1 agreement.

    A layer that stays in float inside the int8 region (no int8 kernel in the backend) is refused, named.
    """
    run = as_run(run_dir)
    float_path = run.verified("float")
    model, model_cfg, _, extra = load_checkpoint(float_path)
    if extra.get("split_sha256", run.digest("split")) != run.digest("split"):
        raise CheckpointError(f"{float_path} is stale: it was trained on another split than {run.path('split')}",
                              run.fix("float"))
    rd = load_run_data(run)
    x, _ = rd.tensors("train")
    calib = _calib_batches(x, quant_cfg.calibration_size)
    t_quant = time.perf_counter()
    int8, qat = quant.int8_and_qat(model, calib, quant_cfg.backend, f"model {model_cfg.name}")
    quant_seconds = time.perf_counter() - t_quant
    tx, ty = rd.tensors("test")
    with torch.no_grad():
        ptq_pred = torch.cat([int8(b).argmax(1) for b in tx.split(1024)])
        qat_int8 = quant.convert(qat)
        qat_pred = torch.cat([qat_int8(b).argmax(1) for b in tx.split(1024)])
        float_pred = torch.cat([model(b).argmax(1) for b in tx.split(1024)])
    result = QuantizeResult(
        quant_cfg.backend, quant_cfg.calibration_size,
        ptq_qat_agreement=100.0 * float((ptq_pred == qat_pred).float().mean()),
        float_test_acc=100.0 * float((float_pred == ty).float().mean()),
        int8_test_acc=100.0 * float((ptq_pred == ty).float().mean()),
        seconds=quant_seconds,
    )
    _save_torch(
        run.path("quantized"),
        {
            "format": QUANTIZED_FORMAT,
            "version": __version__,
            "float_sha256": sha256_file(float_path),
            "info": result.to_dict(),
            "int8_state": int8.state_dict(),
            "qat_state": quant.save_qat_state(qat),
        },
    )
    run.record("quantized")
    _save_features(run, qat, rd, model_cfg.head)
    return result


def rebase(run_dir: Run | Path, method: str) -> dict[str, Any]:
    """Make an unlearning result the run's deployed model (``quantized.pt``: its int8 model and QAT copy).

    Used after a purge: the purged samples are gone, so later unlearning must start from a model that
    already forgot them. The float model stays the original (the retrain reference trains from scratch on
    what is left). Results made against the old base become stale, as does the feature cache, which is
    rebuilt here without the purged samples.
    """
    run = as_run(run_dir)
    q = load_quantized(run)
    result = load_result_full(run, method, q, run.forget_ids())
    info = {**q.info, "base": {"method": method, "result_sha256": sha256_file(result.path),
                               "since": datetime.now(UTC).isoformat(timespec="seconds")}}
    payload = load_payload(run.verified("quantized"), "quantized model", run.fix("quantized"))
    _save_torch(
        run.path("quantized"),
        {**payload, "info": info, "int8_state": result.int8.state_dict(), "qat_state": result.qat_state},
    )
    run.record("quantized")
    _save_features(run, result.qat(q), load_run_data(run), q.model_cfg.head)
    return info


def _save_features(run: Run, qat: nn.Module, rd: RunData, head: str) -> None:
    """Cache the deployed int8 model's classifier inputs for every train / val sample.

    Classifier-mode unlearning never changes the convs, so these stay valid for every later request
    against this deployed model; stored as the uint8 values with their scale and zero point (exact).
    """
    indices = rd.live(rd.split.train + rd.split.val)
    x, _ = data.to_tensors(rd.source.train, indices)
    extractor = quant.int8_features(qat, dequantize=False, head=head)
    with torch.no_grad():
        chunks = [extractor(b) for b in x.split(1024)]
    _save_torch(
        run.path("features"),
        {
            "format": FEATURES_FORMAT,
            "quantized_sha256": run.digest("quantized"),
            "indices": torch.tensor(indices, dtype=torch.long),
            "values": torch.cat([c.int_repr() for c in chunks]).flatten(1),
            "scale": float(chunks[0].q_scale()),
            "zero_point": int(chunks[0].q_zero_point()),
        },
    )
    run.record("features")


def load_features(
    run_dir: Run | Path, q: Quantized, split: data.Split, purged: frozenset[int] = frozenset()
) -> FeatureCache | None:
    """The cached features of this run's forget / retain / val samples, or None if absent or stale."""
    run = as_run(run_dir)
    if not run.exists("features"):
        return None
    payload = load_payload(run.verified("features"), "feature cache", run.fix("features"))
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


def load_quantized(run_dir: Run | Path) -> Quantized:
    run = as_run(run_dir)
    float_path = run.verified("float")
    q_path = run.verified("quantized")
    fix = run.fix("quantized")
    payload = load_payload(q_path, "quantized model", fix)
    if payload["format"] != QUANTIZED_FORMAT:
        raise CheckpointError(f"{q_path} has format {payload['format']!r}, expected {QUANTIZED_FORMAT!r}", fix)
    if payload["float_sha256"] != sha256_file(float_path):
        raise CheckpointError(f"{q_path} is stale: {float_path.name} changed after it was made", fix)
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


@dataclass(frozen=True)
class ForgetReceipt:
    """A filed request: its id, whether it was new, its sample count and the ledger's total."""

    request_id: str
    added: bool  # False: the same request id was already recorded with the same samples
    samples: int
    forget_total: int


def forget(
    run_dir: Run | Path,
    *,
    ids: list[int] | None = None,
    hashes: list[str] | None = None,
    klass: int | None = None,
    count: int | None = None,
    fraction: float | None = None,
    request_id: str | None = None,
    seed: int = 0,
    source: str = "cli",
    device: str | None = None,
    leave: bool = False,
    run_data: RunData | None = None,
    ledger: Ledger | None = None,
    store: SampleStore | None = None,
) -> ForgetReceipt:
    """File a deletion request in the ledger (idempotent by request id): training-sample ids, content ids
    (sha256 of the samples' bytes, as recorded at train time), a class, or a random count / fraction.

    With ``device`` (a device id of the run's training provenance) the request is that device's: its
    ``hashes`` must all be samples it contributed, ``klass`` selects its own samples of the class, and
    ``leave=True`` every sample it contributed (the device leaves the fleet).

    ``run_data``: the run's ``load_run_data``, for a caller filing many requests in a row (the server's intake of a
    fleet's batches), which otherwise reloads the whole training pool and re-reads the whole ledger per request
    (quadratic in the requests of a round). Its forget set is kept current here: each request filed through it
    adds its samples (requests another process files meanwhile are still recorded; only this receipt's total and
    the would-forget-everything check do not see them).

    ``ledger`` / ``store``: the run's forget ledger and sample store, already open, for such a caller (one
    connection for its batch, whose ``Ledger.batch`` commits the batch's requests together); by default each is
    opened for this request and the request is committed before this returns."""
    run = as_run(run_dir)
    rd = load_run_data(run) if run_data is None else run_data
    device_spec: dict[str, Any] = {}
    if device is not None:
        device_spec = {"device": device, "kind": "client" if leave else "class" if klass is not None else "samples",
                       **({"class": klass} if klass is not None else {})}
        ids, hashes, klass = (_device_selection(run, rd, device, hashes, klass, leave, ids, count, fraction, store),
                              None, None)
    elif leave:
        raise ConfigError("leave=True needs the device that leaves", "pass device=<its id in the provenance>")
    if hashes is not None:
        if ids is not None:
            raise ConfigError("give sample ids or content hashes, not both", "file two requests")
        ids = ids_for_hashes(run, rd.split, hashes)
    chosen = data.select_forget(
        rd.split, rd.source.train.labels, fraction=fraction, count=count, klass=klass, ids=ids,
        seed=seed, pool_size=len(rd.source.train),
    )
    spec: dict[str, Any]
    kind, spec = (
        ("samples", {"hashes": len(chosen)}) if hashes is not None
        else ("samples", {"ids": len(chosen)}) if ids is not None
        else ("class", {"class": klass}) if klass is not None
        else ("count", {"count": count, "seed": seed}) if count is not None
        else ("fraction", {"fraction": fraction, "seed": seed})
    )
    if device_spec:
        kind, spec = device_spec.pop("kind"), {**device_spec, "count": len(chosen)}
    rid = request_id or f"req-{kind}-{ids_hash(chosen)}"
    remaining = set(rd.live(rd.split.train)) - set(rd.split.forget) - set(chosen)
    if not remaining:  # nothing could be trained or kept useful: refused before the ledger records it
        raise ForgetRequestError(
            f"request {rid} would forget every remaining training sample of {run.root}",
            "a model needs at least one training sample: start a new run on the data that remains",
        )
    with nullcontext(ledger) if ledger is not None else run.ledger() as led:
        added = led.add(rid, kind, spec, chosen, source=source)
        if run_data is None:
            return ForgetReceipt(rid, added, len(chosen), len(led.forget_ids()))
    rd.split.forget = sorted(set(rd.split.forget) | set(chosen))
    return ForgetReceipt(rid, added, len(chosen), len(rd.split.forget))


def _device_selection(run: Run, rd: RunData, device: str, hashes: list[str] | None, klass: int | None, leave: bool,
                      ids: list[int] | None, count: int | None, fraction: float | None,
                      opened: SampleStore | None = None) -> list[int]:
    """The training-sample ids of a device's request, checked against the run's provenance by content id."""
    if ids is not None or count is not None or fraction is not None or sum(
            (hashes is not None, klass is not None, leave)) != 1:
        raise ConfigError("a device's request is one of: hashes=[...], klass=K or leave=True",
                          "devices name their samples by content id, never by the server's sample ids")
    train = set(rd.split.train)
    with nullcontext(opened) if opened is not None else SampleStore(run.require("samples")) as store:
        if not store.has_provenance():
            raise ForgetRequestError(f"{run.root} has no training provenance, so no request can be a device's",
                                     "train or import with --provenance FILE.csv (device_id,sha256)")
        if hashes is not None:
            wanted = [h.strip().lower() for h in hashes if h.strip()]
            found = store.check_owned(device, wanted)
            return sorted({i for h in wanted for i in found.get(h, []) if i in train})
        own = store.ids_for_hashes(store.contributed_by(device))
    mine = sorted({i for ids_ in own.values() for i in ids_ if i in train})
    if not mine:
        raise ForgetRequestError(f"device {device!r} contributed no training sample", "check the device id")
    if leave:
        return mine
    chosen = [i for i in mine if int(rd.source.train.labels[i]) == klass]
    if not chosen:
        raise ForgetRequestError(f"device {device!r} contributed no training sample of class {klass}",
                                 "a device can ask only for its own samples")
    return chosen


def ids_for_hashes(run: Run, split: data.Split, hashes: list[str]) -> list[int]:
    """Training-sample ids of these content ids; a hash that names no training sample is refused."""
    wanted = [h.strip().lower() for h in hashes if h.strip()]
    if not wanted:
        raise ForgetRequestError("the request names no content hashes", "list one sha256 (64 hex digits) per line")
    bad = [h for h in wanted if len(h) != 64 or any(c not in "0123456789abcdef" for c in h)]
    if bad:
        raise ForgetRequestError(f"{len(bad)} line(s) are not sha256 hex digests, e.g. {bad[0][:70]!r}",
                                 "list one sha256 (64 hex digits) per line")
    with SampleStore(run.require("samples")) as store:
        found = store.ids_for_hashes(wanted)
    train = set(split.train)
    unknown = [h for h in wanted if h not in found]
    outside = [h for h in wanted if h in found and not train & set(found[h])]
    if unknown or outside:
        first = (unknown or outside)[0]
        what = "is not a sample of this run's dataset" if unknown else "is a validation or test sample"
        raise ForgetRequestError(f"content hash {first[:16]}... {what} ({len(unknown)} unknown, "
                                 f"{len(outside)} not in training, of {len(wanted)})",
                                 "name only samples the model was trained on (their sha256 as stored)")
    return sorted({i for h in wanted for i in found[h] if i in train})


def run_unlearn(run_dir: Run | Path, cfg: MethodConfig, *, quiet: bool = False) -> UnlearnRecord:
    """Unlearn every request in the ledger with the method of ``type(cfg)``; saves its result."""
    run_dir = as_run(run_dir)
    q = load_quantized(run_dir)
    with run_dir.ledger() as ledger:
        requests = ledger.requests()
    rd = load_run_data(run_dir)  # its forget set is the ledger's
    forget_ids = rd.split.forget
    if not forget_ids:
        raise ForgetRequestError(
            f"the forget ledger of {run_dir.root} has no requests",
            f"file one: `edge-qmul forget --run {run_dir.root} --fraction 0.1`",
        )
    fx, fy = rd.tensors("forget")
    if len(fy) == 0:
        raise ForgetRequestError(
            f"every sample in the forget ledger of {run_dir.root} was already purged (the base model honours them)",
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
        val_x=vx, val_y=vy, quiet=quiet, features=features, head=q.model_cfg.head,
        history=training_history(run_dir, rd, rd.live(forget_ids), q) if needs_history(run_dir, cfg) else None,
    )
    result = unlearn(ctx, cfg)
    return save_result(run_dir, cfg.name, q, result, [r.request_id for r in requests], forget_ids)


def needs_history(run_dir: Run | Path, cfg: MethodConfig) -> bool:
    return cfg.name == "auto" or (cfg.name == REFERENCE and as_run(run_dir).exists("generations"))


@dataclass(frozen=True)
class UnlearnRecord:
    """What an unlearning result was made from and what it honours (stored with it as ``meta``)."""

    method: str
    forget_hash: str  # ids_hash of the forget set it was computed for
    forget_count: int
    request_ids: list[str]
    quantized_sha256: str
    seconds: float
    created: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def save_result(
    run_dir: Run | Path, name: str, q: Quantized, result: UnlearnResult, request_ids: list[str], forget_ids: list[int]
) -> UnlearnRecord:
    """Write the result and its log (what evaluate / export read) and make it the latest."""
    run = as_run(run_dir)
    if result.float_model is not None:
        save_checkpoint(run.path("result_float", method=name), result.float_model, q.model_cfg, q.train_cfg,
                        {"retrain": True})
        run.record("result_float", method=name)
    record = UnlearnRecord(name, ids_hash(forget_ids), len(forget_ids), list(request_ids), q.sha256,
                           float(result.log["seconds"]), datetime.now(UTC).isoformat(timespec="seconds"))
    _save_torch(
        run.path("result", method=name),
        {
            "format": RESULT_FORMAT,
            "version": __version__,
            "meta": record.to_dict(),
            "qat_state": quant.save_qat_state(result.qat),
            "int8_state": result.int8.state_dict(),
        },
    )
    run.record("result", method=name)
    write_json(run.path("result_log", method=name), {**record.to_dict(), "log": result.log})
    run.record("result_log", method=name)
    set_latest(run, name)
    return record


def set_latest(run_dir: Run | Path, method: str) -> None:
    """Record which unlearning result later stages (export) use by default."""
    run = as_run(run_dir)
    write_json(run.path("latest"), {"method": method})
    run.record("latest")


def latest_method(run_dir: Run | Path) -> str:
    run = as_run(run_dir)
    if not run.exists("latest"):
        raise CheckpointError(f"{run.root} has no unlearning result",
                              f"run `edge-qmul unlearn --run {run.root} --method qmul`")
    path = run.verified("latest")
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


def load_result_full(run_dir: Run | Path, method: str, q: Quantized, forget_ids: list[int]) -> LoadedResult:
    run = as_run(run_dir)
    path = run.verified("result", method=method)
    fix = run.fix("result", method=method)
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


def load_result(
    run_dir: Run | Path, method: str, q: Quantized, forget_ids: list[int]
) -> tuple[nn.Module, dict[str, Any]]:
    res = load_result_full(run_dir, method, q, forget_ids)
    return res.int8, res.meta


def ledger_forget_ids(run_dir: Run | Path) -> list[int]:
    return as_run(run_dir).forget_ids()


@dataclass(frozen=True)
class EvalReport:
    """FA / RA / TA / MIA / Avg Gap / seconds per method, measured on the torch int8 models."""

    toolkit_version: str
    dataset: str
    seed: int
    forget_count: int
    backend: str
    reference: str | None
    methods: dict[str, dict[str, Any]]
    time_ratio_to_retrain: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k == "reference"}


def evaluate(run_dir: Run | Path, methods: list[str] | None = None) -> EvalReport:
    """Metrics of the untouched int8 model (``none``) and of each unlearning result; writes the report."""
    run = as_run(run_dir)
    q = load_quantized(run)
    rd = load_run_data(run)
    forget_ids = rd.split.forget
    if not forget_ids:
        raise ForgetRequestError(f"the forget ledger of {run.root} has no requests",
                                 "file one with `edge-qmul forget`")
    sets = rd.eval_sets()
    chosen = run.results() if methods is None else methods
    rows: dict[str, dict[str, Any]] = {"none": {**evaluate_model(q.int8, sets), "seconds": 0.0}}
    for method in chosen:
        model, meta = load_result(run, method, q, forget_ids)
        rows[method] = {**evaluate_model(model, sets), "seconds": float(meta["seconds"])}
    for row in rows.values():
        row["avg_gap"] = avg_gap(row, rows[REFERENCE]) if REFERENCE in rows else None
    ratios = None
    if REFERENCE in rows and rows[REFERENCE]["seconds"] > 0:
        ratios = {m: r["seconds"] / rows[REFERENCE]["seconds"] for m, r in rows.items() if m != "none"}
    report = EvalReport(__version__, rd.split.dataset, rd.split.seed, len(forget_ids), q.backend,
                        REFERENCE if REFERENCE in rows else None, rows, ratios)
    write_json(run.path("report"), report.to_dict())
    run.record("report")
    return report
