"""FedProx (Li et al. 2020): FedAvg aggregation; clients add (mu/2)·||w - w_global||² to their loss
(`fedprox-mu`, read by the client method from the run config; the server needs no knob of its own)."""

from fedxmr_server.strategies.base import XmrStrategy


class FedProxXmr(XmrStrategy):
    name = "fedprox"
    description = "FedProx: FedAvg aggregation of updates trained with a proximal term toward the global model"
