"""How the protocol's objects travel in Flower messages (ConfigRecord / MetricRecord in a RecordDict).

Message types (``query.<action>``; each is one round trip, ~6 s on a real deployment, so everything a
node needs in a step goes into one message):

``query.forget``   server -> device: "send your pending requests"; reply: one ``DeviceBatch``
``query.ack``      server -> device: one ``Outcome`` per batch entry, sent after the ledger commit
``query.receipt``  server -> device: per recorded request, the model version that first honours it
``evaluate``       server -> device (federated mode): the head's QAT state + the device's forget ids;
                   reply: gradient-norm statistics and accuracies at those weights (``fedqmul``)
``train``          server -> device (federated mode): the same + the round's (w_f, w_r, lr);
                   reply: the device's updated head state and sample count

Signed payloads and signatures travel as ``bytes`` lists in a ConfigRecord; the server re-parses them from
those bytes, so nothing in a record is trusted without its signature.
"""

from __future__ import annotations

from typing import Any

from edge_qmul.federated.protocol import STATUSES, DeviceBatch, Outcome, ProtocolError, SignedRequest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

QUERY_FORGET = "query.forget"
QUERY_ACK = "query.ack"
QUERY_RECEIPT = "query.receipt"
EVALUATE = "evaluate"
TRAIN = "train"

_BATCH = "forget-batch"
_ACK = "forget-ack"
_RECEIPT = "forget-receipt"
_QUERY = "forget-query"
_SUMMARY = "summary"
_HEAD = "head"
_ROUND = "fedqmul-round"
_STATS = "fedqmul-stats"


def _bad(what: str) -> ProtocolError:
    return ProtocolError("malformed-batch", f"malformed message content: {what}", "update the device software")


