"""The Flower ClientApp: one device. Each handler loads the device, does one protocol step, saves it.

Handlers (message type ``query.<action>``; see ``messages``):

- ``forget``: sign every pending deletion request and send them as one batch;
- ``ack``: settle the batch with the server's per-request outcomes (recorded requests leave the queue);
- ``receipt``: record which model version honours which of the device's requests;
- ``rollout``: verify, check and install a signed bundle, or roll back to the parent model (``rollout``);
- ``evaluate`` / ``train`` (federated mode): one round of federated Q-MUL on the device's own samples
  (``fedqmul``): statistics at the broadcast weights / one local epoch, replying the new weights.
"""

from __future__ import annotations

from edge_qmul.federated import messages
from edge_qmul.federated.config import DeviceConfig, FederatedConfig
from edge_qmul.federated.task import Device
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


def _device(context: Context) -> Device:
    return Device.open(
        DeviceConfig.from_node_config(context.node_config),
        FederatedConfig.from_run_config(context.run_config),
        context.state,
    )


def send_queue(device: Device, message: Message) -> Message:
    """The reply to ``query.forget``: every pending request, signed, as one batch."""
    device.refresh_queue()
    batch = device.outgoing()
    device.save()  # the in-flight list must be on disk before the batch leaves the device
    return Message(messages.batch_to_content(batch), reply_to=message)


def settle(device: Device, message: Message) -> Message:
    """The reply to ``query.ack``: the in-flight batch settled against the server's outcomes."""
    counts = device.apply_outcomes(messages.content_to_acks(message.content))
    device.save()
    return Message(messages.summary(**counts), reply_to=message)


@app.query("forget")
def forget(message: Message, context: Context) -> Message:
    return send_queue(_device(context), message)


@app.query("ack")
def ack(message: Message, context: Context) -> Message:
    return settle(_device(context), message)


@app.query("receipt")
def receipt(message: Message, context: Context) -> Message:
    device = _device(context)
    count = device.apply_receipt(messages.content_to_receipt(message.content))
    device.save()
    return Message(messages.summary(receipts=count), reply_to=message)


def _round(message: Message, context: Context, train: bool) -> RecordDict:
    from edge_qmul.federated import fedqmul  # torch: only the unlearning handlers need it

    device_cfg = DeviceConfig.from_node_config(context.node_config)
    run_cfg = FederatedConfig.from_run_config(context.run_config)
    state, spec = messages.content_to_round(message.content)
    cfg = fedqmul.config_from_json(spec["unlearn-config"])
    q, head = fedqmul.load_for_device(run_cfg.run_path)
    head.load_state_dict(state, strict=True)
    local = fedqmul.local_data(q, run_cfg.run_path, device_cfg, spec["forget-ids"])
    if not train:
        return messages.stats_to_content(fedqmul.local_stats(head, local, cfg, spec["seed"]))
    metrics = fedqmul.local_update(q, head, local, cfg, spec["w-f"], spec["w-r"], spec["lr"], spec["seed"])
    return messages.update_to_content(fedqmul.state_of(head), metrics)


@app.query("rollout")
def rollout(message: Message, context: Context) -> Message:
    from edge_qmul.federated import rollout as rollout_mod

    device = _device(context)
    return Message(rollout_mod.device_handle(device, message.content), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return Message(_round(message, context, train=False), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    return Message(_round(message, context, train=True), reply_to=message)
