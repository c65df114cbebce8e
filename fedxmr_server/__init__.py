"""fedxmr ServerApp: aggregation strategies, server-side dev/test evaluation and run reports."""

import common  # noqa: F401  (torchvision shim first)
