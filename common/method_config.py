"""Per-method run-config sections and the one list of method names.

Every method that has knobs owns a section: the run-config keys that start with `<method>-` (e.g. `rcsr-router`,
`fedprox-mu`). `common.config.parse_run_config` validates the selected method's section with the class registered
here, and refuses a key of another method set away from its default (e.g. `method=fedavg fedprox-mu=0.1`), naming
it: a knob that would be silently ignored is an error. The defaults also sit in `pyproject.toml` (Flower refuses
override keys it has no default for); a test keeps both in step. A method with a section must not be the prefix of a
common key (e.g. `local` and `local-epochs`); a test checks that too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.parts import fedcafe as fedcafe_part
from common.router import ROUTERS


def kebab(name: str) -> str:
    return name.replace("_", "-")


class Section(BaseModel):
    """A method's own keys, without the `<method>-` prefix."""

    model_config = ConfigDict(alias_generator=kebab, populate_by_name=True, extra="forbid", frozen=True)

    def model_parts(self) -> tuple[str, ...]:
        """The parts this method adds to each tower (`common.parts`); none by default."""
        return ()


class FedProxSection(Section):
    """FedProx (Li et al. 2020): clients add (mu/2)·||w - w_global||² to their loss."""

    mu: float = Field(0.01, gt=0.0)


class RcsrSection(Section):
    """RCSR; see fedxmr_server/strategies/rcsr.py. Anchoring weights are 0 (off) by default, chosen on dev."""

    router: Literal[ROUTERS] = "learned"  # type: ignore[valid-type]
    anchor_weight: float = Field(0.0, ge=0.0)  # unimodal clients' anchoring to the other modality
    align_weight: float = Field(0.0, ge=0.0)  # paired clients' anchoring of both towers
    anchor_temperature: float = Field(0.1, gt=0.0, le=1.0)
    proto_ema: float = Field(0.5, ge=0.0, lt=1.0)
    router_temperature: float = Field(0.1, gt=0.0)
    router_steps: int = Field(10, ge=0, le=10_000)
    router_lr: float = Field(0.01, gt=0.0, le=1.0)
    minimax_eta: float = Field(0.1, ge=0.0)  # 0: no minimax fairness weighting
    holdout: float = Field(0.1, ge=0.0, lt=0.9)  # share held out each round (rotating) to measure consistency


class CentralizedSection(Section):
    """One node with the whole train split; its own budget, chosen on dev among (epochs, lr) = (1, 1e-3),
    (2, 1e-3), (1, 3e-4), 12 rounds each (docs/MEASURED.md, "Centralized reference")."""

    local_epochs: int = Field(1, ge=1, le=1000)
    lr: float = Field(3e-4, gt=0.0, le=10.0)
    average: float = Field(0.0, ge=0.0, lt=1.0)  # > 0: score an exponential average of the weights over rounds


class FedProtoSection(Section):
    """FedProto (Tan et al. 2022) for retrieval: only per-concept prototypes are exchanged."""

    weight: float = Field(1.0, ge=0.0)  # weight of the prototype-distance term
    proto_ema: float = Field(0.0, ge=0.0, lt=1.0)  # 0: the global table is this round's count-weighted mean


class UniAlignSection(Section):
    """FedAvg whose unimodal clients stay in the shared space (`common/unimodal.py`; issue 11). Defaults chosen on dev
    (docs/MEASURED.md, "Unimodal clients")."""

    distill_weight: float = Field(1.0, ge=0.0)  # unimodal clients' distillation from the round's global model; 0: off
    distill_kind: Literal["embedding", "relational"] = "embedding"
    # what of its tower a unimodal client trains and sends; "none", a control: it sends its tower as it arrived, so
    # it weighs in the mean without moving it (what its weight alone does: a smaller server step on that tower)
    train_parts: Literal["all", "adapter-hash", "none"] = "all"
    weighting: Literal["size", "agreement"] = "size"  # agreement: size x max(0, cos to the paired mean update)


