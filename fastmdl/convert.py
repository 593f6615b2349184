"""``fastmdl.convert``: any CNN into a :class:`MultiDomainModel`."""

from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import nn

from . import _domain, channels_last, graph
from .conv_heads import ClassPadding, ConvHeads
from .head_path import find_head
from .layers import BatchNorm2d, Conv2d, DomainHeads, _check_classes, _check_num_domains
from .masks import MaskGroup, Segment


class MultiDomainModel(nn.Module):
    """A network whose convolutions, BatchNorms and classifier are per-domain.

    ``forward(x, domain)`` runs the wrapped model's own, unmodified ``forward(x)``
    with ``domain`` (an int or an int64 tensor of shape (N,)) made visible to its
    fastmdl layers for the duration of the call; the hand-over is per thread, so
    several threads may run one model at once. Returns the head's
    (N, max(num_classes)) logits, -inf past each domain's classes: a linear head
    gives them so, and with a convolutional head (:class:`fastmdl.ConvHeads`)
    ``class_padding`` sets them on the wrapped model's output (None otherwise).

    Built by :func:`convert`; ``mask_groups()`` lists the prunable filter groups.
    """

    def __init__(self, module: nn.Module, num_domains: int, num_classes: Sequence[int],
                 input_size: Tuple[int, int, int], channel_graph: graph.ChannelGraph,
                 input_size_source: str = "given"):
        super().__init__()
        self.module = module
        self.num_domains = num_domains
        self.num_classes = list(num_classes)
        self.input_size = tuple(input_size)
        # "given" (by the user), "trained" (read off the training data by `train`)
        # or "assumed" (neither: the (C, 224, 224) convert traced at).
        self.input_size_source = _check_source(input_size_source)
        self._graph = channel_graph
        self._groups = _wire_masks(module, channel_graph)
        head = channel_graph.head
        self.class_padding = None
        if head is not None and isinstance(module.get_submodule(head), ConvHeads):
            self.class_padding = ClassPadding(num_classes, next(module.parameters()).device)

    def forward(self, x: torch.Tensor, domain: _domain.Domain) -> torch.Tensor:
        out = _domain.run(self.module, x, domain, self.num_domains)
        if self.class_padding is not None:
            out = self.class_padding(out, domain)
        return out

    def set_input_size(self, input_size: Tuple[int, int, int], source: str = "given") -> None:
        """Cost the model (and later serve its pruned network) at ``input_size`` =
        (C, H, W); ``source`` says where the size comes from ("given", "trained").
        The channel graph is re-traced at that size; the masks are unchanged."""
        size = _check_input_size(input_size, self.input_size[0])
        if size[0] != self.input_size[0]:
            raise ValueError(f"input_size must keep the model's {self.input_size[0]} input "
                             f"channels, got {size}")
        if size != self.input_size:
            self._graph = analyse_at(self, size)
            self.input_size = size
        self.input_size_source = _check_source(source)

    def frozen_layers(self) -> Dict[str, object]:
        """The convolutions whose filters the channel analysis had to keep whole.

        Returns ``{"layers": [(name, weights), ...], "held": h, "unprunable": f}``:
        each convolution whose output channels are frozen (an op the analysis
        cannot follow reads or writes them) with its weight count; the fraction h
        of all convolution weights those layers hold (only their input channels
        can still be pruned); and the fraction f that no mask can remove, i.e. the
        weights whose filter AND input channel are both frozen. The image's
        channels are frozen by nature, so a first convolution counts only through
        its filters."""
        g = self._graph
        layers, stuck, total = [], 0.0, 0
        for info in g.layers.values():
            if info.kind != "conv":
                continue
            n = info.module.weight.numel()
            total += n
            if not all(g.is_frozen(sp) for sp, _, _ in info.out_axis.segments):
                continue
            layers.append((info.name, n))
            width = info.in_axis.width if info.in_axis is not None else 0
            frozen_in = (sum(w for sp, _, w in info.in_axis.segments if g.is_frozen(sp))
                         if info.in_axis is not None else 0)
            stuck += n * (frozen_in / width if width else 1.0)
        held = sum(n for _, n in layers)
        return {"layers": layers, "held": held / total if total else 0.0,
                "unprunable": stuck / total if total else 0.0}

    def mask_groups(self) -> List[MaskGroup]:
        """The prunable groups: filters tied by the graph share one (D, C) ``scores``."""
        return list(self._groups)

    def layer_infos(self) -> Dict[str, graph.LayerInfo]:
        """Every conv, BatchNorm, linear layer and head with the channel segments it
        reads (see ``fastmdl/graph.py``); used by the cost model and ``prune``."""
        return self._graph.layers

    def extra_repr(self) -> str:
        return (f"num_domains={self.num_domains}, num_classes={self.num_classes}, "
                f"mask_groups={len(self._groups)}")


