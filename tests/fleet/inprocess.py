"""An in-process Flower Grid: the real ServerApp and ClientApp code, without a SuperLink.

Every message goes through Flower's own serialization (``wire``: deflate into the object-store format
the SuperLink uses, inflate again), and a ClientApp failure becomes an error reply as on a SuperNode.
The fast tests and bench/federated_modes.py use it; the deployment test (tests/test_federated_deploy.py) runs the
same app through a real SuperLink and SuperNodes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from uuid import uuid4

from edge_qmul.federated import client_app
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

NODE = 2**63 + 100  # Flower node ids are unsigned 64-bit; the first local node is beyond SQLite INTEGER


def act_as_flower_process(run_id: int = 1) -> None:
    """Set the TaskIdentity Flower sets in a real ServerApp / ClientApp process (messages take their run and
    sender from it). For scripts; tests use the ``flower_process`` fixture, which restores it afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity._run_id = run_id  # type: ignore[attr-defined]
    TaskIdentity._node_id = 1  # type: ignore[attr-defined]
    TaskIdentity._task_id = 1  # type: ignore[attr-defined]


def wire(message: Message) -> Message:
    """Deflate a message into Flower's object store format and inflate it again (what the SuperLink does)."""
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
    out = inflate_object_from_contents(message.object_id, contents)
    assert isinstance(out, Message)
    out.metadata.__dict__["_message_id"] = message.metadata.message_id
    return out


class LocalGrid(Grid):
    """A Grid that delivers messages to in-process ClientApps (one Context per node), through ``wire``.

    ``drop(message)`` returning True simulates a node that never answers that message. A ClientApp that
    raises answers with an error reply, as a SuperNode does. ``app`` is the ClientApp every node runs (the
    production one, or ``fleet.faults.app`` for devices that misbehave on purpose).
    """

    def __init__(self, node_configs: dict[int, dict[str, object]], run_config: dict[str, object],
                 drop: Callable[[Message], bool] = lambda m: False, app: ClientApp = client_app.app) -> None:
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config=run_config)  # type: ignore[arg-type]
            for node, cfg in node_configs.items()
        }
        self.drop = drop
        self.app = app
        self._replies: dict[str, Message] = {}

    # Grid's run bookkeeping is not used by the app; this fake only routes messages.
    def set_run(self, run: object) -> None:
        raise NotImplementedError("the in-process grid has no run")

    @property
    def run(self) -> object:  # type: ignore[override]
        raise NotImplementedError("the in-process grid has no run")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            ids.append(msg.metadata.message_id)
            received = wire(msg)
            if self.drop(received):
                continue
            try:
                reply = self.app(received, self.contexts[received.metadata.dst_node_id])
            except Exception as err:  # mirrors the SuperNode: any ClientApp failure becomes an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=received)
            reply.metadata.__dict__["_message_id"] = uuid4().hex
            self._replies[msg.metadata.message_id] = wire(reply)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def local_grid(run: Path, states: Sequence[Path], run_config: dict[str, object],
               drop: Callable[[Message], bool] = lambda m: False,
               node_config: dict[str, object] | None = None, app: ClientApp = client_app.app) -> LocalGrid:
    """One node per device state dir in ``states`` (node id NODE + its index; node config ``state-dir`` plus
    the extra ``node_config`` keys, e.g. a fault of fleet/faults.py), all running ``app``."""
    nodes = {NODE + i: {"state-dir": str(state), **(node_config or {})} for i, state in enumerate(states)}
    return LocalGrid(nodes, {"run-dir": str(run), "num-clients": len(nodes), **run_config}, drop, app)
