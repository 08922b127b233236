"""Federated Q-MUL as a Flower ``Strategy``: one round per epoch of Q-MUL, the forget samples staying on the devices.

``FedQMul(...).start(grid=..., initial_arrays=<the head's QAT state>, num_rounds=strategy.num_rounds)`` runs
``epochs + 1`` rounds of Flower's own loop (train, then evaluate, in every round; ``fedqmul`` has the maths):

- round 1 sends no train messages; its ``evaluate`` asks every participating device for its statistics at
  the initial weights (``configure_evaluate``), which ``aggregate_evaluate`` pools into ḡ_f, ḡ_r and the
  weights w_f, w_r of epoch 0;
- round k + 1 (k = 1..epochs): ``configure_train`` sends the state with (w_f, w_r, lr) of epoch k - 1 (lr on
  central Q-MUL's cosine schedule) and the local epochs each device runs on it (``LOCAL_EPOCHS``);
  ``aggregate_train`` averages the devices' head states by sample count, steps towards the average with the
  server step size and refreshes the weight fake-quant ranges (``fedqmul.average_states``); its ``evaluate``
  measures the statistics at the new weights for the next epoch, and after the last epoch only the accuracies
  (``final``).

Each message names, for its device, the requests it honours this round (request ids; the device resolves
them to its own samples), its samples in the server's training split (its retain set is drawn from them:
``trained_by_device``) and the installed model whose ``features.onnx`` gives the features. A device
holding forget samples (``holders``) that errs or does not answer stops the unlearning: ``failed`` says
why, the remaining rounds send nothing, and the caller makes no model, so the requests stay pending. A
retain-only device that drops out is left out of later rounds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_qmul.federated import fedqmul
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from edge_qmul.config import QMul
from edge_qmul.errors import EdgeQmulError, UnlearningError

log = logging.getLogger(__name__)

# Federated Q-MUL's recipe: Q-MUL fields over QMul's defaults (the operator's unlearn-* settings override them),
# and the local epochs each device runs per round. Chosen on bench/federated_modes.py's two tuning forget sets
# (their own requests and retrain references, the validation split in place of the test split;
# bench/results/federated_modes_tuning.json): of lr {0.3, 0.1} x (rounds, local epochs) {(5, 1), (10, 1), (5, 3),
# (10, 3)}, QMul's lr 0.3 and 5 rounds with 3 local epochs had the smallest mean Avg Gap to retrain (0.52; 1.07
# with one local epoch, 0.80 with one over 10 rounds). With one local epoch a round moves the head by about a third
# of a central epoch (each of 3 devices takes a third of the steps, and averaging does not add their steps up).
FEDERATED_RECIPE: dict[str, Any] = {}
LOCAL_EPOCHS = 3


@dataclass(frozen=True)
class Participant:
    """A node of this round: the device it answered as, and its requests the round honours."""

    device_id: str
    request_ids: tuple[str, ...] = ()
    trained: bytes | None = None  # its samples in the server's training split (``fedqmul.prefixes``); None: unknown


@dataclass
class FedQMul(Strategy):
    """Q-MUL on the classifier head with the fleet (see the module docstring).

    ``head`` is the server's QAT head (trained in place: it shares its modules with the QAT copy);
    ``participants`` maps Flower node id -> ``Participant``; ``holders`` are the device ids whose requests
    the ledger holds (each must take part in every round); ``model`` is the model config a device rebuilds
    the head from (``ModelConfig.to_dict()`` plus backend, image-size, color); ``model_version`` the
    installed model whose ``features.onnx`` the devices run.
    """

    head: nn.Module
    cfg: QMul
    participants: dict[int, Participant]
    holders: set[str]
    model: dict[str, Any]
    model_version: str
    server_lr: float = 1.0
    local_epochs: int = LOCAL_EPOCHS
    rounds: list[dict[str, Any]] = field(default_factory=list)  # one per epoch: weights, norms, accuracies, lr
    final: dict[str, Any] | None = None  # the devices' forget / retain accuracy after the last epoch
    failed: str | None = None
    _weights: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        missing = self.holders - {p.device_id for p in self.participants.values()}
        if missing:
            self._fail("the start", missing)

    @property
    def num_rounds(self) -> int:
        return self.cfg.epochs + 1

    def summary(self) -> None:
        log.info("FedQMul: %d device(s), %d holding forget samples; %d epochs of %d local epoch(s), lr %.4g, server "
                 "lr %.3g, features of %s", len(self.participants), len(self.holders), self.cfg.epochs,
                 self.local_epochs, self.cfg.lr, self.server_lr, self.model_version)

    # -- messages ------------------------------------------------------------------------------------

    def _messages(self, arrays: ArrayRecord, server_round: int, message_type: str, epoch: int, *,
                  w_f: float = 0.0, w_r: float = 0.0, lr: float = 0.0, norms: bool = True) -> list[Message]:
        order = sorted({p.device_id for p in self.participants.values()})
        out = []
        for node, p in sorted(self.participants.items()):
            spec = fedqmul.RoundSpec(
                device_id=p.device_id, request_ids=p.request_ids, model_version=self.model_version, model=self.model,
                unlearn_config=fedqmul.config_json(self.cfg), epoch=epoch,
                seed=self.cfg.seed + 1000 * epoch + order.index(p.device_id), w_f=w_f, w_r=w_r, lr=lr, norms=norms,
                local_epochs=self.local_epochs, trained=p.trained)
            out.append(Message(fedqmul.round_content(arrays, spec, server_round), node, message_type))
        return out

    def _collect(self, replies: Iterable[Message], train: bool, step: str
                 ) -> dict[int, tuple[dict[str, float], dict[str, Any] | None]] | None:
        """The usable replies by node, or None (and ``failed``) if a holder of forget samples is missing."""
        keys = ("num-examples",) if train else fedqmul.STAT_KEYS
        got: dict[int, tuple[dict[str, float], dict[str, Any] | None]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if node not in self.participants:
                continue
            if reply.has_error():
                log.warning("node %d (device %s...) answered %s with an error: %s", node,
                            self.participants[node].device_id[:16], step, reply.error.reason)
                continue
            try:
                device, metrics, state = fedqmul.read_reply(reply.content, keys, train)
            except EdgeQmulError as err:
                log.warning("node %d: unusable reply to %s (%s)", node, step, err.message)
                continue
            if device != self.participants[node].device_id:
                log.warning("node %d answered %s as device %s..., not %s...; reply ignored", node, step, device[:16],
                            self.participants[node].device_id[:16])
                continue
            got[node] = (metrics, state)
        for node in sorted(set(self.participants) - set(got)):
            log.warning("node %d (device %s...) gave no usable reply to %s", node,
                        self.participants[node].device_id[:16], step)
        missing = self.holders - {self.participants[n].device_id for n in got}
        if missing:
            self._fail(step, missing)
            return None
        self.participants = {n: self.participants[n] for n in got}  # retain-only devices that dropped out
        return got

    def _fail(self, step: str, missing: set[str]) -> None:
        self.failed = (f"stopped at {step}: device(s) {', '.join(sorted(d[:16] + '...' for d in missing))} hold "
                       "forget samples and did not take part")
        log.warning("federated unlearning %s; the requests stay pending", self.failed)

    # -- evaluate: statistics at the broadcast weights -----------------------------------------------

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        if self.failed:
            return []
        epoch = server_round - 1  # the epoch these statistics set the weights of (== epochs: the final look)
        return self._messages(arrays, server_round, MessageType.EVALUATE, epoch, norms=epoch < self.cfg.epochs)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.failed:
            return None
        epoch = server_round - 1
        got = self._collect(replies, train=False, step=f"round {server_round} (evaluate)")
        if got is None:
            return None
        stats = [metrics for metrics, _ in got.values()]
        summary = fedqmul.summary_of(stats)
        if epoch >= self.cfg.epochs:
            self.final = summary
            return _metrics(summary)
        try:
            w_f, w_r, gf, gr = fedqmul.adaptive_weights(stats)
        except UnlearningError as err:
            self.failed = f"stopped at round {server_round} (evaluate): {err.message}"
            log.warning("federated unlearning %s; the requests stay pending", self.failed)
            return None
        self._weights = (w_f, w_r)
        self.rounds.append({"epoch": epoch, "server_lr": self.server_lr, "w_f": w_f, "w_r": w_r, "g_f": gf, "g_r": gr,
                            "devices": len(got), **summary})
        log.info("federated Q-MUL epoch %d: %d devices, w_f %.3f, w_r %.3f, forget acc %s", epoch, len(got), w_f,
                 w_r, summary["forget_acc"])
        return _metrics({"w_f": w_f, "w_r": w_r, "g_f": gf, "g_r": gr, **summary})

    # -- train: one local epoch per device, then the server step -------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        if self.failed or server_round < 2:  # round 1 only measures the initial weights
            return []
        epoch = server_round - 2
        lr = fedqmul.cosine(self.cfg.lr, epoch, self.cfg.epochs)
        self.rounds[epoch]["lr"] = lr
        w_f, w_r = self._weights
        return self._messages(arrays, server_round, MessageType.TRAIN, epoch, w_f=w_f, w_r=w_r, lr=lr)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self.failed or server_round < 2:
            return None, None
        got = self._collect(replies, train=True, step=f"round {server_round} (train)")
        if got is None:
            return None, None
        updates = [(state, metrics["num-examples"]) for metrics, state in got.values() if state is not None]
        fedqmul.average_states(self.head, updates, self.server_lr)
        samples = sum(n for _, n in updates)
        return (ArrayRecord(torch_state_dict=fedqmul.state_of(self.head)),
                MetricRecord({"devices": len(updates), "num-examples": samples}))


def _metrics(values: Mapping[str, Any]) -> MetricRecord:
    return MetricRecord({k: float(v) for k, v in values.items() if isinstance(v, int | float)})


# ---------------------------------------------------------------------------------------------------
# The server's side of a federated unlearning (coordinator.unlearn_federated)
# ---------------------------------------------------------------------------------------------------


def requests_by_device(requests: Iterable[Any]) -> tuple[dict[str, list[str]], list[str]]:
    """The ledger's request ids by the device that filed them (``spec["device"]``), and the ids of requests no
    device filed (the operator's: their samples are on no device, so federated rounds cannot honour them)."""
    by_device: dict[str, list[str]] = {}
    orphans: list[str] = []
    for r in requests:
        device = r.spec.get("device") if isinstance(r.spec, dict) else None
        if isinstance(device, str) and device:
            by_device.setdefault(device, []).append(r.request_id)
        else:
            orphans.append(r.request_id)
    return by_device, orphans


def model_spec(run: Any, q: Any) -> dict[str, Any]:
    """What a device rebuilds the QAT head from: the model config, the quantization backend and the image
    options the run reads its data with (image folders on the device are decoded the same way)."""
    import json

    info = json.loads(run.verified("run_info").read_text()) if run.exists("run_info") else {}
    data = info.get("data", {}) if isinstance(info, dict) else {}
    return {**q.model_cfg.to_dict(), "backend": q.backend, "image-size": int(data.get("image_size") or 0),
            "color": str(data.get("color", "auto"))}


def features_version(run: Any, q: Any) -> str:
    """The version of the run's exported model, whose ``features.onnx`` devices use: it must have the QAT
    copy's features (every parameter outside the head as in the quantized model: a head-only unlearning
    result, e.g. an earlier federated round's), so the head the server trains reads what the devices compute."""
    import torch

    from edge_qmul import quant
    from edge_qmul.train import load_payload

    if not run.exists("int8_onnx") or not run.exists("features_onnx"):
        raise UnlearningError(
            f"{run.root} has no exported model with features.onnx, so devices cannot compute features",
            "export a model (`edge-qmul export`), bundle it and roll it out to the fleet first")
    version = str(run.model_version())
    method = version.rsplit("-", 1)[0]
    payload = load_payload(run.verified("result", method=method), "unlearning result", run.fix("result", method=method))
    head_keys = set(quant.split_at_classifier(q.qat, q.model_cfg.head)[1].state_dict())
    base = q.qat.state_dict()
    changed = [k for k, v in payload["qat_state"].items() if k not in head_keys and k in base
               and isinstance(v, torch.Tensor) and (v.shape != base[k].shape or not torch.equal(v, base[k]))]
    if changed:
        raise UnlearningError(
            f"the exported model {version} changed the network outside its classifier head ({changed[0]}, ...): its "
            "features are not the quantized model's, which federated Q-MUL unlearns from",
            "export and roll out a head-only result (central qmul with layers=classifier, or a federated one)")
    return version


def trained_by_device(run: Any, devices: Iterable[str]) -> dict[str, bytes]:
    """Per device, the content ids (``fedqmul.prefixes``) of its contributed samples in the run's training split:
    the server's own records (provenance and split), which a round sends each device so that its retain set is
    what the model was trained on. Empty when the run has no provenance."""
    from edge_qmul import data
    from edge_qmul.store import SampleStore

    if not run.exists("samples"):
        return {}
    split = data.Split.load(run.verified("split"))
    with SampleStore(run.path("samples")) as store:
        if not store.has_provenance():
            return {}
        in_train = set(store.hashes(split.train).values())
        return {d: fedqmul.prefixes([h for h in store.contributed_by(d) if h in in_train]) for d in devices}


def run_fedqmul(grid: Grid, cfg: Any, participants: Mapping[int, str], model_version: str | None = None, *,
                unlearn: Mapping[str, Any] | None = None, local_epochs: int = 0, retain: str = "trained"
                ) -> Any | None:
    """Federated Q-MUL over the whole ledger with the devices of ``participants`` (node id -> device id, as
    they answered this round): the result is saved in the run (``pipeline.save_result`` as ``fedqmul``) and
    its record returned; None, with the reason logged, if it could not run (the requests stay pending).

    ``model_version``: the installed model whose features.onnx the devices run (default ``features_version``:
    the run's exported model). ``unlearn``: Q-MUL fields over ``cfg``'s (the benchmark's tuning); ``local_epochs``
    per round (0: the run config's ``local-epochs``, whose 0 means ``LOCAL_EPOCHS``); ``retain``: "trained" (a
    device retains its samples in the server's training split) or "contributed" (every sample it contributed:
    the behaviour before, for comparison)."""
    import time

    from edge_qmul import pipeline, quant
    from edge_qmul.config import build
    from edge_qmul.ledger import Ledger
    from edge_qmul.methods import UnlearnResult
    from edge_qmul.run import Run

    local_epochs = local_epochs or int(getattr(cfg, "local_epochs", 0)) or LOCAL_EPOCHS

    t0 = time.perf_counter()
    with Ledger(cfg.ledger_path) as ledger:
        requests = ledger.requests()
        forget_ids = ledger.forget_ids()
    by_device, orphans = requests_by_device(requests)
    if orphans:
        log.warning("federated unlearning cannot honour %d request(s) no device filed (first %s): their samples are "
                    "on no device; unlearn them in central mode. Nothing unlearned, the requests stay pending",
                    len(orphans), orphans[0])
        return None
    if retain not in ("trained", "contributed"):
        raise UnlearningError(f"retain={retain!r} is not a retain set", "use 'trained' or 'contributed'")
    run = Run(cfg.run_path)
    trained = trained_by_device(run, set(participants.values())) if retain == "trained" else {}
    nodes: dict[int, Participant] = {}
    for node, device in sorted(participants.items()):
        if device in {p.device_id for p in nodes.values()}:
            log.warning("node %d answered as device %s..., which another node already is; left out", node, device[:16])
            continue
        nodes[node] = Participant(device, tuple(by_device.get(device, [])), trained.get(device))
    q = pipeline.load_quantized(run)
    head = quant.split_at_classifier(q.qat, q.model_cfg.head)[1]
    ucfg = build(QMul, {**FEDERATED_RECIPE, **cfg.unlearn_overrides, **(unlearn or {}), "layers": "classifier"},
                 "[tool.flwr.app.config] unlearn-*")
    try:
        version = model_version or features_version(run, q)
    except UnlearningError as err:
        log.warning("federated unlearning cannot start: %s (%s); the requests stay pending", err.message, err.fix)
        return None
    strategy = FedQMul(head, ucfg, nodes, set(by_device), model_spec(run, q), version, cfg.server_lr, local_epochs)
    if strategy.failed:
        return None
    strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=fedqmul.state_of(head)),
                   num_rounds=strategy.num_rounds, timeout=cfg.reply_timeout)
    if strategy.failed:
        return None
    int8 = quant.convert(q.qat)
    log_ = {"seconds": time.perf_counter() - t0, "config": ucfg.to_dict(), "local_epochs": local_epochs,
            "retain": retain, "rounds": strategy.rounds,
            "final": strategy.final, "features_version": version, "devices": len(strategy.participants)}
    result = UnlearnResult("fedqmul", q.qat, int8, log_)
    return pipeline.save_result(run, "fedqmul", q, result, [r.request_id for r in requests], forget_ids)
