"""Devices that misbehave on purpose, for tests only: the production ClientApp has no fault switch.

``app`` is a Flower ClientApp that wraps the production one (``edge_qmul.federated.client_app``) and reads
one extra node-config key, ``faults``: a comma-separated subset of

- ``requests``: after its genuine queue the device's forget reply carries one entry per kind in
  ``EXPECTED_FAULT_ANSWERS``: a body naming this device signed by another key (``forged``), a genuine entry
  whose payload was edited after signing (``mutated``), the exact signed bytes of its first genuine entry
  once more (``replayed``: acknowledged again, never a second ledger row), a genuinely signed request
  reusing that entry's id for part of its samples (``conflict``) and one naming a sample of its held-out pool,
  which no one trained on (``held-out``). The server's answer to each is kept in ``<state-dir>/faults.json``;
- ``lose-acks``: the device never records an acknowledgement (as if every ``query.ack`` were lost on the way
  back): its requests stay unanswered and go out again next round;
- ``dead``: every handler fails (a board that crashed; the SuperNode answers with an error);
- ``broken-runtime``: the board's onnxruntime fails, so every bundle check fails (a failed wave).

The key is removed before the production code sees the node config (whose parser rejects unknown keys).
In process: ``local_grid(..., app=faults.app, node_config={"faults": "requests"})``. On real SuperNodes:
``Deployment.fault_app()`` writes a Flower app whose ``clientapp`` is this module (the FAB carries it, so a
SuperNode imports it from the bundle), started with ``--node-config '... faults="requests"'``.

This module imports only edge_qmul, cryptography and Flower (it runs in ClientApp processes from the bundle).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from edge_qmul.devices.state import KEY_FILE, PROTOCOL, DeviceState, canonical_json
from edge_qmul.federated import client_app, messages
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from edge_qmul.errors import ConfigError

FAULTS_KEY = "faults"
KNOWN_FAULTS = ("requests", "lose-acks", "dead", "broken-runtime")
FAULTS_FILE = "faults.json"  # in the device's state dir: the server's answer to each injected entry
# What the server must answer to each injected entry: "acknowledged" or "refused:<reason code>".
EXPECTED_FAULT_ANSWERS = {
    "forged": "refused:bad-signature",
    "mutated": "refused:bad-signature",
    "replayed": "acknowledged",
    "conflict": "refused:conflict",
    "held-out": "refused:not-owner",  # held, never contributed: not in the training provenance
}


def _sign(state: DeviceState, body: dict[str, Any], key: Any = None) -> dict[str, str]:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    payload = canonical_json(body)
    signer = key or load_pem_private_key((state.dir / KEY_FILE).read_bytes(), password=None)
    return {"request_id": body["request_id"], "payload": payload.decode("ascii"),
            "signature": signer.sign(payload).hex()}


def injected_entries(state: DeviceState, genuine: list[dict[str, str]]) -> list[tuple[str, dict[str, str]]]:
    """(fault name, entry) for each fault that applies: ``replayed``, ``mutated`` and ``conflict`` need a
    genuine samples entry in this batch (``conflict`` one of two or more samples), ``forged``, ``mutated`` and
    ``held-out`` a held-out sample."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out: list[tuple[str, dict[str, str]]] = []
    held = state.held_out()

    def body(hashes: list[str], rid: str | None = None) -> dict[str, Any]:
        return {"protocol": PROTOCOL, "device_id": state.device_id, "request_id": rid or os.urandom(16).hex(),
                "kind": "samples", "hashes": sorted(hashes), "class": None, "created": 0}

    if held:
        out.append(("forged", _sign(state, body(held[:1]), Ed25519PrivateKey.generate())))
        out.append(("held-out", _sign(state, body(held[:1]))))
    first = next((e for e in genuine if json.loads(e["payload"])["kind"] == "samples"), None)
    if first is not None:
        signed = json.loads(first["payload"])
        out.append(("replayed", dict(first)))
        if held:
            out.append(("mutated", dict(first, payload=first["payload"].replace(signed["hashes"][0], held[0]))))
        if len(signed["hashes"]) > 1:
            # the same request id, validly signed, for part of its samples: must not overwrite or merge with it
            out.append(("conflict", _sign(state, body(signed["hashes"][1:], rid=signed["request_id"]))))
    return out


