"""Federated Q-MUL: the devices unlearn together and the forget samples never leave them.

The server holds the QAT copy; each device holds its own samples (``edge_qmul.devices.state``). Only the
classifier head moves (central Q-MUL's default, ``layers="classifier"``), so a device computes the int8
model's features of its own samples once (``features.onnx`` of the model it runs, shipped in its bundle) and
every step after that costs only the head. One epoch of central Q-MUL becomes one round of
``strategy.FedQMul`` (a Flower ``Strategy``):

1. ``evaluate``: the server sends the head's QAT state and, to each device, the ids of its acknowledged
   requests the round honours (request ids, never sample ids or contents). The device resolves them to
   its own content ids from its own request records (``DeviceState.request_hashes``). Its retain set is its
   other samples that the server's training split holds, which the message names (8-byte prefixes of their
   content ids, from the server's provenance and split: ``prefixes``), so a device does not train on what the
   server kept for validation, as central Q-MUL does not; never its held-out pool. At the broadcast weights
   it computes its forget samples' similar labels and the gradient-norm sums g(B) over up to
   ``norm_batches`` forget batches (similar labels) and retain batches, and replies the sums weighted by
   batch size, the sample counts and its forget / retain accuracy (``local_stats``).
2. The server pools the sums into fleet-wide means ḡ_f, ḡ_r and forms w_f = ḡ_r / (ḡ_f + ḡ_r),
   w_r = ḡ_f / (ḡ_f + ḡ_r) (``adaptive_weights``): the weights central Q-MUL computes, from batches spread
   over the fleet. Each batch counts by its size: a device holding 10 forget samples has one 10-sample
   batch, whose gradient norm is inflated by noise; counted as one batch like a full 256-sample one, it
   doubled ḡ_f on digits (8.2 vs central's 4.5 at the same weights; 4.8 when counted by size).
3. ``train``: the same state plus (w_f, w_r, lr, local epochs); each device runs that many local epochs of
   Q-MUL steps over its forget (similar labels) and retain samples (``local_update``: central Q-MUL's own step
   code, one optimizer for the round) and replies its new head state and sample count.
4. The server averages the states weighted by sample count and steps towards the average with a server
   step size (``average_states``; default 1 = plain FedAvg), then sets each weight fake-quant's range and
   scale from the new weights.

The learning rate follows central Q-MUL's cosine schedule over the rounds. Differences from central
Q-MUL, by construction: the optimizer's momentum restarts every round on every device, and a device's
local epochs see only its own samples.

What a device needs (``DeviceRound``): its state dir (samples, request records, installed models) and the
message. It rebuilds the head's structure from the model config in the message (a built-in model by name;
a user model ``package.module:FACTORY`` only if that module is importable on the device; a
``FILE.py:FACTORY`` model names a file on the server and is refused), prepares it for QAT as the server
did and loads the server's head state strictly. It computes features with ``features.onnx`` of the model
version the server names, which it must have installed (``DeviceState.model_dir``); the features are
cached in ``<state>/fedqmul/`` keyed by that file's sha256. Such a device installs
``edge-qmul[federated]`` (the device extra plus torch, which trains the head).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edge_qmul import quant
from edge_qmul.config import QMul, config_from_dict
from edge_qmul.errors import ConfigError, ForgetRequestError, UnlearningError
from edge_qmul.methods import QMulMethod, UnlearnContext, grad_norm_sum, predict_logits, similar_labels
from edge_qmul.models import ModelConfig, build_model, is_user_spec
from edge_qmul.train import sgd

if TYPE_CHECKING:
    from edge_qmul.devices.state import DeviceState

STAT_KEYS = ("g-f-sum", "f-samples", "g-r-sum", "r-samples", "forget-correct", "n-forget", "retain-correct",
             "n-retain")
CACHE_DIR = "fedqmul"  # under the device's state dir: feature caches, one per features.onnx
CACHE_FORMAT = "edge-qmul/device-features/2"
ANSWERED = ("acknowledged", "honoured")  # a request the server may ask a device to honour in a round


@dataclass
class LocalData:
    """A device's own samples as the int8 model's classifier inputs, split into forget and retain."""

    forget_x: torch.Tensor
    forget_y: torch.Tensor
    retain_x: torch.Tensor
    retain_y: torch.Tensor

    @property
    def size(self) -> int:
        return len(self.forget_y) + len(self.retain_y)


@dataclass(frozen=True)
class RoundSpec:
    """What a round message tells a device, besides the head's state (``round_config`` / ``read_round``)."""

    device_id: str  # who the server believes this node is
    request_ids: tuple[str, ...]  # the device's requests this round honours (empty: a retain-only device)
    model_version: str  # the installed model whose features.onnx computes the features
    model: dict[str, Any]  # ModelConfig.to_dict() plus "backend", "image-size", "color"
    unlearn_config: str  # QMul as JSON (``config_json``)
    epoch: int
    seed: int
    w_f: float = 0.0
    w_r: float = 0.0
    lr: float = 0.0
    norms: bool = True  # evaluate: compute the gradient-norm sums (False: accuracies only, the final look)
    local_epochs: int = 1  # train: passes over the device's forget and retain samples in this round
    # The device's samples the server's training split holds, as 8-byte prefixes of their content ids (``prefixes``):
    # the retain set is drawn from these only (the samples the server kept for validation or never trained on are
    # not the model's to retain). None: every contributed sample (a server without provenance).
    trained: bytes | None = None


