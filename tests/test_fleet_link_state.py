"""The fleet-scale harness's link state (tests/fleet/simulation.py, ``indexed_link_state_class``): a node's
messages looked up by destination return what Flower's stock in-memory link state returns, in the same order."""

from __future__ import annotations

import time
from typing import Any

import pytest
from fleet.simulation import indexed_link_state_class

pytest.importorskip("flwr")


def _grid(state_class: type) -> tuple[Any, list[int]]:
    """An in-memory grid over a fresh state of ``state_class`` with a run and four nodes (as the engine sets up)."""
    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    state = state_class(NoOpFederationManager(), ObjectStoreFactory().store())
    run = Run.create_empty(run_id=7)
    run.federation_id = NOOP_FEDERATION_ID
    run.primary_task_id = 8
    state.run_ids[run.run_id] = RunRecord(run=run)  # as flwr.simulation.run_simulation._main_loop registers it
    state.task_store[8] = Task(task_id=8, run_id=run.run_id)
    nodes = []
    for i in range(4):
        node = state.create_node(NOOP_FLWR_AID, NOOP_ACCOUNT_NAME, bytes([i]) * 32,
                                 heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node)

    class Factory:
        def state(self) -> Any:
            return state

    grid = InMemoryGrid(state_factory=Factory())  # type: ignore[arg-type]
    grid.set_run(run)
    return grid, nodes


def _deliveries(state_class: type) -> list[list[str]]:
    """What the engine's dispatcher would get: per sweep, each node's next message type (limit=1)."""
    from flwr.app import Message, RecordDict

    grid, nodes = _grid(state_class)
    plan = [(nodes[0], "a1", 600.0), (nodes[1], "b1", 600.0), (nodes[0], "a2", 600.0), (nodes[2], "c1", 0.05),
            (nodes[0], "a3", 600.0)]
    grid.push_messages([Message(RecordDict(), node, f"query.{name}", ttl=ttl) for node, name, ttl in plan])
    time.sleep(0.1)  # c1 has expired
    sweeps = []
    for _ in range(4):
        sweeps.append([m.metadata.message_type for n in nodes for m in grid.state.get_message_ins(n, limit=1)])
    sweeps.append([m.metadata.message_type for m in grid.state.get_message_ins(nodes[0], limit=None)])
    return sweeps


def test_the_indexed_link_state_hands_out_what_flowers_in_memory_state_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 8), ("_run_id", 7), ("_node_id", SUPERLINK_NODE_ID)):  # as the engine sets them
        monkeypatch.setattr(TaskIdentity, name, value)

    stock = _deliveries(InMemoryLinkState)
    assert stock == [["query.a1", "query.b1"], ["query.a2"], ["query.a3"], [], []]
    assert _deliveries(indexed_link_state_class()) == stock
