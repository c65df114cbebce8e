"""AdamW without `torch.optim`.

Every `torch.optim` optimizer imports `torch._dynamo` on first use (its `add_param_group` and `step` are wrapped
for torch.compile), which costs about 2 s on 2 cores. Under the Deployment Engine each train message runs in a
fresh ClientApp process, so that import was paid on every message. This is the update of `torch.optim.AdamW`'s
single-tensor path (the one it takes for CPU tensors): the same operations in the same order, so the results are
bit-identical there (tests/test_optim.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def decays(params: Iterable[torch.nn.Parameter]) -> list[bool]:
    """Which parameters get weight decay: matrices only, as open_clip does; not biases, LayerNorm gains or the
    temperature (1-D), whose decay pulls them toward 0 for no regularising benefit."""
    return [p.ndim >= 2 for p in params]


class AdamW:
    """Decoupled weight decay Adam (Loshchilov & Hutter), the defaults of torch.optim.AdamW. `decay` (one flag per
    parameter, default all) says which parameters are decayed, like torch's two parameter groups."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 decay: list[bool] | None = None) -> None:
        self.params = list(params)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.decay = [True] * len(self.params) if decay is None else list(decay)
        if len(self.decay) != len(self.params):
            raise ValueError(f"AdamW: {len(self.decay)} decay flags for {len(self.params)} parameters")
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [0.0] * len(self.params)  # floats, as torch's step values

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, (p, exp_avg, exp_avg_sq) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq)):
            if p.grad is None:
                continue
            self.steps[i] += 1.0
            grad, step = p.grad, self.steps[i]
            p.mul_(1 - self.lr * (self.weight_decay if self.decay[i] else 0.0))
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = self.lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