# ---------------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------------


def head_structure(model: Mapping[str, Any]) -> tuple[nn.Module, ModelConfig]:
    """The QAT classifier head of the server's model, rebuilt from the message's model config: the model is
    built (random weights), prepared for QAT with the server's backend exactly as ``quantize`` does, and
    split at its head. Its state then comes from the server (``load_head_state``)."""
    spec = {k: v for k, v in model.items() if k not in ("backend", "image-size", "color")}
    try:
        cfg = ModelConfig.from_dict(dict(spec))
    except (KeyError, TypeError) as err:
        raise ConfigError(f"the server's model config is incomplete ({err})", "update the device software") from err
    if is_user_spec(cfg.name) and cfg.name.partition(":")[0].endswith(".py"):
        raise ConfigError(
            f"the server's model {cfg.name!r} is defined in a file on the server, which a device never reads",
            "package the model as a module installed on the devices and train with --model package.module:FACTORY, "
            "or unlearn in central mode")
    example = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    qat = quant.prepare_qat(build_model(cfg).eval(), str(model["backend"]), example)
    return quant.split_at_classifier(qat, cfg.head)[1], cfg


def load_head_state(head: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load the server's head state exactly (observers' lazily sized buffers are sized first)."""
    own = head.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape and own[key].numel() == 0:
            mod_name, _, buf = key.rpartition(".")
            getattr(head.get_submodule(mod_name), buf).resize_(value.shape)
    try:
        head.load_state_dict(dict(state), strict=True)
    except RuntimeError as err:
        raise ConfigError(f"the server's head state does not fit the model rebuilt on the device: "
                          f"{str(err).splitlines()[0]}",
                          "update the device software to the server's edge-qmul") from err


def forget_hashes(state: DeviceState, request_ids: Sequence[str]) -> list[str]:
    """The content ids the named requests of this device cover. Every id must be one of its own requests that
    the server acknowledged (or already honoured); anything else is refused, naming the request."""
    records = {r.request_id: r for r in state.requests()}
    for rid in request_ids:
        record = records.get(rid)
        if record is None:
            raise ForgetRequestError(f"this device never filed request {rid[:40]!r}",
                                     "the server named another device's request: check the node -> device mapping")
        if record.status not in ANSWERED:
            raise ForgetRequestError(f"request {rid} is {record.status} on this device, not acknowledged",
                                     "run an intake round first: the server acknowledges a request before honouring it")
    covered = state.request_hashes(request_ids)
    return sorted({h for hashes in covered.values() for h in hashes})


def features_path(state: DeviceState, version: str) -> Path:
    """``features.onnx`` of the installed model ``version``; an error naming what is installed otherwise."""
    from edge_qmul.devices.runtime import FEATURES_FILE

    directory = state.model_dir(version)
    if directory is None:
        have = ", ".join(state.installed()) or "none"
        raise UnlearningError(f"this device does not run model {version} (installed: {have})",
                              "roll that model out to the device first (`flwr run` with mode=\"rollout\")")
    path = Path(directory) / FEATURES_FILE
    if not path.is_file():
        raise UnlearningError(f"model {version} on this device has no {FEATURES_FILE}",
                              "export it again with this edge-qmul (export writes features.onnx), bundle and roll out")
    return path


def own_features(state: DeviceState, hashes: Sequence[str], version: str, model: Mapping[str, Any]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(features float32 [N, F], labels int64 [N]) of the device's samples ``hashes``, in that order.

    Features are ``features.onnx`` of the installed model ``version`` on the device's own pixels
    (``DeviceState.pixels`` / scale), cached in ``<state>/fedqmul/features-<sha16>.npz`` keyed by that file's
    sha256: only samples not in the cache are computed.
    """
    from edge_qmul.devices import runtime

    path = features_path(state, version)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    cache = state.dir / CACHE_DIR / f"features-{digest[:16]}.npz"
    known: dict[str, int] = {}
    values = np.zeros((0, 0), np.float32)
    labels = np.zeros(0, np.int64)
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as npz:
                if str(npz["format"]) == CACHE_FORMAT and str(npz["features_sha256"]) == digest:
                    known = {h: i for i, h in enumerate(npz["hashes"].tolist())}
                    values, labels = npz["values"], npz["labels"]
        except (OSError, ValueError, KeyError):
            known = {}  # an unreadable cache is recomputed
    missing = [h for h in dict.fromkeys(hashes) if h not in known]
    if missing:
        image_size = int(model.get("image-size", 0)) or None
        color = str(model.get("color", "auto"))
        if state.dataset == "npz":
            image_size, color = None, "auto"  # arrays load as stored
        images, new_labels, scale = state.pixels(missing, image_size=image_size, color=color)
        new = runtime.compute_features(path, images.astype(np.float32) / np.float32(scale))
        values = new if not known else np.concatenate([values, new])
        labels = np.asarray(new_labels, np.int64) if not known else np.concatenate([labels, new_labels])
        known.update({h: len(known) + i for i, h in enumerate(missing)})
        _save_cache(cache, digest, list(known), values, labels)
    rows = np.array([known[h] for h in hashes], dtype=np.int64)
    return values[rows], labels[rows]


