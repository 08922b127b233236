"""How the protocol's objects travel in Flower messages (ConfigRecord / MetricRecord in a RecordDict).

Message types (``query.<action>``; each is one round trip, ~6 s on a real deployment, so everything a
node needs in a step goes into one message):

``query.forget``   server -> device: "send your pending requests"; reply: the device id, every entry of
                   ``DeviceState.pending()`` (request id, the signed canonical body, its signature) and the
                   ids of its acknowledged requests still awaiting a receipt
``query.ack``      server -> device: one answer per entry (``receive.Answer``: acknowledged, or refused with
                   a reason), sent after the ledger commit
``query.receipt``  server -> device: per honoured request, the model version that first honours it
``evaluate``       server -> device (federated mode): the head's QAT state + the device's request ids to honour;
                   reply: gradient-norm statistics and accuracies at those weights
``train``          server -> device (federated mode): the same + the round's (w_f, w_r, lr);
                   reply: the device's updated head state and sample count
                   (both are Flower's own message types; their records are ``fedqmul``'s, sent by ``strategy``)

Signed payloads (canonical JSON) and signatures (hex) travel as string lists in a ConfigRecord, exactly as
the device stored them; the server verifies each one (``receive``), so nothing in a record is trusted
without its signature. The device id beside them only says where to send receipts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from edge_qmul.errors import ForgetRequestError

QUERY_FORGET = "query.forget"
QUERY_ACK = "query.ack"
QUERY_RECEIPT = "query.receipt"

_BATCH = "forget-batch"
_ACK = "forget-ack"
_RECEIPT = "forget-receipt"
_QUERY = "forget-query"
_SUMMARY = "summary"


ANSWER_STATUSES = ("acknowledged", "refused")


class ProtocolError(ForgetRequestError):
    """A message's content is not what the protocol says; ``reason`` is a short code ("malformed-batch")."""

    def __init__(self, reason: str, message: str, fix: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, fix)


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


def entries_to_content(device_id: str, entries: Sequence[Mapping[str, str]],
                       awaiting: Sequence[str] = ()) -> RecordDict:
    """A device's reply to ``query.forget``: its id, its pending signed entries, and the ids of its
    acknowledged requests that no receipt has reached yet (the server answers those with receipts)."""
    record: dict[str, Any] = {"device-id": device_id}
    if entries:
        record["request-ids"] = [str(e["request_id"]) for e in entries]
        record["payloads"] = [str(e["payload"]) for e in entries]
        record["signatures"] = [str(e["signature"]) for e in entries]
    if awaiting:
        record["awaiting"] = [str(r) for r in awaiting]
    return RecordDict({_BATCH: ConfigRecord(record)})


def content_to_entries(content: RecordDict) -> tuple[str, list[dict[str, str]], list[str]]:
    """(device id, entries as ``DeviceState.pending()`` gives them, awaiting request ids) of a forget reply."""
    record = _config(content, _BATCH)
    device_id = _get(record, "device-id", str)
    columns = [_get_list(record, k, str) for k in ("request-ids", "payloads", "signatures")]
    if len({len(c) for c in columns}) != 1:
        raise _bad("request-ids, payloads and signatures differ in length")
    entries = [{"request_id": r, "payload": p, "signature": s} for r, p, s in zip(*columns, strict=True)]
    return device_id, entries, _get_list(record, "awaiting", str)


def answers_to_content(answers: list[tuple[str, str, str]]) -> RecordDict:
    """The server's ``query.ack``: (request id, "acknowledged" | "refused", reason) per entry, in order."""
    record: dict[str, Any] = {"count": len(answers)}
    if answers:
        record["request-id"] = [a[0] for a in answers]
        record["status"] = [a[1] for a in answers]
        record["reason"] = [a[2] for a in answers]
    return RecordDict({_ACK: ConfigRecord(record)})


def content_to_answers(content: RecordDict) -> list[tuple[str, str, str]]:
    record = _config(content, _ACK)
    count = _get(record, "count", int)
    columns = [_get_list(record, k, str) for k in ("request-id", "status", "reason")]
    if any(len(c) != count for c in columns):
        raise _bad("acknowledgement columns differ in length")
    answers = list(zip(*columns, strict=True))
    if any(status not in ANSWER_STATUSES for _, status, _ in answers):
        raise _bad(f"an acknowledgement status is not one of {ANSWER_STATUSES}")
    return answers


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
