"""The run configuration, validated before round 1.

Flower hands every app a flat `run_config` (defaults in `pyproject.toml` `[tool.flwr.app.config]`, overridden
with `flwr run . --run-config "k=v ..."`). `parse_run_config` validates it once; a bad value raises
`ConfigError` naming the key, the value and the allowed range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from common.data.concepts import CONCEPT_NAMES
from common.data.federation import parse_mix
from common.data.precomputed import is_feature_file
from common.data.partition import PARTITIONERS
from common.losses import HASH_LOSSES, LossWeights
from common.model import ModelConfig
from common.parts import personal as personal_part
from common.method_config import (SECTIONS, Section, aggregation_support, dp_refusal, kebab,
                                  secagg_refusal)
from common.robust import AGGREGATIONS
from common.train import TrainConfig


_DRILL = "(raise|nan|poison|inflate|scale|boast|flip|replay)"  # fedxmr_client/faults.py: FAULTS (a test checks)


class ConfigError(ValueError):
    """Invalid run or node configuration; the message names every offending key."""


class RunConfig(BaseModel):
    model_config = ConfigDict(alias_generator=kebab, populate_by_name=True, extra="forbid", frozen=True)

    # federation
    method: str = Field("fedavg", min_length=1)  # a name of common.method_config.SECTIONS
    num_server_rounds: int = Field(20, ge=1, le=10_000)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    test_clients: int = Field(0, ge=0)  # nodes scored by the final per-client test, sampled; 0: every node
    min_nodes: int = Field(2, ge=1)  # fewer usable train replies in a round: the round keeps the model
    max_failed_rounds: int = Field(3, ge=1)  # that many such rounds in a row fail the run
    round_timeout: float = Field(3600.0, gt=0.0)
    # what the server trusts (common/robust.py): how updates are combined, and which replies it screens out
    aggregation: Literal[AGGREGATIONS] = "mean"  # type: ignore[valid-type]
    trim_fraction: float = Field(0.1, ge=0.0, lt=0.5)  # trimmed-mean: weight share cut at each end
    update_norm_limit: float = Field(10.0, ge=0.0)  # screen out an update > this x the round's median norm; 0: off
    max_num_examples: int = Field(1_000_000, ge=1)  # a reply claiming more examples is screened out
    # the most any one client weighs in any mix of client inputs (weights, memories, prototypes, hypernetwork
    # inputs), after the method's own weights (common/trust.py); at least the uniform share of the clients mixed
    max_client_share: float = Field(0.3, gt=0.0, le=1.0)
    # client-level differential privacy (common/privacy.py, docs/PRIVACY.md): on when a noise multiplier or a target ε
    # is set; each client's update clipped to L2 norm `dp-clip`, equal weights, Gaussian noise; δ 0: min(1e-5, 0.1 /
    # clients) (fedxmr_server/privacy.py: default_delta)
    dp_noise_multiplier: float = Field(0.0, ge=0.0)
    dp_target_epsilon: float = Field(0.0, ge=0.0)
    dp_clip: float = Field(1.0, gt=0.0)
    dp_delta: float = Field(0.0, ge=0.0, lt=1.0)
    dp_side: Literal["server", "client"] = "server"  # who clips and draws the noise
    # secure aggregation (Flower's SecAgg+, fedxmr_server/strategies/secagg.py, docs/PRIVACY.md): the server
    # learns only the weighted mean of the train round's updates. `secagg-shares`: the fraction of the sampled
    # clients each client's secrets are shared with; `secagg-threshold`: the fraction of those shares that rebuild
    # one (fewer colluding clients learn nothing); `secagg-clip`: every value a client sends must lie in
    # [-clip, clip] (it is quantised)
    secure_aggregation: bool = False
    secagg_shares: float = Field(1.0, gt=0.0, le=1.0)
    secagg_threshold: float = Field(0.6, gt=0.5, le=1.0)  # above 0.5: no two disjoint halves both rebuild a secret
    secagg_clip: float = Field(8.0, ge=1.0)  # at least 1: the indicator entries (1) must pass unclipped
    # score the global model on dev / run the per-client dev evaluation every k rounds (and always in the last
    # round); selection only sees scored rounds, so 1 (every round) is the protocol, larger is for fast grids
    eval_every: int = Field(1, ge=1)
    client_eval_every: int = Field(1, ge=1)
    # the dev metric that selects the reported round (fedxmr_server/strategies/base.py: selection_score): "rsum"
    # (continuous R@K, instance-level), "map" (continuous label MAP), "hash-map" (standard Hamming MAP, what the
    # hashing tables report); "auto": hash-map on a feature file (labels given), rsum on captions (Flickr8k)
    select_on: Literal["auto", "rsum", "map", "hash-map"] = "auto"
    partitioner: Literal[PARTITIONERS] = "iid"  # type: ignore[valid-type]
    partition_beta: float = Field(0.5, gt=0.0, le=1000.0)
    partition_ways: int = Field(2, ge=1)
    partition_shots: int = Field(0, ge=0)  # > 0: n-way k-shot (nway partitioner only; common/data/partition/)
    modality_mix: str = "1,0,0"  # fractions of paired, image-only, text-only clients
    seed: int = Field(0, ge=0)
    # local training
    local_epochs: int = Field(5, ge=1, le=1000)
    batch_size: int = Field(64, ge=2, le=65_536)
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    personal_adapters: bool = False
    personal_epochs: int = Field(2, ge=1, le=1000)
    # model and loss
    embed_dim: int = Field(256, ge=8, le=8192)
    adapter_dim: int = Field(64, ge=1, le=8192)
    hash_bits: Literal[16, 32, 64, 128] = 64
    temperature: float = Field(0.07, gt=0.0, le=1.0)
    learn_temperature: bool = True
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    hash_weight: float = Field(0.5, ge=0.0)
    quant_weight: float = Field(0.1, ge=0.0)
    hash_temperature: float = Field(0.1, gt=0.0, le=1.0)
    hash_distill_weight: float = Field(0.0, ge=0.0)  # common/losses.py: code_distill
    hash_balance_weight: float = Field(0.0, ge=0.0)  # common/losses.py: bit_balance
    hash_straight_through: bool = False
    hash_detach: bool = False  # common/model.py: Tower.forward
    hash_scale: float = Field(1.0, gt=0.0, le=1000.0)  # common/model.py: ModelConfig.hash_scale
    label_positives: float = Field(0.0, ge=0.0, le=1.0)  # common/losses.py: info_nce
    hash_loss: Literal[HASH_LOSSES] = "infonce"  # type: ignore[valid-type]  # common/losses.py: retrieval_loss
    # data, backbone, outputs
    backbone: str = Field("effnet-lite0+minilm", min_length=1)
    device: str = "auto"
    data_dir: str = ""
    data_keys: str = ""  # a feature file's variables: "img=data.X1,txt=data.X2,labels=L" (common/data/precomputed.py)
    cache_dir: str = ""
    out_dir: str = "runs"
    run_name: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")
    resume: str = ""  # a run dir: continue it after its last completed round (same config otherwise)
    max_train_images: int = Field(0, ge=0)
    max_eval_images: int = Field(0, ge=0)
    # the database of the test MAP (fedxmr_server/evaluator.py): "test" (test vs test) or "retrieval" (test queries
    # vs train + test items, the hashing papers' retrieval set); R@K and dev stay within their split
    gallery: Literal["test", "retrieval"] = "test"
    encode_batch_size: int = Field(32, ge=1, le=4096)
    # fault and attack drills (tests, rehearsals, docs/ATTACKS.md): "partition:kind,...", kinds in
    # fedxmr_client/faults.py (raise, nan, poison, inflate, scale, boast, flip, replay)
    faults: str = Field("", pattern=rf"^(\d+:{_DRILL}(,\d+:{_DRILL})*)?$")

    _options: Section = PrivateAttr(default_factory=Section)

    @property
    def options(self) -> Section:
        """The selected method's own section (`<method>-*` keys); empty for a method without knobs."""
        return self._options

    @field_validator("method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in SECTIONS:
            raise ValueError(f"unknown method {value!r}; available: {sorted(SECTIONS)}")
        return value

    @field_validator("modality_mix")
    @classmethod
    def _valid_mix(cls, value: str) -> str:
        parse_mix(value)
        return value

    def selection_metric(self) -> str:
        """What `select-on` means for this run's data: "auto" is "hash-map" on a feature file, else "rsum"."""
        if self.select_on != "auto":
            return self.select_on
        return "hash-map" if is_feature_file(Path(self.data_dir)) else "rsum"

    @property
    def dp(self) -> bool:
        """Whether client-level DP is on."""
        return self.dp_noise_multiplier > 0 or self.dp_target_epsilon > 0

    def mix(self) -> tuple[float, float, float]:
        return parse_mix(self.modality_mix)

    def model_cfg(self, img_dim: int, txt_dim: int, personal: bool = False,
                  concepts: int = len(CONCEPT_NAMES)) -> ModelConfig:
        """`concepts`: the dataset's label columns (`common.data.datasets.concept_count`; Flickr8k's DERIVED concepts
        by default), for the parts that predict them; `personal`: the node's personal adapters (`common.parts`)."""
        return ModelConfig(img_dim=img_dim, txt_dim=txt_dim, embed_dim=self.embed_dim, adapter_dim=self.adapter_dim,
                           hash_bits=self.hash_bits, temperature=self.temperature,
                           learn_temperature=self.learn_temperature, dropout=self.dropout,
                           hash_detach=self.hash_detach, hash_scale=self.hash_scale,
                           parts=((personal_part.NAME,) if personal else ()) + self.options.model_parts(),
                           concepts=concepts)

    def train_cfg(self) -> TrainConfig:
        return TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size, lr=self.lr,
                           weight_decay=self.weight_decay,
                           weights=LossWeights(self.hash_weight, self.quant_weight, self.hash_temperature,
                                               self.hash_distill_weight, self.hash_balance_weight,
                                               self.hash_straight_through, self.hash_loss, self.label_positives))

    def as_flat_dict(self) -> dict[str, Any]:
        """The flat run config: the common keys and the selected method's section (`<method>-<key>`)."""
        own = self._options.model_dump(by_alias=True)
        return self.model_dump(by_alias=True) | {f"{self.method}-{k}": v for k, v in own.items()}


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        shown = f" (got {err['input']!r})" if err["type"] != "missing" else ""
        lines.append(f"{source} key '{key}': {err['msg']}{shown}")
    return "invalid " + source + ":\n  " + "\n  ".join(lines)


