"""Device placement without a GPU: every tensor the node's training, losses and evaluation make names its device.

A CPU-only machine cannot run a second device: torch's `meta` device fails at the first read of a value (`.item()`,
`.numpy()`), and `torch.set_default_device("meta")` also moves module construction and torch's own optimizer step
counters there. So this check is static: in the modules that run on the node's device, a tensor factory
(`torch.zeros`, `torch.as_tensor`, ...) without `device=` makes a CPU tensor, which on CUDA meets the model's tensors
and fails (the bug this found: `linear`'s client built its features on the CPU). The calls allowed without it are
listed with their reason. `benchmarks/gpu_check.py` checks placement on a real GPU."""

from __future__ import annotations

import ast
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
FACTORIES = {"arange", "as_tensor", "empty", "eye", "from_numpy", "full", "linspace", "ones", "rand", "randint",
             "randn", "randperm", "tensor", "zeros"}
# what runs on the node's device: local training, its losses and terms, the model and its parts, evaluation
ON_DEVICE = ["common/train.py", "common/losses.py", "common/unimodal.py", "common/model.py", "common/blocks.py",
             "common/evaluate.py", "common/parts", "fedxmr_client/methods", "fedxmr_client/app.py"]
ALLOWED = {  # (file, source of the call) -> why a CPU tensor is right there
    ("common/model.py", "torch.full((1,), math.log(min(1.0 / cfg.temperature, MAX_SCALE)))"):
        "a parameter made at construction; the module is moved to its device after",
    ("common/model.py", "torch.as_tensor(np.asarray(v))"): "copied into a parameter with `copy_`, which moves it",
    ("common/parts/fedcafe.py", "torch.zeros(concepts, bits)"): "a buffer made at construction, moved with the module",
    ("fedxmr_client/app.py", "torch.from_numpy(v)"): "the reply's arrays, which leave the node as numpy",
}


def _factory_calls(path: Path) -> list[tuple[int, str]]:
    """(line, source) of every `torch.<factory>(...)` call without a `device=` keyword."""
    calls = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                and "device" not in {k.arg for k in node.keywords}):
            calls.append((node.lineno, ast.unparse(node)))
    return calls


def _files() -> list[Path]:
    out = []
    for name in ON_DEVICE:
        path = PROJECT / name
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def test_tensors_made_on_the_node_name_their_device() -> None:
    found = {(str(p.relative_to(PROJECT)), src): line for p in _files() for line, src in _factory_calls(p)}
    unplaced = [f"{f}:{line}: {src}" for (f, src), line in sorted(found.items()) if (f, src) not in ALLOWED]
    assert not unplaced, "tensors made without `device=` where the node's model may be on a GPU:\n" + "\n".join(
        unplaced)
    stale = [key for key in ALLOWED if key not in found]
    assert not stale, f"allowed calls that no longer exist (remove them from ALLOWED): {stale}"


def test_the_check_finds_a_factory_without_a_device(tmp_path: Path) -> None:
    code = tmp_path / "m.py"
    code.write_text("import torch\nx = torch.arange(3)\ny = torch.zeros(2, device=x.device)\nz = torch.eye(2)\n")
    assert [line for line, _ in _factory_calls(code)] == [2, 4]
