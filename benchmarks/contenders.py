"""Mixed-domain convolution problems and the contenders the op benchmarks compare.

Contenders, on the same problem (no epilogue, so every contender computes the same
convolution):
  (a) loop   per-domain loop over the framework's convolution with cached sliced
             weights: gather the domain's samples and channels, conv, scatter;
  (b) mask   dense convolution of the union network, then a per-sample 0/1 mask;
  (c) dense  dense convolution of the union network alone;
  (d) ideal  (c) scaled by the fraction of the union's FLOPs the batch needs;
  and fastmdl's backends through fastmdl.ops.domain_conv2d.

Also here, for benchmarks/gpu.py: the unique convolution shapes of ResNet-26 and
ResNet-50 (``resnet26_layers``, ``resnet50_layers``), ``union_problem`` (a problem
cut down to the channels some domain uses, as fastmdl.prune leaves a layer),
``rel_error``, ``cuda_graphed`` and the GPU ceilings ``gpu_ceilings``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from fastmdl._io import atomic_write
from fastmdl._shapes import conv_output_hw, output_memory_format
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


def _gather(x: torch.Tensor, rows: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    """x[rows][:, chans], in x's memory format (a channels_last x is gathered through
    its NHWC view, so the copy comes out channels_last without a second copy)."""
    if output_memory_format(x) == torch.channels_last:
        return (x.permute(0, 2, 3, 1).index_select(0, rows).index_select(3, chans)
                .permute(0, 3, 1, 2))
    return x.index_select(0, rows).index_select(1, chans)


def contenders(p: Problem, backends: List[str], *, fixed_rows: bool = False,
               raw_op: bool = False) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument callable computing the layer on p.

    ``fixed_rows``: the loop (a) takes each domain's sample rows computed once here
    (a server knows every request's domain on the host) instead of a ``nonzero``
    per call, so it has no host synchronisation and can be captured in a CUDA
    graph. ``raw_op``: the backends are called as a pruned layer calls them,
    ``torch.ops.fastmdl.domain_conv2d`` with no per-call argument check (the
    public wrapper's value check costs one device-to-host copy per call)."""
    in_idx, in_off, out_idx, out_off = p.lists
    d_count = p.in_masks.shape[0]
    sliced = []  # cached per-domain weights, as a tuned loop would keep them
    for d in range(d_count):
        ci = in_idx[in_off[d]:in_off[d + 1]]
        co = out_idx[out_off[d]:out_off[d + 1]]
        sliced.append((ci, co, p.weight.index_select(0, co).index_select(1, ci).contiguous()))
    rows_of = [(p.domain == d).nonzero().squeeze(1) for d in range(d_count)] if fixed_rows else None
    out_mask = p.out_masks.to(p.x.dtype)
    ho, wo = p.out_hw()
    c_out = p.weight.shape[0]
    y_format = output_memory_format(p.x)

    def loop():
        y = torch.empty((p.x.shape[0], c_out, ho, wo), dtype=p.x.dtype, device=p.x.device,
                        memory_format=y_format).zero_()
        for d, (ci, co, w) in enumerate(sliced):
            rows = rows_of[d] if rows_of is not None else (p.domain == d).nonzero().squeeze(1)
            if rows.numel() == 0 or co.numel() == 0:
                continue
            z = F.conv2d(_gather(p.x, rows, ci), w, None, p.stride, p.padding)
            y[rows.unsqueeze(1), co.unsqueeze(0)] = z
        return y

    def mask():
        return (F.conv2d(p.x, p.weight, None, p.stride, p.padding)
                * out_mask[p.domain][:, :, None, None])

    def dense():
        return F.conv2d(p.x, p.weight, None, p.stride, p.padding)

    out = dict(zip(BASELINES, (loop, mask, dense)))
    stride, padding = [p.stride] * 2, [p.padding] * 2
    for name in backends:
        if raw_op:
            out[name] = (lambda name=name: torch.ops.fastmdl.domain_conv2d(
                p.x, p.weight, p.domain, in_idx, in_off, out_idx, out_off, None, None, None,
                False, stride, padding, [1, 1], name))
        else:
            out[name] = (lambda name=name: domain_conv2d(p.x, p.weight, p.domain, in_idx, in_off,
                                                         out_idx, out_off, stride=p.stride,
                                                         padding=p.padding, backend=name))
    return out