class MoonSection(Section):
    """MOON (Li, He & Song, CVPR 2021) on the towers' embeddings: each item's embedding is pulled toward the round's
    global model's and pushed from the node's previous local model's (model-contrastive term, weight mu)."""

    mu: float = Field(1.0, ge=0.0)
    temperature: float = Field(0.5, gt=0.0, le=10.0)


class FedCafeSection(Section):
    """FedCAFE (ACM MM 2024); see fedxmr_server/strategies/fedcafe.py. Loss weights as in the paper."""

    afe: bool = True  # adaptive feature enhancement; false: codes from the raw hash feature, no memory read
    enhance_weight: float = Field(0.1, ge=0.0)  # L_E = 1 - cos(V_E, O)
    teacher_weight: float = Field(0.1, ge=0.0)  # L_C = 1 - cos(V_E, the round's global model's V_E)
    class_weight: float = Field(1.0, ge=0.0)  # L_P = KL(labels ‖ concept prediction), mean over items × concepts
    # aggregation weights: "nll" α ∝ Sim_k (the paper's direction: the client less like the global memory weighs
    # more), "inverse" α ∝ 1/Sim_k, "uniform", "size" (FedAvg's: α ∝ the client's items; an ablation)
    weighting: Literal["nll", "inverse", "uniform", "size"] = "nll"
    kmeans_iters: int = Field(20, ge=0, le=1000)  # K-means fusion of the memories; 0: the count-weighted means

    def model_parts(self) -> tuple[str, ...]:
        return (fedcafe_part.NAME,) if self.afe else ()


class PlFedCmhSection(Section):
    """PLFedCMH (ICASSP 2023); see fedxmr_server/strategies/plfedcmh.py. Loss weights: the released code's α, β for
    the two instance-class terms; the prototype distance is on a mean, not a sum, so not its η = 1e5."""

    class_weight: float = Field(0.5, ge=0.0)  # instance-class similarity to the client's own class codes
    global_weight: float = Field(0.5, ge=0.0)  # instance-class similarity to the global prototypes
    proto_weight: float = Field(1.0, ge=0.0)  # distance to the item's classes' global prototypes
    hn_lr: float = Field(0.01, gt=0.0, le=10.0)  # the hypernetwork's SGD step
    hn_embed_dim: int = Field(32, ge=1, le=4096)  # client embedding and hidden width of the hypernetwork
    # the instance-class target of an item with k labels: "split" c/k per label, "indicator" c per label (the paper's;
    # unreachable for k > 1 unless the labels' class codes coincide); fedxmr_client/methods/plfedcmh.py
    class_target: Literal["split", "indicator"] = "split"


class LinearSection(Section):
    """The closed-form floor (`common/linear.py`): ridge onto the labels, then federated ITQ."""

    ridge: float = Field(100.0, gt=0.0)  # λ of the ridge regression on standardised features


# The registry of method names: every name here has a server strategy and a client method (tests check both).
SECTIONS: dict[str, type[Section] | None] = {
    "fedavg": None,
    "fedprox": FedProxSection,
    "rcsr": RcsrSection,
    "local": None,
    "paired-only": None,
    "centralized": CentralizedSection,
    "fedproto": FedProtoSection,
    "unialign": UniAlignSection,
    "moon": MoonSection,
    "fedcafe": FedCafeSection,
    "plfedcmh": PlFedCmhSection,
    "linear": LinearSection,
}