def _record(state: DeviceState, answers: dict[str, str]) -> None:
    path = state.dir / FAULTS_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    path.write_text(json.dumps({**known, **answers}, sort_keys=True))


def fault_answers(state_dir: Path) -> dict[str, str]:
    """What the server answered to each injected entry ({} before any acknowledgement)."""
    path = Path(state_dir) / FAULTS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@contextmanager
def broken_runtime() -> Iterator[None]:
    """Every bundle check fails as on a board whose onnxruntime cannot create a session."""
    from edge_qmul.devices import runtime

    def fail(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise runtime.BadInputError("onnxruntime failed to create a session (simulated broken runtime)",
                                    "repair the board's runtime")

    with mock.patch.object(runtime, "check_bundle_in_fresh_process", fail):
        yield


def split_faults(context: Context) -> tuple[Context, frozenset[str]]:
    """The context without the ``faults`` node-config key, and the faults it asked for (a dead board fails here)."""
    node_config = dict(context.node_config)
    faults = frozenset(f.strip() for f in str(node_config.pop(FAULTS_KEY, "")).split(",") if f.strip())
    unknown = sorted(faults - set(KNOWN_FAULTS))
    if unknown:
        raise ConfigError(f"unknown fault(s) {', '.join(unknown)}", f"use any of: {', '.join(KNOWN_FAULTS)}")
    if "dead" in faults:
        raise RuntimeError("this board is dead (fault injection)")
    clean = Context(run_id=context.run_id, node_id=context.node_id, node_config=node_config,  # type: ignore[arg-type]
                    state=context.state, run_config=context.run_config)
    return clean, faults


app = ClientApp()


@app.query("forget")
def forget(message: Message, context: Context) -> Message:
    context, faults = split_faults(context)
    if "requests" not in faults:
        return client_app.app(message, context)
    with client_app.device_state(context) as state:
        genuine = state.pending()
        extra = injected_entries(state, genuine)
        # which reply positions are injected: the acknowledgement answers entry by entry, in order
        (state.dir / "faults-sent.json").write_text(json.dumps([name for name, _ in extra]))
        awaiting = [r.request_id for r in state.requests() if r.status == "acknowledged"]
        reply = Message(messages.entries_to_content(state.device_id, genuine + [e for _, e in extra], awaiting),
                        reply_to=message)
        for entry in genuine:
            state.mark(entry["request_id"], "sent")
        return reply


@app.query("ack")
def ack(message: Message, context: Context) -> Message:
    context, faults = split_faults(context)
    answers = messages.content_to_answers(message.content)
    with client_app.device_state(context) as state:
        if "lose-acks" in faults:
            return Message(messages.summary(lost=len(answers)), reply_to=message)
        if "requests" in faults:
            sent = state.dir / "faults-sent.json"
            names = json.loads(sent.read_text()) if sent.exists() else []
            if names and len(answers) >= len(names):
                cut = len(answers) - len(names)
                _record(state, {name: status if status == "acknowledged" else f"{status}:{reason.split(':')[0]}"
                                for name, (_, status, reason) in zip(names, answers[cut:], strict=True)})
                answers = answers[:cut]
        return Message(messages.summary(**client_app.settle(state, answers)), reply_to=message)


@app.query("rollout")
def rollout(message: Message, context: Context) -> Message:
    context, faults = split_faults(context)
    if "broken-runtime" in faults:
        with broken_runtime():
            return client_app.app(message, context)
    return client_app.app(message, context)


@app.query("receipt")
def receipt(message: Message, context: Context) -> Message:
    return client_app.app(message, split_faults(context)[0])


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return client_app.app(message, split_faults(context)[0])


@app.train()
def train(message: Message, context: Context) -> Message:
    return client_app.app(message, split_faults(context)[0])
