"""One federated forget round on the server: collect, record, acknowledge, unlearn, issue receipts.

``run_round(grid, cfg)`` is what the ServerApp's ``main`` calls; it only needs a Flower ``Grid``, so tests
drive it with an in-process grid as well as through a real SuperLink.

1. wait until ``num-clients`` SuperNodes are connected (or ``connect-timeout`` passes, then go ahead with
   those present);
2. ``query.forget`` to every node, one message each; each device answers with its device id, every signed
   request of its queue (``DeviceState.pending()``) and the ids of its requests awaiting a receipt. The
   node -> device mapping of this round comes from these replies (never from configuration);
3. ``receive.receive`` files each entry: it checks the signature under the device key the body names,
   ownership of every content id against the training provenance, and request-id conflicts, and commits
   an accepted request to the forget ledger before answering. A request sent again (a lost
   acknowledgement, or its signed bytes replayed) is acknowledged again without a second ledger row;
4. ``query.ack`` to every node that answered: one answer per entry (after the commit in step 3);
5. if any request in the ledger is not yet honoured, unlearn every request in it, then
   ``Ledger.mark_honoured`` with the new model's version (``Run.model_version``: its exported int8 ONNX):
   central mode: ``pipeline.run_unlearn`` with Q-MUL on the server;
   federated mode: ``unlearn_federated``, Q-MUL rounds with the devices (``fedqmul``);
6. ``query.receipt`` to each device with honoured requests it has not got a receipt for (those acknowledged
   now, or listed as awaiting): request id -> the model version that first honoured it. The ledger says
   which device filed which request (its ``spec["device"]``), so a device only ever learns about its own.

A node that fails or does not answer within ``reply-timeout`` is logged with its node id and left out of
the later steps; what was already recorded for it stays recorded (step 3 happens before any later step).
A summary is written to ``<run-dir>/federated/round-<flower run id>.json``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from edge_qmul.federated import messages
from edge_qmul.federated.config import FederatedConfig
from edge_qmul.federated.messages import ProtocolError
from edge_qmul.federated.receive import receive
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from edge_qmul.atomic import write_json
from edge_qmul.config import method_config
from edge_qmul.ledger import Ledger
from edge_qmul.run import Run

log = logging.getLogger(__name__)


@dataclass
class RoundSummary:
    flower_run_id: int
    mode: str
    nodes: int = 0  # connected when the round started
    replied: int = 0  # answered the forget query with a decodable batch
    devices: int = 0  # distinct device ids among the replies
    acked_nodes: int = 0  # confirmed the acknowledgement
    accepted: int = 0  # acknowledged and recorded now
    already_recorded: int = 0  # acknowledged again: the ledger held the request already (a resend or replay)
    refused: int = 0
    refusals: dict[str, int] = field(default_factory=dict)  # reason code -> count
    model_version: str | None = None
    honoured: int = 0  # requests whose honoured_by is this round's model version
    receipts: int = 0  # nodes that confirmed their receipt
    seconds: dict[str, float] = field(default_factory=dict)

    def one_line(self) -> str:
        return (
            f"forget round: {self.replied}/{self.nodes} nodes replied; {self.accepted} accepted, "
            f"{self.already_recorded} already recorded, {self.refused} refused {dict(self.refusals)}; "
            f"model {self.model_version or '-'} honours {self.honoured}; {self.seconds.get('total', 0):.1f}s"
        )


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Node ids once ``wanted`` are connected, or whatever is connected when ``timeout`` runs out."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted or time.monotonic() >= deadline:
            return nodes
        time.sleep(poll)


def _exchange(grid: Grid, contents: dict[int, RecordDict], message_type: str, timeout: float) -> dict[int, Message]:
    """Send one message per node and return the replies without errors, by node id."""
    ttl = timeout + 60.0  # long enough for a slow node's reply to still count while we wait
    sent = [Message(content, node, message_type, ttl=ttl) for node, content in contents.items()]
    replies: Iterable[Message] = grid.send_and_receive(sent, timeout=timeout) if sent else []
    out: dict[int, Message] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d answered %s with an error: %s", node, message_type, reply.error.reason)
            continue
        out[node] = reply
    for node in sorted(set(contents) - set(out)):
        log.warning("node %d gave no usable reply to %s within %.0fs", node, message_type, timeout)
    return out


def run_round(grid: Grid, cfg: FederatedConfig, *, flower_run_id: int = 0) -> RoundSummary:
    t0 = time.perf_counter()
    summary = RoundSummary(flower_run_id, cfg.mode)
    nodes = wait_for_nodes(grid, cfg.num_clients, cfg.connect_timeout)
    summary.nodes = len(nodes)
    level = logging.INFO if len(nodes) >= cfg.num_clients else logging.WARNING
    log.log(level, "forget round %d: %d node(s) connected (%d expected)", flower_run_id, len(nodes), cfg.num_clients)

    # -- collect and record ----------------------------------------------------------------------------
    t = time.perf_counter()
    replies = _exchange(grid, {n: messages.forget_query(time.time()) for n in nodes}, messages.QUERY_FORGET,
                        cfg.reply_timeout)
    acks: dict[int, RecordDict] = {}
    devices: dict[int, str] = {}  # node -> the device id it answered with (this round only)
    awaiting: dict[int, set[str]] = {}  # node -> request ids its device waits to get a receipt for
    reasons: Counter[str] = Counter()
    run_data = None  # the run's training pool, loaded once for the round's batches (receive)
    for node, reply in sorted(replies.items()):
        try:
            device_id, entries, waiting = messages.content_to_entries(reply.content)
        except ProtocolError as err:
            log.warning("node %d: reply refused (%s: %s); nothing recorded for it", node, err.reason, err.message)
            continue
        if entries and run_data is None:
            from edge_qmul import pipeline  # torch: loaded when there is something to file

            run_data = pipeline.load_run_data(cfg.run_path)
        answers = receive(cfg.run_path, entries, run_data=run_data)
        acks[node] = messages.answers_to_content([(a.request_id, a.status, a.reason) for a in answers])
        devices[node] = device_id
        awaiting[node] = set(waiting) | {a.request_id for a in answers if a.status == "acknowledged"}
        for a in answers:
            summary.accepted += a.status == "acknowledged" and a.recorded
            summary.already_recorded += a.status == "acknowledged" and not a.recorded
            if a.status == "refused":
                reasons[refusal_code(a.reason)] += 1
    summary.replied = len(acks)
    summary.devices = len(set(devices.values()))
    summary.refused = sum(reasons.values())
    summary.refusals = dict(sorted(reasons.items()))
    summary.seconds["collect"] = time.perf_counter() - t

    # -- acknowledge (every accepted request above is already committed) -----------------------------
    t = time.perf_counter()
    confirmed = _exchange(grid, acks, messages.QUERY_ACK, cfg.reply_timeout)
    summary.acked_nodes = len(confirmed)
    summary.seconds["ack"] = time.perf_counter() - t
    # A durable mark that this round's acknowledgements went out, with the server process's pid (an
    # operator, or the crash test, can see where a killed round stopped).
    write_json(cfg.run_path / "federated" / f"acked-{flower_run_id}.json",
               {"pid": os.getpid(), "accepted": summary.accepted, "acked_nodes": summary.acked_nodes,
                "time": time.time()})
    if cfg.hold_after_ack > 0:  # test switch: a window in which to kill the server before it unlearns
        log.warning("holding %.0fs after acknowledgement (hold-after-ack)", cfg.hold_after_ack)
        time.sleep(cfg.hold_after_ack)

    # -- unlearn -------------------------------------------------------------------------------------
    if cfg.mode == "central":
        t = time.perf_counter()
        summary.model_version, summary.honoured = unlearn_pending(cfg)
        summary.seconds["unlearn"] = time.perf_counter() - t
    elif cfg.mode == "federated":
        t = time.perf_counter()
        summary.model_version, summary.honoured = unlearn_federated(grid, cfg, devices)
        summary.seconds["unlearn"] = time.perf_counter() - t

    # -- receipts ------------------------------------------------------------------------------------
    t = time.perf_counter()
    receipts = _receipts(cfg, devices, awaiting)
    summary.receipts = len(_exchange(grid, receipts, messages.QUERY_RECEIPT, cfg.reply_timeout))
    summary.seconds["receipt"] = time.perf_counter() - t

    summary.seconds["total"] = time.perf_counter() - t0
    write_json(Run(cfg.run_path).path("federated") / f"round-{flower_run_id}.json", asdict(summary))
    log.info("%s", summary.one_line())
    return summary


def _pending(cfg: FederatedConfig) -> bool:
    with Ledger(cfg.ledger_path) as ledger:
        if any(r.honoured_by is None for r in ledger.requests()):
            return True
    log.info("no unhonoured forget requests: the current model stands")
    return False


def _honour(cfg: FederatedConfig, record: Any) -> tuple[str, int]:
    """Export the new result and mark the requests it covers as honoured by its model version (the digest of
    its int8 ONNX, the name bundles and certificates cite); (version, newly honoured)."""
    from edge_qmul.export.stage import export_run

    run = Run(cfg.run_path)
    export_run(run, record.method)
    version = run.model_version()
    with Ledger(cfg.ledger_path) as ledger:
        # the result covers every request in the ledger (the record lists them); only unhonoured rows change.
        ledger.mark_honoured(record.request_ids, version)
        honoured = sum(r.honoured_by == version for r in ledger.requests())
    log.info("unlearned %d samples in %.1fs: model %s honours %d new request(s)",
             record.forget_count, record.seconds, version, honoured)
    return version, honoured


def unlearn_pending(cfg: FederatedConfig) -> tuple[str | None, int]:
    """Central mode: Q-MUL over the whole ledger if any request is not yet honoured."""
    from edge_qmul import pipeline  # local import: torch is heavy and only the unlearning modes need it

    if not _pending(cfg):
        return None, 0
    meta = pipeline.run_unlearn(cfg.run_path, method_config("qmul", cfg.unlearn_overrides), quiet=True)
    return _honour(cfg, meta)


def unlearn_federated(grid: Grid, cfg: FederatedConfig, participants: dict[int, str]) -> tuple[str | None, int]:
    """Federated mode: Q-MUL rounds with the devices over the whole ledger (``strategy.FedQMul``, a Flower
    Strategy run by its own ``start``; ``fedqmul`` has the maths and the device side).

    ``participants`` maps node id -> the device id it answered this round's forget query with. Each device
    is sent the ids of its own requests to honour and resolves them to its own samples; the forget samples
    never leave the devices. If a device holding forget samples is absent or stops answering, or a request
    in the ledger was filed by no device, no model is made and the requests stay pending for a later round.
    """
    from edge_qmul.federated.strategy import run_fedqmul

    if not _pending(cfg):
        return None, 0
    record = run_fedqmul(grid, cfg, participants)
    if record is None:
        return None, 0
    return _honour(cfg, record)


def refusal_code(reason: str) -> str:
    """The code of a refusal reason ("not-owner: ..." -> "not-owner")."""
    return reason.split(":", 1)[0].strip() or "refused"


def _receipts(cfg: FederatedConfig, devices: dict[int, str], awaiting: dict[int, set[str]]) -> dict[int, RecordDict]:
    """Per node: the honoured requests its device filed (the ledger row's ``spec["device"]``) among those it
    waits for, each with the model version that first honoured it (what a deletion certificate cites)."""
    with Ledger(cfg.ledger_path) as ledger:
        honoured = {r.request_id: (r.spec.get("device"), r.honoured_by) for r in ledger.requests() if r.honoured_by}
    out: dict[int, RecordDict] = {}
    for node, device_id in devices.items():
        mine: dict[str, str] = {}
        for rid in awaiting.get(node, ()):
            owner, version = honoured.get(rid, (None, None))
            if owner == device_id and version:
                mine[rid] = version
        if mine:
            out[node] = messages.receipt_to_content(mine)
    return out


def run_rollout_round(grid: Grid, cfg: FederatedConfig, *, flower_run_id: int = 0) -> Any:
    """Rollout mode: ship ``cfg.bundle`` in waves (``rollout.run_rollout``)."""
    from edge_qmul.federated.rollout import run_rollout

    return run_rollout(grid, cfg, _exchange, wait_for_nodes, flower_run_id)