def convert(model: nn.Module, num_domains: int, num_classes: Optional[Sequence[int]] = None, *,
            input_size: Tuple[int, int, int] = None,
            score_init: Union[float, str] = "magnitude",
            rewrite_channels_last: bool = True) -> MultiDomainModel:
    """A multi-domain copy of ``model`` (the original is left untouched).

    Every ``nn.Conv2d`` becomes a :class:`fastmdl.Conv2d` and every
    ``nn.BatchNorm2d`` a :class:`fastmdl.BatchNorm2d`, with weights and statistics
    copied into each of the ``num_domains`` domains; the classifier becomes
    per-domain heads with ``num_classes[d]`` classes for domain d (default: the
    original classifier's, for every domain): :class:`fastmdl.DomainHeads` for the
    ``nn.Linear`` whose output is the model's output (possibly through dropout),
    :class:`fastmdl.ConvHeads` for a convolution whose output reaches it through
    ops that keep its channels apart (SqueezeNet's convolution, ReLU and global
    pooling; see ``fastmdl/head_path.py``). Any other model is refused with a
    ``ValueError`` that names the layer and the reason. Channels-last blocks
    (ConvNeXt's permute, LayerNorm, ``nn.Linear`` MLP, permute back) are first
    rewritten to run channels-first (``fastmdl/channels_last.py``): their linear
    layers become 1x1 convolutions that prune like any other, and ``model.module``
    is then the rewritten ``torch.fx.GraphModule`` (which keeps the layers and
    their names, not the model class's own methods; ``rewrite_channels_last=False``
    keeps the model as it is, and such blocks whole). The model is traced
    with torch.fx at ``input_size`` = (C, H, W) to find the filters tied together,
    which then share one mask; costs are counted, and the pruned network served,
    at that size. Without ``input_size``, :func:`fastmdl.train` takes the size of
    the training images; until then the model is traced at (C_in, 224, 224) and
    ``input_size_source`` is "assumed", which :func:`fastmdl.cost_report` says.

    ``score_init`` starts every mask score at that number, or with "magnitude"
    (the default) at each filter's L1 norm (summed over the group's
    convolutions) over the group's mean: every filter starts kept, and under a
    budget the weakest filters of a group reach 0 first instead of all at once.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    num_domains = _check_num_domains(num_domains)
    if not isinstance(rewrite_channels_last, bool):
        raise TypeError(f"rewrite_channels_last must be a bool, got "
                        f"{type(rewrite_channels_last).__name__}")
    if score_init != "magnitude" and (isinstance(score_init, bool) or not isinstance(
            score_init, (int, float)) or not score_init > 0):
        raise ValueError(f"score_init must be a positive number or 'magnitude', got {score_init!r}")
    inner = copy.deepcopy(model)
    convs = [m for m in inner.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Conv2d: fastmdl prunes "
                         "convolution filters, so there is nothing to convert")
    source = "assumed" if input_size is None else "given"
    input_size = _check_input_size(input_size, convs[0].in_channels)
    example = torch.randn((1,) + input_size, device=convs[0].weight.device,
                          dtype=convs[0].weight.dtype)
    if rewrite_channels_last:
        inner = _channels_first(inner, example, input_size)
    if num_classes is not None:
        num_classes = _check_classes(num_classes)
        if len(num_classes) != num_domains:
            raise ValueError(f"num_classes must list one class count per domain "
                             f"({num_domains}), got {len(num_classes)}")

    for name, m in list(inner.named_modules()):
        if isinstance(m, (Conv2d, BatchNorm2d, DomainHeads, ConvHeads)):
            if m.num_domains != num_domains:
                raise ValueError(f"{name} already has {m.num_domains} domains, not {num_domains}")
        elif isinstance(m, nn.Conv2d):
            _replace(inner, name, Conv2d.from_conv(
                m, num_domains, 1.0 if score_init == "magnitude" else score_init))
        elif isinstance(m, nn.BatchNorm2d):
            _replace(inner, name, BatchNorm2d.from_batchnorm(m, num_domains))

    gm = _traced(inner, example, input_size)
    head_name = find_head(gm)
    head = inner.get_submodule(head_name)
    if isinstance(head, (DomainHeads, ConvHeads)):
        if num_classes is not None and list(num_classes) != head.num_classes:
            raise ValueError(f"the model's {type(head).__name__} has num_classes "
                             f"{head.num_classes}, not {list(num_classes)}")
        classes = head.num_classes
    else:
        width = head.out_features if isinstance(head, nn.Linear) else head.out_channels
        classes = num_classes or [width] * num_domains
        _replace(inner, head_name, _heads(head_name, head, classes))
        gm = _traced(inner, example, input_size)
    model = MultiDomainModel(inner, num_domains, classes, input_size, graph.analyse(gm), source)
    _warn_frozen(model)
    if score_init == "magnitude":
        with torch.no_grad():
            for g in model.mask_groups():
                l1 = sum(inner.get_submodule(n).weight.abs().flatten(1).sum(1) for n in g.members)
                g.scores.copy_((l1 / l1.mean().clamp(min=1e-12)).clamp(min=1e-3)
                               .expand_as(g.scores))
    return model


def analyse_at(model: MultiDomainModel, input_size: Tuple[int, int, int]) -> graph.ChannelGraph:
    """The channel graph of ``model`` with layer sizes for inputs of ``input_size``;
    the groups are the model's own (they do not depend on the size)."""
    if tuple(input_size) == model.input_size:
        return model._graph
    p = next(model.parameters())
    example = torch.randn((1,) + tuple(input_size), device=p.device, dtype=p.dtype)
    return graph.analyse(_traced(model.module, example, tuple(input_size)))