def union_problem(p: Problem) -> Problem:
    """p cut down to the input channels and filters some domain uses: the layer as
    fastmdl.prune leaves it, so the dense contenders (b), (c) run the real union
    network (with few domains the union is narrower than the layer)."""
    keep_in = p.in_masks.any(0).nonzero().squeeze(1)
    keep_out = p.out_masks.any(0).nonzero().squeeze(1)
    x = p.x.index_select(1, keep_in).contiguous(memory_format=output_memory_format(p.x))
    w = p.weight.index_select(0, keep_out).index_select(1, keep_in).contiguous()
    return Problem(x, w, p.domain, p.in_masks[:, keep_in], p.out_masks[:, keep_out], p.stride,
                   p.padding)


def resnet26_layers(size: int = 64, width: float = 1.0, min_cin: int = 4):
    """The unique convolution shapes of fastmdl.models.resnet26 at a size x size input,
    in RESNET_LAYERS' format and network order, read off the model itself (built on
    the meta device, so no memory and no FLOPs). Convolutions with fewer than
    ``min_cin`` input channels (the RGB stem, whose inputs are never pruned) are
    left out."""
    from fastmdl.models import resnet26
    with torch.device("meta"):
        model = resnet26(width=width)
    found = []

    def hook(module, args):
        h = args[0].shape[2]
        k, s, pad = module.kernel_size[0], module.stride[0], module.padding[0]
        if module.in_channels < min_cin:
            return
        name = (f"R26 {k}x{k} {module.in_channels}->{module.out_channels}"
                f"{' s2' if s == 2 else ''} @{h}")
        entry = (name, module.in_channels, module.out_channels, h, k, s, pad)
        if entry not in found:
            found.append(entry)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    try:
        model(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return found


def resnet50_layers(size: int = 224):
    """The unique convolution shapes of a ResNet-50 (torchvision's v1.5: stride on the
    3x3 of each bottleneck, projection shortcuts on each stage's first block) at a
    size x size input, stem left out, in RESNET_LAYERS' format and network order."""
    found = []

    def add(c_in, c_out, hw, k, s):
        name = f"R50 {k}x{k} {c_in}->{c_out}{' s2' if s == 2 else ''} @{hw}"
        entry = (name, c_in, c_out, hw, k, s, k // 2)
        if entry not in found:
            found.append(entry)

    hw, c_in = size // 4, 64  # the 7x7 stride-2 stem and the stride-2 max-pool
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(blocks):
            s = 2 if stage > 0 and b == 0 else 1
            add(c_in, width, hw, 1, 1)            # 1x1 reduce
            add(width, width, hw, 3, s)           # 3x3
            add(width, 4 * width, hw // s, 1, 1)  # 1x1 expand
            if b == 0:
                add(c_in, 4 * width, hw, 1, s)    # projection shortcut
            c_in, hw = 4 * width, hw // s
    return found


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64 over want's finite entries (NaN when got
    is not finite there, so a bound check ``err <= bound`` fails)."""
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"output shape {tuple(got.shape)} != expected {tuple(want.shape)}")
    want = want.detach().to(torch.float64)
    got = got.detach().to(device=want.device, dtype=torch.float64)
    finite = torch.isfinite(want)
    diff = (got - want)[finite].norm()
    den = want[finite].norm()
    return float(diff / den) if float(den) > 0 else float(diff)


def check_same_function(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Assert max|got - want| <= 1e-3 * max|want|: a whole network's float32 outputs
    agree to that, Winograd convolutions included (each layer's rounding is about
    1e-5 of its outputs' range, and it adds up over 50 layers), while a wrong
    channel or domain moves them by far more."""
    if tuple(got.shape) != tuple(want.shape):
        raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
    err = float((got.double() - want.double()).abs().max())
    scale = float(want.double().abs().max())
    if not err <= 1e-3 * scale:
        raise AssertionError(f"{what}: max error {err:.3g} > 1e-3 x max|output| {scale:.3g}")


def cuda_graphed(fn: Callable):
    """fn captured in a CUDA graph: (replay, output) where replay() re-runs the GPU work
    with no host work and output is what fn returned during capture (rewritten by
    every replay). Warm-ups run on a side stream first, so lazy initialisation, JIT
    compiles and cuDNN's benchmark-mode search happen outside the capture."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    torch.cuda.synchronize()
    return graph.replay, out


def gpu_ceilings(dtype: torch.dtype, size: int = 8192):
    """(matmul TFLOP/s in dtype on size x size operands, device-to-device copy GB/s
    counting bytes read + written), CUDA-event medians."""
    from triton.testing import do_bench
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    tflops = 2 * size ** 3 / ms / 1e9
    del a, b
    src = torch.empty(1 << 28, device="cuda", dtype=torch.float32).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms_copy = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    gbs = 2 * src.numel() * src.element_size() / ms_copy / 1e6
    return tflops, gbs


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


def interleaved_medians(fns: Dict[str, Callable], *, warmup: int = 2,
                        repeats: int = 7) -> Dict[str, float]:
    """Median wall time of each fn(), timed in rounds (one call of each per round) so
    that a slow spell of the machine hits every contender alike."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def per_domain_networks(model) -> List[torch.nn.Module]:
    """Contender (e): what a user of a per-domain pruning tool deploys. For each
    domain, a plain copy of the converted network with ``torch.nn`` layers only,
    physically cut to the filters and channels that domain's masks keep, with that
    domain's BatchNorm (statistics and affine) and head; run on its own samples,
    its logits equal the masked model's for that domain."""
    import copy

    from torch import nn

    import fastmdl
    from fastmdl import graph
    from fastmdl.cost import multidomain_layers

    layers = {layer.name: layer for layer in multidomain_layers(model, hard=True)}
    nets = []
    for d in range(model.num_domains):
        net = copy.deepcopy(model.module).eval()
        for name, m in list(net.named_modules()):
            if name not in layers:
                continue
            info = layers[name]
            keep_in = (info.in_masks[d] > 0).nonzero().squeeze(1)
            if isinstance(m, fastmdl.Conv2d):
                keep_out = (info.out_masks[d] > 0).nonzero().squeeze(1)
                groups, block = m.groups, graph.tied_block(m)
                if block:  # group j reads group j (a depthwise filter its own channel)
                    keep_in = torch.arange(block if keep_out.numel() else 0)
                    groups = max(1, keep_out.numel() // block)
                elif m.groups != 1:  # fastmdl keeps a grouped conv whole; so does the user
                    keep_in = torch.arange(m.in_channels // m.groups)
                new = nn.Conv2d(keep_in.numel() * groups, keep_out.numel(), m.kernel_size,
                                m.stride, m.padding, m.dilation, groups, m.bias is not None,
                                m.padding_mode)
                with torch.no_grad():
                    new.weight.copy_(m.weight[keep_out][:, keep_in])
                    if m.bias is not None:
                        new.bias.copy_(m.bias[keep_out])
            elif isinstance(m, fastmdl.BatchNorm2d):
                new = nn.BatchNorm2d(keep_in.numel(), eps=m.eps)
                with torch.no_grad():
                    new.running_mean.copy_(m.running_mean[d, keep_in])
                    new.running_var.copy_(m.running_var[d, keep_in])
                    if m.weight is not None:
                        new.weight.copy_(m.weight[d, keep_in])
                        new.bias.copy_(m.bias[d, keep_in])
            elif isinstance(m, (fastmdl.DomainHeads, fastmdl.ConvHeads)):
                w = m.weights[d]
                if isinstance(m, fastmdl.ConvHeads):  # SqueezeNet's classifier
                    new = nn.Conv2d(keep_in.numel(), w.shape[0], m.kernel_size, m.stride,
                                    m.padding, m.dilation, bias=m.biases is not None)
                else:
                    new = nn.Linear(keep_in.numel(), w.shape[0], m.biases is not None)
                with torch.no_grad():
                    new.weight.copy_(w[:, keep_in])
                    if m.biases is not None:
                        new.bias.copy_(m.biases[d])
            else:
                continue
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, new.eval())
        nets.append(_domain_selections(net, model, d))
    return nets


def _domain_selections(net, model, d: int):
    """``net`` (domain d's cut copy) with each channel shuffle, split and slice the
    analysis followed made a selection of the channels domain d keeps, as
    fastmdl.prune does for the union (a user of a per-domain tool rewrites them the
    same way: the reshapes would mix the wrong channels)."""
    from fastmdl import graph
    from fastmdl.masks import hard_mask
    from fastmdl.prune import _replace_selections

    g = model._graph
    if not g.selects:
        return net
    scores = g.scores_by_root()
    kept = {}
    for s in range(len(g.parent)):
        root = g.find(s)
        if root not in kept:
            if root in scores and not g.frozen[root]:
                kept[root] = hard_mask(scores[root].detach(), g.blocks[root])[d].nonzero()[:, 0]
            else:
                kept[root] = torch.arange(g.widths[root])
    gm = graph.trace(net)
    _replace_selections(gm, g, kept)
    return gm.eval()
