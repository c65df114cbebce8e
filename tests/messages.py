"""Constructed Flower replies for strategy tests (as in Flower's own strategy tests: a Mock with content,
metadata.src_node_id and has_error())."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict


def reply(node: int, arrays: dict[str, np.ndarray] | None, metrics: dict, error: str | None = None,
          records: dict[str, dict[str, np.ndarray]] | None = None) -> Message:
    msg = Mock(spec=Message)
    msg.metadata = Mock(src_node_id=node)
    msg.has_error = Mock(return_value=error is not None)
    msg.error = Error(code=0, reason=error) if error else None
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    for name, record in (records or {}).items():
        content[name] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in record.items()})
    msg.content = content
    return msg


def grid(node_ids: list[int]) -> Mock:
    """A Grid stand-in that lists `node_ids` (and the task identity Flower's Message constructor needs)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    g = Mock()
    g.get_node_ids.return_value = list(node_ids)
    # answers the strategy's `query` messages (node n holds partition n); a test replaces it to answer the rest
    g.send_and_receive.side_effect = lambda messages, timeout=None: identities(list(messages)) or []
    return g


def identities(messages: list[Message]) -> list[Message] | None:
    """Replies to the `query` messages a strategy sends before a node's first message (node n holds partition n);
    None if `messages` are not queries."""
    if not messages or messages[0].metadata.message_type != "query":
        return None
    return [reply(m.metadata.dst_node_id, None, {"partition-id": m.metadata.dst_node_id}) for m in messages]
