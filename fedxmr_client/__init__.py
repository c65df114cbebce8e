"""fedxmr ClientApp: trains the shared towers and hash heads on a node's private, cached features."""

import common  # noqa: F401  (torchvision shim first, in every ClientApp process)