def _channels_first(inner: nn.Module, example: torch.Tensor, input_size) -> nn.Module:
    """``inner``, or its traced graph module with every channels-last block rewritten
    to run channels-first (``fastmdl/channels_last.py``) if it has any: then the
    blocks' linear layers are 1x1 convolutions and prune like any other."""
    gm = _traced(inner, example, input_size)
    return gm if channels_last.to_channels_first(gm, inner) else inner


def _traced(inner: nn.Module, example: torch.Tensor, input_size) -> fx.GraphModule:
    gm = graph.trace(inner)
    try:
        graph.shape_propagate(gm, example)
    except Exception as e:
        raise ValueError(f"running the model on an input of size {input_size} failed "
                         f"({type(e).__name__}: {e}); pass input_size=(C, H, W) that the "
                         "model accepts") from e
    return gm


def _heads(name: str, head: nn.Module, classes: List[int]) -> nn.Module:
    """The per-domain heads replacing the classifier ``head`` (an ``nn.Linear`` or
    the convolution ``find_head`` accepted)."""
    if isinstance(head, nn.Linear):
        return DomainHeads.from_linear(head, classes)
    try:
        return ConvHeads.from_conv(head, classes)
    except ValueError as e:
        raise ValueError(f"the classifier head is the convolution {name!r}, but {e}") from None


