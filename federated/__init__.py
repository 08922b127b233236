"""edge_qmul.federated: the Flower app that collects forget requests from devices (ARCHITECTURE.md §8).

Each SuperNode is a device: its node config names its own state directory (``state-dir``), which
``edge-qmul device init`` made (``edge_qmul.devices.state.DeviceState``): its Ed25519 key (its public key in
hex is the device id), the fleet's bundle key it pinned, the index of its own samples by content id, its
durable queue of signed deletion requests and its installed models. Device code (``client_app``, the device
side of ``rollout``) reads only that directory and the messages, never the server's run directory. In one
round (``coordinator.run_round``) the ServerApp:

1. asks every node for its pending requests (``query.forget``; one message per node); each device answers
   its device id and every entry of ``DeviceState.pending()`` exactly as it signed it, then marks them sent;
2. files each entry with ``receive.receive``: the signature under the key the body names, ownership of
   every content id against the training provenance (``train --provenance``), request-id conflicts;
   accepted requests go to the forget ledger (``edge_qmul.ledger``) before any answer. The same signed entry
   sent again (a lost acknowledgement, a replay) is acknowledged again without a second row;
3. answers each entry, acknowledged or refused with a reason (``query.ack``), only after the ledger commit;
   the device records it (``DeviceState.mark``);
4. in ``central`` mode, unlearns with Q-MUL on the server (``pipeline.run_unlearn``), marks the requests
   honoured by the new model's version and sends each device a receipt for its own honoured requests
   (``query.receipt``; the ledger records which device filed each one).

Trust model. A request is the device's because it verifies under the key its body names and the provenance
names that key as the contributor of every sample it asks about; there is no key registry to trust on first
use. The node -> device mapping of a round comes from the replies and only decides where receipts and
rollout messages go. Transport is Flower's: TLS with a fleet CA and SuperNode authentication (``certs``
makes the certificates and the SuperNodes' EC keys). Under Flower's simulation engine, whose nodes carry only
``partition-id`` / ``num-partitions``, the run config's ``state-root`` gives each node the state directory
``<state-root>/device-<partition-id>`` (``config.DeviceConfig.state_path``).

Run it (the app directory is the repository; pyproject's ``[tool.flwr.app]`` bundles only the config and
these sources, and the SuperLink and SuperNodes run the installed edge-qmul package; the README's fleet
recipe has every step)::

    edge-qmul fleet certs --out certs --host 192.0.2.10 && edge-qmul fleet node-key --out node0
    flower-superlink --ssl-ca-certfile certs/ca.pem --ssl-certfile certs/server.pem \\
        --ssl-keyfile certs/server.key --enable-supernode-auth --host 192.0.2.10 --port 9091 \\
        --disable-runtime-dependency-installation
    flwr supernode register node0.pub <connection>      # connection: address + root-certificates = ca.pem
    flower-supernode --root-certificates ca.pem --superlink 192.0.2.10:9091 \\
        --auth-supernode-private-key node0 --port 9101 \\
        --node-config 'state-dir="/var/lib/edge-qmul/device0"'  # made by `edge-qmul device init`
    flwr run . <connection> -c 'run-dir="/abs/path/to/run"'

``mode`` is one of ``config.MODES``: intake, central, federated (Q-MUL rounds on the devices: the
``strategy.FedQMul`` Flower strategy; ``fedqmul`` has the device side, which needs ``edge-qmul[federated]``),
rollout.
"""