def _save_cache(path: Path, digest: str, hashes: list[str], values: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".features-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, format=np.array(CACHE_FORMAT), features_sha256=np.array(digest), hashes=np.array(hashes),
                     values=values.astype(np.float32), labels=labels.astype(np.int64))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


PREFIX = 8  # bytes of a content id the server names a device's trained samples by (``prefixes``)


def prefixes(hashes: Sequence[str]) -> bytes:
    """The first ``PREFIX`` bytes of each content id, concatenated (how a round names the trained samples: 8 bytes
    instead of 64 hex digits each; a collision can only add one of the device's own samples to its retain set)."""
    return b"".join(bytes.fromhex(h[:2 * PREFIX]) for h in hashes)


def device_data(state: DeviceState, spec: RoundSpec) -> LocalData:
    """The device's forget set (what the named requests cover, among the samples it contributed) and retain
    set (its other contributed samples that the server trained on: ``spec.trained``, when the server names them),
    as the int8 model's features. Held-out samples are never in either."""
    contributed = state.contributed_pool()  # every sample outside the held-out pool
    covered = set(forget_hashes(state, spec.request_ids))
    forget = [h for h in contributed if h in covered]
    retain = [h for h in contributed if h not in covered]
    if spec.trained is not None:
        trained = {spec.trained[i:i + PREFIX] for i in range(0, len(spec.trained), PREFIX)}
        retain = [h for h in retain if bytes.fromhex(h[:2 * PREFIX]) in trained]
    x, y = own_features(state, forget + retain, spec.model_version, spec.model)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = len(forget)
    return LocalData(xt[:n], yt[:n], xt[n:], yt[n:])


def device_round(state: DeviceState, head_state: Mapping[str, torch.Tensor], spec: RoundSpec, train: bool
                 ) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
    """One round on the device: (statistics, None) for evaluate, (metrics, new head state) for train."""
    if spec.device_id != state.device_id:
        raise ForgetRequestError(f"the server sent this round to device {spec.device_id[:16]}..., but this is "
                                 f"{state.device_id[:16]}...", "the server's node -> device mapping is stale: "
                                 "run a new forget round")
    cfg = config_from_json(spec.unlearn_config)
    head, model_cfg = head_structure(spec.model)
    load_head_state(head, head_state)
    local = device_data(state, spec)
    if not train:
        return local_stats(head, local, cfg, spec.seed, norms=spec.norms), None
    metrics = local_update(head, model_cfg, local, cfg, spec.w_f, spec.w_r, spec.lr, spec.seed, spec.local_epochs)
    return metrics, state_of(head)