# Which `aggregation` rules a method honours, where not all of them; refused at parse time (common/config.py), with
# why. median and trimmed-mean count every client once, so they would discard a method's own weights; methods that
# never average client arrays have nothing for the rule to act on.
_OWN = "its own client weights ({}), which median and trimmed-mean would discard (norm-clip clips, then weighs)"
_NONE = "no average of client arrays ({}) for the rule to act on"
_SUPPORT: dict[str, tuple[tuple[str, ...], str]] = {
    "rcsr": (("mean", "norm-clip"), _OWN.format("router x minimax")),
    "fedcafe": (("mean", "norm-clip"), _OWN.format("memory similarity")),
    "local": (("mean",), _NONE.format("each client keeps its own model")),
    "plfedcmh": (("mean",), _NONE.format("the hypernetwork mixes the clients' models per client and layer")),
    "fedproto": (("mean",), _NONE.format("only prototypes are exchanged")),
    "linear": (("mean",), _NONE.format("statistics are summed")),
    "centralized": (("mean",), _NONE.format("one node trains the model")),
}


def aggregation_support(method: str, options: Section) -> tuple[tuple[str, ...], str]:
    """(the `aggregation` rules `method` honours with these options, why; () when it honours every rule)."""
    if method == "unialign" and getattr(options, "weighting", "size") == "agreement":
        return ("mean", "norm-clip"), _OWN.format("agreement")
    return _SUPPORT.get(method, ((), ""))


# What each method's clients send beyond their model weights, and so why it refuses client-level DP (common/privacy.py
# clips and noises model updates only); methods not listed send only weights and run under DP.
_LEAKS = "its clients send {}, which DP-FedAvg neither clips nor noises"
_DP_REFUSED: dict[str, str] = {
    "fedproto": _LEAKS.format("record 'prototypes': the mean embedding of their items of each concept and how many "
                              "items they hold per concept"),
    "rcsr": _LEAKS.format("record 'prototypes' (per-concept mean embeddings and counts) and consistency statistics "
                          "of their held-out items; the router weighs individual clients"),
    "plfedcmh": _LEAKS.format("record 'prototypes' (per-concept mean hash features and counts); the hypernetwork "
                              "mixes individual clients' models"),
    "fedcafe": _LEAKS.format("record 'memory': the mean hash code of their items of each concept and per-concept "
                             "counts; the weights compare individual clients' memories"),
    "linear": _LEAKS.format("record 'linear': the sums, second moments XᵀX and label cross-moments XᵀY of their "
                            "items' features, then ITQ sums"),
    "centralized": "one node holds all the data: there is no second client to hide a client among",
    "local": "no update is ever shared (each client keeps its own model): there is nothing to release",
}


def dp_refusal(method: str, options: Section) -> str:
    """Why `method` (with these options) cannot run under client-level DP; "" when it can."""
    if method == "unialign" and getattr(options, "weighting", "size") == "agreement":
        return "unialign-weighting = 'agreement' weighs each client by its own update (use 'size')"
    return _DP_REFUSED.get(method, "")


# Why a method cannot run with secure aggregation (SecAgg+ gives the server the weighted mean of the updates and
# nothing else); methods not listed need only that mean.
_INDIVIDUAL = "its server needs each client's own {}, which secure aggregation hides"
_SECAGG_REFUSED: dict[str, str] = {
    "fedproto": "its clients send per-concept prototypes and counts, which SecAgg+ does not aggregate here (not built)",
    "rcsr": _INDIVIDUAL.format("prototypes and consistency statistics (the router weighs clients one by one)"),
    "plfedcmh": _INDIVIDUAL.format("model (the hypernetwork mixes models per client and layer)"),
    "fedcafe": _INDIVIDUAL.format("memory (its weights compare clients' memories)"),
    "linear": "its sums of feature statistics could be summed securely, but that is not built",
    "centralized": "one node holds all the data: there is no sum of several clients to hide a client in",
    "local": "no update is ever shared: there is nothing to aggregate",
}


def secagg_refusal(method: str, options: Section) -> str:
    """Why `method` (with these options) cannot run with secure aggregation; "" when it can."""
    if method == "unialign" and getattr(options, "weighting", "size") == "agreement":
        return "unialign-weighting = 'agreement' weighs each client by its own update, which the server must see"
    return _SECAGG_REFUSED.get(method, "")
