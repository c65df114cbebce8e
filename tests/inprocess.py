"""A Flower Grid that delivers the ServerApp's messages to the ClientApp in this process, for tests that run the real
ServerApp and ClientApp code round after round in seconds (no Ray, no SuperLink): one fresh `Context` per node,
node ids chosen by the test (a resumed simulation gets new ones), an exception in the ClientApp becomes an error
reply as Flower makes it, and `kill_at` stops the ServerApp mid-round the way `kill -9` would: nothing after that
point runs."""

from __future__ import annotations

import copy
from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict

from fedxmr_client.app import app as client_app


class Killed(BaseException):
    """The ServerApp process died here (a BaseException: no `except Exception` in the code under test runs)."""


class InProcessGrid:
    def __init__(self, run_config: dict, node_ids: list[int], kill_at: tuple[int, str] | None = None,
                 node_configs: list[dict] | None = None) -> None:
        """`kill_at`: (round, message type): die after the nodes handled that round's messages of that type, before
        the ServerApp sees the replies. `node_configs`: each node's own (default: its partition of the simulation)."""
        configs = node_configs or [{"partition-id": pid, "num-partitions": len(node_ids)}
                                   for pid in range(len(node_ids))]
        self.contexts = {nid: Context(run_id=1, node_id=nid, state=RecordDict(), run_config=dict(run_config),
                                      node_config=dict(config))
                         for nid, config in zip(node_ids, configs, strict=True)}
        self.kill_at = kill_at

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        replies = []
        for msg in messages:
            try:  # a copy, as a real transport delivers: a node must never change what another node receives
                replies.append(client_app(copy.deepcopy(msg), self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:  # what Flower sends back for a ClientApp exception
                replies.append(Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        if messages and self.kill_at is not None:
            rnd = messages[0].content["config"].get("server-round") if "config" in messages[0].content else None
            if (rnd, messages[0].metadata.message_type) == self.kill_at:
                raise Killed(f"killed in round {rnd}")
        return replies


def server_context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=dict(run_config))