def _context(head: nn.Module, model_cfg: ModelConfig, local: LocalData) -> UnlearnContext:
    return UnlearnContext(
        qat=head, forget_x=local.forget_x, forget_y=local.forget_y, retain_x=local.retain_x,
        retain_y=local.retain_y, num_classes=model_cfg.num_classes, model_cfg=model_cfg,
        train_cfg=None, backend="", calib_size=0,
    )


def local_stats(head: nn.Module, local: LocalData, cfg: QMul, seed: int, norms: bool = True) -> dict[str, float]:
    """Similar labels and gradient-norm sums at the broadcast weights (step 1 of a round); with ``norms``
    False only the accuracies (the final look after the last round)."""
    model = head.eval()
    gen = torch.Generator().manual_seed(seed)
    bs, k = cfg.batch_size, cfg.norm_batches or None
    out = dict.fromkeys(STAT_KEYS, 0.0)
    out["n-forget"], out["n-retain"] = float(len(local.forget_y)), float(len(local.retain_y))
    if len(local.forget_y):
        logits = predict_logits(model, local.forget_x)
        out["forget-correct"] = float((logits.argmax(1) == local.forget_y).sum())
        if norms:
            sim = similar_labels(logits, local.forget_y, cfg.label_variant)
            batches = torch.randperm(len(sim), generator=gen).split(bs)[:k]
            out["g-f-sum"] = sum(len(b) * grad_norm_sum(model, local.forget_x[b], sim[b]) for b in batches)
            out["f-samples"] = float(sum(len(b) for b in batches))
    if len(local.retain_y):
        out["retain-correct"] = float((predict_logits(model, local.retain_x).argmax(1) == local.retain_y).sum())
        if norms:
            batches = torch.randperm(len(local.retain_y), generator=gen).split(bs)[:k]
            out["g-r-sum"] = sum(len(b) * grad_norm_sum(model, local.retain_x[b], local.retain_y[b])
                                 for b in batches)
            out["r-samples"] = float(sum(len(b) for b in batches))
    return out


class _RoundQMul(QMulMethod):
    """Central Q-MUL's epoch with the fleet's weights instead of locally measured ones."""

    def __init__(self, cfg: QMul, w_f: float, w_r: float) -> None:
        super().__init__(cfg)
        self.fleet_weights = (w_f, w_r)

    def begin_epoch(self, ctx: UnlearnContext, epoch: int) -> dict[str, float]:
        self.forget_labels = similar_labels(predict_logits(ctx.qat.eval(), ctx.forget_x), ctx.forget_y,
                                            self.cfg.label_variant)
        self.retain_idx = self.retain_sample(ctx)
        self.w_f, self.w_r = self.fleet_weights
        return {}


def local_update(head: nn.Module, model_cfg: ModelConfig, local: LocalData, cfg: QMul, w_f: float, w_r: float,
                 lr: float, seed: int, local_epochs: int = 1) -> dict[str, float]:
    """``local_epochs`` local epochs of Q-MUL steps on the device's samples (step 3 of a round), one optimizer
    (its momentum carries over between them) at the round's lr; each epoch takes its similar labels at its start,
    as central Q-MUL's do. Trains ``head`` in place."""
    method = _RoundQMul(replace(cfg, seed=seed), w_f, w_r)
    ctx = _context(head, model_cfg, local)
    opt = sgd(head, lr, cfg.momentum, cfg.weight_decay)
    losses: dict[str, float] = {}
    for epoch in range(local_epochs):
        method.begin_epoch(ctx, epoch)
        losses = method.train_steps(ctx, opt, method.steps(ctx, epoch))
    return {"num-examples": float(local.size), **{k.replace("_", "-"): v for k, v in losses.items()}}


# ---------------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------------


def adaptive_weights(stats: list[dict[str, float]]) -> tuple[float, float, float, float]:
    """(w_f, w_r, ḡ_f, ḡ_r) from the devices' size-weighted gradient-norm sums, pooled over the fleet."""
    f_samples = sum(s["f-samples"] for s in stats)
    r_samples = sum(s["r-samples"] for s in stats)
    if f_samples == 0:
        raise UnlearningError("no device reported forget batches", "the devices holding forget samples must take part")
    if r_samples == 0:  # every participant is leaving the fleet: nothing to retain
        return 1.0, 0.0, sum(s["g-f-sum"] for s in stats) / f_samples, 0.0
    gf = sum(s["g-f-sum"] for s in stats) / f_samples
    gr = sum(s["g-r-sum"] for s in stats) / r_samples
    return gr / (gf + gr), gf / (gf + gr), gf, gr


