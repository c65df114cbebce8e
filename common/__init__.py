"""Pure torch/numpy core of fedxmr: data, backbones, feature cache, models, losses, metrics (no Flower)."""

from common import tv_shim as _tv_shim  # noqa: F401  (must run before anything imports open_clip)
