"""The registry of client methods, one per method name of `common.method_config.SECTIONS`."""

from __future__ import annotations

from common.config import ConfigError
from fedxmr_client.methods.base import ClientMethod
from fedxmr_client.methods.centralized import CentralizedClient
from fedxmr_client.methods.fedcafe import FedCafeClient
from fedxmr_client.methods.fedprox import FedProxClient
from fedxmr_client.methods.fedproto import FedProtoClient
from fedxmr_client.methods.linear import LinearClient
from fedxmr_client.methods.moon import MoonClient
from fedxmr_client.methods.paired_only import PairedOnlyClient
from fedxmr_client.methods.plfedcmh import PlFedCmhClient
from fedxmr_client.methods.rcsr import RcsrClient
from fedxmr_client.methods.unialign import UniAlignClient


class LocalClient(ClientMethod):
    name = "local"  # trains like FedAvg; the server sends each node its own model back


CLIENT_METHODS: dict[str, type[ClientMethod]] = {
    cls.name: cls for cls in (ClientMethod, FedProxClient, RcsrClient, LocalClient, PairedOnlyClient,
                              CentralizedClient, FedProtoClient, UniAlignClient, MoonClient, FedCafeClient,
                              PlFedCmhClient, LinearClient)}


def client_method(name: str) -> ClientMethod:
    if name not in CLIENT_METHODS:
        raise ConfigError(f"run config key 'method': no client method for {name!r}; "
                          f"available: {sorted(CLIENT_METHODS)}")
    return CLIENT_METHODS[name]()
