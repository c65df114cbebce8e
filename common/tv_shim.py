"""Make `import open_clip` work next to the CPU build of torch.

PyPI only ships a CUDA build of torchvision; its compiled extension cannot load next to torch+cpu and
torchvision then fails at import ("operator torchvision::nms does not exist"). open_clip imports torchvision
for its transforms, which need none of the compiled ops. If the extension fails to load we declare the two
op schemas torchvision's fake-registrations expect; nms/qnms stay unusable, everything else works.
Imported from `common/__init__.py`, so every process that imports the project (pytest, Ray actors,
ClientApp subprocesses) gets it before open_clip.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import torch

_LIBRARY: torch.library.Library | None = None  # must stay referenced, or the schemas are dropped


def apply() -> bool:
    """Return True when the shim was needed (the real extension did not load)."""
    global _LIBRARY
    if _LIBRARY is not None:
        return True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    libs = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        if libs:
            torch.ops.load_library(libs[0])
            return False
    except (OSError, ImportError, RuntimeError):
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    return True


apply()
