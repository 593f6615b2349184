"""Activations that map 0 to 0, right after a convolution nothing else reads, run
in that convolution's epilogue (fastmdl/compact/plan.py ``fused_activation``):
inside oneDNN's call, or after Winograd, the BLAS product or the padded storage's
kernel. Each path must still equal the masked model."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
from fastmdl.compact import steps as S
from layouts import check_every_layout, per_domain_statistics
from pruned_model import set_masks

SIZE = 16
ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu-tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(inplace=True),
    "hardswish": lambda: nn.Hardswish(),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "tanh": lambda: nn.Tanh(),
    "leaky": lambda: nn.LeakyReLU(0.2),
}


class Paths(nn.Module):
    """One convolution per path of ``steps.Conv``, each followed by ``act``: a
    strided 3x3 (oneDNN), a 3x3 at 8x8 (Winograd on AVX-512 CPUs), a small 1x1
    (the BLAS product), a 5x5 (oneDNN) followed by a function-call GELU."""

    def __init__(self, act):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 12, 3, 2, 1, bias=False), nn.BatchNorm2d(12), act())
        self.b = nn.Sequential(nn.Conv2d(12, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), act())
        self.c = nn.Sequential(nn.Conv2d(16, 16, 1), act())
        self.d = nn.Conv2d(16, 20, 5, padding=2)
        self.head = nn.Linear(20, 4)

    def forward(self, x):
        x = self.c(self.b(self.a(x)))
        return self.head(F.gelu(self.d(x)).mean((2, 3)))


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_fused_activations_equal_the_masked_model(name):
    torch.manual_seed(0)
    model = fastmdl.convert(Paths(ACTIVATIONS[name]), 3, [4, 4, 4], input_size=(3, SIZE, SIZE))
    set_masks(model, keep=0.5, shared=0.0, seed=1)
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)
    plan = pruned.compact_plan()
    fused = [s for s in plan.steps if isinstance(s, S.Conv) and s.act is not None]
    assert len(fused) == 4 and sum(isinstance(s, S.Alias) for s in plan.steps) == 4
    check_every_layout(pruned, model, name, SIZE, rtol=1e-5, atol=1e-5)


class NotFused(nn.Module):
    """A convolution read by its activation and by an add; an activation after a
    residual add; a sigmoid (it does not map 0 to 0)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.a(x)
        y = F.silu(a) + a
        y = F.silu(self.b(y) + y)
        return self.head(torch.sigmoid(self.c(y)).mean((2, 3)))


def test_what_is_not_fused():
    torch.manual_seed(0)
    model = fastmdl.convert(NotFused(), 3, [4, 4, 4], input_size=(3, SIZE, SIZE))
    set_masks(model, keep=0.5, shared=0.0, seed=1)
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)
    plan = pruned.compact_plan()
    assert not any(isinstance(s, S.Alias) for s in plan.steps)
    assert all(s.act is None for s in plan.steps if isinstance(s, S.Conv))
    check_every_layout(pruned, model, "NotFused", SIZE, rtol=1e-5, atol=1e-5)