def average_states(
    head: nn.Module, states: list[tuple[dict[str, torch.Tensor], float]], server_lr: float = 1.0
) -> None:
    """FedAvg into ``head`` with a server step size: W <- W + server_lr * (Σ_k n_k/n W_k - W).

    Every floating tensor moves this way (the frozen activation ranges are equal everywhere and stay
    put); integer buffers are taken from the first state. Then every weight fake-quant's range, scale and
    zero point are set from the new weights (``quant.refresh_weight_ranges``).

    Each of K devices runs 1/K of an epoch's steps from the same weights, so plain averaging (server_lr
    1) moves the model less per round than central Q-MUL's epoch. Summing the displacements instead
    (server_lr = K) matches a central epoch only to first order: on Fashion-MNIST with 3 devices and
    Q-MUL's lr 0.3 it overshot and collapsed the model (Avg Gap 65.8 vs 1.16 with server_lr 1;
    bench/federated_modes.py), because a central epoch's later steps see the forget loss already falling.
    """
    if not states:
        raise UnlearningError("no device returned an update", "check the SuperNodes' logs")
    total = sum(w for _, w in states)
    if not total > 0:
        raise UnlearningError("the devices' updates carry no samples", "check the devices' data")
    old = state_of(head)
    new: dict[str, torch.Tensor] = {}
    for k, v in old.items():
        if v.is_floating_point():
            avg = sum(s[k] * (w / total) for s, w in states)
            new[k] = v + server_lr * (avg - v)
        else:
            new[k] = states[0][0][k].clone()
    head.load_state_dict(new, strict=True)
    quant.refresh_weight_ranges(head)


def cosine(base: float, epoch: int, epochs: int) -> float:
    return 0.5 * base * (1.0 + math.cos(math.pi * epoch / max(1, epochs)))


def config_json(cfg: QMul) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True)


def config_from_json(text: str) -> QMul:
    """The server's Q-MUL config (``config_json``), rebuilt only from the allow-listed config classes."""
    fix = "update the device software"
    try:
        cfg = config_from_dict(json.loads(text), "unlearning config from the server")
    except json.JSONDecodeError as err:
        raise ConfigError(f"unlearning config from the server is invalid: {err}", fix) from err
    except ConfigError as err:
        raise ConfigError(err.message, f"{err.fix}; or {fix}" if err.fix else fix) from err
    if type(cfg) is not QMul:
        raise ConfigError(f"the server sent a {type(cfg).__name__} config; federated rounds run qmul", fix)
    return cfg


