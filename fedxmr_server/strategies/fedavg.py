"""FedAvg (McMahan et al. 2017): example-weighted mean of the clients' trainable arrays."""

from fedxmr_server.strategies.base import XmrStrategy


class FedAvgXmr(XmrStrategy):
    name = "fedavg"
    description = "FedAvg: per-key example-weighted mean of the arrays each client trained"