def _get(record: ConfigRecord, key: str, kind: type) -> Any:
    if key not in record:
        raise _bad(f"missing {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _bad(f"{key!r} must be {kind.__name__}")
    return value


def _get_list(record: ConfigRecord, key: str, kind: type) -> list[Any]:
    # An empty list is stored without an element type, so absent and [] both mean "none".
    value = record.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise _bad(f"{key!r} must be a list of {kind.__name__}")
    return value


def _config(content: RecordDict, name: str) -> ConfigRecord:
    record = content.get(name)
    if not isinstance(record, ConfigRecord):
        raise _bad(f"no {name!r} config record")
    return record


def forget_query(server_time: float) -> RecordDict:
    return RecordDict({_QUERY: ConfigRecord({"server-time": float(server_time)})})


def batch_to_content(batch: DeviceBatch) -> RecordDict:
    record: dict[str, Any] = {
        "partition-id": batch.partition_id,
        "num-partitions": batch.num_partitions,
        "public-key": batch.public_key,
        "key-proof": batch.key_proof,
    }
    if batch.entries:
        record["payloads"] = [e.payload for e in batch.entries]
        record["signatures"] = [e.signature for e in batch.entries]
    return RecordDict({_BATCH: ConfigRecord(record)})


def content_to_batch(content: RecordDict) -> DeviceBatch:
    record = _config(content, _BATCH)
    payloads = _get_list(record, "payloads", bytes)
    signatures = _get_list(record, "signatures", bytes)
    if len(payloads) != len(signatures):
        raise _bad(f"{len(payloads)} payloads but {len(signatures)} signatures")
    return DeviceBatch(
        partition_id=_get(record, "partition-id", int),
        num_partitions=_get(record, "num-partitions", int),
        public_key=_get(record, "public-key", bytes),
        key_proof=_get(record, "key-proof", bytes),
        entries=[SignedRequest(p, s) for p, s in zip(payloads, signatures, strict=True)],
    )


def acks_to_content(outcomes: list[Outcome]) -> RecordDict:
    record: dict[str, Any] = {"count": len(outcomes)}
    if outcomes:
        record["index"] = [o.index for o in outcomes]
        record["request-id"] = [o.request_id for o in outcomes]
        record["status"] = [o.status for o in outcomes]
        record["reason"] = [o.reason for o in outcomes]
    return RecordDict({_ACK: ConfigRecord(record)})


def content_to_acks(content: RecordDict) -> list[Outcome]:
    record = _config(content, _ACK)
    count = _get(record, "count", int)
    columns = [_get_list(record, k, t) for k, t in (("index", int), ("request-id", str), ("status", str),
                                                     ("reason", str))]
    if any(len(c) != count for c in columns):
        raise _bad("acknowledgement columns differ in length")
    outcomes = [Outcome(*row) for row in zip(*columns, strict=True)]
    if [o.index for o in outcomes] != list(range(count)) or any(o.status not in STATUSES for o in outcomes):
        raise _bad("acknowledgement indices or statuses are invalid")
    return outcomes


def receipt_to_content(honoured: dict[str, str]) -> RecordDict:
    """request id -> model version that first honoured it."""
    record: dict[str, Any] = {"count": len(honoured)}
    if honoured:
        ids = sorted(honoured)
        record["request-ids"] = ids
        record["model-versions"] = [honoured[i] for i in ids]
    return RecordDict({_RECEIPT: ConfigRecord(record)})


def content_to_receipt(content: RecordDict) -> dict[str, str]:
    record = _config(content, _RECEIPT)
    ids = _get_list(record, "request-ids", str)
    versions = _get_list(record, "model-versions", str)
    if not len(ids) == len(versions) == _get(record, "count", int):
        raise _bad("receipt columns differ in length")
    return dict(zip(ids, versions, strict=True))


def summary(**counts: int) -> RecordDict:
    """A device's reply to ack / receipt: counts only."""
    return RecordDict({_SUMMARY: MetricRecord(dict(counts))})


def read_summary(content: RecordDict) -> dict[str, int]:
    record = content.get(_SUMMARY)
    if not isinstance(record, MetricRecord):
        raise _bad(f"no {_SUMMARY!r} metric record")
    return {k: int(v) for k, v in record.items() if isinstance(v, int | float)}


def round_to_content(state: dict[str, Any], forget_ids: list[int], unlearn_config: str, epoch: int, seed: int,
                     w_f: float = 0.0, w_r: float = 0.0, lr: float = 0.0) -> RecordDict:
    """A federated Q-MUL round message: the head's QAT state (torch tensors) and the round's settings."""
    record: dict[str, Any] = {"unlearn-config": unlearn_config, "epoch": epoch, "seed": seed, "w-f": float(w_f),
                              "w-r": float(w_r), "lr": float(lr)}
    if forget_ids:
        record["forget-ids"] = [int(i) for i in forget_ids]
    return RecordDict({_HEAD: ArrayRecord(torch_state_dict=state), _ROUND: ConfigRecord(record)})


def content_to_round(content: RecordDict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(head state as torch tensors, settings) of a round message."""
    head = content.get(_HEAD)
    if not isinstance(head, ArrayRecord):
        raise _bad(f"no {_HEAD!r} array record")
    record = _config(content, _ROUND)
    spec = {
        "unlearn-config": _get(record, "unlearn-config", str),
        "epoch": _get(record, "epoch", int),
        "seed": _get(record, "seed", int),
        "w-f": _get(record, "w-f", float),
        "w-r": _get(record, "w-r", float),
        "lr": _get(record, "lr", float),
        "forget-ids": _get_list(record, "forget-ids", int),
    }
    return head.to_torch_state_dict(), spec


def stats_to_content(stats: dict[str, float]) -> RecordDict:
    return RecordDict({_STATS: MetricRecord({k: float(v) for k, v in stats.items()})})


def content_to_stats(content: RecordDict, keys: tuple[str, ...]) -> dict[str, float]:
    record = content.get(_STATS)
    if not isinstance(record, MetricRecord) or any(k not in record for k in keys):
        raise _bad(f"no complete {_STATS!r} metric record")
    return {k: float(record[k]) for k in keys}  # type: ignore[arg-type]


def update_to_content(state: dict[str, Any], metrics: dict[str, float]) -> RecordDict:
    return RecordDict({_HEAD: ArrayRecord(torch_state_dict=state), _STATS: MetricRecord(dict(metrics))})


def content_to_update(content: RecordDict) -> tuple[dict[str, Any], float]:
    """(updated head state, number of samples it was trained on)."""
    head = content.get(_HEAD)
    if not isinstance(head, ArrayRecord):
        raise _bad(f"no {_HEAD!r} array record")
    return head.to_torch_state_dict(), content_to_stats(content, ("num-examples",))["num-examples"]
