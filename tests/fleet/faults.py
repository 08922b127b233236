"""Devices that misbehave on purpose, for tests only: the production ClientApp has no fault switch.

``app`` is a Flower ClientApp that wraps the production one (``edge_qmul.federated.client_app``) and reads
one extra node-config key, ``faults``: a comma-separated subset of

- ``requests``: the device is a ``FaultyDevice``: after its genuine requests it sends one request of each
  kind the server must refuse (foreign samples, forged signature, replayed nonce, conflicting id, expired
  timestamp), and records the server's answer to each under ``state["faults"]``;
- ``broken-runtime``: the board's onnxruntime fails, so every bundle check fails (a failed wave).

The key is removed before the production code sees the node config (whose parser rejects unknown keys).
In process: ``local_grid(..., app=faults.app, node_config={"faults": "requests"})``. On real SuperNodes:
``Deployment.fault_app()`` writes a Flower app whose ``clientapp`` is this module (the FAB carries it, so a
SuperNode imports it from the bundle), started with ``--node-config '... faults="requests"'``.

This module imports only edge_qmul and Flower (it runs in ClientApp processes from the bundle).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any
from unittest import mock

from edge_qmul.federated import client_app, partition, protocol
from edge_qmul.federated.config import DeviceConfig, FederatedConfig
from edge_qmul.federated.protocol import DeviceBatch, ForgetRequest, Outcome, SignedRequest
from edge_qmul.federated.task import Device, request_id
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from edge_qmul import data
from edge_qmul.errors import ConfigError
from edge_qmul.run import Run

FAULTS_KEY = "faults"
KNOWN_FAULTS = ("requests", "broken-runtime")
# What the server must answer to each injected request fault.
EXPECTED_FAULT_REASONS = {
    "other-client": "not-owner",
    "forged": "bad-signature",
    "replay": "replayed-nonce",
    "id-conflict": "request-id-conflict",
    "expired": "expired",
}


class FaultyDevice(Device):
    """A device that also sends one request per fault in ``EXPECTED_FAULT_REASONS`` with every batch."""

    def outgoing(self, now: int | None = None) -> DeviceBatch:
        now = int(time.time()) if now is None else now
        batch = super().outgoing(now)
        genuine = list(zip(self.state["in_flight"], batch.entries, strict=True))
        extra = self._faults(genuine, now)
        self.state["in_flight"] = [*self.state["in_flight"], *(label for label, _ in extra)]
        return replace(batch, entries=[*batch.entries, *(signed for _, signed in extra)])

    def apply_outcomes(self, outcomes: list[Outcome]) -> dict[str, int]:
        """Record the answers to the injected requests, then settle the genuine ones as a device does."""
        in_flight: list[str] = self.state["in_flight"]
        faults = 0
        if len(outcomes) == len(in_flight):  # else the production check refuses the whole acknowledgement
            genuine: list[tuple[str, Outcome]] = []
            for label, outcome in zip(in_flight, outcomes, strict=True):
                kind, _, name = label.partition(":")
                if kind == "fault":
                    self.state.setdefault("faults", {})[name] = outcome.reason or outcome.status
                    faults += 1
                else:
                    genuine.append((label, outcome))
            self.state["in_flight"] = [label for label, _ in genuine]
            outcomes = [outcome for _, outcome in genuine]
        return {**super().apply_outcomes(outcomes), "faults": faults}

    def _faults(self, sent: list[tuple[str, SignedRequest]], now: int) -> list[tuple[str, SignedRequest]]:
        pid, n, seed = self.partition_id, self.cfg.num_partitions, self.run_cfg.seed
        split = data.Split.load(Run(self.run_cfg.run_path).require("split"))
        own = partition.partition(split.train, n, pid)
        m = max(1, self.run_cfg.samples_per_request)
        out: list[tuple[str, SignedRequest]] = []

        def req(tag: str, ids: list[int], ts: int = now, rid: str | None = None) -> ForgetRequest:
            return ForgetRequest(rid or request_id(seed, pid, f"x-{tag}"), pid, "samples", tuple(sorted(ids)), None,
                                 ts, protocol.new_nonce())

        if n > 1:
            other = partition.partition(split.train, n, (pid + 1) % n)
            out.append(("fault:other-client", protocol.sign(req("other", other[:m]), self.key)))
        out.append(("fault:forged", protocol.sign(req("forged", own[:m]), protocol.generate_key())))
        stale = now - self.run_cfg.max_request_age - 3600
        out.append(("fault:expired", protocol.sign(req("expired", own[:m], ts=stale), self.key)))
        first = next((p for p in self.pending() if p.kind == "samples"), None)
        if first is not None:
            # Same id as a genuine request, different samples: must not overwrite or merge with it.
            different = [i for i in own if i not in set(first.sample_ids)][:1]
            if different:
                conflict = req("conflict", different, rid=first.request_id)
                out.append(("fault:id-conflict", protocol.sign(conflict, self.key)))
        if sent:
            out.append(("fault:replay", sent[0][1]))  # the exact bytes again: same nonce
        return out


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
    """The context without the ``faults`` node-config key, and the faults it asked for."""
    node_config = dict(context.node_config)
    faults = frozenset(f.strip() for f in str(node_config.pop(FAULTS_KEY, "")).split(",") if f.strip())
    unknown = sorted(faults - set(KNOWN_FAULTS))
    if unknown:
        raise ConfigError(f"unknown fault(s) {', '.join(unknown)}", f"use any of: {', '.join(KNOWN_FAULTS)}")
    clean = Context(run_id=context.run_id, node_id=context.node_id, node_config=node_config,  # type: ignore[arg-type]
                    state=context.state, run_config=context.run_config)
    return clean, faults


def _device(context: Context, faults: frozenset[str]) -> Device:
    cls = FaultyDevice if "requests" in faults else Device
    return cls.open(DeviceConfig.from_node_config(context.node_config),
                    FederatedConfig.from_run_config(context.run_config), context.state)


app = ClientApp()


@app.query("forget")
def forget(message: Message, context: Context) -> Message:
    context, faults = split_faults(context)
    return client_app.send_queue(_device(context, faults), message)


@app.query("ack")
def ack(message: Message, context: Context) -> Message:
    context, faults = split_faults(context)
    return client_app.settle(_device(context, faults), message)


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
