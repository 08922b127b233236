"""A ServerApp for tests only: it asks every device about samples that device does not hold.

A real server names, in a federated Q-MUL round, the requests whose samples a device must forget; the device
resolves them to content ids from its own records (``fedqmul.forget_hashes``). A server that names requests
the device never filed (another device's, or one that does not exist) must get a refusal, not a round run on
whatever the device happens to hold. The production ServerApp never sends such a round, so this one does:

1. a ``query.forget`` to every node, to learn which device each node is (nothing is acknowledged, so any
   queued entries simply go out again at the next intake);
2. per node, one ``evaluate`` round message per probe: each request of the ledger that another device filed,
   and a request id no one filed, all for the model the devices run (the run's exported version);
3. the replies (error reason, or "answered" if the device ran the round) go to
   ``<run-dir>/../probe-<flower run id>.json`` as ``{device id: {request id: reason}}``.

Started with ``Deployment.probe_app()``, which bundles this module as the app's ``serverapp`` (the ClientApp is
the production one, or ``fleet.faults:app`` if the caller asks). It reads only the ``run-dir`` run-config key.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge_qmul.federated import fedqmul, messages
from edge_qmul.federated.coordinator import wait_for_nodes
from edge_qmul.federated.strategy import model_spec, requests_by_device
from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.serverapp import Grid, ServerApp

from edge_qmul import pipeline, quant
from edge_qmul.config import method_config
from edge_qmul.ledger import Ledger
from edge_qmul.run import Run

app = ServerApp()
NOBODY = "0" * 32  # a request id no device filed
TIMEOUT = 240.0


def _ask(grid: Grid, nodes: list[int], message_type: str, content_of: object) -> dict[int, Message]:
    sent = [Message(content_of(node), node, message_type, ttl=TIMEOUT + 60)  # type: ignore[operator]
            for node in nodes]
    return {r.metadata.src_node_id: r for r in grid.send_and_receive(sent, timeout=TIMEOUT)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    run = Run(Path(str(context.run_config["run-dir"])))
    with Ledger(run.path("ledger")) as ledger:
        by_device, _ = requests_by_device(ledger.requests())
    nodes = wait_for_nodes(grid, len(by_device), TIMEOUT)
    replies = _ask(grid, nodes, messages.QUERY_FORGET, lambda node: messages.forget_query(0.0))
    device_of = {node: messages.content_to_entries(r.content)[0] for node, r in replies.items()
                 if not r.has_error()}

    q = pipeline.load_quantized(run)
    head = quant.split_at_classifier(q.qat, q.model_cfg.head)[1]
    arrays = ArrayRecord(torch_state_dict=fedqmul.state_of(head))
    config = fedqmul.config_json(method_config("qmul", {"layers": "classifier"}))  # type: ignore[arg-type]
    spec = {"model_version": str(run.model_version()), "model": model_spec(run, q), "unlearn_config": config,
            "epoch": 0, "seed": 0}
    answers: dict[str, dict[str, str]] = {}
    for node, device in device_of.items():
        others = [rid for d, rids in by_device.items() if d != device for rid in rids]
        for rid in [*others, NOBODY]:
            round_spec = fedqmul.RoundSpec(device_id=device, request_ids=(rid,), **spec)  # type: ignore[arg-type]
            reply = _ask(grid, [node], MessageType.EVALUATE,
                         lambda _n, s=round_spec: fedqmul.round_content(arrays, s, 1)).get(node)
            reason = "no reply" if reply is None else reply.error.reason if reply.has_error() else "answered"
            answers.setdefault(device, {})[rid] = reason
    out = run.root.parent / f"probe-{context.run_id}.json"
    out.write_text(json.dumps(answers, indent=1, sort_keys=True))
