"""The Flower ClientApp: one device. Each handler opens the device's own state, does one protocol step, replies.

The device is ``DeviceState.open(node_config["state-dir"])``: the directory ``edge-qmul device init`` made,
holding its key, the pinned fleet key, the index of its own samples, its request queue and its installed
models (``edge_qmul.devices.state``). Handlers read only that state and the message; nothing here reads the
server's run directory. Under Flower's simulation engine, whose nodes' config is only ``partition-id`` /
``num-partitions``, a ``state-root`` (node config, or run config for the whole simulated fleet) stands in:
the state dir is then ``<state-root>/device-<partition-id>`` (``DeviceConfig.state_path``).

Handlers (message type ``query.<action>``; see ``messages``):

- ``forget``: reply the device id, every pending signed request (``DeviceState.pending()``, as stored) and
  the ids still awaiting a receipt; the sent requests are marked ``sent`` once the reply is built;
- ``ack``: record the server's answer to each request (``mark``: acknowledged, or refused with the reason);
- ``receipt``: mark requests honoured by the model version the server names;
- ``rollout``: verify, check and install a signed bundle, or roll back to the parent model (``rollout``);
- ``evaluate`` / ``train`` (federated mode): one round of federated Q-MUL on the device's own samples
  (``fedqmul``).
"""

from __future__ import annotations

import logging

from edge_qmul.devices.state import DeviceState
from edge_qmul.federated import messages
from edge_qmul.federated.config import DeviceConfig
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from edge_qmul.errors import ForgetRequestError

log = logging.getLogger(__name__)

app = ClientApp()


def device_state(context: Context) -> DeviceState:
    """The device this SuperNode is: its state dir from the node config (``state-dir``, or ``state-root`` +
    ``partition-id`` under the simulation engine)."""
    cfg = DeviceConfig.from_node_config(context.node_config)
    return DeviceState.open(cfg.state_path(context.run_config))


def send_queue(state: DeviceState, message: Message) -> Message:
    """The reply to ``query.forget``: the device id, every unanswered request exactly as signed and stored,
    and the acknowledged requests that still wait for a receipt. The requests are marked ``sent`` only
    after the reply is built; an answer (``settle``) or the next query decides what becomes of them."""
    entries = state.pending()
    awaiting = [r.request_id for r in state.requests() if r.status == "acknowledged"]
    reply = Message(messages.entries_to_content(state.device_id, entries, awaiting), reply_to=message)
    with state.batch():  # one durable commit for the message, not one per request
        for entry in entries:
            state.mark(entry["request_id"], "sent")
    return reply


def settle(state: DeviceState, answers: list[tuple[str, str, str]]) -> dict[str, int]:
    """Record the server's answers (``query.ack``); answers naming a request this device does not hold, or
    one already in a final state, are counted as ignored (a stale or repeated acknowledgement)."""
    counts = {"acknowledged": 0, "refused": 0, "ignored": 0}
    with state.batch():  # one durable commit for the message; an ignored answer changes nothing
        for request_id, status, reason in answers:
            try:
                state.mark(request_id, status, reason=reason if status == "refused" else "")
            except ForgetRequestError as err:
                log.warning("acknowledgement of %s ignored: %s", request_id[:40], err.message)
                counts["ignored"] += 1
                continue
            counts[status] += 1
    return counts


def record_receipts(state: DeviceState, honoured: dict[str, str]) -> dict[str, int]:
    """Mark each named request honoured by its model version (``query.receipt``)."""
    counts = {"receipts": 0, "ignored": 0}
    with state.batch():  # one durable commit for the message; an ignored receipt changes nothing
        for request_id, version in sorted(honoured.items()):
            try:
                state.mark(request_id, "honoured", model_version=version)
            except ForgetRequestError as err:
                log.warning("receipt for %s ignored: %s", request_id[:40], err.message)
                counts["ignored"] += 1
                continue
            counts["receipts"] += 1
    return counts


@app.query("forget")
def forget(message: Message, context: Context) -> Message:
    with device_state(context) as state:
        return send_queue(state, message)


@app.query("ack")
def ack(message: Message, context: Context) -> Message:
    answers = messages.content_to_answers(message.content)
    with device_state(context) as state:
        return Message(messages.summary(**settle(state, answers)), reply_to=message)


@app.query("receipt")
def receipt(message: Message, context: Context) -> Message:
    honoured = messages.content_to_receipt(message.content)
    with device_state(context) as state:
        return Message(messages.summary(**record_receipts(state, honoured)), reply_to=message)


def _round(message: Message, context: Context, train: bool) -> RecordDict:
    """One federated Q-MUL round on the device's own state (``fedqmul.device_round``): the head's QAT state and
    the round's settings come in the message; features, forget and retain sets come from the state dir."""
    from edge_qmul.federated import fedqmul  # torch: only the unlearning handlers need it

    head_state, spec = fedqmul.read_round(message.content)
    with device_state(context) as state:
        metrics, new_state = fedqmul.device_round(state, head_state, spec, train)
        return fedqmul.reply_content(state.device_id, metrics, new_state)


@app.query("rollout")
def rollout(message: Message, context: Context) -> Message:
    from edge_qmul.federated import rollout as rollout_mod  # numpy + the on-board runtime

    with device_state(context) as state:
        return Message(rollout_mod.device_handle(state, message.content), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return Message(_round(message, context, train=False), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return Message(_round(message, context, train=True), reply_to=message)
