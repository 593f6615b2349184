"""The layer of :mod:`fastmdl.basis`: a convolution split by SVD into an orthonormal
basis convolution, per-domain scaling factors and a 1x1 mapping."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _domain
from .layers import Conv2d, _check_num_domains, _resolve_domain
from .masks import apply_mask, binarize, hard_mask
from .ops import index_lists


class BasisConv2d(nn.Module):
    r"""A convolution split into basis, per-domain factors and mapping (see
    :mod:`fastmdl.basis`): :math:`y_n = M (s_{d_n} \odot (V^\top \star x_n)) + b`,
    then the filter masks of a :class:`fastmdl.Conv2d` it replaced.

    Tensors: ``basis`` (r, C_in, kh, kw), ``mapping`` (C_out, r, 1, 1) and ``bias``
    are frozen; ``factors`` (D, r) is the trainable part. ``components`` (D, r)
    says which components each domain uses (all until :func:`prune`);
    ``in_masks`` (D, C_in) which input channels each domain's samples can have
    nonzero (from the filter masks upstream). Once pruned, the basis convolution
    runs through ``fastmdl::domain_conv2d`` (``backend`` picks its backend).
    ``forward(x, domain)`` takes an int or an int64 (N,) tensor, or reads the
    domain of the enclosing model when ``domain`` is omitted.
    """

    def __init__(self, basis: torch.Tensor, mapping: torch.Tensor, bias: Optional[torch.Tensor],
                 *, num_domains: int = 1, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                 padding_mode: str = "zeros", scores: Optional[nn.Parameter] = None,
                 prunable: bool = False, in_masks: Optional[torch.Tensor] = None):
        super().__init__()
        if basis.dim() != 4 or mapping.dim() != 2 or mapping.shape[1] != basis.shape[0]:
            raise ValueError(f"basis must be (r, C_in, kh, kw) and mapping (C_out, r), got "
                             f"{tuple(basis.shape)} and {tuple(mapping.shape)}")
        self.num_domains = _check_num_domains(num_domains)
        rank, self.in_channels = basis.shape[:2]
        self.out_channels = mapping.shape[0]
        self.kernel_size = tuple(basis.shape[2:])
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups, self.padding_mode, self.backend = 1, padding_mode, "auto"
        self.basis = nn.Parameter(basis.detach().clone(), requires_grad=False)
        self.mapping = nn.Parameter(mapping.detach().reshape(self.out_channels, rank, 1, 1).clone(),
                                    requires_grad=False)
        self.bias = (nn.Parameter(bias.detach().clone(), requires_grad=False)
                     if bias is not None else None)
        self.factors = nn.Parameter(torch.ones((num_domains, rank), dtype=basis.dtype,
                                               device=basis.device))
        # Shared with the replaced fastmdl.Conv2d's group, and with the BatchNorms
        # that read these channels: one source of truth for the filter masks.
        self.scores = scores
        self.prunable = prunable and scores is not None
        self.mask_block = 1  # the masked conv's blocks (fastmdl.Conv2d.mask_block)
        if in_masks is None:
            in_masks = torch.ones((num_domains, self.in_channels), device=basis.device)
        self.register_buffer("in_masks", (in_masks != 0).float())
        self.register_buffer("components", torch.ones((num_domains, rank), device=basis.device))
        self.pruned = False

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, num_domains: int,
                  in_masks: Optional[torch.Tensor] = None) -> "BasisConv2d":
        r"""The full-rank split of ``conv`` (an ``nn.Conv2d`` or :class:`fastmdl.Conv2d`,
        groups=1). With filter masks, the SVD spans only the filters some domain
        keeps and the input channels some domain's ``in_masks`` keeps: the rest
        are 0 in every domain's output or input, so the layer stays exact."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"BasisConv2d needs groups=1, got a convolution with groups="
                             f"{conv.groups}")
        c_out, c_in, kh, kw = conv.weight.shape
        masked = isinstance(conv, Conv2d) and conv.prunable
        rows = torch.arange(c_out, device=conv.weight.device)
        kept = hard_mask(conv.scores, conv.mask_block) if masked else None
        if masked and bool(kept.any()):
            rows = kept.any(dim=0).nonzero().squeeze(1)
        cols = torch.arange(c_in * kh * kw, device=conv.weight.device)
        if in_masks is not None and bool(in_masks.any()):
            live = (in_masks != 0).any(dim=0).repeat_interleave(kh * kw)
            cols = live.nonzero().squeeze(1)
        w = conv.weight.detach().reshape(c_out, -1).double()
        u, s, vh = torch.linalg.svd(w[rows][:, cols], full_matrices=False)
        basis = w.new_zeros((s.numel(), c_in * kh * kw))
        basis[:, cols] = vh
        mapping = w.new_zeros((c_out, s.numel()))
        mapping[rows] = u * s
        dtype = conv.weight.dtype
        new = cls(basis.reshape(-1, c_in, kh, kw).to(dtype), mapping.to(dtype), conv.bias,
                  num_domains=num_domains, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, padding_mode=conv.padding_mode,
                  scores=conv.scores if isinstance(conv, Conv2d) else None,
                  prunable=masked, in_masks=in_masks)
        new.mask_block = conv.mask_block if masked else 1
        return new

    @property
    def rank(self) -> int:
        """Number of basis components held (the union over domains once pruned)."""
        return self.basis.shape[0]

    def masks(self) -> Optional[torch.Tensor]:
        """(D, C_out) binary filter masks (straight-through), or None if unmasked."""
        return binarize(self.scores, self.mask_block) if self.prunable else None

    def forward(self, x: torch.Tensor, domain: Optional[_domain.Domain] = None) -> torch.Tensor:
        domain = _resolve_domain(self, x, domain)
        padding = list(self.padding)
        if self.padding_mode != "zeros":
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = [0, 0]
        if self.pruned:
            z = torch.ops.fastmdl.domain_conv2d(
                x, self.basis, _domain.as_tensor(domain, x.shape[0], x.device), self.in_index,
                self.in_offsets, self.comp_index, self.comp_offsets, self.factors, None, None,
                False, list(self.stride), padding, list(self.dilation), self.backend)
        else:
            z = F.conv2d(x, self.basis, None, self.stride, padding, self.dilation)
            s = self.factors[domain]
            z = z * (s.view(1, -1, 1, 1) if isinstance(domain, int) else s[:, :, None, None])
        y = F.conv2d(z, self.mapping, self.bias)
        return apply_mask(y, self.masks(), domain) if self.prunable else y

    @torch.no_grad()
    def _prune_(self, keep: torch.Tensor, fallback: int) -> None:
        """Keep the components some row of the (D, r) bool ``keep`` has (or only
        ``fallback``, used by no domain, if none has any); domain d uses ``keep[d]``."""
        idx = keep.any(dim=0).nonzero().squeeze(1)
        if idx.numel() == 0:  # a zero-width tensor would need special cases downstream
            idx = torch.tensor([fallback], device=keep.device)
        self.basis = nn.Parameter(self.basis[idx].clone(), requires_grad=False)
        self.mapping = nn.Parameter(self.mapping[:, idx].clone(), requires_grad=False)
        self.factors = nn.Parameter(self.factors[:, idx].clone(),
                                    requires_grad=self.factors.requires_grad)
        self.components = keep[:, idx].float()
        for name, m in (("in", self.in_masks), ("comp", self.components)):
            index, offsets = index_lists(m)
            self.register_buffer(f"{name}_index", index)
            self.register_buffer(f"{name}_offsets", offsets)
        self.pruned = True

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"rank={self.rank}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, num_domains={self.num_domains}, pruned={self.pruned}")