def _section_keys(raw: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The `<method>-*` keys of every method with a section, without the prefix (longest method name first)."""
    out: dict[str, dict[str, Any]] = {name: {} for name, section in SECTIONS.items() if section is not None}
    for key, value in raw.items():
        owner = max((n for n in out if key.startswith(f"{n}-")), key=len, default=None)
        if owner is not None:
            out[owner][key[len(owner) + 1:]] = value
    return out


def parse_run_config(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a flat run config (kebab-case keys); unknown keys are errors, and so is a key of a method other than
    the selected one set away from its default (it would be silently ignored)."""
    sections = _section_keys(raw)
    common = {k: v for k, v in raw.items() if not any(k.startswith(f"{n}-") for n in sections)}
    try:
        cfg = RunConfig.model_validate(common)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "run config")) from None
    problems = []
    for name, keys in sections.items():
        section = SECTIONS[name]
        try:
            parsed = section.model_validate(keys)
        except ValidationError as exc:
            raise ConfigError(_format_errors(exc, "run config").replace("key '", f"key '{name}-")) from None
        if name == cfg.method:
            cfg._options = parsed
            continue
        default = section().model_dump(by_alias=True)
        problems += [f"run config key '{name}-{k}' (= {v!r}) belongs to method '{name}', but method is "
                     f"'{cfg.method}'" for k, v in parsed.model_dump(by_alias=True).items() if v != default[k]]
    if cfg.partition_shots and cfg.partitioner != "nway":
        problems.append(f"run config key 'partition-shots' (= {cfg.partition_shots}) applies to partitioner 'nway' "
                        f"only, not {cfg.partitioner!r}")
    allowed, why = aggregation_support(cfg.method, cfg.options)
    if allowed and cfg.aggregation not in allowed:
        problems.append(f"run config keys 'aggregation' = {cfg.aggregation!r} and 'method' = {cfg.method!r}: the "
                        f"method has {why}; use aggregation {' or '.join(map(repr, allowed))}")
    problems += _dp_problems(cfg) + _secagg_problems(cfg)
    if cfg.hash_loss == "center" and cfg.hash_straight_through:
        problems.append("run config keys 'hash-loss' = 'center' and 'hash-straight-through' = true: the center loss on "
                        "exact ±1 codes has no gradient; use one of them")
    if problems:
        raise ConfigError("invalid run config:\n  " + "\n  ".join(problems))
    return cfg


