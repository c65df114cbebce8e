"""common.optim.AdamW: bit-identical to torch.optim.AdamW on CPU, and training never imports torch._dynamo (the
import that made every fresh ClientApp process ~2 s slower)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from common.model import ModelConfig, XmrModel
from common.optim import AdamW
from common.train import trainable


def test_adamw_is_bit_identical_to_torch() -> None:
    """Real model, only the image tower trained: parameters without a gradient (text tower, temperature) must not
    move, not even by weight decay."""
    def make() -> XmrModel:
        torch.manual_seed(0)
        return XmrModel(ModelConfig(img_dim=24, txt_dim=16, embed_dim=8, adapter_dim=4, hash_bits=16))

    ours, theirs = make(), make()
    opt_ours = AdamW(ours.parameters(), lr=3e-3, weight_decay=0.05)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=3e-3, weight_decay=0.05)
    x = torch.randn(40, 24)
    for step in range(30):
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            torch.manual_seed(step)  # the same dropout masks for both
            emb, code = model.img(x[step % 5 * 8:(step % 5 + 1) * 8])
            (emb.square().sum() + code.abs().sum()).backward()
            opt.step()
    before = make()
    for (name, a), b, c in zip(ours.named_parameters(), theirs.parameters(), before.parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(a, c) != name.startswith("img."), name  # no gradient, no update (decay included)
    assert any(not torch.equal(a, c) for a, c in zip(ours.parameters(), before.parameters()))


def test_training_does_not_import_dynamo() -> None:
    code = """
import sys
import numpy as np
from common.model import ModelConfig, XmrModel
from common.train import TrainConfig, train_paired
model = XmrModel(ModelConfig(img_dim=24, txt_dim=16, embed_dim=8, adapter_dim=4, hash_bits=16))
rng = np.random.default_rng(0)
stats = train_paired(model, rng.normal(size=(12, 24)).astype("f4"), rng.normal(size=(24, 16)).astype("f4"),
                     np.repeat(np.arange(12), 2), TrainConfig(epochs=2, batch_size=4), rng)
assert stats["steps"] == 6, stats
print("torch._dynamo" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False", "training imported torch._dynamo (about 2 s per ClientApp process)"
