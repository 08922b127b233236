"""The Flower ClientApp: one device. Each handler loads the device, does one protocol step, saves it.

Handlers (message type ``query.<action>``; see ``messages``):

- ``forget``: sign every pending deletion request and send them as one batch;
- ``ack``: settle the batch with the server's per-request outcomes (recorded requests leave the queue);
- ``receipt``: record which model version honours which of the device's requests.
"""

from __future__ import annotations

from edge_qmul.federated import messages
from edge_qmul.federated.config import DeviceConfig, FederatedConfig
from edge_qmul.federated.task import Device
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


def _device(context: Context) -> Device:
    return Device.open(
        DeviceConfig.from_node_config(context.node_config),
        FederatedConfig.from_run_config(context.run_config),
        context.state,
    )


@app.query("forget")
def forget(message: Message, context: Context) -> Message:
    device = _device(context)
    device.refresh_queue()
    batch = device.outgoing()
    device.save()  # the in-flight list must be on disk before the batch leaves the device
    return Message(messages.batch_to_content(batch), reply_to=message)


@app.query("ack")
def ack(message: Message, context: Context) -> Message:
    device = _device(context)
    counts = device.apply_outcomes(messages.content_to_acks(message.content))
    device.save()
    return Message(messages.summary(**counts), reply_to=message)


@app.query("receipt")
def receipt(message: Message, context: Context) -> Message:
    device = _device(context)
    count = device.apply_receipt(messages.content_to_receipt(message.content))
    device.save()
    return Message(messages.summary(receipts=count), reply_to=message)