def state_of(head: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def summary_of(stats: list[dict[str, float]]) -> dict[str, Any]:
    n_f = sum(s["n-forget"] for s in stats)
    n_r = sum(s["n-retain"] for s in stats)
    return {
        "forget_acc": 100.0 * sum(s["forget-correct"] for s in stats) / n_f if n_f else None,
        "retain_acc": 100.0 * sum(s["retain-correct"] for s in stats) / n_r if n_r else None,
        "n_forget": int(n_f),
        "n_retain": int(n_r),
    }


# ---------------------------------------------------------------------------------------------------
# Messages (Flower's record names: "arrays", "config", "metrics"; plus "device", who replied)
# ---------------------------------------------------------------------------------------------------

ARRAYS, CONFIG, METRICS, DEVICE, TRAINED = "arrays", "config", "metrics", "device", "trained"


def _bad(what: str) -> ConfigError:
    return ConfigError(f"malformed federated Q-MUL message: {what}", "run the same edge-qmul on server and devices")


def round_content(arrays: Any, spec: RoundSpec, server_round: int) -> Any:
    """A round message: the head's QAT state (an ``ArrayRecord``) and ``spec`` as a ConfigRecord."""
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    record: dict[str, Any] = {
        "server-round": server_round, "device-id": spec.device_id, "model-version": spec.model_version,
        "model-config": json.dumps(spec.model, sort_keys=True), "unlearn-config": spec.unlearn_config,
        "epoch": spec.epoch, "seed": spec.seed, "w-f": float(spec.w_f), "w-r": float(spec.w_r),
        "lr": float(spec.lr), "norms": spec.norms, "local-epochs": spec.local_epochs,
    }
    if spec.request_ids:  # an empty list has no element type in a ConfigRecord: absent means none
        record["request-ids"] = list(spec.request_ids)
    records: dict[str, Any] = {ARRAYS: arrays, CONFIG: ConfigRecord(record)}
    if spec.trained is not None:  # absent: the server names no trained samples (every contributed one is retained)
        records[TRAINED] = ArrayRecord(numpy_ndarrays=[np.frombuffer(spec.trained, np.uint8).reshape(-1, PREFIX)])
    return RecordDict(records)


def read_round(content: Any) -> tuple[dict[str, torch.Tensor], RoundSpec]:
    """(head state, spec) of a round message (``round_content``)."""
    from flwr.app import ArrayRecord, ConfigRecord

    arrays, record = content.get(ARRAYS), content.get(CONFIG)
    if not isinstance(arrays, ArrayRecord) or not isinstance(record, ConfigRecord):
        raise _bad(f"no {ARRAYS!r} array record or {CONFIG!r} config record")
    kinds: dict[str, type | tuple[type, ...]] = {
        "device-id": str, "model-version": str, "model-config": str, "unlearn-config": str, "epoch": int,
        "seed": int, "w-f": float, "w-r": float, "lr": float, "norms": bool, "local-epochs": int}
    for key, kind in kinds.items():
        if key not in record or not isinstance(record[key], kind) or (kind is int and isinstance(record[key], bool)):
            raise _bad(f"{key!r} missing or not {getattr(kind, '__name__', kind)}")
    ids = record.get("request-ids", [])
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise _bad("'request-ids' must be a list of request ids")
    try:
        model = json.loads(str(record["model-config"]))
    except json.JSONDecodeError as err:
        raise _bad(f"'model-config' is not JSON ({err})") from err
    if not isinstance(model, dict):
        raise _bad("'model-config' is not an object")
    if int(record["local-epochs"]) < 1:  # type: ignore[arg-type]
        raise _bad("'local-epochs' must be at least 1")
    trained = None
    if TRAINED in content:
        ta = content.get(TRAINED)
        arrays_ = ta.to_numpy_ndarrays() if isinstance(ta, ArrayRecord) else []
        if len(arrays_) != 1 or arrays_[0].dtype != np.uint8 or arrays_[0].ndim != 2 or arrays_[0].shape[1] != PREFIX:
            raise _bad(f"{TRAINED!r} must be one uint8 array of {PREFIX}-byte content id prefixes")
        trained = arrays_[0].tobytes()
    spec = RoundSpec(
        device_id=str(record["device-id"]), request_ids=tuple(str(i) for i in ids),
        model_version=str(record["model-version"]),
        model=model, unlearn_config=str(record["unlearn-config"]), epoch=int(record["epoch"]),  # type: ignore[arg-type]
        seed=int(record["seed"]), w_f=float(record["w-f"]), w_r=float(record["w-r"]),  # type: ignore[arg-type]
        lr=float(record["lr"]), norms=bool(record["norms"]),  # type: ignore[arg-type]
        local_epochs=int(record["local-epochs"]), trained=trained,  # type: ignore[arg-type]
    )
    return arrays.to_torch_state_dict(), spec


def reply_content(device_id: str, metrics: Mapping[str, float], state: Mapping[str, torch.Tensor] | None = None
                  ) -> Any:
    """A device's reply: its metrics (statistics, or the update's sample count), its id and, after training,
    its new head state."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    records: dict[str, Any] = {METRICS: MetricRecord({k: float(v) for k, v in metrics.items()}),
                               DEVICE: ConfigRecord({"device-id": device_id})}
    if state is not None:
        records[ARRAYS] = ArrayRecord(torch_state_dict=dict(state))
    return RecordDict(records)


def read_reply(content: Any, keys: Sequence[str], train: bool
               ) -> tuple[str, dict[str, float], dict[str, torch.Tensor] | None]:
    """(device id, metrics with at least ``keys``, head state when ``train``) of a device's reply."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    metrics, device = content.get(METRICS), content.get(DEVICE)
    if not isinstance(metrics, MetricRecord) or any(k not in metrics for k in keys):
        raise _bad(f"no complete {METRICS!r} record (needs {', '.join(keys)})")
    if not isinstance(device, ConfigRecord) or not isinstance(device.get("device-id"), str):
        raise _bad(f"no {DEVICE!r} record with the device id")
    state = None
    if train:
        arrays = content.get(ARRAYS)
        if not isinstance(arrays, ArrayRecord):
            raise _bad(f"no {ARRAYS!r} array record in a train reply")
        state = arrays.to_torch_state_dict()
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return str(device["device-id"]), values, state