def _warn_frozen(model: MultiDomainModel) -> None:
    """Say which convolutions keep all their filters, and what that costs: a
    network converted with half of it frozen is a different product from one
    fully prunable, and the user should not learn it from the pruned size."""
    report = model.frozen_layers()
    layers = report["layers"]
    if not layers:
        return
    names = ", ".join(name for name, _ in layers[:8]) + (", ..." if len(layers) > 8 else "")
    convs = sum(1 for i in model.layer_infos().values() if i.kind == "conv")
    warnings.warn(
        f"fastmdl.convert: {len(layers)} of {convs} convolutions keep all their filters "
        f"(frozen: an op the channel analysis cannot follow, or the model's output, uses "
        f"their channels): {names}. They hold {100 * report['held']:.1f}% of the "
        f"convolution weights, prunable only through their input channels; "
        f"{100 * report['unprunable']:.1f}% cannot be pruned at all. "
        f"model.frozen_layers() lists them.",
        UserWarning, stacklevel=3)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


INPUT_SIZE_SOURCES = ("given", "trained", "assumed")


def _check_source(source: str) -> str:
    if source not in INPUT_SIZE_SOURCES:
        raise ValueError(f"input_size_source must be one of {INPUT_SIZE_SOURCES}, got {source!r}")
    return source


def _check_input_size(input_size, channels: int) -> Tuple[int, int, int]:
    if input_size is None:
        return (channels, 224, 224)
    if (not isinstance(input_size, (tuple, list)) or len(input_size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                       for v in input_size)):
        raise ValueError(f"input_size must be (C, H, W) of positive ints, got {input_size!r}")
    return tuple(input_size)


def _wire_masks(module: nn.Module, g: graph.ChannelGraph) -> List[MaskGroup]:
    """Tie the scores of each group's convolutions to one Parameter, mark the
    convolutions of frozen spaces unprunable, and give each BatchNorm the masks of
    its channels. A group's members are every convolution writing its channels:
    those a residual add ties, a depthwise or grouped convolution over them (its
    filter c is kept exactly where channel c is; a grouped one's channels go in
    blocks, see ``fastmdl/graph.py``) and a squeeze-and-excitation gate's last
    convolution (its gate c multiplies channel c)."""
    groups = []
    scores_of: Dict[int, nn.Parameter] = {}
    for root, members in g.groups().items():
        convs = [g.layers[m].module for m in members]
        scores = convs[0].scores
        for name, c in zip(members, convs):
            if c.scores.shape != scores.shape:
                raise ValueError(f"convolution {name} writes the channels of mask group "
                                 f"{members[0]} but has {tuple(c.scores.shape)} mask scores, "
                                 f"not the group's {tuple(scores.shape)}")
            c.scores = scores
            c.prunable = True
            c.mask_block = g.block(root)
        scores_of[root] = scores
        groups.append(MaskGroup(members[0], tuple(members), scores, g.block(root)))
    def masked(axis: graph.Axis) -> Optional[List[Segment]]:
        segs = [Segment(scores_of.get(g.find(s)), w, g.block(s), first)
                for s, first, w in axis.segments]
        return segs if any(seg.scores is not None for seg in segs) else None

    for info in g.layers.values():
        if info.kind == "conv":
            # A depthwise conv over parts of several groups is masked like its input.
            info.module.out_segments = masked(info.out_axis) if info.out_space is None \
                else None
        if info.kind == "conv" and (info.out_space is None
                                    or g.find(info.out_space) not in scores_of):
            info.module.prunable = False
            info.module.scores.requires_grad_(False)
        if info.kind == "bn":
            info.module.mask_segments = masked(info.in_axis)
    return groups
