"""edge_qmul.federated: the Flower app that collects forget requests from devices (ARCHITECTURE.md §8).

Each SuperNode is a device. It holds one partition of the run's training data (``partition``), a queue of
deletion requests and an Ed25519 key (``task``). In one round (``coordinator.run_round``) the ServerApp:

1. asks every node for its pending requests (``query.forget``; one message per node, each with all of
   that node's requests);
2. verifies each signed request (``intake``): device key, signature, timestamp window, nonce replay,
   ownership against the training provenance, and request-id conflicts. Accepted requests go to the
   forget ledger (``edge_qmul.ledger``);
3. acknowledges each request, or refuses it with a reason (``query.ack``), only after the ledger commit;
4. in ``central`` mode, unlearns with Q-MUL on the server (``pipeline.run_unlearn``), marks the requests
   honoured by the new model's version and sends each device a receipt (``query.receipt``).

Trust model. The server registers a device's public key on first contact (trust on first use), but only
after the device proves it holds the key; every later request must verify against that key. A key
file (``key-file``: JSON {partition id: public key hex}) pre-registers (pins) keys for fleets that
provision keys at manufacture. Pinned keys take precedence over first-contact registrations. Devices keep
their key under ``state-dir``. A device without one gets a fresh key every run, and the server then
refuses it (``key-mismatch``). Message transport is Flower's: TLS with a fleet CA and SuperNode
authentication (``certs`` makes the certificates and the SuperNodes' EC keys).

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
        --node-config 'partition-id=0 num-partitions=3 state-dir="/var/lib/edge-qmul/device0"'
    flwr run . <connection> -c 'run-dir="/abs/path/to/run"'

``mode`` is one of ``config.MODES``: intake, central, federated (Q-MUL rounds on the devices), rollout.
"""
