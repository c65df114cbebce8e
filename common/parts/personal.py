"""Personal adapters (`personal-adapters = true`, any method): one more zero-initialised residual adapter per tower,
applied after the shared one only when the node asks for its personal view; trained by the node alone and never
uploaded (the part is private)."""

from __future__ import annotations

from torch import nn

from common.blocks import Adapter, ModelConfig

NAME = "personal"


def build(cfg: ModelConfig) -> nn.Module:
    return Adapter(cfg.embed_dim, cfg.adapter_dim, cfg.dropout)