def _dp_problems(cfg: RunConfig) -> list[str]:
    """Why this run cannot have the DP it asks for (common/method_config.py: what a refused method's records leak)."""
    if not cfg.dp:
        return []
    problems = []
    if cfg.dp_noise_multiplier > 0 and cfg.dp_target_epsilon > 0:
        problems.append("run config keys 'dp-noise-multiplier' and 'dp-target-epsilon' are both set; set one (the "
                        "other is derived)")
    refused = dp_refusal(cfg.method, cfg.options)
    if refused:
        problems.append(f"run config key 'method' = {cfg.method!r} cannot run under client-level DP "
                        f"('dp-noise-multiplier' / 'dp-target-epsilon'): {refused}")
    if cfg.aggregation != "mean":
        problems.append(f"run config key 'aggregation' = {cfg.aggregation!r}: DP-FedAvg needs the plain mean of "
                        "clipped updates (a robust rule's sensitivity to one client is not bounded by the clip)")
    return problems


def _secagg_problems(cfg: RunConfig) -> list[str]:
    """Why this run cannot have the secure aggregation it asks for."""
    if not cfg.secure_aggregation:
        return []
    problems = []
    refused = secagg_refusal(cfg.method, cfg.options)
    if refused:
        problems.append(f"run config key 'method' = {cfg.method!r} cannot run with 'secure-aggregation': {refused}")
    if cfg.aggregation != "mean":
        problems.append(f"run config key 'aggregation' = {cfg.aggregation!r}: a robust rule needs every client's "
                        "update, which secure aggregation hides; use 'mean'")
    if cfg.min_nodes < 2:
        problems.append(f"run config key 'min-nodes' = {cfg.min_nodes}: SecAgg+ needs at least 2 clients in a sum "
                        "(one client's mean is its own update)")
    if cfg.dp and cfg.dp_side == "server":
        problems.append("run config keys 'secure-aggregation' and 'dp-side' = 'server': the server would clip each "
                        "update, which it no longer sees; use 'dp-side' = 'client' (each client clips and adds its "
                        "share of the noise inside the secure sum)")
    return problems


class NodeConfig(BaseModel):
    """What a node says about itself: its partition and, in deployment, its own data, cache and device."""

    model_config = ConfigDict(alias_generator=kebab, populate_by_name=True, extra="ignore", frozen=True)

    partition_id: int = Field(0, ge=0)
    num_partitions: int = Field(1, ge=1)
    data_dir: str = ""
    cache_dir: str = ""
    device: str = ""
    # the node's own rule, whatever the run config says: answer train messages only inside SecAgg+
    require_secure_aggregation: bool = False


def parse_node_config(raw: Mapping[str, Any]) -> NodeConfig:
    try:
        node = NodeConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "node config")) from None
    if node.partition_id >= node.num_partitions:
        raise ConfigError(f"node config key 'partition-id': {node.partition_id} is not below "
                          f"'num-partitions' {node.num_partitions}")
    return node
