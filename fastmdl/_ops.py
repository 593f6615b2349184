"""The op ``fastmdl::domain_conv2d``: its schema (declared once, here), its fake
implementation for tracing, its device implementation and its autograd formula.

The device implementation only picks a backend (see ``fastmdl.backends``) and
calls it. The backward pass is exact and backend-independent: with the domains'
channel sets turned into per-sample 0/1 masks,

    gm     = dy * [y > 0 if relu] * out_mask             (zero outside out_d)
    dshift = sum over samples of domain d and pixels of gm
    dscale = same sum of gm * z,   z = the op's output with no epilogue (recomputed)
    dz     = gm * scale[domain]
    dx     = conv_transpose(dz, W) * in_mask
    dW     = conv_weight_grad(x * in_mask, dz)
    dres   = dy * [y > 0 if relu]

so a pruned network can be fine-tuned on mixed batches on every backend.
"""

from __future__ import annotations

import torch

from . import _shapes, backends

SCHEMA = (
    "domain_conv2d(Tensor x, Tensor weight, Tensor domain, Tensor in_index, Tensor in_offsets, "
    "Tensor out_index, Tensor out_offsets, Tensor? scale, Tensor? shift, Tensor? residual, "
    "bool relu, int[2] stride, int[2] padding, int[2] dilation, str backend) -> Tensor"
)

_lib = torch.library.Library("fastmdl", "FRAGMENT")
_lib.define(SCHEMA)


def _forward(x, weight, domain, in_index, in_offsets, out_index, out_offsets, scale, shift,
             residual, relu, stride, padding, dilation, backend):
    impl = backends.resolve(backend, x.device, x.dtype, weight.shape[2] * weight.shape[3])
    return impl(x, weight, domain, in_index, in_offsets, out_index, out_offsets, scale, shift,
                residual, relu, stride, padding, dilation)


_lib.impl("domain_conv2d", _forward, "CompositeExplicitAutograd")


def _fake(x, weight, domain, in_index, in_offsets, out_index, out_offsets, scale, shift,
          residual, relu, stride, padding, dilation, backend=None):
    ho, wo = _shapes.conv_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    return torch.empty((x.shape[0], weight.shape[0], ho, wo), dtype=x.dtype, device=x.device,
                       memory_format=_shapes.output_memory_format(x))


torch.library.register_fake("fastmdl::domain_conv2d", _fake)


def _setup_context(ctx, inputs, output):
    (x, weight, domain, in_index, in_offsets, out_index, out_offsets, scale, shift, residual,
     relu, stride, padding, dilation, backend) = inputs
    ctx.relu, ctx.stride, ctx.padding, ctx.dilation, ctx.backend = (
        relu, stride, padding, dilation, backend)
    ctx.has_scale, ctx.has_shift, ctx.has_residual = (
        scale is not None, shift is not None, residual is not None)
    ctx.save_for_backward(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                          scale, output if relu else None)


def _backward(ctx, grad):
    (x, weight, domain, in_index, in_offsets, out_index, out_offsets, scale,
     output) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    stride, padding, dilation = list(ctx.stride), list(ctx.padding), list(ctx.dilation)
    num_domains = in_offsets.numel() - 1

    g = grad * (output > 0) if ctx.relu else grad
    d_residual = g if ctx.has_residual and needs[9] else None
    out_mask = _shapes.domain_masks(out_index, out_offsets, weight.shape[0], g.dtype)
    gm = g * out_mask[domain][:, :, None, None]

    def per_domain_sum(t):
        sums = torch.zeros((num_domains, t.shape[1]), dtype=t.dtype, device=t.device)
        return sums.index_add_(0, domain, t.sum(dim=(2, 3)))

    d_shift = per_domain_sum(gm) if ctx.has_shift and needs[8] else None
    d_scale = None
    if ctx.has_scale and needs[7]:
        z = torch.ops.fastmdl.domain_conv2d(x, weight, domain, in_index, in_offsets, out_index,
                                            out_offsets, None, None, None, False, stride,
                                            padding, dilation, ctx.backend)
        d_scale = per_domain_sum(gm * z)
    dz = gm * scale[domain][:, :, None, None] if ctx.has_scale else gm

    d_x = d_weight = None
    if needs[0] or needs[1]:
        in_mask = _shapes.domain_masks(in_index, in_offsets, x.shape[1], x.dtype)[domain]
        in_mask = in_mask[:, :, None, None]
        if needs[0]:
            d_x = (torch.nn.grad.conv2d_input(x.shape, weight, dz, stride, padding, dilation)
                   * in_mask)
        if needs[1]:
            d_weight = torch.nn.grad.conv2d_weight(x * in_mask, weight.shape, dz, stride, padding,
                                                   dilation)
    return (d_x, d_weight, None, None, None, None, None, d_scale, d_shift, d_residual,
            None, None, None, None, None)


torch.library.register_autograd("fastmdl::domain_conv2d", _backward, setup_context=_setup_context)


def _fake_cpp(x, weight, domain, in_index, in_offsets, out_index, out_offsets, scale, shift,
              residual, relu, stride, padding, dilation):
    return _fake(x, weight, domain, in_index, in_offsets, out_index, out_offsets, scale, shift,
                 residual, relu, stride, padding, dilation)


def register_cuda_fake() -> None:
    """Give the CUDA kernel's own op a fake implementation (when fastmdl._C has it)."""
    torch.library.register_fake("fastmdl::domain_conv2d_cuda", _fake_cpp)


def register_cpp_fake() -> None:
    """Give the compiled kernels' own ops fake implementations once the extension has
    loaded: domain_conv2d_cpu always, domain_conv2d_cuda when it was compiled in."""
    torch.library.register_fake("fastmdl::domain_conv2d_cpu", _fake_cpp)
    if hasattr(torch.ops.fastmdl, "domain_conv2d_cuda"):
        register_cuda_fake()
