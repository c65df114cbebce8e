"""Local training: every client trains its own model from the common initialisation for the same budget and is
never aggregated. The server keeps each client's model in its per-client store (`state.clients`) and sends each
client its own; a node is evaluated against the shared gallery embedded by its own model. No global model: the
round is selected on the mean per-client dev score, and the summary is the mean and worst client."""

import numpy as np
from flwr.app import Message

from common import protocol as P
from fedxmr_server.strategies.base import Arrays, XmrStrategy, from_array_record


class LocalXmr(XmrStrategy):
    name = "local"
    description = "Local: no aggregation; each client's model lives in the server's per-client store"
    has_global_model = False

    def model_for(self, client: str, selected: bool = False) -> Arrays:
        """The client's own model; the common initialisation (`state.arrays`, never aggregated) before it trained."""
        source = self.best if selected else self.state
        return source.clients.get(client, source.arrays)

    def aggregate(self, server_round: int, replies: list[Message], weights: np.ndarray) -> None:
        for msg in replies:
            client = self.client_of(msg)
            self.state.clients[client] = self.model_for(client) | from_array_record(msg.content[P.ARRAYS])
