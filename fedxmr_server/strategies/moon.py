"""MOON (Li, He & Song, CVPR 2021): FedAvg aggregation of updates trained with the model-contrastive term
(`fedxmr_client/methods/moon.py`; `moon-mu`, `moon-temperature` are read by the client)."""

from fedxmr_server.strategies.base import XmrStrategy


class MoonXmr(XmrStrategy):
    name = "moon"
    description = ("MOON: FedAvg aggregation of updates trained to stay near the global model's embeddings and away "
                   "from the node's previous ones")
