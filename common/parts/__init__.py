"""Model parts that methods (and node options) add to each tower, by name: the one registry of them.

The shared model (`common.model`) is towers and hash heads; it knows where a part sits, never what it does:
- stage "embed": another view of the embedding, applied after the shared adapter only when asked for by name
  (`Tower.embed(x, view=NAME)`), e.g. personal adapters;
- stage "code": reads the raw hash feature O and gives (its own output, the code feature the code is read from),
  e.g. FedCAFE's enhancement head; at most one per model.
A `private` part never leaves the node (`common.model.upload_keys` leaves it out). A part's arrays are named
`<modality>.<part name>.…`. A method asks for its parts in its config section (`Section.model_parts`); adding a
part means a module here and a line in `PARTS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from torch import nn

from common.blocks import ModelConfig
from common.parts import fedcafe, personal


@dataclass(frozen=True)
class PartSpec:
    stage: Literal["embed", "code"]
    build: Callable[[ModelConfig], nn.Module]
    private: bool = False  # trained and kept by the node only


PARTS: dict[str, PartSpec] = {
    personal.NAME: PartSpec("embed", personal.build, private=True),
    fedcafe.NAME: PartSpec("code", fedcafe.build),
}


def specs(cfg: ModelConfig) -> dict[str, PartSpec]:
    """The config's parts, checked: known names, no repeats, at most one code part."""
    unknown = [name for name in cfg.parts if name not in PARTS]
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; available: {sorted(PARTS)}")
    if len(set(cfg.parts)) != len(cfg.parts):
        raise ValueError(f"model parts repeat a name: {list(cfg.parts)}")
    out = {name: PARTS[name] for name in cfg.parts}
    if sum(spec.stage == "code" for spec in out.values()) > 1:
        raise ValueError(f"at most one code part per model, got {list(cfg.parts)}")
    return out


def is_private(key: str) -> bool:
    """Whether an array (`<mod>.<part>.…`) belongs to a private part."""
    fields = key.split(".")
    return len(fields) > 2 and fields[1] in PARTS and PARTS[fields[1]].private


LEGACY_KEYS = {"classifier.": f"{fedcafe.NAME}.classifier.", "memory": f"{fedcafe.NAME}.memory"}


def upgrade_state(state: dict) -> dict:
    """Arrays saved before parts existed (`img.classifier.*`, `img.memory`) under their part's names."""
    out = {}
    for key, value in state.items():
        mod, _, rest = key.partition(".")
        for old, new in LEGACY_KEYS.items():
            if rest == old or (old.endswith(".") and rest.startswith(old)):
                key = f"{mod}.{new}{rest[len(old):]}"
                break
        out[key] = value
    return out
