"""Mixed-domain convolution problems and the contenders the op benchmarks compare.

Contenders, on the same problem (no epilogue, so every contender computes the same
convolution):
  (a) loop   per-domain loop over the framework's convolution with cached sliced
             weights: gather the domain's samples and channels, conv, scatter;
  (b) mask   dense convolution of the union network, then a per-sample 0/1 mask;
  (c) dense  dense convolution of the union network alone;
  (d) ideal  (c) scaled by the fraction of the union's FLOPs the batch needs;
  and fastmdl's backends through fastmdl.ops.domain_conv2d.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from fastmdl._io import atomic_write
from fastmdl._shapes import conv_output_hw
from fastmdl.ops import domain_conv2d, index_lists

BASELINES = ("(a) loop", "(b) mask", "(c) dense")

# ResNet-like layers: (name, C_in, C_out, H=W, k, stride, padding).
RESNET_LAYERS = [
    ("conv2_x 3x3 64", 64, 64, 56, 3, 1, 1),
    ("conv3_x 3x3 128", 128, 128, 28, 3, 1, 1),
    ("conv4_x 3x3 256", 256, 256, 14, 3, 1, 1),
    ("conv5_x 3x3 512", 512, 512, 7, 3, 1, 1),
    ("down 3x3 s2 64->128", 64, 128, 56, 3, 2, 1),
    ("bottleneck 1x1 256->64", 256, 64, 56, 1, 1, 0),
]


@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    domain: torch.Tensor
    in_masks: torch.Tensor
    out_masks: torch.Tensor
    stride: int
    padding: int

    @property
    def lists(self):
        return (*index_lists(self.in_masks), *index_lists(self.out_masks))

    def useful_flops(self) -> float:
        """2 * sum over samples of |out_d| * |in_d| * kh * kw * H_out * W_out."""
        ho, wo = self.out_hw()
        per_domain = self.out_masks.sum(1).double() * self.in_masks.sum(1).double()
        k = self.weight.shape[2] * self.weight.shape[3]
        return float(2 * per_domain[self.domain.cpu()].sum() * k * ho * wo)

    def dense_flops(self) -> float:
        ho, wo = self.out_hw()
        c_out, c_in, kh, kw = self.weight.shape
        return float(2 * self.x.shape[0] * c_out * c_in * kh * kw * ho * wo)

    def out_hw(self):
        return conv_output_hw(self.x.shape[2:], self.weight.shape[2:], (self.stride,) * 2,
                              (self.padding,) * 2, (1, 1))


def make_problem(c_in, c_out, hw, k, stride, padding, *, n=32, domains=4, keep=0.5,
                 dtype=torch.float32, device="cpu", channels_last=False, seed=0) -> Problem:
    """N samples over D domains; each domain keeps a random ``keep`` fraction of the
    input channels and of the output filters."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, hw, hw, generator=gen)
    w = torch.randn(c_out, c_in, k, k, generator=gen) / (c_in * k * k) ** 0.5

    def masks(width):
        m = torch.zeros(domains, width, dtype=torch.bool)
        for d in range(domains):
            m[d, torch.randperm(width, generator=gen)[:max(1, round(keep * width))]] = True
        return m

    domain = torch.arange(n) % domains
    domain = domain[torch.randperm(n, generator=gen)]
    x = x.to(device=device, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return Problem(x, w.to(device=device, dtype=dtype), domain.to(device), masks(c_in).to(device),
                   masks(c_out).to(device), stride, padding)


def contenders(p: Problem, backends: List[str]) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument callable computing the layer on p."""
    in_idx, in_off, out_idx, out_off = p.lists
    d_count = p.in_masks.shape[0]
    sliced = []  # cached per-domain weights, as a tuned loop would keep them
    for d in range(d_count):
        ci = in_idx[in_off[d]:in_off[d + 1]]
        co = out_idx[out_off[d]:out_off[d + 1]]
        sliced.append((ci, co, p.weight.index_select(0, co).index_select(1, ci).contiguous()))
    out_mask = p.out_masks.to(p.x.dtype)
    ho, wo = p.out_hw()
    c_out = p.weight.shape[0]

    def loop():
        y = p.x.new_zeros((p.x.shape[0], c_out, ho, wo))
        for d, (ci, co, w) in enumerate(sliced):
            rows = (p.domain == d).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            z = F.conv2d(p.x.index_select(0, rows).index_select(1, ci), w, None, p.stride, p.padding)
            y[rows.unsqueeze(1), co.unsqueeze(0)] = z
        return y

    def mask():
        return F.conv2d(p.x, p.weight, None, p.stride, p.padding) * out_mask[p.domain][:, :, None, None]

    def dense():
        return F.conv2d(p.x, p.weight, None, p.stride, p.padding)

    out = dict(zip(BASELINES, (loop, mask, dense)))
    for name in backends:
        out[name] = (lambda name=name: domain_conv2d(p.x, p.weight, p.domain, in_idx, in_off,
                                                     out_idx, out_off, stride=p.stride,
                                                     padding=p.padding, backend=name))
    return out


def median_seconds(fn: Callable, *, warmup: int = 2, repeats: int = 9) -> float:
    """Median wall time of fn() on the CPU."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(size: int = 2048, repeats: int = 9) -> float:
    """This machine's measured float32 matmul rate (GFLOP/s), the CPU ceiling."""
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    t = median_seconds(lambda: a @ b, warmup=5, repeats=repeats)
    return 2 * size ** 3 / t / 1e9


def write_atomic(path: str, text: str) -> None:
    """Write atomically: a reader sees the old file or the new one, never half."""
    with atomic_write(path, "w") as f:
        f.write(text)
